"""Linear kernels (through the torch ops) against the pure-JAX oracle, dpprims.reference.

CPU: the Triton kernels run through the interpreter (conftest). Inputs are fresh random
values at odd and power-of-two shapes; every output buffer starts as NaN (POISON) so an
element a kernel forgets to write fails.
"""
import numpy as np
import pytest
import torch

jnp = pytest.importorskip("jax.numpy")
from dpprims import reference as ref  # noqa: E402
from dpprims.bindings.torch import _backend  # noqa: E402
from dpprims.bindings.torch import linear as ops  # noqa: E402

# max |out - ref| / max |ref| allowed, per input dtype
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# the clipped GEMM rounds c_i * G to the operand dtype once: one more half-precision rounding
TOL_SUM = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}

SHAPES = [  # B, T, D, P
    pytest.param(5, 7, 123, 11, id="B5-T7-D123-P11"),
    pytest.param(3, 1, 33, 17, id="B3-T1-D33-P17"),
    pytest.param(4, 16, 32, 64, id="B4-T16-D32-P64"),
    pytest.param(2, 67, 19, 150, id="B2-T67-D19-P150"),
    pytest.param(1, 130, 9, 5, id="B1-T130-D9-P5"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def poison():
    _backend.POISON = True
    yield
    _backend.POISON = False


def _rng():
    return np.random.default_rng()


def _inputs(B, T, D, P, dtype, device, scale=1.0):
    rng = _rng()
    A = torch.tensor(rng.standard_normal((B, T, D)) * scale, dtype=dtype, device=device)
    G = torch.tensor(rng.standard_normal((B, T, P)), dtype=dtype, device=device)
    return A, G


def _np64(x):
    return jnp.asarray(x.detach().double().cpu().numpy())


def _check(out, expected, tol, what):
    out = np.asarray(out.detach().double().cpu().numpy())
    expected = np.asarray(expected, dtype=np.float64)
    assert out.shape == expected.shape, f"{what}: shape {out.shape} != {expected.shape}"
    assert np.all(np.isfinite(out)), f"{what}: non-finite output (unwritten element?) {out}"
    err = np.max(np.abs(out - expected)) / max(np.max(np.abs(expected)), 1e-30)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}\nout={out.ravel()[:8]}\nref={expected.ravel()[:8]}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,D,P", SHAPES)
def test_weight_sq_norms(B, T, D, P, dtype, device):
    A, G = _inputs(B, T, D, P, dtype, device)
    expected = ref.linear_weight_sq_norms_direct(_np64(A), _np64(G))
    methods = ["outer"] if T == 1 else ["direct", "ghost"]
    for method in methods:
        _check(ops.linear_weight_sq_norms(A, G, method), expected, TOL[dtype], f"{method} norm")
    # the oracle's own two closed forms agree (sanity of the oracle at this shape)
    _check(torch.tensor(np.asarray(ref.linear_weight_sq_norms_ghost(_np64(A), _np64(G)))), expected, 1e-12, "oracle ghost")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,D,P", SHAPES)
def test_bias_sq_norms(B, T, D, P, dtype, device):
    _, G = _inputs(B, T, D, P, dtype, device)
    _check(ops.linear_bias_sq_norms(G), ref.linear_bias_sq_norms(_np64(G)), TOL[dtype], "bias norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,D,P", SHAPES)
def test_clipped_sums(B, T, D, P, dtype, device):
    A, G = _inputs(B, T, D, P, dtype, device)
    c = torch.rand(B, device=device, dtype=torch.float32)
    c64 = _np64(c)
    _check(ops.linear_clipped_weight_grad(A, G, c), ref.linear_clipped_weight_grad(_np64(A), _np64(G), c64),
           TOL_SUM[dtype], "clipped weight grad")
    _check(ops.linear_clipped_bias_grad(G, c), ref.linear_clipped_bias_grad(_np64(G), c64),
           TOL_SUM[dtype], "clipped bias grad")


def test_2d_inputs_are_T1(device):
    A, G = _inputs(6, 1, 21, 13, torch.float32, device)
    c = torch.rand(6, device=device)
    _check(ops.linear_weight_sq_norms(A[:, 0], G[:, 0], "outer"), ref.linear_weight_sq_norms_direct(_np64(A), _np64(G)),
           TOL[torch.float32], "2-D outer")
    _check(ops.linear_clipped_weight_grad(A[:, 0], G[:, 0], c),
           ref.linear_clipped_weight_grad(_np64(A), _np64(G), _np64(c)), TOL_SUM[torch.float32], "2-D clipped")


def test_strided_inputs_need_no_copy(device):
    """Non-contiguous views (a transposed buffer, a slice) go straight to the kernels."""
    rng = _rng()
    base_a = torch.tensor(rng.standard_normal((9, 4, 30)), dtype=torch.float32, device=device)
    A = base_a.transpose(0, 1)[:, 1:8, ::2]  # [4, 7, 15], no unit stride anywhere
    G = torch.tensor(rng.standard_normal((4, 11, 7)), dtype=torch.float32, device=device).transpose(1, 2)[:, :, 2:]
    assert not A.is_contiguous() and not G.is_contiguous()
    c = torch.rand(4, device=device)
    expected = ref.linear_weight_sq_norms_direct(_np64(A), _np64(G))
    for method in ("direct", "ghost"):
        _check(ops.linear_weight_sq_norms(A, G, method), expected, TOL[torch.float32], f"strided {method}")
    _check(ops.linear_clipped_weight_grad(A, G, c), ref.linear_clipped_weight_grad(_np64(A), _np64(G), _np64(c)),
           TOL_SUM[torch.float32], "strided clipped")


def test_dropped_example_with_nonfinite_values_contributes_nothing(device):
    """c_i = 0 must mean 'nothing', even when example i holds inf/NaN (0 * inf = NaN)."""
    A, G = _inputs(5, 6, 17, 9, torch.float32, device)
    A[2, 3, 4] = float("inf")
    G[2, 1, 0] = float("nan")
    c = torch.rand(5, device=device) + 0.1
    c[2] = 0.0
    keep = np.array([0, 1, 3, 4])
    A64, G64, c64 = _np64(A)[keep], _np64(G)[keep], _np64(c)[keep]
    _check(ops.linear_clipped_weight_grad(A, G, c), ref.linear_clipped_weight_grad(A64, G64, c64), 2e-6, "weight")
    _check(ops.linear_clipped_bias_grad(G, c), ref.linear_clipped_bias_grad(G64, c64), 2e-6, "bias")


@pytest.mark.parametrize("method", ["direct", "ghost", "outer"])
def test_empty_batch(method, device):
    T = 1 if method == "outer" else 5
    A, G = _inputs(0, T, 7, 3, torch.float32, device)
    c = torch.zeros(0, device=device)
    assert ops.linear_weight_sq_norms(A, G, method).shape == (0,)
    assert ops.linear_bias_sq_norms(G).shape == (0,)
    w = ops.linear_clipped_weight_grad(A, G, c)
    assert w.shape == (3, 7) and torch.all(w == 0)
    b = ops.linear_clipped_bias_grad(G, c)
    assert b.shape == (3,) and torch.all(b == 0)


def test_clip_factors_against_reference(device):
    rng = _rng()
    B = 37
    sq = torch.tensor(rng.exponential(4.0, B), dtype=torch.float32, device=device)
    sq[3] = float("nan")
    sq[5] = float("inf")
    sq[7] = 0.0
    mask = torch.tensor(rng.random(B) > 0.2, device=device)
    for clipping in ("flat", "automatic"):
        C = float(rng.uniform(0.5, 2.0))
        c, n = ops.clip_factors(sq, mask, torch.tensor([C], device=device), clipping == "automatic", 0.01)
        n_ref = np.sqrt(sq.double().cpu().numpy())
        expected = ref.clip_factors(jnp.asarray(n_ref), C, clipping=clipping, gamma=0.01,
                                    mask=jnp.asarray(mask.cpu().numpy()))
        got = c.double().cpu().numpy()
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-6, atol=0)
        assert got[3] == 0 and got[5] == 0, "non-finite norms must give factor 0"
        finite = np.isfinite(n_ref)
        np.testing.assert_allclose(n.double().cpu().numpy()[finite], n_ref[finite], rtol=1e-6)


