"""GroupNorm / LayerNorm affine and Embedding kernels (through the torch ops) against the
pure-JAX oracle, dpprims.reference (float64).

CPU: the Triton kernels run through the interpreter (conftest). Inputs are fresh random values
at odd and power-of-two shapes; every output buffer starts as NaN (POISON) so an element a kernel
forgets to write fails.
"""
import math

import numpy as np
import pytest
import torch

jnp = pytest.importorskip("jax.numpy")
from dpprims import reference as ref  # noqa: E402
from dpprims.bindings.torch import _backend  # noqa: E402
from dpprims.bindings.torch import embedding as eops  # noqa: E402
from dpprims.bindings.torch import norm_affine as nops  # noqa: E402

# max |out - ref| / max |ref| allowed. Norm-affine inputs are compared on the very values the
# kernel reads (x, G in their dtype, fp32 statistics), so only fp32 accumulation differs and
# every dtype gets the fp32 tolerance; ``TOL_HALF_STATS`` is for statistics stored in half
# precision by torch itself (a half model without autocast).
TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
TOL_HALF_STATS = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
# Embedding: G G^T in half precision operands (fp32 accumulation), the clipped sum rounds c_i * G
# to the operand dtype once.
TOL_EMB = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
TOL_EMB_SUM = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

NORM_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
               pytest.param(torch.bfloat16, id="bf16")]  # no tl.dot in these kernels: bf16 is fine on CPU
EMB_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
              pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu)]  # interpreter tl.dot on bf16 is wrong

GN_SHAPES = [  # B, C, spatial, num_groups
    pytest.param(5, 6, (7,), 3, id="B5-C6-L7-g3"),
    pytest.param(3, 8, (), 4, id="B3-C8-2d-g4"),
    pytest.param(2, 12, (5, 3), 1, id="B2-C12-5x3-g1"),
    pytest.param(4, 6, (3, 5), 6, id="B4-C6-3x5-g6"),
    pytest.param(2, 130, (3,), 2, id="B2-C130-L3-g2"),  # several channel blocks
    pytest.param(1, 4, (17, 19), 2, id="B1-C4-17x19-g2"),  # several position blocks
]
LN_SHAPES = [  # x shape, normalized_shape
    pytest.param((5, 9), (9,), id="B5-D9"),
    pytest.param((4, 7, 13), (13,), id="B4-T7-D13"),
    pytest.param((3, 5, 4, 6), (4, 6), id="B3-T5-norm4x6"),
    pytest.param((2, 3, 4, 5), (5,), id="B2-3x4-D5"),
    pytest.param((2, 300, 3), (3,), id="B2-T300-D3"),  # several position blocks
    pytest.param((2, 3, 200), (200,), id="B2-T3-D200"),  # several channel blocks
]


@pytest.fixture(autouse=True)
def poison():
    _backend.POISON = True
    yield
    _backend.POISON = False


def _rng():
    return np.random.default_rng()


def _t(a, dtype, device):
    return torch.tensor(a, dtype=dtype, device=device)


def _np64(x):
    return jnp.asarray(x.detach().double().cpu().numpy())


def _check(out, expected, tol, what):
    out = np.asarray(out.detach().double().cpu().numpy())
    expected = np.asarray(expected, dtype=np.float64)
    assert out.shape == expected.shape, f"{what}: shape {out.shape} != {expected.shape}"
    assert np.all(np.isfinite(out)), f"{what}: non-finite output (unwritten element?) {out}"
    err = np.max(np.abs(out - expected)) / max(np.max(np.abs(expected)), 1e-30) if out.size else 0.0
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}\nout={out.ravel()[:8]}\nref={expected.ravel()[:8]}"


