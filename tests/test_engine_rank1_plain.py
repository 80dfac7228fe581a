"""The plain-torch (CPU) path of T = 1 Linear layers (the default MLP job's layers): norms
||g_i||^2 (||a_i||^2 + 1) and the clipped sum as one GEMM (c * g)^T a added into .grad, against
an independent float64 oracle (one autograd.grad per example), over repeated steps on one engine,
several physical batches accumulating into .grad, padding, a non-finite example, frozen weights /
no bias, a mean-reduced loss and an empty batch.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _paths import plain_torch_path

from dpprims.bindings.torch import _backend
from dpprims.torch import DPEngine

RTOL = 2e-5


def _mlp(bias=True, d=23, h=17, k=5):
    return nn.Sequential(nn.Linear(d, h, bias=bias), nn.Tanh(), nn.Linear(h, k, bias=bias))


def _plain_copy(model):
    """A copy with the modules' own forwards (an engine replaces them per instance)."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        mod.__dict__.pop("forward", None)
    return m


def _oracle(model, batches, C):
    """(norms per batch, summed clipped gradients) in float64, example by example."""
    m64 = _plain_copy(model).double()
    params = [(n, p) for n, p in m64.named_parameters() if p.requires_grad]
    sums = {n: torch.zeros_like(p) for n, p in params}
    all_norms = []
    for x, y, mask in batches:
        norms = []
        for i in range(x.shape[0]):
            loss = F.cross_entropy(m64(x[i:i + 1].double()), y[i:i + 1], reduction="sum")
            grads = torch.autograd.grad(loss, [p for _, p in params])
            n = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            norms.append(n)
            if (mask is not None and not mask[i]) or not torch.isfinite(n):
                continue
            c = torch.clamp(C / (n + 1e-6), max=1.0)
            for (name, _), g in zip(params, grads):
                sums[name] += c * g
        all_norms.append(torch.stack(norms) if norms else torch.zeros(0, dtype=torch.float64))
    return all_norms, sums


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _batch(B, seed, d=23, k=5, masked=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g) * 2
    y = torch.randint(0, k, (B,), generator=g)
    mask = None
    if masked:
        mask = torch.ones(B, dtype=torch.bool)
        mask[1::3] = False
    return x, y, mask


@pytest.mark.parametrize("bias,freeze", [(True, None), (False, None), (True, "0.weight"), (True, "2.bias")],
                         ids=["bias", "no-bias", "frozen-weight", "frozen-bias"])
def test_rank1_plain_path_matches_oracle_over_steps_and_accumulation(bias, freeze):
    torch.manual_seed(3)
    model = _mlp(bias)
    if freeze:
        dict(model.named_parameters())[freeze].requires_grad_(False)
    # C between the examples' norms, so that some are clipped and some not
    C = float(torch.cat(_oracle(model, [_batch(7, 0)], 1.0)[0]).median())
    with plain_torch_path():
        engine = DPEngine(model, max_grad_norm=C)
        for step in range(3):  # a fresh logical batch each step: two physical batches into .grad
            batches = [_batch(7, 10 * step), _batch(5, 10 * step + 1, masked=True)]
            norms_ref, sums_ref = _oracle(model, batches, C)
            model.zero_grad(set_to_none=True)
            for (x, y, mask), nref in zip(batches, norms_ref):
                norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"), mask=mask)
                assert _rel(norms, nref) <= RTOL
            assert _backend.LAST_BACKEND["linear_clipped_weight_grad"] == "torch"
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    assert p.grad is None
                    continue
                assert _rel(p.grad, sums_ref[name]) <= RTOL, name
            assert any((n > C).any() for n in norms_ref) and any((n < C).any() for n in norms_ref)
            with torch.no_grad():  # move the weights so the next step's numbers differ
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
    plan = engine.plan()
    assert [r["method"] for r in plan] == ["outer", "outer"] and all(r["clipped_sum"] == "rank1" for r in plan)
    assert all("outer" in r["cpu_ms"] for r in plan)


def test_rank1_plain_path_nonfinite_and_padding_rows_never_reach_grad():
    """A NaN input row and an inf input row (non-finite norms) and padding rows holding NaN: c_i = 0,
    indexed away before the GEMM, so .grad stays finite and equals the oracle over the others."""
    torch.manual_seed(5)
    model = _mlp()
    x, y, _ = _batch(9, 1)
    x[2, 4] = float("nan")
    x[6] = float("inf")
    mask = torch.ones(9, dtype=torch.bool)
    mask[7] = False
    x[7] = float("nan")  # a padding row full of NaN
    ok = torch.tensor([i not in (2, 6, 7) for i in range(9)])
    _, sums_ref = _oracle(model, [(x[ok], y[ok], None)], 1.0)
    with plain_torch_path():
        engine = DPEngine(model, max_grad_norm=1.0)
        norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"), mask=mask)
    assert not torch.isfinite(norms[[2, 6]]).any()
    assert int(engine.last_stats["nonfinite"]) == 2  # the padding row is not counted
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
        assert _rel(p.grad, sums_ref[name]) <= RTOL, name


def test_rank1_plain_path_mean_loss_and_empty_batch():
    torch.manual_seed(8)
    model = _mlp()
    x, y, _ = _batch(6, 2)
    norms_ref, sums_ref = _oracle(model, [(x, y, None)], 0.3)
    with plain_torch_path():
        engine = DPEngine(model, max_grad_norm=0.3, loss_reduction="mean")
        norms = engine.backward(F.cross_entropy(model(x), y))  # scalar mean loss: undone by B
        assert _rel(norms, norms_ref[0]) <= RTOL
        for name, p in model.named_parameters():
            assert _rel(p.grad, sums_ref[name]) <= RTOL, name
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        e2 = DPEngine(_plain_copy(model), max_grad_norm=0.3)
        m2 = e2.model
        for p in m2.parameters():
            p.grad = None
        xe, ye = x[:0], y[:0]
        norms0 = e2.backward(F.cross_entropy(m2(xe), ye, reduction="none"))
    assert norms0.shape == (0,)
    for name, p in m2.named_parameters():  # B = 0 contributes an exact zero
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any(), name
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
