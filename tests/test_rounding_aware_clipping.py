"""Design (c) of the clipped sum, the rounding-aware clip factor (docs/PRIVACY.md).

The "rounded rows" clipped sum of a Linear layer with T > 1 is ONE GEMM over the B*T rows with
y_t = RZ(c_i g_t) rounded toward zero onto the input dtype (no per-example fp32 pass). Where
positions cancel, that rounding alone can push a contribution past C; the engine charges
c_i rho_i + alpha_i to the clip factor, rho_i = u sqrt(sum_l S_l^2), S = sum_t ||g_t|| ||a_t||,
alpha_i the subnormal-range term. Checked here, through the interpreter on CPU (or compiled on a
GPU), in bf16 and fp16:

* crafted cancellation reproducers inside ONE example (T = 5, 16, 33, pairs across K-block
  boundaries): the rounded GEMM with the plain factor exceeds C (negative control, asserted),
  with the rounding-aware factor (ops and DPEngine) it stays <= C; fp16 subnormal case where the
  relative term alone is not enough (negative control) and the absolute term is;
* the kernel against a float64 emulation of exactly what it computes (odd shapes, a dropped
  example with NaN rows, NaN-poisoned outputs, an assertion that the rounding happened);
* the clip-factor kernel's slack inputs against a float64 formula, edge cases included;
* DPEngine(clipped_sum="rounded") on several Linear layers against a float64 micro-batch loop
  with the same (smaller) factors, and the selector / plan / user override.

Under the interpreter the bindings upcast bf16 operands to fp32 (its bf16 tl.dot is broken) but
the kernel still rounds onto bf16 (ROUND_DTYPE): the emulation tests assert it did.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpprims.bindings.torch import _backend
from dpprims.bindings.torch import linear as ops
from dpprims.kernels import linear as klin
from dpprims.torch import DPEngine

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PATH = _backend.backend_for(torch.empty(0, device=DEVICE))
KERNELS = pytest.mark.skipif(PATH == "torch", reason="design (c) runs on the Triton backends only")
pytestmark = KERNELS
FP32_SLACK = 1e-5
HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
# (significand bits incl. the implicit one, exponent of the smallest normal, largest finite)
FORMATS = {torch.bfloat16: (8, -126, (2 - 2 ** -7) * 2.0 ** 127), torch.float16: (11, -14, 65504.0)}
U = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # round-toward-zero relative bound


@pytest.fixture(autouse=True)
def poison():
    _backend.POISON = True
    yield
    _backend.POISON = False


def rtz(x, dtype) -> np.ndarray:
    """float64 values rounded toward zero onto ``dtype`` from the format's definition."""
    x = np.asarray(x, dtype=np.float64)
    p, emin, top = FORMATS[dtype]
    ax = np.abs(x)
    _, k = np.frexp(ax)
    ulp = np.ldexp(1.0, np.maximum(k - 1, emin) - p + 1)
    return np.sign(x) * np.minimum(np.floor(ax / ulp) * ulp, top)


def _grid_frac(v: float, dtype) -> float:
    """Position of v > 0 between its two neighbours on the dtype's grid, in ulps (0 .. 1)."""
    p, emin, _ = FORMATS[dtype]
    _, k = math.frexp(v)
    ulp = math.ldexp(1.0, max(k - 1, emin) - p + 1)
    return v / ulp - math.floor(v / ulp)


def _half_values(dtype, lo, hi):
    """Every value of ``dtype`` in [lo, hi) (float64)."""
    p, emin, _ = FORMATS[dtype]
    out, v = [], lo
    while v < hi:
        out.append(v)
        _, k = math.frexp(v)
        v += math.ldexp(1.0, max(k - 1, emin) - p + 1)
    return out