# --------------------------------------------------------------------------------------------
# GroupNorm / LayerNorm affine
# --------------------------------------------------------------------------------------------
def _gn_case(B, C, spatial, groups, dtype, device, scale=2.0):
    rng = _rng()
    x = _t(rng.standard_normal((B, C, *spatial)) * scale + 0.5, dtype, device)
    G = _t(rng.standard_normal((B, C, *spatial)), dtype, device)
    _, mean, rstd = torch.ops.aten.native_group_norm(x.float(), None, None, B, C, math.prod(spatial), groups, 1e-5)
    return x, G, mean, rstd


def _ln_case(shape, norm_shape, dtype, device, scale=2.0):
    rng = _rng()
    x = _t(rng.standard_normal(shape) * scale - 0.3, dtype, device)
    G = _t(rng.standard_normal(shape), dtype, device)
    _, mean, rstd = torch.ops.aten.native_layer_norm(x.float(), list(norm_shape), None, None, 1e-5)
    return x, G, mean, rstd


def _split(pe, sq, channel_shape):
    B = pe.shape[0]
    return (pe[:, 0].reshape(B, *channel_shape), pe[:, 1].reshape(B, *channel_shape), sq[:, 0], sq[:, 1])


def _check_affine(pe, sq, xh64, G64, channel_axis, channel_shape, tol, what):
    dw, db = ref.norm_affine_per_example_grads(xh64, G64, channel_axis)
    sw, sb = ref.norm_affine_sq_norms(xh64, G64, channel_axis)
    got = _split(pe, sq, channel_shape)
    for out, want, name in zip(got, (dw, db, sw, sb), ("dweight", "dbias", "|dweight|^2", "|dbias|^2")):
        _check(out, want, tol, f"{what} {name}")


@pytest.mark.parametrize("dtype", NORM_DTYPES)
@pytest.mark.parametrize("B,C,spatial,groups", GN_SHAPES)
def test_groupnorm_affine_grads(B, C, spatial, groups, dtype, device):
    x, G, mean, rstd = _gn_case(B, C, spatial, groups, dtype, device)
    pe, sq = nops.groupnorm_affine_grads(x, G, mean, rstd, groups)
    assert _backend.LAST_BACKEND["groupnorm_affine_grads"] == ("triton" if device == "cuda" else "triton-interpreter")
    xh64 = ref.groupnorm_xhat(_np64(x), groups)
    _check_affine(pe, sq, xh64, _np64(G), 1, (C,), TOL[dtype], "groupnorm")


@pytest.mark.parametrize("dtype", NORM_DTYPES)
@pytest.mark.parametrize("shape,norm_shape", LN_SHAPES)
def test_layernorm_affine_grads(shape, norm_shape, dtype, device):
    x, G, mean, rstd = _ln_case(shape, norm_shape, dtype, device)
    pe, sq = nops.layernorm_affine_grads(x, G, mean, rstd, len(norm_shape))
    xh64 = ref.layernorm_xhat(_np64(x), norm_shape)
    axes = tuple(range(len(shape) - len(norm_shape), len(shape)))
    _check_affine(pe, sq, xh64, _np64(G), axes, norm_shape, TOL[dtype], "layernorm")


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")])
def test_half_statistics_and_mixed_dtypes(dtype, device):
    """A half model without autocast: torch stores mean / rstd in half too (x_hat is then what
    torch's own backward uses); under CUDA autocast x stays half while G is fp32."""
    rng = _rng()
    x = _t(rng.standard_normal((3, 8, 5, 2)), dtype, device)
    G = _t(rng.standard_normal((3, 8, 5, 2)), dtype, device)
    _, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, 3, 8, 10, 2, 1e-5)
    pe, sq = nops.groupnorm_affine_grads(x, G, mean, rstd, 2)
    _check_affine(pe, sq, ref.groupnorm_xhat(_np64(x), 2), _np64(G), 1, (8,), TOL_HALF_STATS[dtype], "half stats")
    # autocast layout: x half, G and the statistics fp32
    x, G32, mean, rstd = _ln_case((4, 6, 10), (10,), dtype, device)
    G32 = G32.float()
    pe, sq = nops.layernorm_affine_grads(x, G32, mean, rstd, 1)
    _check_affine(pe, sq, ref.layernorm_xhat(_np64(x), (10,)), _np64(G32), -1, (10,), 1e-5, "x half, G fp32")


