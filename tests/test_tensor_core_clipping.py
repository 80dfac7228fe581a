"""The tensor-core clipped sums (issue 11, docs/PRIVACY.md "Rounding in the clipped sum").

Each kernel is checked at odd shapes, on fresh random inputs, against an independent float64
emulation of exactly what its design computes:

* Linear T > 1 and Conv (design (a), scale outside the MMA): sum_i c_i G_i^T A_i of the input
  dtype's values, with NO rounding after c_i: the tolerance is fp32 accumulation (1e-5 of the
  largest |term| sum), far below one half-precision rounding;
* Linear T = 1 (design (b), rank one): sum_i rtz(fl32(c_i g_i)) a_i^T, rtz = rounding toward zero
  onto the input dtype, emulated here in float64 from the format's definition (significand
  width, smallest normal exponent, largest finite value), not from the kernel's bit tricks;
* Embedding: sum_i rtz(c_i) dW_i.

Under the interpreter bf16 operands are upcast to fp32 (its bf16 tl.dot is broken), while the
kernels keep ROUND_DTYPE = "bf16": the tests below also assert that the bf16 rounding really
happened (the result matches the rounded emulation, not the unrounded sum). Outputs are
poisoned with NaN. GPU-marked tests run the same checks on compiled kernels at realistic
shapes (skipped without CUDA).
"""
import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from dpprims.bindings.torch import _backend
from dpprims.bindings.torch import conv as conv_ops
from dpprims.bindings.torch import embedding as emb_ops
from dpprims.bindings.torch import linear as ops
from dpprims.kernels import conv as kconv
from dpprims.kernels import linear as klin
from dpprims.kernels._launch import cdiv

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
FMT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# (significand bits incl. the implicit one, exponent of the smallest normal, largest finite)
FORMATS = {"bf16": (8, -126, (2 - 2 ** -7) * 2.0 ** 127), "fp16": (11, -14, 65504.0),
           "tf32": (11, -126, (2 - 2 ** -10) * 2.0 ** 127)}
ACC_TOL = 1e-5  # fp32 accumulation, relative to the sum of |terms|


@pytest.fixture(autouse=True)
def poison():
    _backend.POISON = True
    yield
    _backend.POISON = False


def rtz_ref(x, fmt: str) -> np.ndarray:
    """Round float64 values toward zero onto format ``fmt`` (float64 in, float64 out)."""
    x = np.asarray(x, dtype=np.float64)
    if fmt == "fp32":
        return x
    p, emin, top = FORMATS[fmt]
    ax = np.abs(x)
    _, k = np.frexp(ax)  # ax = m 2^k, m in [0.5, 1)
    e = np.maximum(k - 1, emin)
    ulp = np.ldexp(1.0, e - p + 1)
    y = np.floor(ax / ulp) * ulp
    return np.sign(x) * np.minimum(y, top)


def _t(x, dtype, device):
    return torch.tensor(np.asarray(x), dtype=dtype, device=device)


def _f64(x):
    return x.detach().double().cpu().numpy()


def _rel(out, expected, scale):
    out = _f64(out)
    assert np.all(np.isfinite(out)), f"non-finite output (unwritten element?) {out.ravel()[:8]}"
    return float(np.max(np.abs(out - expected)) / max(float(np.max(scale)), 1e-30))


def _factors(rng, B, device, zero=()):
    c = rng.uniform(0.05, 1.0, B).astype(np.float32)
    for i in zero:
        c[i] = 0.0
    return torch.tensor(c, device=device)


# ============================================================================= rounding helper
@triton.jit
def _rtz_probe_kernel(x_ptr, N, y_ptr, ROUND_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N, other=0.0)
    tl.store(y_ptr + offs, klin._round_toward_zero(x, ROUND_DTYPE), mask=offs < N)