def _adversarial_pair(dtype, c0, lo, hi):
    """(p, q) of ``dtype`` values with c0 p just above a grid point (RZ loses 0.05-0.3 ulp) and
    c0 q just below one (RZ loses 0.7-0.95 ulp), q < p: RZ(c0 p) - RZ(c0 q) is a whole ulp
    while c0 (p - q) is a fraction of one, so the rounded pair is several times its exact
    value. The >= 0.05 ulp margins keep it so for any factor within 1e-5 relative of c0."""
    vals = np.array(_half_values(dtype, lo, hi))
    frac = np.array([_grid_frac(c0 * v, dtype) for v in vals])
    r = rtz(c0 * vals, dtype)
    ps = (frac >= 0.05) & (frac <= 0.3)
    qs = (frac >= 0.7) & (frac <= 0.95)
    P, Q = np.meshgrid(vals[ps], vals[qs], indexing="ij")
    RP, RQ = np.meshgrid(r[ps], r[qs], indexing="ij")
    exact = c0 * (P - Q)
    gain = np.where(exact > 0, (RP - RQ) / np.where(exact > 0, exact, 1.0), 0.0)
    k = np.unravel_index(np.argmax(gain), gain.shape)
    assert gain[k] > 1.25, gain[k]
    return float(P[k]), float(Q[k])


def _cancelling_example(dtype, T, starts, c0=0.55):
    """a [T, 1] = 1 on the pairs' rows, g [T, 1]: (p, -q) at rows (s, s + 1) for s in starts."""
    p, q = _adversarial_pair(dtype, c0, 1.0, 2.0)
    a = np.zeros((T, 1))
    g = np.zeros((T, 1))
    for s in starts:
        a[s] = a[s + 1] = 1.0
        g[s], g[s + 1] = p, -q
    return a, g


def _one_example_batch(a, g, dtype, B=3, index=1):
    """A, G [B, T, 1] on DEVICE: example ``index`` holds (a, g), the others random (padding)."""
    rng = np.random.default_rng()
    A = rng.standard_normal((B,) + a.shape)
    Gm = rng.standard_normal((B,) + g.shape)
    A[index], Gm[index] = a, g
    return (torch.tensor(A, dtype=dtype, device=DEVICE), torch.tensor(Gm, dtype=dtype, device=DEVICE))


def _contribution(A, G, c, index):
    """||sum_t y_t a_t^T|| of example ``index`` alone through the rounded-rows kernel."""
    only = torch.zeros_like(c)
    only[index] = c[index]
    W = ops.linear_clipped_weight_grad(A, G, only, "ieee", "rounded")
    return float(W.double().norm())


def _factors(A, G, C, index, with_rho=True, with_alpha=True):
    B = A.shape[0]
    sq = ops.linear_weight_sq_norms(A, G, "direct")
    mask = torch.zeros(B, device=DEVICE)
    mask[index] = 1
    Ct = torch.tensor([C], device=DEVICE)
    rho, alpha = ops.rounded_rows_slack(A, G)
    slack = torch.stack([rho * with_rho, alpha * with_alpha])
    plain, _ = ops.clip_factors(sq, mask, Ct, False, 0.01)
    aware, _ = ops.clip_factors(sq, mask, Ct, False, 0.01, slack)
    return plain, aware


# ============================================================== crafted cancellation, one example
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("T,starts", [pytest.param(5, [0, 3], id="T5"), pytest.param(16, [3, 9, 14], id="T16"),
                                      pytest.param(33, [15, 31], id="T33-across-K-blocks")])
