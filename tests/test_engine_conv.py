"""DPEngine with Conv2d / Conv1d layers against the micro-batch loop.

The oracle is the definition: a float64 copy of the model, one torch.autograd.grad per example,
global per-example norm, clip factor min(1, C / (n + 1e-6)) (0 for padding and non-finite
examples), and the sum of the clipped per-example gradients. The engine runs in fp32 through
the fused kernels (Triton interpreter on CPU).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dpprims.torch import DPEngine

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

RTOL = 1e-5
C_NORM = 0.7


class CNN(nn.Module):
    """Every conv configuration the engine has to get right, in one small model."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, (3, 2), padding="same", groups=8)  # asymmetric 'same'
        self.dilated = nn.Conv2d(8, 6, (1, 3), dilation=2, padding=(0, 2), padding_mode="reflect", bias=False)
        self.pointwise = nn.Conv2d(6, 6, 1, stride=(1, 2))
        self.fc = nn.Linear(6 * 4 * 2, num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = torch.tanh(self.grouped(x))
        x = F.relu(self.depthwise(x))
        x = torch.tanh(self.dilated(x))
        x = self.pointwise(x)
        return self.fc(x.flatten(1))


class CNN1d(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.conv1 = nn.Conv1d(4, 6, 5, stride=2, dilation=2)
        self.conv2 = nn.Conv1d(6, 6, 4, padding="same", groups=3, padding_mode="circular")
        self.depthwise = nn.Conv1d(6, 6, 3, padding=1, groups=6, bias=False)
        self.fc = nn.Linear(6 * 6, num_classes)

    def forward(self, x):
        x = torch.tanh(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(self.depthwise(x).flatten(1))


class SharedConv(nn.Module):
    """One conv called twice per forward, at two resolutions (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, groups=1)
        self.fc = nn.Linear(3 * 36 + 3 * 9, 3)

    def forward(self, x):
        a = torch.tanh(self.conv(x))
        b = self.conv(F.avg_pool2d(x, 2))
        return self.fc(torch.cat([a.flatten(1), b.flatten(1)], dim=1))


def _data(model_cls, B):
    if model_cls is CNN1d:
        return torch.randn(B, 4, 19), torch.randint(0, 4, (B,))
    if model_cls is SharedConv:
        return torch.randn(B, 3, 6, 6), torch.randint(0, 3, (B,))
    return torch.randn(B, 3, 8, 8), torch.randint(0, 5, (B,))


def micro_batch_oracle(model, x, y, C, mask=None):
    """(norms [B], {name: clipped sum}) from per-example autograd.grad in float64."""
    m64 = copy.deepcopy(model).double()
    params = [(n, p) for n, p in m64.named_parameters() if p.requires_grad]
    B = x.shape[0]
    sums = {n: torch.zeros_like(p) for n, p in params}
    norms = []
    for i in range(B):
        loss = F.cross_entropy(m64(x[i:i + 1].double()), y[i:i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, [p for _, p in params])
        n = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(n)
        c = torch.clamp(C / (n + 1e-6), max=1.0)
        if (mask is not None and not mask[i]) or not torch.isfinite(n):
            continue
        for (name, _), g in zip(params, grads):
            sums[name] += c * g
    return torch.stack(norms), sums


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _check_grads(model, expected, rtol=RTOL):
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None
            continue
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        err = _rel(p.grad, expected[name])
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("norm_method", ["auto", "ghost", "direct"])
@pytest.mark.parametrize("model_cls", [CNN, CNN1d, SharedConv], ids=["cnn2d", "cnn1d", "shared-conv"])
def test_engine_matches_micro_batch_loop(model_cls, norm_method):
    torch.manual_seed(0)
    model = model_cls()
    x, y = _data(model_cls, 4)
    norms_ref, sums_ref = micro_batch_oracle(model, x, y, C_NORM)
    engine = DPEngine(model, max_grad_norm=C_NORM, norm_method=norm_method)
    norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert _rel(norms, norms_ref) <= RTOL
    assert (norms_ref > C_NORM).any(), "the test should clip at least one example"
    _check_grads(model, sums_ref)
    plan = {r["layer"]: r for r in engine.plan()}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            r = plan[name]
            assert r["kind"] == ("conv1d" if isinstance(mod, nn.Conv1d) else "conv2d")
            assert r["groups"] == mod.groups and r["p"] == mod.out_channels // mod.groups
            assert r["d"] == mod.in_channels // mod.groups * mod.weight[0, 0].numel()
            if norm_method != "auto":
                assert r["method"] == norm_method
            assert r["method"] in ("direct", "ghost") and r["norm_flops"] > 0
    if model_cls is SharedConv:
        assert plan["conv"]["calls"] == 2 and plan["conv"]["T"] == 36 + 9
    engine.format_plan()  # renders with conv rows


@pytest.mark.parametrize("model_cls", [CNN, CNN1d, SharedConv], ids=["cnn2d", "cnn1d", "shared-conv"])
def test_engine_on_the_plain_torch_backend(model_cls, monkeypatch):
    """Without the interpreter, CPU tensors run the plain-torch implementation (F.unfold):
    same numbers, and the engine reports that backend."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(6)
    model = model_cls()
    x, y = _data(model_cls, 4)
    norms_ref, sums_ref = micro_batch_oracle(model, x, y, C_NORM)
    engine = DPEngine(model, max_grad_norm=C_NORM)
    norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert _rel(norms, norms_ref) <= RTOL
    _check_grads(model, sums_ref)
    if model_cls is not SharedConv:
        assert engine.last_stats["backends"]["conv2d_clipped_weight_grad"] == "torch"


def test_cost_model_picks_per_layer():
    """A wide layer on a tiny spatial grid goes ghost, a narrow one on a large grid direct."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 64, 3, stride=4),
                          nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.Flatten(), nn.Linear(64 * 4, 2))
    x, y = torch.randn(2, 2, 10, 10), torch.tensor([0, 1])
    engine = DPEngine(model, max_grad_norm=1.0)
    engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    plan = {r["layer"]: r for r in engine.plan()}
    assert plan["0"]["T"] == 100 and plan["0"]["method"] == "direct"
    assert plan["4"]["T"] == 4 and plan["4"]["method"] == "ghost"


def test_mask_and_nonfinite_example():
    torch.manual_seed(1)
    model = CNN()
    x, y = _data(CNN, 5)
    x[3, 1, 2, 2] = float("nan")
    mask = torch.tensor([True, False, True, True, True])
    norms_ref, sums_ref = micro_batch_oracle(model, x, y, C_NORM, mask=mask)
    engine = DPEngine(model, max_grad_norm=C_NORM)
    norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"), mask=mask)
    assert not torch.isfinite(norms[3])
    keep = torch.tensor([0, 1, 2, 4])
    assert _rel(norms[keep], norms_ref[keep]) <= RTOL
    _check_grads(model, sums_ref)
    assert int(engine.last_stats["nonfinite"]) == 1


class _ConvBackwardSpy(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.convolution_backward.default:
            self.masks.append(tuple(args[10] if len(args) > 10 else kwargs["output_mask"]))
        return func(*args, **kwargs)


def test_autograd_computes_no_conv_weight_gradient(monkeypatch):
    """The non-private weight-gradient conv never runs: every convolution_backward the step
    dispatches asks for the input gradient only, the weight-gradient helpers are not called,
    and the engine's leak guard (which raises on any autograd parameter gradient) stays silent."""
    def boom(*a, **k):
        raise AssertionError("conv weight gradient computed by autograd")

    monkeypatch.setattr(torch.nn.grad, "conv2d_weight", boom)
    monkeypatch.setattr(torch.nn.grad, "conv1d_weight", boom)
    torch.manual_seed(2)
    model = CNN()
    x, y = _data(CNN, 3)
    x.requires_grad_(True)  # so that conv1 needs an input gradient too
    engine = DPEngine(model, max_grad_norm=C_NORM)
    spy = _ConvBackwardSpy()
    with spy:
        loss = F.cross_entropy(model(x), y, reduction="none")
        engine.backward(loss)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert len(spy.masks) == n_convs
    assert all(mask == (True, False, False) for mask in spy.masks), spy.masks
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_input_gradient_is_exact():
    """dL/dx through the DP convs equals plain autograd's (asymmetric 'same', reflect padding,
    groups, stride), so layers below a conv get the right output gradients."""
    torch.manual_seed(3)
    model = CNN()
    x, y = _data(CNN, 3)
    x1 = x.clone().requires_grad_(True)
    F.cross_entropy(model(x1), y, reduction="sum").backward()
    model.zero_grad()
    x2 = x.clone().requires_grad_(True)
    engine = DPEngine(model, max_grad_norm=C_NORM)
    engine.backward(F.cross_entropy(model(x2), y, reduction="none"))
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)


def test_channels_last_and_frozen_weight():
    """A channels-last input runs without copies; a conv with a frozen weight and a trainable
    bias clips the bias only."""
    torch.manual_seed(4)
    model = CNN()
    model.grouped.weight.requires_grad_(False)
    x, y = _data(CNN, 3)
    x = x.contiguous(memory_format=torch.channels_last)
    norms_ref, sums_ref = micro_batch_oracle(model, x, y, C_NORM)
    engine = DPEngine(model, max_grad_norm=C_NORM)
    norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert _rel(norms, norms_ref) <= RTOL
    _check_grads(model, sums_ref)


def test_autocast_fp16():
    """Under autocast the convs run (and are captured) in fp16, including behind an explicit
    reflect pad; the clipped sums match the fp64 oracle to fp16 accuracy."""
    torch.manual_seed(7)
    model = CNN()
    x, y = _data(CNN, 3)
    norms_ref, sums_ref = micro_batch_oracle(model, x, y, C_NORM)
    engine = DPEngine(model, max_grad_norm=C_NORM)
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
    assert out.dtype == torch.float16
    assert all(cap.saved[0].dtype == torch.float16 for h in engine.handlers for cap in h.state.captures)
    norms = engine.backward(F.cross_entropy(out.float(), y, reduction="none"))
    assert _rel(norms, norms_ref) <= 1e-2
    _check_grads(model, sums_ref, rtol=1e-2)


def test_mean_loss_and_accumulation():
    """loss_reduction='mean' undoes the 1/B; two physical batches add up in .grad."""
    torch.manual_seed(5)
    model = CNN1d()
    x, y = _data(CNN1d, 6)
    _, s1 = micro_batch_oracle(model, x[:3], y[:3], C_NORM)
    _, s2 = micro_batch_oracle(model, x[3:], y[3:], C_NORM)
    engine = DPEngine(model, max_grad_norm=C_NORM, loss_reduction="mean")
    engine.backward(F.cross_entropy(model(x[:3]), y[:3]))
    engine.backward(F.cross_entropy(model(x[3:]), y[3:]))
    _check_grads(model, {k: s1[k] + s2[k] for k in s1})


def test_empty_batch():
    model = CNN()
    engine = DPEngine(model, max_grad_norm=1.0)
    x, y = _data(CNN, 0)
    norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert norms.shape == (0,)
    for p in model.parameters():
        assert p.grad is not None and torch.all(p.grad == 0)


def test_errors_name_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    engine = DPEngine(model, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="'0'.*leading example"):
        model(torch.randn(3, 3, 3))  # unbatched input, which nn.Conv2d itself accepts
    engine.detach()
    with pytest.raises(ValueError, match="Conv3d"):
        DPEngine(nn.Sequential(nn.Conv3d(1, 2, 3)), max_grad_norm=1.0)
    with pytest.raises(ValueError, match="ConvTranspose2d"):
        DPEngine(nn.Sequential(nn.ConvTranspose2d(1, 2, 3)), max_grad_norm=1.0)


def test_detach_restores_the_module():
    model = CNN()
    x, _ = _data(CNN, 2)
    before = model(x)
    engine = DPEngine(model, max_grad_norm=1.0)
    assert "forward" in model.conv1.__dict__
    with torch.no_grad():  # not captured: plain conv
        torch.testing.assert_close(model(x), before)
    engine.detach()
    assert "forward" not in model.conv1.__dict__
    torch.testing.assert_close(model(x), before)


@pytest.mark.gpu
@pytest.mark.parametrize("model_cls", [CNN, CNN1d, SharedConv], ids=["cnn2d", "cnn1d", "shared-conv"])
def test_engine_on_gpu(model_cls, monkeypatch):
    """The compiled kernels in an fp32 step (cuDNN's TF32 off so that the oracle is comparable)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(8)
    model = model_cls()
    x, y = _data(model_cls, 16)
    norms_ref, sums_ref = micro_batch_oracle(model, x, y, C_NORM)
    model = model.cuda()
    engine = DPEngine(model, max_grad_norm=C_NORM)
    norms = engine.backward(F.cross_entropy(model(x.cuda()), y.cuda(), reduction="none"))
    assert _rel(norms.cpu(), norms_ref) <= RTOL
    _check_grads(model.cpu(), sums_ref)
    assert engine.last_stats["backends"]["conv2d_clipped_weight_grad"] == "triton"