def _crafted_values(fmt: str, rng) -> np.ndarray:
    p, emin, top = FORMATS[fmt]
    ulp1 = 2.0 ** (1 - p)
    sub = 2.0 ** (emin - p + 1)  # the format's smallest subnormal
    vals = [0.0, 1.0, 1.0 + ulp1 / 2, 1.0 + ulp1 / 2 + 2 ** -23, 1.0 + ulp1 * 0.999, 2.0 - 2 ** -23,
            top, top * (1 + 2 ** -20) if fmt == "fp16" else top, 70000.0, 3.0e38, float(np.finfo(np.float32).max),
            2.0 ** emin, 2.0 ** emin * (1 - 2 ** -20), sub, sub * 1.5, sub * 0.99, sub * 0.5, 2.0 ** -149,
            2.0 ** -130, 1e-10, 1e-30]
    vals += list(rng.standard_normal(200) * np.exp(rng.uniform(-30, 30, 200)))
    vals = np.asarray(vals, dtype=np.float32)
    return np.concatenate([vals, -vals])


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "tf32"])
def test_round_toward_zero_matches_the_format_definition(fmt):
    """Every result is |y| <= |x| and representable: normals, ties, subnormals, underflow to
    0, saturation at the largest finite value, +-inf."""
    rng = np.random.default_rng()
    x = _crafted_values(fmt, rng)
    x = np.concatenate([x, np.float32([np.inf, -np.inf])])
    xt = torch.tensor(x)
    y = torch.full_like(xt, float("nan"))
    _rtz_probe_kernel[(cdiv(len(x), 128),)](xt, len(x), y, ROUND_DTYPE=fmt, BLOCK=128)
    y64 = y.double().numpy()
    exp = rtz_ref(np.where(np.isinf(x), np.sign(x) * np.finfo(np.float32).max, x).astype(np.float64), fmt)
    bad = np.nonzero(y64 != exp)[0]
    assert bad.size == 0, f"{fmt}: x={x[bad[:5]]} got {y64[bad[:5]]} expected {exp[bad[:5]]}"
    assert np.all(np.abs(y64) <= np.abs(x.astype(np.float64)))
    if fmt in ("bf16", "fp16"):  # representable: the cast to the format is exact
        dt = torch.bfloat16 if fmt == "bf16" else torch.float16
        assert torch.equal(y.to(dt).float(), y)


def test_round_toward_zero_is_a_real_rounding():
    """Negative control for the emulation: round-to-nearest of the same values exceeds |x| for
    some of them (the oracle would not notice a kernel that forgot to round otherwise)."""
    x = torch.tensor(_crafted_values("bf16", np.random.default_rng()))
    rn = x.to(torch.bfloat16).double().numpy()
    assert np.any(np.abs(rn) > np.abs(x.double().numpy()))
    assert np.any(rtz_ref(x.double().numpy(), "bf16") != x.double().numpy())


# ============================================================================= Linear
LINEAR_SHAPES = [  # B, T, D, P
    pytest.param(5, 7, 23, 11, id="B5-T7-D23-P11"),
    pytest.param(7, 33, 9, 20, id="B7-T33-D9-P20"),     # 3 K-blocks of 16 per example, 3 splits
    pytest.param(3, 49, 70, 5, id="B3-T49-D70-P5"),     # ResNet-50 stage-4 T, BLOCK_K 64
    pytest.param(2, 16, 130, 140, id="B2-T16-D130-P140"),  # several P/D tiles
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,D,P", LINEAR_SHAPES)
def test_linear_segments_kernel_has_no_rounding_after_the_factor(B, T, D, P, dtype, device):
    rng = np.random.default_rng()
    A = _t(rng.standard_normal((B, T, D)), dtype, device)
    G = _t(rng.standard_normal((B, T, P)), dtype, device)
    c = _factors(rng, B, device, zero=(1,))
    A[1, 0, 0] = float("nan")  # a dropped example's non-finite value never enters
    out = ops.linear_clipped_weight_grad(A, G, c)
    assert _backend.LAST_BACKEND["linear_clipped_weight_grad"] in ("triton", "triton-interpreter")
    a, g, c64 = _f64(A), _f64(G), _f64(c)
    a[1] = 0
    expected = np.einsum("b,btp,btd->pd", c64, g, a)
    scale = np.einsum("b,btp,btd->pd", c64, np.abs(g), np.abs(a))
    err = _rel(out, expected, scale)
    assert err <= ACC_TOL, f"relative error {err:.3e}: a half-precision rounding after c_i would be ~1e-3"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,D,P", [pytest.param(9, 23, 11, id="B9-D23-P11"),
                                   pytest.param(300, 7, 5, id="B300-D7-P5-3splits"),
                                   pytest.param(4, 140, 130, id="B4-D140-P130")])