def test_cancellation_within_one_example(T, starts, dtype):
    a, g = _cancelling_example(dtype, T, starts)
    A, G = _one_example_batch(a, g, dtype)
    n = abs(float(np.sum(g * a)))
    C = 0.55 * (n + 1e-6)  # the plain factor is ~0.55: every c g_t lands where the pair was built for
    plain, aware = _factors(A, G, C, index=1)
    assert abs(float(plain[1]) - 0.55) < 1e-5
    bad = _contribution(A, G, plain, 1) / C
    assert bad > 1.5, f"negative control: the rounded GEMM with the plain factor gave only {bad:.4f} C"
    good = _contribution(A, G, aware, 1) / C
    assert good <= 1.0 + FP32_SLACK, f"rounding-aware factor: contribution {good:.7f} C"
    assert float(aware[1]) > 0  # clipped harder, not dropped


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("T,starts", [pytest.param(5, [0, 3], id="T5"), pytest.param(33, [15, 31], id="T33")])
def test_cancellation_through_the_engine(T, starts, dtype):
    """The same example through DPEngine(clipped_sum="rounded") under autocast (bias-free Linear,
    fp32 weights, two padding rows holding other data): .grad norm <= C, and the plan says (c)."""
    a, g = _cancelling_example(dtype, T, starts)
    A, G = _one_example_batch(a, g, dtype)
    n = abs(float(np.sum(g * a)))
    C = 0.55 * (n + 1e-6)
    lin = nn.Linear(1, 1, bias=False).to(DEVICE)
    engine = DPEngine(lin, max_grad_norm=C, clipped_sum="rounded")
    with torch.autocast(DEVICE, dtype=dtype):
        y = lin(A.float())
    engine.backward((y.float() * G.float()).sum((1, 2)), mask=torch.tensor([0, 1, 0], device=DEVICE))
    ratio = float(lin.weight.grad.double().norm()) / C
    assert ratio <= 1.0 + FP32_SLACK, f"contribution {ratio:.7f} C"
    assert engine.plan()[0]["clipped_sum"] == "rounded" and "(c)" in engine.format_plan()
    assert float(engine.last_stats["rounding_slack"]) > 1.0  # this example's S / n is huge


def test_fp16_subnormal_needs_the_absolute_term():
    """fp16: c g_t in the subnormal range, where RZ's error is absolute (up to 2^-24), not
    relative: with only the relative term u S the contribution exceeds C (negative control);
    with the absolute term alpha it does not."""
    dtype = torch.float16
    sub = 2.0 ** -24
    c0 = 0.55
    vals = [k * sub for k in range(1, 60)]  # fp16 subnormals
    best = None
    ok = [v for v in vals if 0.05 <= (c0 * v / sub) % 1.0 <= 0.95]  # robust to the factor's last bits
    for p in ok:
        for q in ok:
            ex = c0 * (p - q)
            if ex > 0:
                gain = float(rtz(c0 * p, dtype) - rtz(c0 * q, dtype)) / ex
                if best is None or gain > best[0]:
                    best = (gain, p, q)
    gain, p, q = best
    assert gain > 1.5
    T, starts = 16, [2, 7, 12]
    a = np.zeros((T, 1)); g = np.zeros((T, 1))
    for s in starts:
        a[s] = a[s + 1] = 1024.0
        g[s], g[s + 1] = p, -q
    A, G = _one_example_batch(a, g, dtype)
    n = abs(float(np.sum(g * a)))
    C = c0 * (n + 1e-6)
    _, rel_only = _factors(A, G, C, index=1, with_alpha=False)
    bad = _contribution(A, G, rel_only, 1) / C
    assert bad > 1.3, f"negative control: relative term alone gave {bad:.4f} C"
    _, aware = _factors(A, G, C, index=1)
    good = _contribution(A, G, aware, 1) / C
    assert good <= 1.0 + FP32_SLACK, f"contribution {good:.7f} C"


# ==================================================================== the kernel, exactly
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("B,T,D,P", [pytest.param(5, 7, 23, 11, id="B5-T7-D23-P11"),
                                     pytest.param(3, 33, 9, 20, id="B3-T33-D9-P20"),
                                     pytest.param(4, 2, 130, 17, id="B4-T2-D130-P17")])
