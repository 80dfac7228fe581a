"""DPEngine on Linear models against the JAX oracle (vmap of grad) and Opacus' per-sample grads."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

jax = pytest.importorskip("jax")
jnp = jax.numpy
from dpprims import reference as ref  # noqa: E402
from dpprims.torch import DPEngine  # noqa: E402


class SeqMLP(nn.Module):
    """Projections of a transformer block: Linear layers over a sequence dim, mean-pooled head."""

    def __init__(self, d=13, h=19, k=5, bias=True):
        super().__init__()
        self.inp = nn.Linear(d, h, bias=bias)
        self.mid = nn.Linear(h, h, bias=bias)
        self.out = nn.Linear(h, k, bias=bias)

    def forward(self, x):  # x [B, T, d]
        z = torch.tanh(self.inp(x))
        z = torch.tanh(self.mid(z)) + z
        return self.out(z.mean(1))


def _seq_mlp_jax(params, x):
    z = jnp.tanh(x @ params["inp.weight"].T + params.get("inp.bias", 0.0))
    z = jnp.tanh(z @ params["mid.weight"].T + params.get("mid.bias", 0.0)) + z
    return z.mean(0) @ params["out.weight"].T + params.get("out.bias", 0.0)


def _mlp(d=11, h=23, k=7, bias=True):
    return nn.Sequential(nn.Linear(d, h, bias=bias), nn.ReLU(), nn.Linear(h, h, bias=bias), nn.ReLU(),
                         nn.Linear(h, k, bias=bias))


def _mlp_jax(params, x):
    z = x
    for i in (0, 2, 4):
        z = z @ params[f"{i}.weight"].T + params.get(f"{i}.bias", 0.0)
        if i != 4:
            z = jnp.maximum(z, 0.0)
    return z


def _oracle(model, apply, x, y, C, mask=None, clipping="flat"):
    params = {k: jnp.asarray(v.detach().double().numpy()) for k, v in model.named_parameters()}

    def loss_fn(p, ex):
        logits = apply(p, ex[0])
        return -jax.nn.log_softmax(logits)[ex[1]]

    batch = (jnp.asarray(x.double().numpy()), jnp.asarray(y.numpy()))
    m = None if mask is None else jnp.asarray(mask.numpy())
    grads, norms = ref.clipped_grad(loss_fn, params, batch, C, mask=m, clipping=clipping)
    return {k: np.asarray(v) for k, v in grads.items()}, np.asarray(norms)


def _assert_rel(got, want, tol, what):
    got = got.detach().double().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    want = np.asarray(want, dtype=np.float64)
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def _data(B, shape, k, scale=1.0):
    rng = np.random.default_rng()
    x = torch.tensor(rng.standard_normal((B, *shape)) * scale, dtype=torch.float32)
    y = torch.tensor(rng.integers(0, k, B))
    return x, y


@pytest.mark.parametrize("norm_method", ["auto", "ghost", "direct"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("clipping", ["flat", "automatic"])
def test_seq_mlp_matches_oracle(norm_method, bias, clipping):
    model = SeqMLP(bias=bias)
    x, y = _data(6, (9, 13), 5, scale=3.0)
    C = 0.7
    engine = DPEngine(model, C, clipping=clipping, norm_method=norm_method)
    norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    want, want_norms = _oracle(model, _seq_mlp_jax, x, y, C, clipping=clipping)
    _assert_rel(norms, want_norms, 1e-5, "norms")
    for name, p in model.named_parameters():
        _assert_rel(p.grad, want[name], 1e-5, name)
    if norm_method != "auto":
        assert {r["method"] for r in engine.plan() if r["T"] > 1} == {norm_method}
        assert {r["method"] for r in engine.plan() if r["T"] == 1} == {"outer"}


def test_mlp_matches_oracle_and_opacus():
    from opacus import GradSampleModule

    model = _mlp()
    x, y = _data(9, (11,), 7, scale=4.0)
    C = 1.3
    gsm = GradSampleModule(_mlp(), loss_reduction="sum")
    gsm._module.load_state_dict(model.state_dict())
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    per = {n: p.grad_sample.double() for n, p in gsm._module.named_parameters()}
    op_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per.values()))
    c = torch.clamp(C / (op_norms + 1e-6), max=1.0)
    op_sum = {n: torch.einsum("b,b...->...", c, g) for n, g in per.items()}

    engine = DPEngine(model, C)
    norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    want, want_norms = _oracle(model, _mlp_jax, x, y, C)
    _assert_rel(norms, want_norms, 1e-5, "norms vs oracle")
    _assert_rel(norms, op_norms, 1e-5, "norms vs opacus")
    for name, p in model.named_parameters():
        _assert_rel(p.grad, want[name], 1e-5, f"{name} vs oracle")
        _assert_rel(p.grad, op_sum[name], 1e-5, f"{name} vs opacus")


def test_every_clipped_contribution_has_norm_at_most_C():
    """Property: with a one-hot mask the .grad is one example's contribution: norm <= C."""
    model = _mlp()
    rng = np.random.default_rng()
    engine = DPEngine(model, 0.5)
    for trial in range(3):
        x, y = _data(5, (11,), 7, scale=float(10 ** rng.uniform(-2, 2)))
        for i in range(5):
            model.zero_grad(set_to_none=True)
            mask = torch.zeros(5, dtype=torch.bool)
            mask[i] = True
            norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"), mask=mask)
            total = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters()))
            assert total <= 0.5 * (1 + 1e-6), f"example {i}: contribution norm {total} > C"
            expected = min(float(norms[i]), 0.5)
            assert abs(float(total) - expected) <= 1e-5 * max(expected, 1e-3)