def test_linear_rank1_kernel_rounds_toward_zero(B, D, P, dtype, device):
    rng = np.random.default_rng()
    A = _t(rng.standard_normal((B, D)), dtype, device)
    G = _t(rng.standard_normal((B, P)) * np.exp(rng.uniform(-3, 3, (B, 1))), dtype, device)
    c = _factors(rng, B, device, zero=(2,))
    G[2, 0] = float("inf")
    out = ops.linear_clipped_weight_grad(A, G, c)
    a, g, c64 = _f64(A), _f64(G), _f64(c)
    g[2] = 0
    y = rtz_ref((g.astype(np.float32) * c64.astype(np.float32)[:, None]).astype(np.float64), FMT[dtype])
    expected = np.einsum("bp,bd->pd", y, a)
    scale = np.einsum("bp,bd->pd", np.abs(y), np.abs(a))
    err = _rel(out, expected, scale)
    assert err <= ACC_TOL, f"relative error {err:.3e} against the rounded emulation"
    if dtype != torch.float32:  # the rounding really happened (under the interpreter too)
        unrounded = np.einsum("b,bp,bd->pd", c64, g, a)
        assert _rel(out, unrounded, scale) > 30 * max(err, 1e-9)
    # per example: the contribution never exceeds c_i ||g_i|| ||a_i|| (rank one)
    for i in (0, B - 1):
        ci = torch.zeros_like(c)
        ci[i] = c[i]
        w = _f64(ops.linear_clipped_weight_grad(A, G, ci))
        assert np.linalg.norm(w) <= c64[i] * np.linalg.norm(g[i]) * np.linalg.norm(a[i]) * (1 + 1e-6)


def test_linear_rank1_tf32_truncates_both_operands(device):
    """fp32 with precision "tf32" at T = 1: c_i g_i and a_i are truncated onto TF32 values, so
    the tensor core's own operand rounding is the identity (docs/PRIVACY.md)."""
    rng = np.random.default_rng()
    B, D, P = 6, 13, 9
    A = _t(rng.standard_normal((B, D)), torch.float32, device)
    G = _t(rng.standard_normal((B, P)), torch.float32, device)
    c = _factors(rng, B, device)
    out = ops.linear_clipped_weight_grad(A, G, c, "tf32")
    y = rtz_ref((_f64(G).astype(np.float32) * _f64(c).astype(np.float32)[:, None]).astype(np.float64), "tf32")
    a = rtz_ref(_f64(A), "tf32")
    expected = np.einsum("bp,bd->pd", y, a)
    assert _rel(out, expected, np.einsum("bp,bd->pd", np.abs(y), np.abs(a))) <= ACC_TOL


