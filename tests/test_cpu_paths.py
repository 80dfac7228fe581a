"""The plain-torch (CPU) paths and their cost model: every method, forced, against the
definition.

Oracles: per-example float64 autograd.grad loops (the weight gradient of each example on its
own) and the micro-batch loop of test_engine_conv. The plain-torch path is what runs on a CPU
without TRITON_INTERPRET (``plain_torch_path``), so these tests pin that path on explicitly.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _paths import plain_torch_path
from test_engine_conv import CNN, CNN1d, _check_grads, _data, _rel, micro_batch_oracle

from dpprims.bindings.torch import _backend
from dpprims.bindings.torch import conv as conv_ops
from dpprims.bindings.torch import linear as lin_ops
from dpprims.torch import DPEngine
from dpprims.torch.handlers import cpu_cost

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

RTOL = 1e-5


def _conv_ref(x, G, k, s, p, d, groups):
    """(per-example weight gradients [B, C_out, C_in/g, *k], squared norms [B]) in float64,
    one autograd.grad of sum(conv(x_i, W) * G_i) per example."""
    conv = F.conv2d if len(k) == 2 else F.conv1d
    grads = []
    for i in range(x.shape[0]):
        w = torch.zeros(G.shape[1], x.shape[1] // groups, *k, dtype=torch.float64, requires_grad=True)
        y = conv(x[i:i + 1].double(), w, None, s, p, d, groups)
        (gw,) = torch.autograd.grad((y * G[i:i + 1].double()).sum(), w)
        grads.append(gw)
    per = torch.stack(grads)
    return per, per.pow(2).flatten(1).sum(1)


# (B, C_in, spatial, C_out, kernel, stride, padding, dilation, groups): odd shapes, strided,
# grouped, depthwise, dilated, 1-D, and T >= 256 (the grouped-conv branch of the direct path)
CONV_CASES = [
    pytest.param(5, 6, (9, 7), 4, (3, 2), (2, 1), (1, 0), (1, 2), 2, id="B5-grouped-strided-dilated"),
    pytest.param(3, 4, (5, 6), 4, (1, 1), (1, 1), (0, 0), (1, 1), 4, id="B3-depthwise-1x1"),
    pytest.param(2, 3, (17, 17), 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, id="B2-T289-grouped-conv-branch"),
    pytest.param(3, 6, (23,), 9, (4,), (2,), (3,), (2,), 3, id="B3-conv1d-grouped"),
]


@pytest.mark.parametrize("variant", ["default", "loop-build", "grouped-build", "im2col-build", "im2col-gram",
                                     "shifted-gram"])
@pytest.mark.parametrize("B,C,sp,Co,k,s,p,d,g", CONV_CASES)
def test_conv_plain_torch_methods_match_autograd(B, C, sp, Co, k, s, p, d, g, variant, monkeypatch):
    """Every plain-torch norm method and the per-example gradients against autograd; the build
    variants force how per-example gradients are built (a weight-gradient conv per example,
    one grouped conv with the batch as groups, the chunked im2col + batched GEMM: at default
    thresholds these small shapes take the im2col), the gram variants the ghost path's U^T U
    (from the im2col or from the padded input's Gram)."""
    if variant.endswith("-build"):
        monkeypatch.setattr(conv_ops, "_BUILD", variant[:-len("-build")])
        if variant == "im2col-build":  # chunks of 2 examples: the chunk boundaries are exercised
            d_, t_ = C // g * math.prod(k), math.prod(
                (n + 2 * pp - dd * (kk - 1) - 1) // ss + 1 for n, kk, ss, pp, dd in zip(sp, k, s, p, d))
            monkeypatch.setattr(conv_ops, "_IM2COL_CHUNK", 2 * g * d_ * t_)
    elif variant.endswith("-gram"):
        monkeypatch.setattr(conv_ops, "_GRAM", variant[:-len("-gram")])
    torch.manual_seed(B * 100 + C)
    x = torch.randn(B, C, *sp)
    out_sp = [(n + 2 * pp - dd * (kk - 1) - 1) // ss + 1 for n, kk, ss, pp, dd in zip(sp, k, s, p, d)]
    G = torch.randn(B, Co, *out_sp)
    per_ref, sq_ref = _conv_ref(x, G, k, s, p, d, g)
    with plain_torch_path():
        for method in ("direct", "ghost"):
            sq = conv_ops.conv2d_weight_sq_norms(x, G, list(k), list(s), list(p), list(d), g, method)
            assert _backend.LAST_BACKEND[f"conv2d_weight_sq_norms[{method}]"] == "torch"
            assert _rel(sq, sq_ref) <= 1e-5, f"{method}: relative error {_rel(sq, sq_ref):.2e}"
        geo, x4, G4 = conv_ops.conv_geometry(x, G, list(k), list(s), list(p), list(d), g)
        per = conv_ops.per_example_weight_grads(x4, G4, geo)
        assert per.shape == (B, Co, geo.D)
        assert _rel(per, per_ref.reshape(B, Co, -1)) <= 1e-5
        c = torch.rand(B)
        c[1] = 0.0
        ref_sum = (c.double().view(-1, 1, 1) * per_ref.reshape(B, Co, -1)).sum(0)
        assert _rel(conv_ops.clipped_sum_of_rows(per, c), ref_sum) <= 1e-5


@pytest.mark.parametrize("hw,k,s,lo,d,g,hw_out", [
    ((17, 16), (2, 2), (1, 1), (0, 0), (1, 1), 1, (17, 16)),  # padding="same", even kernel: high pad 1 only
    ((33, 16), (3, 3), (2, 1), (1, 1), (1, 2), 2, (17, 16)),  # strided, dilated, grouped, high pad 3 on W
])
def test_per_example_builds_agree_on_asymmetric_padding(hw, k, s, lo, d, g, hw_out, monkeypatch):
    """The per-example conv loop pads x itself where torch's symmetric padding would not give
    G's shape (then it calls a padding-0 conv): the same gradients as the grouped conv and the
    im2col + batched GEMM."""
    torch.manual_seed(17)
    x, G = torch.randn(3, 4, *hw), torch.randn(3, 6, *hw_out)
    geo, x4, G4 = conv_ops.conv_geometry(x, G, list(k), list(s), list(lo), list(d), g)
    assert geo.T >= 256
    built = {}
    for build in ("loop", "grouped", "im2col"):
        monkeypatch.setattr(conv_ops, "_BUILD", build)
        built[build] = conv_ops.per_example_weight_grads(x4, G4, geo)
    assert _rel(built["loop"], built["grouped"]) <= 1e-5
    assert _rel(built["im2col"], built["grouped"]) <= 1e-5


@pytest.mark.parametrize("hw,k,s,lo,d,g,hw_out", [
    ((17, 16), (2, 2), (1, 1), (0, 0), (1, 1), 1, (17, 16)),  # padding="same", even kernel: high pad 1 only
    ((33, 16), (3, 3), (2, 1), (1, 1), (1, 2), 2, (17, 16)),  # strided, dilated, grouped, high pad 3 on W
    ((11, 9), (3, 3), (2, 2), (2, 0), (1, 1), 1, (6, 3)),     # cropped: the last rows / columns unread
])
def test_shifted_gram_ghost_matches_autograd(hw, k, s, lo, d, g, hw_out, monkeypatch):
    """The shifted input Gram (no im2col) gives U^T U exactly as the im2col does, on
    asymmetric padding and crops, and the ghost norms of autograd; a non-finite input value
    poisons its own example's norm only, and one in a position no window reads (the crop)
    changes nothing."""
    torch.manual_seed(23)
    B, C, Co = 4, 4, 6
    x, G = torch.randn(B, C, *hw), torch.randn(B, Co, *hw_out)
    geo, x4, G4 = conv_ops.conv_geometry(x, G, list(k), list(s), list(lo), list(d), g)
    U = conv_ops.im2col(x4, geo).reshape(B * g, geo.D, geo.T)
    uu = conv_ops.shifted_input_gram(x4, geo).reshape(B * g, geo.T, geo.T)
    assert _rel(uu, U.transpose(1, 2).double() @ U.double()) <= 1e-5
    monkeypatch.setattr(conv_ops, "_GRAM", "shifted")
    sq = conv_ops._torch_weight_sq_norms(x4, G4, geo, "ghost")
    # oracle: autograd on the explicitly padded input (asymmetric padding, crop)
    xp = conv_ops._padded(x4, geo)
    _, sq_ref = _conv_ref(xp, G, k, s, (0, 0), d, g)
    assert _rel(sq, sq_ref) <= 1e-5
    x_bad = x.clone()
    x_bad[1, 0, lo[0], lo[1] + 1] = float("inf")
    geo, xb4, _ = conv_ops.conv_geometry(x_bad, G, list(k), list(s), list(lo), list(d), g)
    sq_bad = conv_ops._torch_weight_sq_norms(xb4, G4, geo, "ghost")
    assert not torch.isfinite(sq_bad[1])
    keep = torch.tensor([0, 2, 3])
    assert torch.equal(sq_bad[keep], sq[keep])


@pytest.mark.parametrize("hw,k,s,out,bad", [
    ((12, 10), 3, 2, (5, 4), (11, 9)),  # 3x3 stride 2: the last row and column are cropped
    ((9, 9), 1, 2, (5, 5), (1, 4)),     # 1x1 stride 2: an odd row sits in a stride gap of X^T X
])
def test_shifted_gram_ignores_unread_positions(hw, k, s, out, bad, monkeypatch):
    """A NaN at a position of x that no window reads leaves every norm unchanged on the
    shifted path (as on the im2col path): its row and column of X^T X are never read."""
    torch.manual_seed(29)
    x, G = torch.randn(3, 5, *hw), torch.randn(3, 7, *out)
    args = ([k, k], [s, s], [0, 0], [1, 1], 1)
    geo, x4, G4 = conv_ops.conv_geometry(x, G, *args)
    x_bad = x.clone()
    x_bad[0, 2, bad[0], bad[1]] = float("nan")
    monkeypatch.setattr(conv_ops, "_GRAM", "shifted")
    ref = conv_ops._torch_weight_sq_norms(x4, G4, geo, "ghost")
    got = conv_ops._torch_weight_sq_norms(conv_ops.conv_geometry(x_bad, G, *args)[1], G4, geo, "ghost")
    assert torch.isfinite(got).all() and torch.equal(got, ref)
    assert _rel(ref, _conv_ref(x, G, (k, k), (s, s), (0, 0), (1, 1), 1)[1]) <= 1e-5


def test_per_example_build_rule():
    """ResNet-18's layer1/2 3x3 (B = 32): a weight-gradient conv per example; its stem and 1x1
    downsample, and its layer3 3x3: the chunked im2col; a depthwise conv at T >= 256: the
    grouped conv."""
    rule = conv_ops.per_example_build_for
    assert rule(1024, 576, 64, 1, 64) == "loop"
    assert rule(256, 1152, 128, 1, 128) == "loop"
    assert rule(64, 2304, 256, 1, 256) == "im2col"
    assert rule(1024, 27, 64, 1, 3) == "im2col"
    assert rule(256, 64, 128, 1, 64) == "im2col"
    assert rule(256, 9, 1, 64, 64) == "grouped"
    assert rule(64, 9, 1, 64, 64) == "im2col"


def test_gram_method_follows_the_time_model():
    """ResNet-18's layer3/4 stride-1 3x3 convs (B = 32) take the shifted Gram; a strided 1x1
    downsample and a 32x32 stride-2 conv keep the im2col (N^2 >> K*T^2)."""
    def geo(c_in, hw, c_out, k, s, p):
        x = torch.empty(32, c_in, hw, hw)
        out = (hw + 2 * p - k) // s + 1
        G = torch.empty(32, c_out, out, out)
        return conv_ops.conv_geometry(x, G, [k, k], [s, s], [p, p], [1, 1], 1)[0]
    assert conv_ops.gram_method(geo(256, 8, 256, 3, 1, 1)) == "shifted"
    assert conv_ops.gram_method(geo(512, 4, 512, 3, 1, 1)) == "shifted"
    assert conv_ops.gram_method(geo(128, 16, 256, 1, 2, 0)) == "im2col"
    assert conv_ops.gram_method(geo(64, 32, 128, 3, 2, 1)) == "im2col"


def test_clipped_sum_of_rows_drops_nonfinite_examples():
    """The instantiate clipped sum leaves c_i == 0 rows out: a NaN / inf gradient of a dropped
    example cannot reach the sum (0 * NaN would be NaN)."""
    torch.manual_seed(1)
    per = torch.randn(4, 3, 5)
    per[2, 0, 0] = float("nan")
    per[3] = float("inf")
    c = torch.tensor([0.5, 1.0, 0.0, 0.0])
    out = conv_ops.clipped_sum_of_rows(per, c)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, 0.5 * per[0] + per[1])
    with pytest.raises(ValueError, match="clip factors"):
        conv_ops.clipped_sum_of_rows(per, c[:3])


@pytest.mark.parametrize("method", ["direct", "ghost"])
def test_linear_plain_torch_methods_match_autograd(method):
    torch.manual_seed(3)
    B, T, D, P = 5, 7, 13, 6
    A, G = torch.randn(B, T, D), torch.randn(B, T, P)
    ref = torch.einsum("btp,btd->bpd", G.double(), A.double()).pow(2).sum((1, 2))
    with plain_torch_path():
        sq = lin_ops.linear_weight_sq_norms(A, G, method)
    assert _rel(sq, ref) <= 1e-5


@pytest.mark.parametrize("norm_method", ["ghost", "direct", "instantiate", "auto"])
@pytest.mark.parametrize("model_cls", [CNN, CNN1d], ids=["cnn2d", "cnn1d"])
def test_engine_cpu_methods_match_micro_batch_loop(model_cls, norm_method):
    """Each method forced on every layer of the plain-torch path (and the cost model's own
    choice) gives the oracle's norms and clipped sums; the plan reports the method run."""
    torch.manual_seed(11)
    model = model_cls()
    x, y = _data(model_cls, 5)
    norms_ref, sums_ref = micro_batch_oracle(model, x, y, 0.7)
    with plain_torch_path():
        engine = DPEngine(model, max_grad_norm=0.7, norm_method=norm_method)
        norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert (norms_ref > 0.7).any()
    assert _rel(norms, norms_ref) <= RTOL
    _check_grads(model, sums_ref)
    for r in engine.plan():
        if r["kind"] in ("conv1d", "conv2d"):
            assert r["method"] in cpu_cost.CPU_METHODS and set(r["cpu_ms"]) >= {"ghost", "direct"}
            if norm_method != "auto":
                assert r["method"] == norm_method
            else:
                assert r["cpu_ms"][r["method"]] == min(r["cpu_ms"].values())
    assert "CPU ms" in engine.format_plan()


def test_ghost_clipped_sum_with_mask_and_nonfinite_example():
    """A plain-torch ghost conv (Gram norms, then the framework's weight gradient of c * G as
    the clipped sum) gives the oracle's sums, padding and a non-finite example included."""
    torch.manual_seed(8)
    model = CNN()
    x, y = _data(CNN, 5)
    x[3, 1, 2, 2] = float("inf")
    mask = torch.tensor([1, 0, 1, 1, 1], dtype=torch.bool)
    keep = torch.tensor([0, 2, 4])
    _, sums_ref = micro_batch_oracle(model, x[keep], y[keep], 0.7)
    with plain_torch_path():
        engine = DPEngine(model, max_grad_norm=0.7, norm_method="ghost")
        engine.backward(F.cross_entropy(model(x), y, reduction="none"), mask=mask)
    assert int(engine.last_stats["nonfinite"]) == 1
    _check_grads(model, sums_ref)


def test_instantiate_with_mask_and_nonfinite_example():
    """Padding rows and a non-finite example contribute nothing on the instantiate path."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 36, 3))
    x, y = torch.randn(5, 3, 6, 6), torch.randint(0, 3, (5,))
    x[1, 0, 2, 2] = float("nan")
    mask = torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool)
    keep = torch.tensor([0, 2, 4])
    _, sums_ref = micro_batch_oracle(model, x[keep], y[keep], 0.5)
    with plain_torch_path():
        engine = DPEngine(model, max_grad_norm=0.5, norm_method="instantiate")
        engine.backward(F.cross_entropy(model(x), y, reduction="none"), mask=mask)
    assert int(engine.last_stats["nonfinite"]) == 1
    assert [r["method"] for r in engine.plan()] == ["instantiate", "outer"]  # Linear T = 1: closed form
    _check_grads(model, sums_ref)


def test_cpu_cost_model_picks_per_layer(monkeypatch):
    """Large grid, narrow layer: instantiate (no second GEMM); small grid, wide layer: ghost;
    instantiate over its memory cap: direct. Linear T = 1: the closed form."""
    assert cpu_cost.choose_cpu_method(32, 1024, 576, 64, conv=True) == "instantiate"
    assert cpu_cost.choose_cpu_method(32, 16, 4608, 512, conv=True) == "ghost"
    assert cpu_cost.choose_cpu_method(7, 1, 300, 10, conv=False) == "outer"
    assert cpu_cost.choose_cpu_method(7, 1, 300, 10, conv=False, method="ghost") == "outer"
    monkeypatch.setattr(cpu_cost, "INSTANTIATE_MAX_BYTES", 1024)
    assert cpu_cost.choose_cpu_method(32, 1024, 576, 64, conv=True) == "direct"
    assert cpu_cost.choose_cpu_method(32, 1024, 576, 64, conv=True, method="instantiate") == "direct"
    with pytest.raises(ValueError, match="norm_method"):
        cpu_cost.choose_cpu_method(2, 4, 4, 4, conv=True, method="fast")
    costs = cpu_cost.layer_costs(32, 1024, 576, 64, conv=True)
    assert costs["ghost"] > costs["direct"] > 0


def test_plan_on_plain_torch_follows_the_cpu_model():
    """The engine's per-layer choice on CPU is the cost model's, shown by plan()."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 64, 3, stride=4),
                          nn.ReLU(), nn.Conv2d(64, 96, 3, padding=1), nn.Flatten(), nn.Linear(96 * 16, 2))
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 1])
    with plain_torch_path():
        engine = DPEngine(model, max_grad_norm=1.0)
        engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    plan = {r["layer"]: r for r in engine.plan()}
    for name in ("0", "2", "4"):
        r = plan[name]
        expect = cpu_cost.choose_cpu_method(3, r["T"], r["d"], r["p"], r["groups"], conv=True)
        assert r["method"] == expect
    assert plan["0"]["method"] == "instantiate" and plan["4"]["method"] == "ghost"
    assert plan["6"]["method"] == "outer"