def test_padding_rows_contribute_nothing():
    model = _mlp()
    x, y = _data(7, (11,), 7)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
    engine = DPEngine(model, 1.0)
    engine.backward(F.cross_entropy(model(x), y, reduction="none"), mask=mask)
    padded = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    engine.backward(F.cross_entropy(model(x[mask]), y[mask], reduction="none"))
    for n, p in model.named_parameters():
        torch.testing.assert_close(padded[n], p.grad, rtol=1e-6, atol=1e-7)


def test_physical_batches_accumulate():
    model = _mlp()
    x, y = _data(8, (11,), 7, scale=2.0)
    engine = DPEngine(model, 0.8)
    engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    whole = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for s in (slice(0, 3), slice(3, 8)):
        engine.backward(F.cross_entropy(model(x[s]), y[s], reduction="none"))
    for n, p in model.named_parameters():
        torch.testing.assert_close(whole[n], p.grad, rtol=1e-5, atol=1e-7)


def test_nonfinite_example_contributes_nothing_and_is_reported():
    model = _mlp()
    x, y = _data(6, (11,), 7)
    x[2, 3] = float("inf")
    engine = DPEngine(model, 1.0)
    norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert not torch.isfinite(norms[2]) and torch.isfinite(norms[[0, 1, 3, 4, 5]]).all()
    assert int(engine.last_stats["nonfinite"]) == 1 and int(engine.nonfinite_total) == 1
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())
    keep = torch.tensor([0, 1, 3, 4, 5])
    model.zero_grad(set_to_none=True)
    engine.backward(F.cross_entropy(model(x[keep]), y[keep], reduction="none"))
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-6, atol=1e-7)


def test_mean_loss_detected_and_declared():
    model = _mlp()
    x, y = _data(5, (11,), 7, scale=3.0)
    engine = DPEngine(model, 0.9)
    with pytest.raises(ValueError, match="mean"):
        engine.backward(F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match="mean"):
        engine.backward(F.cross_entropy(model(x), y, reduction="none").mean())
    model.zero_grad(set_to_none=True)
    engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    per_example = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    engine.detach()
    mean_engine = DPEngine(model, 0.9, loss_reduction="mean")
    mean_engine.backward(F.cross_entropy(model(x), y))
    for n, p in model.named_parameters():
        torch.testing.assert_close(per_example[n], p.grad, rtol=1e-5, atol=1e-7)
    # a summed scalar needs no declaration
    model.zero_grad(set_to_none=True)
    mean_engine.detach()
    DPEngine(model, 0.9).backward(F.cross_entropy(model(x), y, reduction="sum"))
    for n, p in model.named_parameters():
        torch.testing.assert_close(per_example[n], p.grad, rtol=1e-5, atol=1e-7)