# ============================================================================= Conv
CONV_CASES = [  # B, C_in, H, W, C_out, k, stride, padding, dilation, groups
    pytest.param(5, 3, 9, 7, 6, 3, 1, 1, 1, 1, id="B5-C3-9x7-k3"),
    pytest.param(4, 4, 8, 8, 6, 3, 2, 1, 1, 2, id="B4-g2-s2"),
    pytest.param(3, 5, 7, 7, 4, 1, 1, 0, 1, 1, id="B3-T49-1x1"),
    pytest.param(7, 2, 4, 4, 3, 3, 1, 1, 1, 1, id="B7-T16-3splits"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C_in,H,W,C_out,k,s,p,d,g", CONV_CASES)
def test_conv_segments_kernel_has_no_rounding_after_the_factor(B, C_in, H, W, C_out, k, s, p, d, g, dtype, device):
    rng = np.random.default_rng()
    x = _t(rng.standard_normal((B, C_in, H, W)), dtype, device)
    H_out = (H + 2 * p - d * (k - 1) - 1) // s + 1
    W_out = (W + 2 * p - d * (k - 1) - 1) // s + 1
    G = _t(rng.standard_normal((B, C_out, H_out, W_out)), dtype, device)
    c = _factors(rng, B, device, zero=(0,))
    x[0, 0, 0, 0] = float("nan")
    out = conv_ops.conv2d_clipped_weight_grad(x, G, c, [k, k], [s, s], [p, p], [d, d], g)
    # float64 oracle: explicit im2col per group, per example
    xf = torch.nn.functional.pad(torch.tensor(_f64(x)), (p, p, p, p))
    xf[0] = 0
    U = torch.nn.functional.unfold(xf, (k, k), dilation=d, stride=s).numpy()  # [B, C_in*k*k, T]
    gg, c64 = _f64(G).reshape(B, C_out, -1), _f64(c)
    Dg, Pg = C_in // g * k * k, C_out // g
    expected = np.concatenate([np.einsum("b,bpt,bdt->pd", c64, gg[:, j * Pg:(j + 1) * Pg], U[:, j * Dg:(j + 1) * Dg])
                               for j in range(g)])
    scale = np.concatenate([np.einsum("b,bpt,bdt->pd", c64, np.abs(gg[:, j * Pg:(j + 1) * Pg]),
                                      np.abs(U[:, j * Dg:(j + 1) * Dg])) for j in range(g)])
    err = _rel(out.reshape(C_out, -1), expected, scale)
    assert err <= ACC_TOL, f"relative error {err:.3e}"


# ============================================================================= Embedding
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,V,P,pad", [pytest.param(5, 9, 13, 10, 3, id="B5-T9-V13-P10-pad3"),
                                         pytest.param(3, 40, 70, 33, None, id="B3-T40-V70-P33")])
def test_embedding_sum_scales_the_one_hot_by_a_rounded_down_factor(B, T, V, P, pad, dtype, device):
    rng = np.random.default_rng()
    ids = torch.tensor(rng.integers(0, V, (B, T)), device=device)
    ids[0, :3] = ids[0, 3]  # repeated ids within an example
    G = _t(rng.standard_normal((B, T, P)), dtype, device)
    c = _factors(rng, B, device, zero=(1,))
    G[1, 2, 0] = float("nan")
    out = emb_ops.embedding_clipped_grad(ids, G, c, V, pad)
    g, c64, idn = _f64(G), _f64(c), ids.cpu().numpy()
    cr = rtz_ref(c64, FMT[dtype])
    keep = (cr[:, None] != 0) & (idn != (-1 if pad is None else pad))
    expected = np.zeros((V, P))
    scale = np.zeros((V, P))
    for i in range(B):
        for t in range(T):
            if keep[i, t]:
                expected[idn[i, t]] += cr[i] * g[i, t]
                scale[idn[i, t]] += abs(cr[i]) * np.abs(g[i, t])
    err = _rel(out, expected, scale)
    assert err <= ACC_TOL, f"relative error {err:.3e}"
    if dtype == torch.bfloat16:  # c_i was rounded (under the interpreter too)
        unrounded = np.where(keep[..., None], g * c64[:, None, None], 0)
        ref_u = np.zeros((V, P))
        np.add.at(ref_u, idn.reshape(-1), unrounded.reshape(-1, P))
        assert _rel(out, ref_u, scale) > 30 * max(err, 1e-9)