def test_rounded_rows_kernel_matches_its_emulation(B, T, D, P, dtype):
    rng = np.random.default_rng()
    A = torch.tensor(rng.standard_normal((B, T, D)), dtype=dtype, device=DEVICE)
    G = torch.tensor(rng.standard_normal((B, T, P)) * 10.0 ** rng.uniform(-3, 1), dtype=dtype, device=DEVICE)
    c = torch.tensor(rng.uniform(0.05, 1.0, B), dtype=torch.float32, device=DEVICE)
    c[1] = 0.0
    A[1, 0, 0] = float("nan")  # a dropped example's non-finite value never enters
    out = ops.linear_clipped_weight_grad(A, G, c, "ieee", "rounded")
    assert _backend.LAST_BACKEND["linear_clipped_weight_grad"] in ("triton", "triton-interpreter")
    a, gg, c32 = A.double().cpu().numpy(), G.double().cpu().numpy(), c.cpu().numpy()
    a[1] = 0
    y = rtz((gg.astype(np.float32) * c32[:, None, None]).astype(np.float64), dtype)  # fl32(c g), then RZ
    expected = np.einsum("btp,btd->pd", y, a)
    unrounded = np.einsum("b,btp,btd->pd", c32.astype(np.float64), gg, a)
    scale = np.einsum("btp,btd->pd", np.abs(y), np.abs(a)).max()
    got = out.double().cpu().numpy()
    assert np.all(np.isfinite(got))
    err = np.abs(got - expected).max() / scale
    assert err <= 1e-5, f"relative error {err:.3e} against the RZ emulation"
    assert np.abs(unrounded - expected).max() / scale > 1e-4  # the rounding did happen
    # the error against the unrounded sum is within the slack the engine charges
    rho, alpha = ops.rounded_rows_slack(A, G)
    for i in range(B):
        if i == 1:
            continue
        ei = np.einsum("tp,td->pd", y[i] - c32[i] * gg[i], a[i])
        assert np.linalg.norm(ei) <= c32[i] * float(rho[i]) + float(alpha[i])


def test_rounded_rows_slack_definition():
    rng = np.random.default_rng()
    A = torch.tensor(rng.standard_normal((4, 6, 5)), dtype=torch.bfloat16, device=DEVICE)
    G = torch.tensor(rng.standard_normal((4, 6, 3)), dtype=torch.bfloat16, device=DEVICE)
    rho, alpha = ops.rounded_rows_slack(A, G)
    a, g = A.double().cpu().numpy(), G.double().cpu().numpy()
    S = (np.linalg.norm(a, axis=2) * np.linalg.norm(g, axis=2)).sum(1)
    np.testing.assert_allclose(rho.double().cpu().numpy(), 2.0 ** -7 * (1 + 2 ** -8) * S, rtol=1e-5)
    np.testing.assert_allclose(alpha.double().cpu().numpy(),
                               2.0 ** -126 * math.sqrt(3) * (1 + 2 ** -8) * np.linalg.norm(a, axis=2).sum(1), rtol=1e-5)
    A[2, 1, 1] = float("inf")
    assert not torch.isfinite(ops.rounded_rows_slack(A, G)[0][2])