def test_xhat_given_directly(device):
    """mean = rstd = None: x is read as x_hat itself (HAS_STATS=False)."""
    rng = _rng()
    xh = _t(rng.standard_normal((4, 6, 11)), torch.float32, device)
    G = _t(rng.standard_normal((4, 6, 11)), torch.float32, device)
    pe, sq = nops.groupnorm_affine_grads(xh, G, None, None, 3)
    _check_affine(pe, sq, _np64(xh), _np64(G), 1, (6,), 1e-5, "gn x_hat")
    pe, sq = nops.layernorm_affine_grads(xh, G, None, None, 1)
    _check_affine(pe, sq, _np64(xh), _np64(G), -1, (11,), 1e-5, "ln x_hat")


def test_strided_and_channels_last_inputs(device):
    rng = _rng()
    x = _t(rng.standard_normal((3, 6, 4, 5)), torch.float32, device).to(memory_format=torch.channels_last)
    G = _t(rng.standard_normal((3, 6, 5, 4)), torch.float32, device).transpose(2, 3)  # not viewable as [B, C, S]
    _, mean, rstd = torch.ops.aten.native_group_norm(x.contiguous(), None, None, 3, 6, 20, 3, 1e-5)
    assert not x.is_contiguous()
    pe, sq = nops.groupnorm_affine_grads(x, G, mean, rstd, 3)
    _check_affine(pe, sq, ref.groupnorm_xhat(_np64(x), 3), _np64(G), 1, (6,), 1e-5, "channels_last")
    x, _, mean, rstd = _ln_case((4, 5, 7), (7,), torch.float32, device)
    G = _t(rng.standard_normal((5, 4, 7)), torch.float32, device).transpose(0, 1)  # [4, 5, 7], batch stride 7
    assert not G.is_contiguous()
    pe, sq = nops.layernorm_affine_grads(x, G, mean, rstd, 1)
    _check_affine(pe, sq, ref.layernorm_xhat(_np64(x), (7,)), _np64(G), -1, (7,), 1e-5, "strided G")


@pytest.mark.parametrize("dtype", NORM_DTYPES)
def test_norm_affine_clipped_grads_drop_nonfinite_example(dtype, device):
    """sum_i c_i (dweight_i, dbias_i); c_i = 0 for an example whose G holds NaN / inf."""
    x, G, mean, rstd = _gn_case(5, 6, (3, 4), 2, dtype, device)
    G[1, 2, 0, 0] = float("nan")
    G[3, 0, 1, 1] = float("inf")
    pe, sq = nops.groupnorm_affine_grads(x, G, mean, rstd, 2)
    assert not torch.isfinite(sq[1]).all() and not torch.isfinite(sq[3]).all()
    c = torch.rand(5, device=device) + 0.1
    c[1] = c[3] = 0.0
    dw, db = nops.norm_affine_clipped_grads(pe, c)
    keep = np.array([0, 2, 4])
    xh64 = ref.groupnorm_xhat(_np64(x), 2)[keep]
    want_w, want_b = ref.norm_affine_clipped_grads(xh64, _np64(G)[keep], _np64(c)[keep], 1)
    _check(dw, want_w, TOL[dtype], "clipped dweight")
    _check(db, want_b, TOL[dtype], "clipped dbias")


def test_clipped_rows_sum_is_deterministic_and_exact(device):
    rng = _rng()
    X = _t(rng.standard_normal((300, 37)), torch.float32, device)  # several row blocks
    c = torch.rand(300, device=device)
    c[::7] = 0.0
    X[::7] = float("nan")
    out = nops.clipped_rows_sum(X, c)
    keep = c != 0
    _check(out, (X[keep].double() * c[keep, None].double()).sum(0).cpu().numpy(), 1e-5, "rows sum")
    assert torch.equal(out, nops.clipped_rows_sum(X, c)), "rerun differs"


