"""End to end: a ResNet-18-GN (CIFAR stem) through DPEngine against Opacus.

The oracle is Opacus' GradSampleModule on a float64 copy of the model (per-sample gradients of
every parameter, noise off), clipped and summed by the definition: n_i = ||g_i||,
c_i = min(1, C / (n_i + 1e-6)), sum_i c_i g_i. All ResNet convs have groups = 1, where Opacus'
unfold-based conv grad sampler is right (grouped and depthwise convs are checked against the
micro-batch loop in test_engine_conv.py). The ReLUs of dpprims.models are not in-place, which
GradSampleModule's backward hooks need.

Size: width 8 (stages 8/16/32/64 channels), batch 2, 3x32x32 inputs: the real CIFAR geometry
(T = 1024, 256, 64, 16 per stage, so the cost model picks direct early and ghost late), with
channel counts the Triton interpreter runs in seconds.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

opacus = pytest.importorskip("opacus")
from dpprims.models import resnet18  # noqa: E402
from dpprims.torch import DPEngine  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

C_NORM = 1.0
RTOL = 1e-4


def opacus_clipped(model, x, y, C):
    """(norms [B], {name: sum_i c_i g_i}) from Opacus per-sample gradients in float64."""
    m64 = copy.deepcopy(model).double()
    gsm = opacus.GradSampleModule(m64, batch_first=True, loss_reduction="sum")
    F.cross_entropy(gsm(x.double()), y, reduction="sum").backward()
    named = [(n.removeprefix("_module."), p) for n, p in gsm.named_parameters() if p.requires_grad]
    per_sample = {n: p.grad_sample for n, p in named}
    B = x.shape[0]
    norms = torch.sqrt(sum(g.reshape(B, -1).pow(2).sum(1) for g in per_sample.values()))
    c = torch.clamp(C / (norms + 1e-6), max=1.0)
    return norms, {n: torch.einsum("b,b...->...", c, g) for n, g in per_sample.items()}


def run_resnet_check(freeze_norms: bool = False, size: int = 32, width: int = 8):
    torch.manual_seed(0)
    model = resnet18(cifar=True, width=width, num_classes=10)
    if freeze_norms:  # development aid only: the test below trains the GroupNorms too
        for mod in model.modules():
            if isinstance(mod, nn.GroupNorm):
                mod.requires_grad_(False)
    x = torch.randn(2, 3, size, size)
    y = torch.tensor([3, 8])
    norms_ref, sums_ref = opacus_clipped(model, x, y, C_NORM)

    engine = DPEngine(model, max_grad_norm=C_NORM)
    norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"))

    rel = ((norms.double() - norms_ref).abs() / norms_ref).max().item()
    assert rel <= RTOL, f"per-example norms: relative error {rel:.2e}"
    assert (norms_ref > C_NORM).any(), "the test should clip"
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert set(sums_ref) == {n for n, _ in trainable}
    for name, p in trainable:
        assert p.grad is not None, f"{name}: no gradient"
        err = ((p.grad.double() - sums_ref[name]).abs().max() / sums_ref[name].abs().max()).item()
        assert err <= RTOL, f"{name}: relative error {err:.2e} > {RTOL:.0e}"
    plan = {r["layer"]: r for r in engine.plan()}
    assert plan["conv1"]["T"] == size * size and plan["conv1"]["method"] == "direct"
    assert plan["layer4.1.conv2"]["T"] == (size // 8) ** 2 and plan["layer4.1.conv2"]["method"] == "ghost"
    return engine


def test_resnet18_gn_matches_opacus():
    """Every parameter (convs, GroupNorm affines, fc) of ResNet-18-GN at 2x3x32x32."""
    run_resnet_check(freeze_norms=False)