class SeqModel(nn.Module):
    """Linear layers on sequences (T = 7 positions) and a LayerNorm: the transformer's layers."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 12)
        self.norm = nn.LayerNorm(12)
        self.mix = nn.Linear(12, 9)
        self.head = nn.Linear(9, 3)

    def forward(self, x):
        h = self.mix(torch.tanh(self.norm(self.inp(x))))
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("norm_method", ["ghost", "direct", "instantiate", "auto"])
def test_engine_cpu_linear_methods_on_sequences(norm_method):
    torch.manual_seed(4)
    model = SeqModel()
    x, y = torch.randn(6, 7, 5), torch.randint(0, 3, (6,))
    norms_ref, sums_ref = micro_batch_oracle(model, x, y, 0.3)
    with plain_torch_path():
        engine = DPEngine(model, max_grad_norm=0.3, norm_method=norm_method)
        norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert (norms_ref > 0.3).any()
    assert _rel(norms, norms_ref) <= RTOL
    _check_grads(model, sums_ref)
    plan = {r["layer"]: r for r in engine.plan()}
    for name in ("inp", "mix"):
        assert plan[name]["T"] == 7
        assert plan[name]["method"] == (norm_method if norm_method != "auto" else
                                        min(plan[name]["cpu_ms"], key=plan[name]["cpu_ms"].get))
    assert plan["head"]["method"] == "outer"


@pytest.mark.parametrize("norm_method", ["ghost", "direct", "instantiate", "auto"])
@pytest.mark.parametrize("model_cls", [SeqModel, CNN, CNN1d], ids=["seq", "cnn2d", "cnn1d"])
def test_engine_cpu_methods_on_an_empty_batch(model_cls, norm_method):
    """B = 0 is a real step (an empty Poisson batch): every forced CPU method returns no norms
    and zero clipped sums, instead of failing to reshape or concatenate nothing."""
    torch.manual_seed(5)
    model = model_cls()
    x = torch.randn(0, 7, 5) if model_cls is SeqModel else _data(model_cls, 0)[0]
    with plain_torch_path():
        engine = DPEngine(model, max_grad_norm=0.3, norm_method=norm_method)
        norms = engine.backward(model(x).sum(dim=1), mask=torch.ones(0, dtype=torch.bool))
    assert norms.shape == (0,)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


@pytest.mark.parametrize("automatic", [False, True])
def test_plain_clip_factors_zero_exactly_the_nonfinite_norms(automatic):
    """clip_factors_torch tests finiteness as n < inf on n = sqrt(sq): every NaN, +inf, -inf or
    negative squared norm (sqrt gives NaN) gets c = 0 and every finite one keeps its factor,
    the same factors as the definition with isfinite; the engine counts the same examples as
    non-finite."""
    torch.manual_seed(31)
    sq = torch.rand(11) * 9
    bad = [1, 4, 6, 9]
    sq[1], sq[4], sq[6], sq[9] = float("nan"), float("inf"), float("-inf"), -2.0
    C = torch.tensor([1.3])
    c, n = lin_ops.clip_factors_torch(sq, None, C, automatic, 0.01)
    n_ref = sq.double().sqrt()
    ok = torch.isfinite(n_ref)
    c_ref = torch.where(ok, 1.3 / (n_ref + 0.01) if automatic else torch.clamp(1.3 / (n_ref + 1e-6), max=1.0), 0.0)
    assert torch.equal(c == 0, ~ok) and ok.sum() == 11 - len(bad)
    assert _rel(c, c_ref) <= 1e-6
    if not automatic:  # C = inf (no clipping): C / n alone would give NaN at n = inf, not 0
        c_inf, _ = lin_ops.clip_factors_torch(sq, None, torch.tensor([float("inf")]), False, 0.01)
        assert torch.equal(c_inf, ok.float())
    model = nn.Sequential(nn.Linear(5, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    x[2, 1], x[4, 0] = float("inf"), float("nan")
    with plain_torch_path():
        engine = DPEngine(model, max_grad_norm=1.0)
        norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert int(engine.last_stats["nonfinite"]) == int((~torch.isfinite(norms)).sum()) == 2


def test_interpreter_set_after_the_kernels_were_defined_is_a_clear_error():
    """TRITON_INTERPRET=1 set after dpprims' kernels were defined in compiled mode: a CPU op
    names the problem and both fixes instead of failing inside Triton ("0 active drivers"); with
    it unset again the plain-torch path runs."""
    import os
    import subprocess
    import sys

    code = (
        "import os, torch\n"
        "from dpprims.bindings.torch import linear as ops\n"
        "A, G = torch.randn(3, 2, 5), torch.randn(3, 2, 4)\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        "    ops.linear_weight_sq_norms(A, G, 'direct')\n"
        "except RuntimeError as e:\n"
        "    print('ERROR', e)\n"
        "os.environ['TRITON_INTERPRET'] = '0'\n"
        "print('OK', ops.linear_weight_sq_norms(A, G, 'direct').shape)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ERROR TRITON_INTERPRET=1 is set" in out.stdout and "dpprims.kernels.linear" in out.stdout
    assert "before importing dpprims" in out.stdout and "plain-torch path" in out.stdout
    assert "OK torch.Size([3])" in out.stdout
