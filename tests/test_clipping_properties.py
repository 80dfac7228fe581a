"""Robust clipping: the privacy-relevant edge cases of DPEngine and the bound every clipped
contribution must obey.

* non-finite per-example norms contribute nothing and are counted (last_stats['nonfinite']);
* clip norm C: NaN and negative are errors, inf is allowed with flat clipping only (no clipping:
  not DP, so DPPlan refuses it), 0 zeroes every gradient; gamma must be positive and finite;
* the contribution bound: for each example alone (one-hot mask, the rest of the batch present as
  padding), the model's .grad - after the cast to the parameter dtype - has L2 norm
  <= C * (1 + FP32_SLACK), over a seeded sweep of random Linear models with inputs, output
  gradients and C at scales 1e-4 .. 1e4, T = 1 and T > 1, flat and automatic clipping, every
  norm method.

FP32_SLACK = 1e-5: the flat factor c = min(1, C / (n + 1e-6)) gives c * n < C in exact
arithmetic; in fp32 the norm pass and the clipped GEMM round differently (relative ~1e-7 per
operation, accumulated over T*d*p terms), so a contribution may exceed C by a few 1e-7 relative;
1e-5 covers that with two orders of margin and is far below anything that matters for privacy.

Half precision (autocast fp16 / bf16 activations into fp32 parameters) used to VIOLATE the
bound: the clipped-sum kernels rounded c_i * G_i back to the half operand dtype before the dot,
which the norm pass never sees, so a contribution could exceed C by ~2^-11 (fp16) / 2^-9 (bf16)
relative for T = 1 and by up to ~100% when c_i * G_i is an fp16 subnormal or positions cancel.
The clipped sums now run on tensor cores in the input dtype with the bound kept
(docs/PRIVACY.md): T > 1 scales each example's unscaled fp32 tile by c_i after the MMA
(design (a)), T = 1 rounds c_i g_i toward zero onto the input dtype (design (b)). The
reproducers of the old bug below are unchanged and must hold on every path; the cases at the
end of the file are aimed at the new design (round-to-nearest at T = 1, fp16 underflow,
cancellation across K-block boundaries, examples sharing K-blocks or splits). bf16 runs under
the interpreter too: its tl.dot multiplies raw bf16 bit patterns (triton-lang/triton#11584), so
the bindings upcast bf16 operands to fp32 there (exact), while the kernels still round onto
bf16 (ROUND_DTYPE), and compiled kernels keep bf16.

Tests run on the ``device`` of conftest (cuda when present, else cpu + interpreter), so on a GPU
they check the compiled kernels.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpprims.bindings.torch import _backend
from dpprims.bindings.torch.linear import check_max_grad_norm
from dpprims.torch import DPEngine

FP32_SLACK = 1e-5



DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # conftest's ``device`` fixture
# "triton" (GPU), "triton-interpreter" (CPU, CI) or "torch" (CPU without the interpreter: the
# plain-torch ops scale c * G in fp32 and have no half-precision violation)
PATH = _backend.backend_for(torch.empty(0, device=DEVICE))
FP16_MARKS: list = []
BF16_MARKS: list = []


def _mlp(d=7, h=9, k=4):
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, k)).to(DEVICE)


def _grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _run(model, engine, x, y, mask=None):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y, reduction="none")
    norms = engine.backward(loss, mask=mask)
    return _grads(model), norms


def _close(ga, gb, atol=1e-6, rtol=1e-5):
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# =============================================================================== non-finite
@pytest.mark.parametrize("bad", ["inf", "nan", "-inf"])
def test_nonfinite_example_contributes_nothing_and_is_counted(bad):
    torch.manual_seed(0)
    model = _mlp()
    engine = DPEngine(model, max_grad_norm=0.5)
    x = torch.randn(6, 7, device=DEVICE)
    y = torch.randint(0, 4, (6,), device=DEVICE)
    x_bad = x.clone()
    x_bad[1, 3] = float(bad)
    x_bad[4, 0] = float(bad)
    g_bad, norms = _run(model, engine, x_bad, y)
    assert not torch.isfinite(norms[[1, 4]]).any()
    assert torch.isfinite(norms[[0, 2, 3, 5]]).all()
    assert int(engine.last_stats["nonfinite"]) == 2
    assert all(torch.isfinite(g).all() for g in g_bad)
    keep = torch.tensor([1, 0, 1, 1, 0, 1], device=DEVICE)
    g_ref, _ = _run(model, engine, x, y, mask=keep)  # the same batch with the bad rows as padding
    _close(g_bad, g_ref)
    assert int(engine.last_stats["nonfinite"]) == 0
    assert int(engine.nonfinite_total) == 2  # running total over backward calls


def test_nonfinite_output_gradient_only():
    """A finite activation with a non-finite loss gradient (e.g. a per-example loss weight of
    inf) is dropped the same way."""
    torch.manual_seed(1)
    lin = nn.Linear(5, 3).to(DEVICE)
    engine = DPEngine(lin, max_grad_norm=1.0)
    x = torch.randn(4, 5, device=DEVICE)
    w = torch.tensor([1.0, float("inf"), 1.0, 1.0], device=DEVICE)
    loss = lin(x).sum(1) * w
    norms = engine.backward(loss)
    assert int(engine.last_stats["nonfinite"]) == 1 and not torch.isfinite(norms[1])
    got = _grads(lin)
    lin.zero_grad(set_to_none=True)
    engine.backward(lin(x).sum(1), mask=torch.tensor([1, 0, 1, 1], device=DEVICE))
    _close(got, _grads(lin))


@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_nonfinite_in_sequence_model(method):
    """T > 1 (norm kernels ghost / direct): a NaN at one position of one example drops exactly
    that example."""
    torch.manual_seed(2)
    lin = nn.Linear(6, 5).to(DEVICE)
    engine = DPEngine(lin, max_grad_norm=0.3, norm_method=method)
    x = torch.randn(3, 4, 6, device=DEVICE)
    v = torch.randn(3, 4, 5, device=DEVICE)
    x_bad = x.clone()
    x_bad[2, 1, 2] = float("nan")
    engine.backward((lin(x_bad) * v).sum((1, 2)))
    got = _grads(lin)
    assert int(engine.last_stats["nonfinite"]) == 1
    lin.zero_grad(set_to_none=True)
    engine.backward((lin(x) * v).sum((1, 2)), mask=torch.tensor([1, 1, 0], device=DEVICE))
    _close(got, _grads(lin))


def test_nonfinite_padding_row_is_not_counted():
    torch.manual_seed(3)
    model = _mlp()
    engine = DPEngine(model, max_grad_norm=1.0)
    x = torch.randn(5, 7, device=DEVICE)
    y = torch.randint(0, 4, (5,), device=DEVICE)
    x[3] = float("nan")
    mask = torch.tensor([True, True, True, False, True], device=DEVICE)
    g_pad, _ = _run(model, engine, x, y, mask=mask)
    assert int(engine.last_stats["nonfinite"]) == 0
    keep = [0, 1, 2, 4]
    g_ref, _ = _run(model, engine, x[keep], y[keep])
    _close(g_pad, g_ref)


# =============================================================================== clip norm C
@pytest.mark.parametrize("clipping", ["flat", "automatic"])
@pytest.mark.parametrize("C", [-1.0, -0.0 - 1e-30, float("nan"), float("-inf")])
def test_invalid_clip_norm_is_an_error(C, clipping):
    with pytest.raises(ValueError, match="max_grad_norm"):
        check_max_grad_norm(C, clipping)
    with pytest.raises(ValueError, match="max_grad_norm"):
        DPEngine(nn.Linear(3, 2), max_grad_norm=C, clipping=clipping)


def test_infinite_clip_norm_only_flat():
    with pytest.raises(ValueError, match="finite max_grad_norm"):
        DPEngine(nn.Linear(3, 2), max_grad_norm=math.inf, clipping="automatic")


@pytest.mark.parametrize("gamma", [0.0, -0.1, float("nan"), float("inf")])
def test_invalid_gamma_is_an_error(gamma):
    with pytest.raises(ValueError, match="gamma"):
        DPEngine(nn.Linear(3, 2), max_grad_norm=1.0, clipping="automatic", gamma=gamma)


def test_plan_refuses_clip_norms_without_a_dp_guarantee():
    """C = 0 (nothing learned) and C = inf (no clipping: no sensitivity bound) are engine
    cases, but a DP training plan refuses them."""
    from dpprims.plan import DPPlan

    for C in (0.0, math.inf, float("nan"), -1.0):
        with pytest.raises(ValueError, match="max_grad_norm"):
            DPPlan.create(num_examples=100, expected_batch_size=10, physical_batch_size=16, max_grad_norm=C,
                          delta=1e-5, steps=10, noise_multiplier=1.0)


@pytest.mark.parametrize("clipping", ["flat", "automatic"])
def test_zero_clip_norm_gives_zero_gradients(clipping):
    torch.manual_seed(4)
    model = _mlp()
    engine = DPEngine(model, max_grad_norm=0.0, clipping=clipping)
    x = torch.randn(5, 7, device=DEVICE)
    y = torch.randint(0, 4, (5,), device=DEVICE)
    g, norms = _run(model, engine, x, y)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in g)
    assert (norms > 0).all() and int(engine.last_stats["clipped"]) == 5


def test_infinite_clip_norm_flat_is_the_unclipped_sum():
    torch.manual_seed(5)
    model = _mlp()
    x = torch.randn(5, 7, device=DEVICE)
    y = torch.randint(0, 4, (5,), device=DEVICE)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    ref = _grads(model)
    engine = DPEngine(model, max_grad_norm=math.inf)
    g, _ = _run(model, engine, x, y)
    _close(g, ref)
    assert int(engine.last_stats["clipped"]) == 0


@pytest.mark.parametrize("clipping", ["flat", "automatic"])
def test_zero_gradient_example_contributes_zero(clipping):
    """n_i = 0: c_i = 1 (flat) or C / gamma (automatic), times a zero gradient: exactly 0, not
    NaN."""
    lin = nn.Linear(4, 3, bias=False).to(DEVICE)
    engine = DPEngine(lin, max_grad_norm=1.0, clipping=clipping, gamma=1e-3)
    x = torch.zeros(2, 4, device=DEVICE)
    norms = engine.backward((lin(x) * torch.randn(2, 3, device=DEVICE)).sum(1))
    assert torch.equal(norms, torch.zeros(2, device=DEVICE))
    assert torch.equal(lin.weight.grad, torch.zeros(3, 4, device=DEVICE))


# =============================================================================== the bound
class _Layers(nn.Module):
    """Independent Linear layers, one input each: per-example loss sum_l <layer_l(x_l), v_l>,
    so layer l's output gradient is v_l exactly (its dtype under autocast)."""

    def __init__(self, shapes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, p, bias=b) for d, p, b in shapes)

    def forward(self, xs):
        return [layer(x) for layer, x in zip(self.layers, xs)]