@pytest.mark.parametrize("C", [0.0, float("inf")])
def test_clip_factor_limits(C, device):
    sq = torch.tensor([0.0, 1e-8, 4.0, 1e12], device=device)
    c, _ = ops.clip_factors(sq, None, torch.tensor([C], device=device), False, 0.01)
    expected = torch.zeros(4) if C == 0 else torch.ones(4)
    assert torch.equal(c.cpu(), expected)


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_invalid_clip_norm_is_an_error(bad):
    with pytest.raises(ValueError, match="max_grad_norm"):
        ops.check_max_grad_norm(bad, "flat")
    with pytest.raises(ValueError, match="automatic"):
        ops.check_max_grad_norm(float("inf"), "automatic")


def test_shape_errors_name_the_problem(device):
    A, G = _inputs(3, 4, 5, 6, torch.float32, device)
    with pytest.raises(ValueError, match=r"agree on \[B, T\]"):
        ops.linear_weight_sq_norms(A, G[:2], "direct")
    with pytest.raises(ValueError, match="same dtype"):
        ops.linear_weight_sq_norms(A, G.half(), "direct")
    with pytest.raises(ValueError, match="T = 1"):
        ops.linear_weight_sq_norms(A, G, "outer")
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        ops.linear_clipped_weight_grad(A, G, torch.ones(2, device=device))