# ========================================================================= the clip factors
@pytest.mark.parametrize("automatic", [False, True], ids=["flat", "automatic"])
def test_clip_factor_slack_matches_the_formula(automatic):
    rng = np.random.default_rng()
    B = 37
    sq = rng.exponential(size=B) * 4
    rho = rng.exponential(size=B) * 0.1
    alpha = rng.exponential(size=B) * 0.05
    sq[3], rho[5], alpha[7] = np.inf, np.nan, np.inf
    alpha[9] = 10.0  # alpha > C: c = 0
    mask = (rng.random(B) < 0.8).astype(np.int64)
    C = 1.3
    t = lambda x: torch.tensor(x, dtype=torch.float32, device=DEVICE)
    slack = torch.stack([t(rho), t(alpha)])
    c, n = ops.clip_factors(t(sq), torch.tensor(mask, device=DEVICE), t([C]), automatic, 0.01, slack)
    nn_ = np.sqrt(sq)
    if automatic:
        exp = np.maximum(C - alpha, 0) / (nn_ + rho + 0.01)
    else:
        exp = np.clip((C - alpha) / (nn_ + rho + 1e-6), 0, 1)
    keep = np.isfinite(nn_) & np.isfinite(rho) & np.isfinite(alpha) & (mask != 0)
    exp = np.where(keep, exp, 0.0)
    np.testing.assert_allclose(c.double().cpu().numpy(), exp, rtol=2e-6, atol=0)
    ok = keep & (exp > 0)
    assert np.all(exp[ok] * (nn_[ok] + rho[ok]) + alpha[ok] <= C * (1 + 1e-6))
    # C = 0 -> 0; C = inf (flat) -> 1 for the kept rows; no slack -> the old factors exactly
    z, _ = ops.clip_factors(t(sq), None, t([0.0]), automatic, 0.01, slack)
    assert float(z.abs().max()) == 0.0
    if not automatic:
        one, _ = ops.clip_factors(t(sq), None, t([math.inf]), False, 0.01, slack)
        kept = np.isfinite(nn_) & np.isfinite(rho) & np.isfinite(alpha)
        assert np.all(one.cpu().numpy()[kept] == 1.0)
    zero_slack, _ = ops.clip_factors(t(sq), None, t([C]), automatic, 0.01, torch.zeros(2, B, device=DEVICE))
    old, _ = ops.clip_factors(t(sq), None, t([C]), automatic, 0.01)
    torch.testing.assert_close(zero_slack, old, rtol=0, atol=0)
    with pytest.raises(ValueError, match="slack must have shape"):
        ops.clip_factors(t(sq), None, t([C]), automatic, 0.01, torch.zeros(B, device=DEVICE))


# ============================================================ the engine vs the micro-batch loop
class _Layers(nn.Module):
    """Independent Linear layers, layer l reading input l: the per-example gradient, norm and
    slack combine over layers exactly as in a deep model, with inputs we control bit for bit."""

    def __init__(self, shapes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, p, bias=b) for d, p, b in shapes)

    def forward(self, xs):
        return [layer(x) for layer, x in zip(self.layers, xs)]


@pytest.mark.parametrize("dtype", HALF)
def test_engine_matches_the_float64_loop_with_the_smaller_factors(dtype):
    rng = np.random.default_rng()
    B, T = 5, 7
    shapes = [(13, 6, True), (9, 11, False)]
    model = _Layers(shapes).to(DEVICE)
    xs = [torch.tensor(rng.standard_normal((B, T, d)), dtype=dtype, device=DEVICE) for d, _, _ in shapes]
    vs = [torch.tensor(rng.standard_normal((B, T, p)), dtype=dtype, device=DEVICE) for _, p, _ in shapes]
    C = 0.05  # every example clipped
    engine = DPEngine(model, max_grad_norm=C, clipped_sum="rounded")
    with torch.autocast(DEVICE, dtype=dtype):
        ys = model([x.float() for x in xs])
    engine.backward(sum((y.float() * v.float()).flatten(1).sum(1) for y, v in zip(ys, vs)))
    got = [p.grad.double().cpu().numpy() for p in model.parameters()]
    assert [r["clipped_sum"] for r in engine.plan()] == ["rounded", "rounded"]

    # float64 loop: per-example gradients from the exact half inputs (G = v, A = x)
    u = U[dtype] * (1 + 2 ** -8)
    per, sq, S2 = [], np.zeros(B), np.zeros(B)
    for i in range(B):
        gi = []
        for (d, p, b), x, v in zip(shapes, xs, vs):
            a, g = x[i].double().cpu().numpy(), v[i].double().cpu().numpy()
            gi.append(g.T @ a)
            if b:
                gi.append(g.sum(0))
            S2[i] += ((np.linalg.norm(a, axis=1) * np.linalg.norm(g, axis=1)).sum() * u) ** 2
        per.append(gi)
        sq[i] = sum(float((w ** 2).sum()) for w in gi)
    n = np.sqrt(sq)
    c_slack = np.minimum(1.0, C / (n + np.sqrt(S2) + 1e-6))  # alpha ~ 2^-126 (bf16) / 1e-6 (fp16): negligible here
    c_plain = np.minimum(1.0, C / (n + 1e-6))
    assert np.all(c_slack < c_plain * (1 - 1e-3))  # the slack is visible
    for k, w in enumerate(got):
        exp = sum(c_slack[i] * per[i][k] for i in range(B))
        other = sum(c_plain[i] * per[i][k] for i in range(B))
        err = np.linalg.norm(w - exp)
        assert err <= 0.5 * np.linalg.norm(other - exp), (
            f"param {k}: |got - loop(c with slack)| = {err:.3e}, |loop(c plain) - loop(c with slack)| = "
            f"{np.linalg.norm(other - exp):.3e}")
        assert err <= 2 * U[dtype] * np.linalg.norm(exp)
    slack_stat = float(engine.last_stats["rounding_slack"])
    np.testing.assert_allclose(slack_stat, np.mean(np.sqrt(S2) / n), rtol=1e-3)
    # every example alone stays <= C
    for i in range(B):
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=dtype):
            ys = model([x.float() for x in xs])
        engine.backward(sum((y.float() * v.float()).flatten(1).sum(1) for y, v in zip(ys, vs)),
                        mask=F.one_hot(torch.tensor(i, device=DEVICE), B))
        norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
        assert norm <= C * (1 + FP32_SLACK)