def _loguniform(rng, lo, hi):
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(1, 4))
    T = int(rng.choice([1, 1, 3, 6]))
    shapes = [(int(rng.integers(1, 24)), int(rng.integers(1, 24)), bool(rng.random() < 0.5)) for _ in range(L)]
    sa = [_loguniform(rng, 1e-4, 1e4) for _ in range(L)]
    sg = [_loguniform(rng, 1e-4, 1e4) for _ in range(L)]
    C = _loguniform(rng, 1e-4, 1e4)
    clipping = "automatic" if rng.random() < 0.25 else "flat"
    method = str(rng.choice(["auto", "ghost", "direct"]))
    return dict(seed=seed, T=T, shapes=shapes, scale_a=sa, scale_g=sg, C=C, clipping=clipping, method=method)


def _contribution_ratios(case, dtype, B=2):
    """norm(.grad) / C for each example alone (one-hot mask), in float64."""
    torch.manual_seed(case["seed"])
    model = _Layers(case["shapes"]).to(DEVICE)
    engine = DPEngine(model, max_grad_norm=case["C"], clipping=case["clipping"],
                      norm_method=case["method"] if case["T"] > 1 else "auto")
    T = case["T"]
    xs = [(torch.randn(B, T, d) * s).to(DEVICE) for (d, _, _), s in zip(case["shapes"], case["scale_a"])]
    vs = [(torch.randn(B, T, p) * s).to(DEVICE) for (_, p, _), s in zip(case["shapes"], case["scale_g"])]
    if T == 1:
        xs, vs = [x[:, 0] for x in xs], [v[:, 0] for v in vs]
    ratios = []
    for i in range(B):
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
            ys = model(xs)
        loss = sum((y.float() * v).flatten(1).sum(1) for y, v in zip(ys, vs))
        engine.backward(loss, mask=F.one_hot(torch.tensor(i, device=DEVICE), B))
        sq = sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None)
        ratios.append(math.sqrt(sq) / case["C"])
    engine.detach()
    return ratios