def test_norm_empty_batch(device):
    x = torch.zeros(0, 6, 4, device=device)
    pe, sq = nops.groupnorm_affine_grads(x, x, torch.zeros(0, 3, device=device), torch.zeros(0, 3, device=device), 3)
    assert pe.shape == (0, 2, 6) and sq.shape == (0, 2)
    pe, sq = nops.layernorm_affine_grads(x, x, torch.zeros(0, 6, 1, device=device), torch.zeros(0, 6, 1, device=device), 1)
    assert pe.shape == (0, 2, 4) and sq.shape == (0, 2)
    dw, db = nops.norm_affine_clipped_grads(pe, torch.zeros(0, device=device))
    assert dw.shape == (4,) and torch.all(dw == 0) and torch.all(db == 0)


def test_norm_bad_arguments(device):
    x = torch.randn(2, 6, 3, device=device)
    with pytest.raises(ValueError, match="num_groups=4 must divide"):
        nops.groupnorm_affine_grads(x, x, None, None, 4)
    with pytest.raises(ValueError, match="both mean and rstd"):
        nops.groupnorm_affine_grads(x, x, torch.zeros(2, 3, device=device), None, 3)
    with pytest.raises(ValueError, match="mean must have 6 elements"):
        nops.groupnorm_affine_grads(x, x, torch.zeros(2, 2, device=device), torch.zeros(2, 2, device=device), 3)
    with pytest.raises(ValueError, match="normalized_ndim=3"):
        nops.layernorm_affine_grads(x, x, None, None, 3)
    with pytest.raises(ValueError, match="same shape"):
        nops.layernorm_affine_grads(x, x[:, :3], None, None, 1)


def test_norm_torch_fallback_matches_oracle(device, monkeypatch):
    """The plain-torch backend (CPU without the interpreter) computes the same math."""
    if device != "cpu":
        pytest.skip("the plain-torch backend runs on CPU only")
    monkeypatch.setattr(_backend, "interpreting", lambda: False)
    x, G, mean, rstd = _gn_case(3, 6, (4, 3), 3, torch.float32, device)
    pe, sq = nops.groupnorm_affine_grads(x, G, mean, rstd, 3)
    assert _backend.LAST_BACKEND["groupnorm_affine_grads"] == "torch"
    _check_affine(pe, sq, ref.groupnorm_xhat(_np64(x), 3), _np64(G), 1, (6,), 1e-5, "torch gn")
    x, G, mean, rstd = _ln_case((3, 4, 5, 6), (5, 6), torch.float32, device)
    pe, sq = nops.layernorm_affine_grads(x, G, mean, rstd, 2)
    _check_affine(pe, sq, ref.layernorm_xhat(_np64(x), (5, 6)), _np64(G), (2, 3), (5, 6), 1e-5, "torch ln")
    c = torch.rand(3)
    c[1] = 0
    pe[1] = float("nan")
    dw, db = nops.norm_affine_clipped_grads(pe, c)
    want = (pe[[0, 2]].double() * c[[0, 2], None, None].double()).sum(0)
    _check(dw, want[0].numpy(), 1e-6, "torch clipped dw")
    _check(db, want[1].numpy(), 1e-6, "torch clipped db")


# --------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------
EMB_SHAPES = [  # B, T, P, V, padding_idx   (T > V forces repeated ids within an example)
    pytest.param(5, 7, 11, 4, None, id="B5-T7-P11-V4"),
    pytest.param(3, 70, 9, 6, 2, id="B3-T70-P9-V6-pad2"),  # several (s, t) tiles
    pytest.param(4, 1, 13, 5, 0, id="B4-T1-P13-V5-pad0"),  # ids [B]
    pytest.param(2, 33, 130, 50, 49, id="B2-T33-P130-V50-pad49"),  # several p blocks
    pytest.param(3, 20, 5, 150, 7, id="B3-T20-P5-V150-pad7"),  # several v blocks, most rows unused
    pytest.param(2, 16, 64, 16, None, id="B2-T16-P64-V16"),
]