# ============================================================================= launch specs
@pytest.mark.parametrize("T,bk", [(16, 16), (49, 64), (196, 16), (1024, 64), (3, 16), (33, 16), (100, 16), (256, 64)])
def test_segment_block_k_pads_least(T, bk):
    assert klin.segment_block_k(T) == bk
    assert all(cdiv(T, bk) * bk <= cdiv(T, o) * o for o in (16, 32, 64))


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("B,T,D,P", [(256, 16, 4608, 512), (64, 49, 4608, 512), (256, 1, 512, 10),
                                     (1000, 1, 64, 64), (8, 512, 768, 3072), (3, 7, 5, 6)])
def test_clipped_sum_specs_keep_examples_whole(B, T, D, P, arch, monkeypatch):
    """GPU specs (interpreter off): splits own whole examples (T > 1) or whole BLOCK_K row
    blocks (T = 1), cover the batch exactly once, and fit the register budget per arch."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    spec = klin.linear_clipped_weight_grad_spec(B, T, D, P, arch=arch)
    split = spec.grid[2]
    c = spec.constexprs
    if T == 1:
        assert spec.outputs["kernel"] == "_linear_clipped_weight_grad_rank1_kernel"
        rps = spec.outputs["rows_per_split"]
        assert rps % c["BLOCK_K"] == 0 and (split - 1) * rps < B <= split * rps
    else:
        assert spec.outputs["kernel"] == "_linear_clipped_weight_grad_kernel"
        eps = spec.outputs["examples_per_split"]
        assert (split - 1) * eps < B <= split * eps
        assert c["BLOCK_K"] == klin.segment_block_k(T, 64 if arch >= 90 else 32)
        # two fp32 [BLOCK_P, BLOCK_D] tiles in registers: <= 128 fp32 values per thread for them
        assert 2 * c["BLOCK_P"] * c["BLOCK_D"] // (32 * spec.num_warps) <= 128
    assert spec.outputs["partials"] == (split, P, D)
    geo = kconv.Conv2dGeometry(B=B, C_in=D, H=T, W=1, C_out=P, H_out=T, W_out=1, KH=1, KW=1, SH=1, SW=1,
                               PH=0, PW=0, DH=1, DW=1, groups=1)
    cs = kconv.conv2d_clipped_weight_grad_spec(geo, arch=arch)
    eps = cs.outputs["examples_per_split"]
    assert (cs.grid[2] - 1) * eps < B <= cs.grid[2] * eps


# ============================================================================= GPU (compiled)
GPU_CASES = [  # B, T, D, P
    pytest.param(64, 16, 4608, 512, id="resnet18-stage4"),
    pytest.param(32, 49, 4608, 512, id="resnet50-224-stage4"),
    pytest.param(8, 512, 768, 3072, id="transformer-mlp"),
    pytest.param(256, 1, 784, 256, id="mlp-T1"),
    pytest.param(37, 13, 99, 70, id="odd"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,D,P", GPU_CASES)
def test_linear_clipped_sum_on_gpu(B, T, D, P, dtype):
    """Compiled kernels (wgmma / mma) in bf16 / fp16 / fp32 against the float64 emulation."""
    rng = np.random.default_rng()
    A = _t(rng.standard_normal((B, T, D)), dtype, "cuda")
    G = _t(rng.standard_normal((B, T, P)), dtype, "cuda")
    c = _factors(rng, B, "cuda", zero=(1,))
    out = ops.linear_clipped_weight_grad(A, G, c)
    assert _backend.LAST_BACKEND["linear_clipped_weight_grad"] == "triton"
    a, g, c64 = _f64(A), _f64(G), _f64(c)
    if T == 1:
        g = rtz_ref((g.astype(np.float32) * c64.astype(np.float32)[:, None, None]).astype(np.float64), FMT[dtype])
        c64 = np.ones_like(c64)
        g[1] = 0
    expected = np.einsum("b,btp,btd->pd", c64, g, a)
    scale = np.einsum("b,btp,btd->pd", np.abs(c64), np.abs(g), np.abs(a))
    assert _rel(out, expected, scale) <= ACC_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_and_embedding_clipped_sums_on_gpu(dtype):
    rng = np.random.default_rng()
    B, C, HW, Co = 32, 64, 8, 128
    x = _t(rng.standard_normal((B, C, HW, HW)), dtype, "cuda")
    G = _t(rng.standard_normal((B, Co, HW, HW)), dtype, "cuda")
    c = _factors(rng, B, "cuda")
    out = conv_ops.conv2d_clipped_weight_grad(x, G, c, [3, 3], [1, 1], [1, 1], [1, 1], 1)
    U = torch.nn.functional.unfold(x.double(), 3, padding=1)
    expected = torch.einsum("b,bpt,bdt->pd", c.double(), G.double().reshape(B, Co, -1), U)
    scale = torch.einsum("b,bpt,bdt->pd", c.double(), G.double().abs().reshape(B, Co, -1), U.abs())
    assert _rel(out.reshape(Co, -1), expected.cpu().numpy(), scale.cpu().numpy()) <= ACC_TOL
    ids = torch.randint(0, 1000, (B, 128), device="cuda")
    Ge = _t(rng.standard_normal((B, 128, 256)), dtype, "cuda")
    out = emb_ops.embedding_clipped_grad(ids, Ge, c, 1000)
    cr = torch.tensor(rtz_ref(_f64(c), FMT[dtype]), device="cuda")
    exp = torch.zeros(1000, 256, dtype=torch.float64, device="cuda").index_add_(
        0, ids.reshape(-1), (Ge.double() * cr.view(B, 1, 1)).reshape(-1, 256))
    sc = torch.zeros(1000, 256, dtype=torch.float64, device="cuda").index_add_(
        0, ids.reshape(-1), (Ge.double().abs() * cr.view(B, 1, 1)).reshape(-1, 256))
    assert _rel(out, exp.cpu().numpy(), sc.cpu().numpy()) <= ACC_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(256, 1, 1024, 10), (64, 49, 96, 200)], ids=["rank1-head", "segments"])
def test_split_k_epilogue_is_deterministic_on_gpu(shape, monkeypatch):
    """The in-kernel split-K reduction (kernels/linear.py _store_split_tile) on real concurrent
    slices: the launch really splits, repeated calls give the same bits whichever slice drew
    the last ticket, no NaN-poisoned workspace slot is ever read, and the sum matches float64."""
    monkeypatch.setattr(_backend, "POISON", True)
    B, T, D, P = shape
    spec = klin.linear_clipped_weight_grad_spec(B, T, D, P, arch=90, itemsize=2)
    assert spec.grid[2] > 1, spec.grid
    rng = np.random.default_rng()
    A = _t(rng.standard_normal((B, T, D)), torch.bfloat16, "cuda")
    G = _t(rng.standard_normal((B, T, P)), torch.bfloat16, "cuda")
    c = _factors(rng, B, "cuda", zero=(3,))
    outs = [ops.linear_clipped_weight_grad(A, G, c) for _ in range(8)]
    torch.cuda.synchronize()
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert torch.isfinite(outs[0]).all()
    a, g, c64 = _f64(A), _f64(G), _f64(c)
    if T == 1:
        g = rtz_ref((g.astype(np.float32) * c64.astype(np.float32)[:, None, None]).astype(np.float64), "bf16")
        c64 = np.ones_like(c64)
        g[3] = 0
    expected = np.einsum("b,btp,btd->pd", c64, g, a)
    scale = np.einsum("b,btp,btd->pd", np.abs(c64), np.abs(g), np.abs(a))
    assert _rel(outs[0], expected, scale) <= ACC_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2, 40])
def test_tf32_cancellation_keeps_the_bound_on_gpu(T):
    """fp32 with plain "tf32" in the norm and the sum (the provably safe pairing): a crafted
    cancellation over positions keeps the contribution <= C."""
    D = P = 1
    a = torch.ones(2, T, D, device="cuda")
    g = torch.zeros(2, T, P, device="cuda")
    g[:, 0] = 1.0
    if T > 1:
        g[:, 1] = -(1 - 2.0 ** -10) * (1 + 2.0 ** -18)  # not TF32-representable: rounded in both passes
    method = "outer" if T == 1 else "ghost"
    C = 1e-3
    n = ops.linear_weight_sq_norms(a, g, method, "tf32").sqrt()
    c = torch.clamp(C / (n + 1e-6), max=1.0) * torch.tensor([1.0, 0.0], device="cuda")
    w = ops.linear_clipped_weight_grad(a, g, c, "tf32")
    assert float(w.double().norm()) <= C * (1 + 1e-5)


# ============================================================================= JAX binding
@pytest.mark.parametrize("T", [1, 5])
def test_jax_kernel_path_rounds_like_the_design(T):
    """The JAX launch builders pass the same ROUND_DTYPE (from the original bf16 dtype, with
    operands upcast under the interpreter): bf16 through the interpreter path matches the
    float64 emulation (design (b) at T = 1, design (a) at T = 5, and the embedding sum)."""
    jnp = pytest.importorskip("jax.numpy")
    from dpprims.bindings import jax as J
    from dpprims.bindings.jax._call import use_path

    if torch.cuda.is_available():
        pytest.skip("the interpreter path needs TRITON_INTERPRET=1 (CPU runs)")
    rng = np.random.default_rng()
    A = jnp.asarray(rng.standard_normal((6, T, 9)), jnp.bfloat16)
    G = jnp.asarray(rng.standard_normal((6, T, 7)), jnp.bfloat16)
    c = jnp.asarray(rng.uniform(0.1, 1, 6), jnp.float32)
    with use_path("interpreter"):
        out = np.asarray(J.linear_clipped_weight_grad(A, G, c), np.float64)
    a = np.asarray(A.astype(jnp.float32), np.float64)
    g = np.asarray(G.astype(jnp.float32), np.float64)
    c64 = np.asarray(c, np.float64)
    if T == 1:
        y = rtz_ref((g.astype(np.float32) * c64.astype(np.float32)[:, None, None]).astype(np.float64), "bf16")
        expected, scale = np.einsum("btp,btd->pd", y, a), np.einsum("btp,btd->pd", np.abs(y), np.abs(a))
    else:
        expected = np.einsum("b,btp,btd->pd", c64, g, a)
        scale = np.einsum("b,btp,btd->pd", c64, np.abs(g), np.abs(a))
    assert np.max(np.abs(out - expected)) <= ACC_TOL * np.max(scale)
    ids = jnp.asarray(rng.integers(0, 11, (4, 6)))
    Ge = jnp.asarray(rng.standard_normal((4, 6, 5)), jnp.bfloat16)
    ce = jnp.asarray(rng.uniform(0.1, 1, 4), jnp.float32)
    with use_path("interpreter"):
        out = np.asarray(J.embedding_clipped_grad(ids, Ge, ce, 11), np.float64)
    cr = rtz_ref(np.asarray(ce, np.float64), "bf16")
    rows = np.asarray(Ge.astype(jnp.float32), np.float64) * cr[:, None, None]
    expected = np.zeros((11, 5))
    np.add.at(expected, np.asarray(ids).reshape(-1), rows.reshape(-1, 5))
    scale = np.zeros((11, 5))
    np.add.at(scale, np.asarray(ids).reshape(-1), np.abs(rows).reshape(-1, 5))
    assert np.max(np.abs(out - expected)) <= ACC_TOL * np.max(scale)


def test_clipped_sum_split_fills_waves_and_spares_memory_bound_layers(monkeypatch):
    """The GPU split-K choice (computed as on a GPU, not under the interpreter): a 5-tile conv
    grid gets a split whose final program count fills its last wave of 132 SMs (not the 64
    slices = 2.4 waves it took before), and a memory-bound layer (ResNet-50's stride-2 1x1
    downsample at 56x56, B = 64) takes far fewer slices than a compute-bound one, because each
    slice's fp32 partial adds traffic."""
    from dpprims.kernels import conv as kc
    from dpprims.kernels import linear as kl
    from dpprims.kernels._launch import cdiv

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for n_tiles, units in ((5, 256), (9, 256), (7, 200), (144, 256)):
        s = kl.clipped_sum_split(n_tiles, units, 1)
        final = cdiv(units, cdiv(units, s))
        programs = final * n_tiles
        busy = programs / (cdiv(programs, 132) * 132)
        best = max((cdiv(units, cdiv(units, k)) * n_tiles) / (cdiv(cdiv(units, cdiv(units, k)) * n_tiles, 132) * 132)
                   for k in range(1, min(cdiv(528, n_tiles), units, 64) + 1))
        assert busy >= best - 0.01, (n_tiles, units, s, busy, best)
    # ResNet-18 CIFAR layer1 conv (64 -> 64, 3x3, 32x32, B = 256): compute-bound, many slices
    geo_c = kc.Conv2dGeometry(B=256, C_in=64, H=32, W=32, C_out=64, H_out=32, W_out=32, KH=3, KW=3,
                              SH=1, SW=1, PH=1, PW=1, DH=1, DW=1, groups=1)
    # ResNet-50 layer2.0.downsample (256 -> 512, 1x1, stride 2, 56x56, B = 64): memory-bound
    geo_m = kc.Conv2dGeometry(B=64, C_in=256, H=56, W=56, C_out=512, H_out=28, W_out=28, KH=1, KW=1,
                              SH=2, SW=2, PH=0, PW=0, DH=1, DW=1, groups=1)
    spec_c = kc.conv2d_clipped_weight_grad_spec(geo_c)
    spec_m = kc.conv2d_clipped_weight_grad_spec(geo_m)
    split_c, split_m = spec_c.grid[2], spec_m.grid[2]
    assert split_c >= 2 * split_m and split_m <= 16, (split_c, split_m)
    part_m = split_m * geo_m.C_out * geo_m.D * 4
    x_bytes = 64 * 256 * 56 * 56 * 2
    assert part_m <= 0.1 * x_bytes, (split_m, part_m, x_bytes)
    # ... but enough slices that its 8 output tiles draw the full DRAM bandwidth (8 CTAs on 8
    # SMs could not: kernels/linear.py dram_fraction)
    assert kl.dram_fraction(spec_m.grid[0] * spec_m.grid[1], 132) < 0.5
    assert kl.dram_fraction(math.prod(spec_m.grid), 132) == 1.0, spec_m.grid


def test_occupancy_model():
    """busy_fraction / dram_fraction (the model the split choice and the compiled-kernel report
    share), against hand-counted cases on 132 SMs."""
    from dpprims.kernels import linear as kl

    assert kl.busy_fraction(132 * 3, 132, 2, 8) == 1.0       # whole rounds, saturated SMs
    assert kl.busy_fraction(64, 132, 2, 8) == 64 / 132       # half the SMs idle
    assert kl.busy_fraction(8, 132, 9, 4) == 8 / 132 / 2      # one 4-warp CTA: half an SM
    assert kl.busy_fraction(432, 132, 1, 8) == 432 / (132 * 4)  # busiest SM runs 4, average 3.27
    assert kl.busy_fraction(132, 132, 1, 4) == 0.5            # occupancy 1 x 4 warps never saturates
    assert kl.busy_fraction(132 * 5, 132, 4, 4) == 132 * 5 / (132 * (4 + 2))  # 4 at a time, then 1 alone
    assert kl.dram_fraction(8, 132) == 16 / 132 and kl.dram_fraction(66, 132) == 1.0