def _sweep(dtype, trials, seed0):
    worst = (-math.inf, None)
    for t in range(trials):
        case = _random_case(seed0 + t)
        r = max(_contribution_ratios(case, dtype))
        if r > worst[0]:
            worst = (r, case)
    return worst


_SWEEP = [
    pytest.param(torch.float32, 16, id="fp32"),
    pytest.param(torch.float16, 6, id="fp16-autocast", marks=FP16_MARKS),
    pytest.param(torch.bfloat16, 8, id="bf16-autocast", marks=BF16_MARKS),
]


@pytest.mark.parametrize("dtype,trials", _SWEEP)
def test_every_contribution_is_at_most_C(dtype, trials):
    """Seeded sweep (reproduce one case with _contribution_ratios(_random_case(seed), dtype))."""
    worst, case = _sweep(dtype, trials, seed0=1000)
    assert worst <= 1.0 + FP32_SLACK, f"contribution {worst:.9g} * C (excess {worst - 1:.3g}) in case {case}"


def _one_layer_contribution(a, g, C, dtype):
    """.grad norm / C of example 0 of a bias-free Linear(D, P) whose per-example gradient is
    sum_t g[t] a[t]^T (a [T, D], g [T, P]); example 1 is padding."""
    a = torch.tensor(a, dtype=torch.float32, device=DEVICE).reshape(1, len(a), -1).repeat(2, 1, 1)
    g = torch.tensor(g, dtype=torch.float32, device=DEVICE).reshape(1, len(g), -1).repeat(2, 1, 1)
    lin = nn.Linear(a.shape[-1], g.shape[-1], bias=False).to(DEVICE)
    engine = DPEngine(lin, max_grad_norm=C)
    with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
        y = lin(a)
    engine.backward((y.float() * g).sum((1, 2)), mask=torch.tensor([1, 0], device=DEVICE))
    return float(lin.weight.grad.double().norm()) / C