def _emb_case(B, T, P, V, pad, dtype, device, id_dtype=torch.int64):
    rng = _rng()
    ids = torch.tensor(rng.integers(0, V, (B, T)), dtype=id_dtype, device=device)
    if pad is not None and B * T:
        ids[0, 0] = pad  # at least one padding position
    G = _t(rng.standard_normal((B, T, P)), dtype, device)
    if T == 1:
        ids, G = ids[:, 0], G[:, 0]  # the [B] / [B, P] form
    return ids, G


@pytest.mark.parametrize("dtype", EMB_DTYPES)
@pytest.mark.parametrize("B,T,P,V,pad", EMB_SHAPES)
def test_embedding_sq_norms(B, T, P, V, pad, dtype, device):
    ids, G = _emb_case(B, T, P, V, pad, dtype, device)
    out = eops.embedding_sq_norms(ids, G, pad)
    want = ref.embedding_sq_norms(jnp.asarray(ids.cpu().numpy()), _np64(G), pad, V)
    _check(out, want, TOL_EMB[dtype], "embedding norm")
    # the oracle's ghost form agrees with its materialised per-example gradients
    pe = ref.embedding_per_example_grads(jnp.asarray(ids.cpu().numpy()), _np64(G), V, pad)
    _check(torch.tensor(np.asarray(want)), np.sum(np.asarray(pe) ** 2, axis=(1, 2)), 1e-12, "oracle ghost")


@pytest.mark.parametrize("dtype", EMB_DTYPES)
@pytest.mark.parametrize("B,T,P,V,pad", EMB_SHAPES)
def test_embedding_clipped_grad(B, T, P, V, pad, dtype, device):
    ids, G = _emb_case(B, T, P, V, pad, dtype, device)
    c = torch.rand(B, device=device, dtype=torch.float32)
    out = eops.embedding_clipped_grad(ids, G, c, V, pad)
    want = ref.embedding_clipped_grad(jnp.asarray(ids.cpu().numpy()), _np64(G), _np64(c), V, pad)
    _check(out, want, TOL_EMB_SUM[dtype], "embedding clipped grad")
    if pad is not None:
        assert torch.all(out[pad] == 0), "the padding row must receive nothing"


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64, torch.int16], ids=["int32", "int64", "int16"])
def test_embedding_id_dtypes(id_dtype, device):
    ids, G = _emb_case(3, 9, 7, 5, 1, torch.float32, device, id_dtype)
    c = torch.rand(3, device=device)
    ids64 = jnp.asarray(ids.long().cpu().numpy())
    _check(eops.embedding_sq_norms(ids, G, 1), ref.embedding_sq_norms(ids64, _np64(G), 1), 1e-5, "norm")
    _check(eops.embedding_clipped_grad(ids, G, c, 5, 1), ref.embedding_clipped_grad(ids64, _np64(G), _np64(c), 5, 1),
           1e-5, "clipped")


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")  # the interpreter's dot on the inf row
def test_embedding_nonfinite_rows(device):
    """A NaN at a padding position is ignored (padding contributes nothing, torch semantics);
    an example with NaN elsewhere has a non-finite norm and, dropped with c_i = 0, adds nothing."""
    ids, G = _emb_case(4, 10, 6, 5, 3, torch.float32, device)
    ids[0, 4] = 3
    G[0, 4] = float("nan")  # padding position of example 0
    ids[2, 5] = 1
    G[2, 5, 2] = float("inf")  # a real token of example 2
    norms = eops.embedding_sq_norms(ids, G, 3)
    assert torch.isfinite(norms[[0, 1, 3]]).all() and not torch.isfinite(norms[2])
    G_clean = G.clone()
    G_clean[0, 4] = 0.0
    keep = np.array([0, 1, 3])
    ids64 = jnp.asarray(ids.cpu().numpy())
    _check(norms[keep], ref.embedding_sq_norms(ids64, _np64(G_clean), 3)[keep], 1e-5, "finite norms")
    c = torch.rand(4, device=device) + 0.1
    c[2] = 0.0
    out = eops.embedding_clipped_grad(ids, G, c, 5, 3)
    want = ref.embedding_clipped_grad(ids64[keep], _np64(G_clean)[keep], _np64(c)[keep], 5, 3)
    _check(out, want, 1e-5, "clipped, example 2 dropped")