def test_weight_gradient_gemm_is_not_run_by_autograd():
    """The backward computes input gradients only: no matmul produces a [p, d] weight grad."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                self.shapes.append(tuple(out.shape))
            return out

    model = _mlp(d=11, h=23, k=7)
    x, y = _data(5, (11,), 7)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    with Recorder() as plain:
        loss.backward()
    weight_shapes = {tuple(p.shape) for n, p in model.named_parameters() if n.endswith("weight")}
    assert weight_shapes & set(plain.shapes), "the recorder must see the non-private weight-grad GEMM"
    model.zero_grad(set_to_none=True)
    engine = DPEngine(model, 1.0)
    loss = F.cross_entropy(model(x), y, reduction="none")
    with Recorder() as dp:
        engine.backward(loss)
    assert not (weight_shapes & set(dp.shapes)), f"autograd ran a weight-gradient GEMM: {dp.shapes}"


def test_shared_layer_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))

    def apply(p, x):
        z = jnp.tanh(x @ p["lin.weight"].T + p["lin.bias"])
        z = jnp.tanh(z @ p["lin.weight"].T + p["lin.bias"])
        return z @ p["head.weight"].T + p["head.bias"]

    model = Twice()
    x, y = _data(5, (6,), 3, scale=2.0)
    engine = DPEngine(model, 0.6)
    norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    want, want_norms = _oracle(model, apply, x, y, 0.6)
    _assert_rel(norms, want_norms, 1e-5, "norms")
    for n, p in model.named_parameters():
        _assert_rel(p.grad, want[n], 1e-5, n)


def test_empty_batch_is_a_valid_step():
    model = _mlp()
    x, y = _data(0, (11,), 7)
    engine = DPEngine(model, 1.0)
    norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert norms.shape == (0,)
    assert all(p.grad is not None and torch.all(p.grad == 0) for p in model.parameters())


def test_frozen_layers_and_frozen_bias():
    model = _mlp()
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    x, y = _data(4, (11,), 7, scale=2.0)
    engine = DPEngine(model, 0.5)
    norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    assert model[0].weight.grad is None and model[2].bias.grad is None

    def apply(p, x):
        full = {k: jnp.asarray(v.detach().double().numpy()) for k, v in model.named_parameters()}
        full.update(p)
        return _mlp_jax(full, x)

    jparams = {k: jnp.asarray(v.detach().double().numpy()) for k, v in params.items()}

    def loss_fn(p, ex):
        return -jax.nn.log_softmax(apply(p, ex[0]))[ex[1]]

    grads, want_norms = ref.clipped_grad(loss_fn, jparams, (jnp.asarray(x.double().numpy()), jnp.asarray(y.numpy())), 0.5)
    _assert_rel(norms, want_norms, 1e-5, "norms")
    for k, v in params.items():
        _assert_rel(v.grad, grads[k], 1e-5, k)


def test_unsupported_modules_are_errors_at_build():
    with pytest.raises(ValueError, match=r"'1'.*BatchNorm1d.*GroupNorm"):
        DPEngine(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), 1.0)

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x) * self.scale

    with pytest.raises(ValueError, match=r"'<root>'.*Custom.*\['scale'\].*Freeze"):
        DPEngine(Custom(), 1.0)
    # a frozen Embedding with max_norm still rewrites its weights from the private batch
    emb = nn.Embedding(10, 4, max_norm=1.0).requires_grad_(False)
    with pytest.raises(ValueError, match=r"'0'.*max_norm"):
        DPEngine(nn.Sequential(emb, nn.Linear(4, 2)), 1.0)
    # frozen BatchNorm (eval mode, no trainable params) is fine
    frozen = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4).requires_grad_(False))
    DPEngine(frozen, 1.0)


def test_functional_use_of_a_wrapped_weight_is_caught():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 5)

        def forward(self, x):
            return self.lin(x) + F.linear(x, self.lin.weight)  # second use bypasses the DP layer

    model = Leaky()
    engine = DPEngine(model, 1.0)
    x = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="outside its DP layer"):
        engine.backward(model(x).pow(2).sum(1))


@pytest.mark.parametrize("outside", ["loss.backward", "autograd.grad"])
def test_backward_outside_the_engine_is_refused_not_mixed(outside):
    """A backward through the wrapped model outside engine.backward leaves output gradients in
    the DP layers; the next engine.backward must refuse them (they would be combined with its own
    batch example by example), then recover: the step after gives the oracle's clipped sum."""
    model = _mlp(bias=True)
    engine = DPEngine(model, 0.7)
    x_old, y_old = _data(6, (11,), 7)
    loss_old = F.cross_entropy(model(x_old.requires_grad_()), y_old)
    if outside == "loss.backward":
        loss_old.backward()
    else:
        torch.autograd.grad(loss_old, x_old)
    x, y = _data(6, (11,), 7)
    with pytest.raises(RuntimeError, match=r"layer '0' holds an output gradient .* outside DPEngine.backward"):
        engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    for p in model.parameters():
        p.grad = None
    engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    want, _ = _oracle(model, _mlp_jax, x, y, 0.7)
    for k, p in model.named_parameters():
        _assert_rel(p.grad, want[k], 1e-5, k)