# Exact reproducers of the half-precision violation: (a [T x D], g [T x P], C, dtype, ratio
# observed). Each is a plain bias-free Linear, fp32 parameters, autocast input, one example plus
# one padding row. fp16 ratios: the kernels under the interpreter at the time of writing; bf16
# ratios: an exact numpy emulation of the kernels' arithmetic (fp32 norm and factor, c * g
# rounded to bf16, fp32 dot), since the interpreter cannot run bf16 dots.
_REPRO = [
    # T = 1, normal range: c * g = 1/15 rounds up (bf16 0.06689, +2^-8.5 relative); fp16 likewise
    pytest.param([[15.0]], [[1.0]], 1.0, torch.bfloat16, 1.00342, id="bf16-T1", marks=BF16_MARKS),
    pytest.param([[125.0]], [[1.0]], 1.0, torch.float16, 1.000404, id="fp16-T1", marks=FP16_MARKS),
    # fp16 subnormal: g = 1e-5 (itself an fp16 subnormal), c * g = 1.67e-7 rounds to 3 * 2^-24
    pytest.param([[6e4]], [[1e-5]], 0.01, torch.float16, 1.0729, id="fp16-subnormal", marks=FP16_MARKS),
    # cancellation over positions: G^T A = g1 + g2 = 2^-7 (fp16: 2^-10) while |g_t| = 1, so the
    # independent roundings of c * g_t are amplified 128x (1024x) relative to the contribution
    pytest.param([[1.0], [1.0]], [[1.0], [-0.9921875]], 0.003, torch.bfloat16, 1.3021, id="bf16-cancel-T2",
                 marks=BF16_MARKS),
    pytest.param([[1.0], [1.0]], [[1.0], [-0.9990234375]], 0.0005, torch.float16, 1.9531, id="fp16-cancel-T2",
                 marks=FP16_MARKS),
]