def test_embedding_deterministic(device):
    ids, G = _emb_case(6, 40, 24, 3, None, torch.float32, device)  # long segments per id
    c = torch.rand(6, device=device)
    a = eops.embedding_clipped_grad(ids, G, c, 3)
    b = eops.embedding_clipped_grad(ids, G, c, 3)
    assert torch.equal(a, b), "rerun differs"
    assert torch.equal(eops.embedding_sq_norms(ids, G), eops.embedding_sq_norms(ids, G))


def test_embedding_empty_and_all_padding(device):
    ids = torch.zeros(0, 5, dtype=torch.long, device=device)
    G = torch.zeros(0, 5, 4, device=device)
    c = torch.zeros(0, device=device)
    assert eops.embedding_sq_norms(ids, G).shape == (0,)
    out = eops.embedding_clipped_grad(ids, G, c, 7)
    assert out.shape == (7, 4) and torch.all(out == 0)
    # every position padding, every example dropped: zeros, all rows written
    ids = torch.full((3, 5), 2, dtype=torch.long, device=device)
    G = torch.randn(3, 5, 4, device=device)
    assert torch.all(eops.embedding_sq_norms(ids, G, 2) == 0)
    assert torch.all(eops.embedding_clipped_grad(ids, G, torch.ones(3, device=device), 7, 2) == 0)
    ids = torch.randint(0, 7, (3, 5), device=device)
    assert torch.all(eops.embedding_clipped_grad(ids, G, torch.zeros(3, device=device), 7) == 0)


def test_embedding_bad_arguments(device):
    ids = torch.randint(0, 5, (2, 3), device=device)
    G = torch.randn(2, 3, 4, device=device)
    c = torch.ones(2, device=device)
    with pytest.raises(TypeError, match="integer"):
        eops.embedding_sq_norms(ids.float(), G)
    with pytest.raises(ValueError, match="padding_idx must be None or >= 0"):
        eops.embedding_sq_norms(ids, G, -1)
    with pytest.raises(ValueError, match="out of range"):
        eops.embedding_clipped_grad(ids, G, c, 5, 5)
    with pytest.raises(ValueError, match=r"ids must be \[B, T\]"):
        eops.embedding_sq_norms(ids, G[:, :2])
    with pytest.raises(ValueError, match="clip factors"):
        eops.embedding_clipped_grad(ids, G, c[:1], 5)


def test_embedding_torch_fallback_matches_oracle(device, monkeypatch):
    if device != "cpu":
        pytest.skip("the plain-torch backend runs on CPU only")
    monkeypatch.setattr(_backend, "interpreting", lambda: False)
    ids, G = _emb_case(4, 9, 6, 5, 2, torch.float32, device)
    c = torch.rand(4)
    c[1] = 0
    G[1, 0, 0] = float("nan")
    ids64 = jnp.asarray(ids.numpy())
    out = eops.embedding_sq_norms(ids, G, 2)
    assert _backend.LAST_BACKEND["embedding_sq_norms"] == "torch"
    keep = np.array([0, 2, 3])
    _check(out[keep], ref.embedding_sq_norms(ids64, _np64(G), 2)[keep], 1e-5, "torch norm")
    _check(eops.embedding_clipped_grad(ids, G, c, 5, 2),
           ref.embedding_clipped_grad(ids64[keep], _np64(G)[keep], _np64(c)[keep], 5, 2), 1e-5, "torch clipped")