# ====================================================================== selector and override
def test_design_selector():
    f = klin.choose_clipped_sum_design
    assert f(1, "torch.bfloat16", "auto") == "rank1"
    assert f(16, "torch.bfloat16", "auto") == "rounded"
    assert f(127, "float16", "auto") == "rounded"
    assert f(klin.ROUNDED_ROWS_MAX_T, "bfloat16", "auto") == "segments"
    assert f(1024, "bfloat16", "rounded") == "rounded"
    assert f(16, "float32", "auto") == "segments"          # fp32 keeps (a)
    assert f(16, "float16", "auto", automatic=True) == "segments"  # c > 1 could saturate fp16
    assert f(16, "bfloat16", "auto", automatic=True) == "rounded"
    assert f(16, "bfloat16", "exact") == "segments"          # the user override
    with pytest.raises(ValueError, match="clipped_sum"):
        f(16, "bfloat16", "fast")
    with pytest.raises(ValueError, match="clipped_sum must be one of"):
        DPEngine(nn.Linear(2, 2), max_grad_norm=1.0, clipped_sum="fast")


@pytest.mark.parametrize("mode,expected", [("exact", ["segments", "rank1", "segments"]),
                                           ("auto", ["rounded", "rank1", "segments"])])
def test_plan_shows_each_layers_design(mode, expected):
    """bf16 T = 9 layer: (c) under "auto", (a) under "exact"; a T = 1 layer: (b); an fp32 layer
    (autocast off for its input): (a) whatever the mode."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq, self.dense, self.full = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                a, b = self.seq(x), self.dense(x[:, 0])
            return a.float().sum((1, 2)) + b.float().sum(1) + self.full(x).sum((1, 2))

    model = M().to(DEVICE)
    engine = DPEngine(model, max_grad_norm=1.0, clipped_sum=mode)
    engine.backward(model(torch.randn(3, 9, 4, device=DEVICE)))
    assert [r["clipped_sum"] for r in engine.plan()] == expected
    assert ("(c)" in engine.format_plan()) == (mode == "auto")
    assert ("rounding_slack" in engine.last_stats) == (mode == "auto")


# ================================================================================ Conv (design (c))
from dpprims.bindings.torch import conv as conv_ops  # noqa: E402

CONV_CASES = [pytest.param(3, 4, 7, 6, 6, 3, 2, 1, 1, 2, id="B3-C4-7x6-O6-k3-s2-p1-g2"),
              pytest.param(2, 3, 9, 5, 5, 2, 1, 2, 2, 1, id="B2-C3-9x5-O5-k2-p2-d2"),
              pytest.param(4, 2, 5, 5, 3, 3, 1, 1, 1, 1, id="B4-C2-5x5-O3-k3-p1")]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("B,C_in,H,W,C_out,k,s,p,d,g", CONV_CASES)
def test_conv_rounded_rows_kernel_matches_its_emulation(B, C_in, H, W, C_out, k, s, p, d, g, dtype):
    rng = np.random.default_rng()
    x = torch.tensor(rng.standard_normal((B, C_in, H, W)), dtype=dtype, device=DEVICE)
    Ho = (H + 2 * p - d * (k - 1) - 1) // s + 1
    Wo = (W + 2 * p - d * (k - 1) - 1) // s + 1
    G = torch.tensor(rng.standard_normal((B, C_out, Ho, Wo)), dtype=dtype, device=DEVICE)
    c = torch.tensor(rng.uniform(0.05, 1.0, B), dtype=torch.float32, device=DEVICE)
    c[1] = 0.0
    x[1, 0, 0, 0] = float("nan")
    args = ([k, k], [s, s], [p, p], [d, d], g)
    out = conv_ops.conv2d_clipped_weight_grad(x, G, c, *args, "ieee", "rounded")
    assert _backend.LAST_BACKEND["conv2d_clipped_weight_grad"] in ("triton", "triton-interpreter")
    x64 = x.double().cpu()
    x64[1] = 0
    Uf = F.unfold(x64, k, dilation=d, padding=p, stride=s)  # [B, C_in k k, T] (float64, exact)
    T = Ho * Wo
    Dg, Pg = C_in // g * k * k, C_out // g
    gg, c32 = G.double().cpu().numpy().reshape(B, C_out, T), c.cpu().numpy()
    y = rtz((gg.astype(np.float32) * c32[:, None, None]).astype(np.float64), dtype)
    Un = Uf.numpy()
    exp = np.concatenate([np.einsum("bpt,bdt->pd", y[:, j * Pg:(j + 1) * Pg], Un[:, j * Dg:(j + 1) * Dg])
                          for j in range(g)])
    unrounded = np.concatenate([np.einsum("b,bpt,bdt->pd", c32.astype(np.float64), gg[:, j * Pg:(j + 1) * Pg],
                                          Un[:, j * Dg:(j + 1) * Dg]) for j in range(g)])
    got = out.double().cpu().numpy().reshape(C_out, Dg)
    scale = np.abs(exp).max() + 1e-30
    assert np.all(np.isfinite(got))
    assert np.abs(got - exp).max() / scale <= 1e-5
    assert np.abs(unrounded - exp).max() / scale > 1e-4  # the rounding did happen
    # the slack: per group S = sum_t ||g_t|| ||u_t||, combined in quadrature
    x[1, 0, 0, 0] = 0.0
    rho, alpha = conv_ops.conv2d_rounded_rows_slack(x, G, *args)
    xr = x.double().cpu()
    Ur = F.unfold(xr, k, dilation=d, padding=p, stride=s).numpy()
    gr = G.double().cpu().numpy().reshape(B, C_out, T)
    S = np.stack([(np.linalg.norm(Ur[:, j * Dg:(j + 1) * Dg], axis=1) * np.linalg.norm(gr[:, j * Pg:(j + 1) * Pg], axis=1)).sum(1)
                  for j in range(g)], 1)
    np.testing.assert_allclose(rho.double().cpu().numpy(), U[dtype] * (1 + 2 ** -8) * np.linalg.norm(S, axis=1), rtol=1e-4)
    for i in range(B):
        if i == 1:
            continue
        err = [np.einsum("pt,dt->pd", y[i, j * Pg:(j + 1) * Pg] - c32[i] * gr[i, j * Pg:(j + 1) * Pg],
                         Ur[i, j * Dg:(j + 1) * Dg]) for j in range(g)]
        assert math.sqrt(sum(float((e ** 2).sum()) for e in err)) <= c32[i] * float(rho[i]) + float(alpha[i])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", ["rounded", "auto", "exact"])
def test_conv_cancellation_through_the_engine(dtype, mode):
    """The cancelling pairs as pixels of a 1x1 Conv2d (T = 5 x 7 = 35 output positions, pairs
    across K-blocks): "rounded" runs (c) for the example and stays <= C; "auto" routes it (its
    slack is far above rounding_slack_max) to design (a) with the plain factor; "exact" is (a)."""
    T, starts = 35, [15, 31]
    a, g = _cancelling_example(dtype, T, starts)
    A, G = _one_example_batch(a, g, dtype)
    x = A.permute(0, 2, 1).reshape(3, 1, 5, 7)
    Gc = G.permute(0, 2, 1).reshape(3, 1, 5, 7)
    n = abs(float(np.sum(g * a)))
    C = 0.55 * (n + 1e-6)
    conv = nn.Conv2d(1, 1, 1, bias=False).to(DEVICE)
    engine = DPEngine(conv, max_grad_norm=C, clipped_sum=mode)
    with torch.autocast(DEVICE, dtype=dtype):
        y = conv(x.float())
    engine.backward((y.float() * Gc.float()).sum((1, 2, 3)), mask=torch.tensor([0, 1, 0], device=DEVICE))
    ratio = float(conv.weight.grad.double().norm()) / C
    assert engine.plan()[0]["clipped_sum"] == ("segments" if mode == "exact" else "rounded")
    assert ratio <= 1.0 + FP32_SLACK, f"contribution {ratio:.7f} C"
    if mode != "rounded":
        assert ratio >= 0.99  # not clipped harder: (a) with the plain factor
    else:
        assert ratio < 0.5  # (c) with the slack: clipped harder
    if mode == "auto":
        assert int(engine.last_stats["exact_routed"]) == 1


@pytest.mark.parametrize("dtype", HALF)
def test_auto_routes_cancelling_examples_to_design_a(dtype):
    """clipped_sum="auto": in a batch of 4, the cancelling example (T = 33) is routed to design
    (a) with the plain factor, the three random ones take (c) with the slack; every example alone
    is <= C, the cancelling one is not clipped away (ratio >= 0.99), and the full batch's .grad
    is the sum of the four contributions (both kernels ran, rows split between them)."""
    rng = np.random.default_rng()
    T = 33
    a, g = _cancelling_example(dtype, T, [15, 31])
    A = 1.0 + 0.3 * rng.standard_normal((4, T, 1))  # positions agree (S / n ~ 1): (c) is cheap
    Gm = (1.0 + 0.3 * rng.standard_normal((4, T, 3))) * 0.1
    A[2], Gm[2] = a, np.repeat(g, 3, axis=1)
    A = torch.tensor(A, dtype=dtype, device=DEVICE)
    Gm = torch.tensor(Gm, dtype=dtype, device=DEVICE)
    n2 = abs(float(np.sum(g * a))) * math.sqrt(3)
    C = 0.55 * (n2 + 1e-6)
    lin = nn.Linear(1, 3, bias=False).to(DEVICE)
    engine = DPEngine(lin, max_grad_norm=C, clipped_sum="auto")

    def grad(mask):
        lin.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=dtype):
            y = lin(A.float())
        engine.backward((y.float() * Gm.float()).sum((1, 2)), mask=mask)
        return lin.weight.grad.double().clone()

    full = grad(torch.ones(4, device=DEVICE))
    assert int(engine.last_stats["exact_routed"]) == 1
    assert 0 < float(engine.last_stats["rounding_slack"]) <= engine.rounding_slack_max
    parts = []
    for i in range(4):
        w = grad(F.one_hot(torch.tensor(i, device=DEVICE), 4))
        ratio = float(w.norm()) / C
        assert ratio <= 1.0 + FP32_SLACK, f"example {i}: {ratio:.7f} C"
        parts.append(w)
    assert float(parts[2].norm()) / C >= 0.99
    torch.testing.assert_close(full, sum(parts), rtol=1e-5, atol=1e-7 * C)