def test_torch_backend_matches_interpreter(monkeypatch):
    """The plain-torch CPU path computes the same numbers as the Triton kernels."""
    A, G = _inputs(4, 9, 21, 10, torch.float32, "cpu")
    c = torch.rand(4)
    results = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", mode)
        results[mode] = [ops.linear_weight_sq_norms(A, G, "direct"), ops.linear_weight_sq_norms(A, G, "ghost"),
                         ops.linear_bias_sq_norms(G), ops.linear_clipped_weight_grad(A, G, c),
                         ops.linear_clipped_bias_grad(G, c)]
        expected_backend = "triton-interpreter" if mode == "1" else "torch"
        assert _backend.LAST_BACKEND["linear_clipped_weight_grad"] == expected_backend
    for a, b in zip(results["1"], results["0"]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)


def test_ops_trace_under_torch_compile():
    """The fake implementations let torch.compile trace the ops without graph breaks."""
    A, G = _inputs(3, 5, 8, 6, torch.float32, "cpu")

    def step(A, G):
        sq = ops.linear_weight_sq_norms(A, G, "ghost") + ops.linear_bias_sq_norms(G)
        c, n = ops.clip_factors(sq, None, torch.ones(1), False, 0.01)
        return ops.linear_clipped_weight_grad(A, G, c), ops.linear_clipped_bias_grad(G, c), n

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(A, G), step(A, G)):
        torch.testing.assert_close(got, want)


def test_cost_model_choice():
    from dpprims.kernels.linear import choose_norm_method, norm_flops

    assert choose_norm_method(1, 512, 512) == "outer"
    assert choose_norm_method(16, 512, 512) == "ghost"  # T^2 (d+p) << T d p
    assert choose_norm_method(4096, 64, 64) == "direct"  # long sequences, narrow layer
    assert choose_norm_method(4096, 64, 64, "ghost") == "ghost"  # user override wins
    f = norm_flops(128, 1024, 1024)
    assert f["direct"] == 2 * 128 * 1024 * 1024 and f["ghost"] == 2 * 128 * 128 * 2048
    with pytest.raises(ValueError, match="norm_method"):
        choose_norm_method(4, 4, 4, "fast")


@pytest.mark.gpu
def test_realistic_shape_on_gpu():
    """B=256, T=128, d=p=1024 in bf16: compiled kernels against a float64 torch computation."""
    A, G = _inputs(256, 128, 1024, 1024, torch.bfloat16, "cuda")
    c = torch.rand(256, device="cuda")
    A64, G64 = A.double(), G.double()
    per_ex = torch.einsum("btp,btd->bpd", G64, A64)
    sq = per_ex.pow(2).sum((1, 2))
    for method in ("direct", "ghost"):
        _check(ops.linear_weight_sq_norms(A, G, method), sq.cpu().numpy(), TOL[torch.bfloat16], method)
    _check(ops.linear_clipped_weight_grad(A, G, c), (per_ex * c.double().view(-1, 1, 1)).sum(0).cpu().numpy(),
           TOL_SUM[torch.bfloat16], "clipped")