@pytest.mark.parametrize("a,g,C,dtype,observed", _REPRO)
def test_half_precision_reproducers(a, g, C, dtype, observed):
    ratio = _one_layer_contribution(a, g, C, dtype)
    assert ratio <= 1.0 + FP32_SLACK, f"contribution {ratio:.7g} * C (observed when written: {observed} * C)"


@pytest.mark.parametrize("a,g,C", [pytest.param(*p.values[:3], id=p.id) for p in _REPRO])
def test_half_precision_reproducers_fp32(a, g, C):
    """The same inputs in fp32 are within the bound: the violation is the half rounding."""
    assert _one_layer_contribution(a, g, C, torch.float32) <= 1.0 + FP32_SLACK


# ======================================================= reproducers aimed at the tensor-core design
# The clipped sums now run on tensor cores in the input dtype (docs/PRIVACY.md): T > 1 multiplies
# each example's unscaled tiles into an fp32 tile and scales that by c_i (design (a)); T = 1
# rounds c_i g_i TOWARD ZERO onto the input dtype (design (b)). The cases below are built so
# that a plausible wrong version of that design breaks the bound: round-to-nearest at T = 1
# (every coordinate just above a rounding midpoint, or an fp16 value that rounds up from below
# half the smallest subnormal), a K-block or split that mixes two examples, or c_i applied
# before a half rounding where positions cancel across a K-block boundary (BLOCK_K = 16 at T = 33).
_U = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # unit roundoff
_HALF = [pytest.param(torch.bfloat16, id="bf16", marks=BF16_MARKS),
         pytest.param(torch.float16, id="fp16", marks=FP16_MARKS)]


def _contribution_in_batch(a, g, C, dtype, B, index):
    """.grad norm / C of example ``index`` alone in a batch of B copies of (a [T, D], g [T, P])
    (the others padding), through a bias-free Linear under autocast."""
    a = torch.tensor(a, dtype=torch.float32, device=DEVICE).reshape(1, len(a), -1).repeat(B, 1, 1)
    g = torch.tensor(g, dtype=torch.float32, device=DEVICE).reshape(1, len(g), -1).repeat(B, 1, 1)
    lin = nn.Linear(a.shape[-1], g.shape[-1], bias=False).to(DEVICE)
    engine = DPEngine(lin, max_grad_norm=C)
    with torch.autocast(DEVICE, dtype=dtype):
        y = lin(a)
    engine.backward((y.float() * g).sum((1, 2)), mask=F.one_hot(torch.tensor(index, device=DEVICE), B))
    return float(lin.weight.grad.double().norm()) / C


def _rn_ratio(a, g, C, dtype):
    """What a round-to-NEAREST T = 1 design would give for the same inputs (numpy emulation of
    fp32 norm and factor, c * g rounded to the half dtype): the negative control."""
    a16 = torch.tensor(a, dtype=dtype).float().double()
    g16 = torch.tensor(g, dtype=dtype).float()
    n = np.float32(float(a16.norm()) * float(g16.double().norm()))
    c = np.float32(min(1.0, np.float32(C) / np.float32(n + np.float32(1e-6))))
    y = (g16 * float(c)).to(dtype).double()
    return float(y.norm() * a16.norm()) / C


@pytest.mark.parametrize("dtype", _HALF)
@pytest.mark.parametrize("index", [0, 3])
def test_rank_one_every_coordinate_just_above_a_midpoint(dtype, index):
    """T = 1, 16 coordinates g_p = 1 and c = 1/2 (1 + u + u/16): every c * g_p sits just above a
    rounding midpoint, so round-to-nearest inflates the whole contribution by ~(1 + u)."""
    u = _U[dtype]
    c_target = 0.5 * (1 + u + u / 16)
    a, g = [[1.0]], [[1.0] * 16]
    C = c_target * (4.0 + 1e-6)  # n = ||a|| ||g|| = 4
    assert _rn_ratio(a, g, C, dtype) > 1 + u / 2  # adversarial for round-to-nearest
    ratio = _contribution_in_batch(a, g, C, dtype, B=5, index=index)
    assert ratio <= 1.0 + FP32_SLACK, f"contribution {ratio:.7g} * C"
    assert ratio >= 1 - 4 * u  # and not clipped away