def test_bad_arguments_are_named():
    model = _mlp()
    with pytest.raises(ValueError, match="max_grad_norm"):
        DPEngine(model, -1.0)
    with pytest.raises(ValueError, match="clipping"):
        DPEngine(model, 1.0, clipping="adaptive")
    with pytest.raises(ValueError, match="norm_method"):
        DPEngine(model, 1.0, norm_method="fast")
    with pytest.raises(ValueError, match="does not clip"):
        DPEngine(model, 1.0, norm_method={"7": "ghost"})
    engine = DPEngine(model, 1.0)
    x, y = _data(4, (11,), 7)
    with pytest.raises(ValueError, match="mask"):
        engine.backward(F.cross_entropy(model(x), y, reduction="none"), mask=torch.ones(3))


def test_plan_reports_layers():
    model = SeqMLP()
    engine = DPEngine(model, 1.0, norm_method={"mid": "direct"})
    x, y = _data(3, (20, 13), 5)
    engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    plan = {r["layer"]: r for r in engine.plan()}
    assert plan["mid"]["method"] == "direct"
    assert plan["inp"]["T"] == 20 and plan["inp"]["d"] == 13 and plan["inp"]["p"] == 19
    assert plan["inp"]["method"] in ("ghost", "direct")
    text = engine.format_plan()
    assert "mid" in text and "direct" in text and "norm MB" in text
    total = text.splitlines()[-1].split()
    assert total[0] == "total"
    assert float(total[1]) == pytest.approx(sum(r["norm_flops"] for r in engine.plan()) / 1e9, abs=1e-3)


def test_detach_restores_the_model():
    model = _mlp()
    x = torch.randn(4, 11)
    before = model(x)
    engine = DPEngine(model, 1.0)
    engine.detach()
    assert all("forward" not in m.__dict__ for m in model.modules())
    loss = model(x).sum()
    loss.backward()
    assert model[0].weight.grad is not None
    torch.testing.assert_close(model(x), before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_on_gpu_matches_microbatch_loop(dtype):
    torch.manual_seed(0)
    model = SeqMLP(d=64, h=128, k=10).cuda()
    x = torch.randn(32, 17, 64, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    C = 1.0
    want = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for i in range(32):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            li = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        gs = torch.autograd.grad(li, list(model.parameters()))
        n = torch.sqrt(sum(g.double().pow(2).sum() for g in gs))
        c = min(1.0, C / (float(n) + 1e-6))
        for (name, _), g in zip(model.named_parameters(), gs):
            want[name] += c * g.double()
    engine = DPEngine(model, C)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        loss = F.cross_entropy(model(x), y, reduction="none")
    engine.backward(loss)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for n, p in model.named_parameters():
        _assert_rel(p.grad.cpu(), want[n].cpu(), tol, n)