# --------------------------------------------------------------------------------------------
# torch.library registration, GPU compilation
# --------------------------------------------------------------------------------------------
def test_ops_pass_torch_library_opcheck(device):
    """Schemas, fake (meta) implementations and AOT dispatch are consistent (torch.compile)."""
    rng = _rng()
    x, G, mean, rstd = _gn_case(3, 6, (5,), 3, torch.float32, device)
    torch.library.opcheck(nops.groupnorm_affine_grads, (x, G, mean, rstd, 3))
    torch.library.opcheck(nops.groupnorm_affine_grads, (x, G, None, None, 3))
    x, G, mean, rstd = _ln_case((3, 4, 5), (5,), torch.float32, device)
    torch.library.opcheck(nops.layernorm_affine_grads, (x, G, mean, rstd, 1))
    torch.library.opcheck(nops.clipped_rows_sum, (_t(rng.standard_normal((4, 7)), torch.float32, device),
                                                  torch.rand(4, device=device)))
    ids, G = _emb_case(3, 6, 4, 5, 1, torch.float32, device)
    torch.library.opcheck(eops.embedding_sq_norms, (ids, G, 1))
    torch.library.opcheck(eops.embedding_clipped_grad, (ids, G, torch.rand(3, device=device), 5, 1))


_SM90_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from dpprims.kernels import embedding as ke, norm_affine as kn

target = GPUTarget("cuda", 90, 32)


def compile_(fn, sig, constexprs, num_warps):
    sig = {**sig, **{k: "constexpr" for k in constexprs}}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    assert "cubin" in triton.compile(src, target=target, options=dict(num_warps=num_warps)).asm


strides = dict(stride_xb="i64", stride_xr="i32", stride_xc="i32", stride_gb="i64", stride_gr="i32", stride_gc="i32")
for dt in ("fp32", "bf16"):
    for row_stats in (False, True):
        compile_(kn._norm_affine_grads_kernel,
                 dict(x_ptr=f"*{dt}", g_ptr="*fp32", mean_ptr="*fp32", rstd_ptr="*fp32", pe_ptr="*fp32",
                      sq_ptr="*fp32", R="i32", C="i32", CPG="i32", NG="i32", **strides),
                 dict(BLOCK_R=32 if row_stats else 128, BLOCK_C=128 if row_stats else 32, HAS_STATS=True,
                      ROW_STATS=row_stats), 8)
    prec = "ieee" if dt == "fp32" else "tf32"
    compile_(ke._embedding_norm_ghost_kernel,
             dict(ids_ptr="*i64", g_ptr=f"*{dt}", out_ptr="*fp32", T="i32", P="i32", pad="i32",
                  stride_ib="i32", stride_it="i32", stride_gb="i32", stride_gt="i32", stride_gp="i32"),
             dict(BLOCK_T=64, BLOCK_P=64, DOT_PRECISION=prec), 8)
    compile_(ke._embedding_clipped_grad_kernel,
             dict(keys_ptr="*i64", perm_ptr="*i64", bounds_ptr="*i64", g_ptr=f"*{dt}", c_ptr="*fp32",
                  out_ptr="*fp32", T="i32", V="i32", P="i32", stride_gb="i32", stride_gt="i32", stride_gp="i32"),
             dict(BLOCK_V=32, BLOCK_P=64, BLOCK_K=32, DOT_PRECISION=prec), 4)
compile_(kn._clipped_rows_sum_kernel,
         dict(x_ptr="*fp32", c_ptr="*fp32", out_ptr="*fp32", B="i32", N="i32", stride_xb="i32", stride_xn="i32"),
         dict(BLOCK_B=16, BLOCK_N=256), 4)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Ahead-of-time compile of every kernel for an H100 (sm_90) without a GPU: catches what the
    interpreter accepts but the compiler rejects (loop-carried types, scalar branches). Runs in
    a subprocess: the interpreter patches triton.language in this one."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]