@pytest.mark.parametrize("index", [0, 1])
def test_rank_one_fp16_value_below_half_the_smallest_subnormal(index):
    """T = 1, fp16: c * g = 0.51 * 2^-24 rounds to nearest UP to 2^-24 (1.96x); toward zero it
    becomes 0 (rounding of tiny values is absolute, not relative: no margin would cover it)."""
    g16 = float(torch.tensor(1e-5, dtype=torch.float16))
    a16 = float(torch.tensor(6e4, dtype=torch.float16))
    c = 0.51 * 2.0 ** -24 / g16
    C = c * (a16 * g16 + 1e-6)
    a, g = [[6e4]], [[1e-5]]
    assert _rn_ratio(a, g, C, torch.float16) > 1.9
    ratio = _contribution_in_batch(a, g, C, torch.float16, B=2, index=index)
    assert ratio <= 1.0 + FP32_SLACK, f"contribution {ratio:.7g} * C"


def _cancelling_rows(T, pairs, u):
    """a [T, 1], g [T, 1]: rows (s, s + 1) of each pair carry g = 1 and -(1 - 8u), a = 1; the
    rest are zero rows, so G^T A = len(pairs) * 8u while sum_t |g_t||a_t| ~ 2 len(pairs)."""
    a = [[0.0] for _ in range(T)]
    g = [[0.0] for _ in range(T)]
    for s in pairs:
        a[s] = a[s + 1] = [1.0]
        g[s], g[s + 1] = [1.0], [-(1.0 - 8 * u)]
    return a, g


@pytest.mark.parametrize("dtype", _HALF)
@pytest.mark.parametrize("index", [0, 3, 6])
def test_cancellation_across_a_k_block_boundary(dtype, index):
    """T = 33 (BLOCK_K = 16): the cancelling rows sit at t = 15/16 and 31/32, across K-block
    boundaries; in a batch of 7 (three splits under the interpreter) the example is the first,
    a middle or the last one. A design rounding c_i * g_t to the half dtype exceeds C here."""
    u = _U[dtype]
    a, g = _cancelling_rows(33, [15, 31], u)
    C = 1e-3
    ratio = _contribution_in_batch(a, g, C, dtype, B=7, index=index)
    assert ratio <= 1.0 + FP32_SLACK, f"contribution {ratio:.7g} * C"
    assert ratio >= 0.99


@pytest.mark.parametrize("dtype", _HALF)
def test_neighbouring_examples_do_not_share_a_segment(dtype):
    """All 5 examples active at once, each clipped, with different cancelling layouts at the
    K-block boundaries: example i's contribution W(all) - W(all but i) stays <= C, so no
    K-block or split lets one example's rows be scaled by another's factor."""
    u = _U[dtype]
    T, B = 33, 5  # three splits of 2, 2 and 1 examples under the interpreter
    rng = np.random.default_rng(7)
    cases = [_cancelling_rows(T, sorted(rng.choice([12, 15, 28, 31], size=2, replace=False)), u) for _ in range(B)]
    scale = [float(10.0 ** rng.uniform(0, 2)) for _ in range(B)]
    a = torch.tensor([ca for ca, _ in cases], dtype=torch.float32, device=DEVICE)
    g = torch.tensor([cg for _, cg in cases], dtype=torch.float32, device=DEVICE) * torch.tensor(scale, device=DEVICE).view(B, 1, 1)
    C = 1e-4
    lin = nn.Linear(1, 1, bias=False).to(DEVICE)
    engine = DPEngine(lin, max_grad_norm=C)

    def grad(mask):
        lin.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=dtype):
            y = lin(a)
        engine.backward((y.float() * g).sum((1, 2)), mask=mask)
        return lin.weight.grad.double().clone()

    full = grad(torch.ones(B, device=DEVICE))
    assert int(engine.last_stats["clipped"]) == B
    for i in range(B):
        drop = torch.ones(B, device=DEVICE)
        drop[i] = 0
        ratio = float((full - grad(drop)).norm()) / C
        assert ratio <= 1.0 + FP32_SLACK, f"example {i}: contribution {ratio:.7g} * C"
