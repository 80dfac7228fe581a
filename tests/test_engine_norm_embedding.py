"""DPEngine on models with GroupNorm, LayerNorm and Embedding against the micro-batch loop
(per-example autograd.grad in float64 + clip + sum), the JAX oracle's norm-affine / embedding
closed forms, and Opacus' per-sample gradients."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpprims.torch import DPEngine


class GNNet(nn.Module):
    """Conv-free GroupNorm model: Linear -> reshape [B, C, *spatial] -> GroupNorm -> Linear."""

    def __init__(self, d=7, C=8, spatial=(3,), groups=2, k=5):
        super().__init__()
        self.C, self.spatial = C, spatial
        n = C * int(np.prod(spatial))
        self.inp = nn.Linear(d, n)
        self.gn = nn.GroupNorm(groups, C)
        self.out = nn.Linear(n, k)

    def forward(self, x):
        z = self.inp(x).view(x.shape[0], self.C, *self.spatial)
        z = torch.tanh(self.gn(z))
        return self.out(z.flatten(1))


class TinyTransformer(nn.Module):
    """Embedding + LayerNorm + Linear over a sequence dim, mean-pooled head."""

    def __init__(self, V=11, D=12, H=10, k=4, padding_idx=0):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.ln1 = nn.LayerNorm(D)
        self.proj = nn.Linear(D, H)
        self.ln2 = nn.LayerNorm(H)
        self.head = nn.Linear(H, k)

    def forward(self, ids):  # ids [B, T]
        z = self.ln1(self.emb(ids))
        z = self.ln2(F.gelu(self.proj(z)) + z[..., :self.proj.out_features])
        return self.head(z.mean(1))


class LN2d(nn.Module):
    """LayerNorm over a 2-D normalized_shape (T, D) and a shared LayerNorm called twice."""

    def __init__(self, T=5, D=6, k=3):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.ln_td = nn.LayerNorm((T, D))
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(T * D, k)

    def forward(self, x):  # x [B, T, D]
        z = self.ln_td(torch.tanh(self.lin(x)))
        z = self.ln(self.ln(z) * 1.5 + x)  # the same LayerNorm twice: per-example grads add
        return self.head(z.flatten(1))


def _randomise(model, scale=0.5):
    """Non-trivial affine parameters (the defaults 1 / 0 hide bugs)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.add_(torch.randn_like(m.weight) * scale)
                if m.bias is not None:
                    m.bias.add_(torch.randn_like(m.bias) * scale)
    return model


def _loop(model, inputs, y, C, mask=None):
    """Micro-batch oracle in float64: per-example autograd.grad, flat clipping, sum.
    Returns ({name: clipped sum}, norms [B])."""
    m64 = copy.deepcopy(model).double()
    named = [(n, p) for n, p in m64.named_parameters() if p.requires_grad]
    sums = {n: torch.zeros_like(p) for n, p in named}
    norms = []
    for i in range(inputs.shape[0]):
        xi = inputs[i:i + 1]
        xi = xi.double() if xi.is_floating_point() else xi
        loss = F.cross_entropy(m64(xi), y[i:i + 1], reduction="sum")
        gs = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        gs = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, gs)]
        n = torch.sqrt(sum(g.pow(2).sum() for g in gs))
        norms.append(n)
        c = 0.0 if (mask is not None and not mask[i]) or not torch.isfinite(n) else min(1.0, C / (float(n) + 1e-6))
        for (name, _), g in zip(named, gs):
            if c:
                sums[name] += c * g
    return sums, torch.stack(norms) if norms else torch.zeros(0, dtype=torch.float64)


def _assert_rel(got, want, tol, what):
    got = got.detach().double()
    want = want.detach().double()
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30)) if want.numel() else 0.0
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def _check_engine(model, inputs, y, C, tol=1e-5, mask=None, **kw):
    want, want_norms = _loop(model, inputs, y, C, mask)
    engine = DPEngine(model, C, **kw)
    norms = engine.backward(F.cross_entropy(model(inputs), y, reduction="none"), mask=mask)
    _assert_rel(norms, want_norms, tol, "norms")
    for name, p in model.named_parameters():
        if p.requires_grad:
            _assert_rel(p.grad, want[name], tol, name)
    return engine, norms


def _ids(B, T, V, pad=0):
    rng = np.random.default_rng()
    ids = torch.tensor(rng.integers(0, min(V, 5), (B, T)))  # few distinct ids: many repeats
    ids[:, -2:] = pad  # trailing padding
    return ids


# --------------------------------------------------------------------------------------------
# against the micro-batch loop
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial,groups", [((), 2), ((3,), 1), ((3,), 2), ((2, 3), 8)],
                         ids=["2d-g2", "3d-g1", "3d-g2", "4d-g8"])
def test_groupnorm_model_matches_loop(spatial, groups):
    model = _randomise(GNNet(C=8, spatial=spatial, groups=groups))
    x = torch.randn(5, 7) * 3
    y = torch.randint(0, 5, (5,))
    engine, _ = _check_engine(model, x, y, C=0.8)
    plan = {r["layer"]: r for r in engine.plan()}
    assert plan["gn"]["kind"] == "groupnorm" and plan["gn"]["method"] == "instantiate"
    assert plan["gn"]["T"] == int(np.prod(spatial)) and plan["gn"]["p"] == 8


@pytest.mark.parametrize("clipping", ["flat", "automatic"])
def test_tiny_transformer_matches_loop(clipping):
    model = _randomise(TinyTransformer())
    ids = _ids(4, 9, 11)
    y = torch.randint(0, 4, (4,))
    if clipping == "flat":
        engine, _ = _check_engine(model, ids, y, C=0.5)
    else:  # automatic clipping: c_i = C / (n_i + gamma), against the loop's gradients directly
        want, want_norms = _loop(model, ids, y, float("inf"))  # C = inf: unclipped sums, exact norms
        m64 = copy.deepcopy(model).double()  # before the engine wraps the layers
        engine = DPEngine(model, 0.5, clipping="automatic", gamma=0.01)
        norms = engine.backward(F.cross_entropy(model(ids), y, reduction="none"))
        _assert_rel(norms, want_norms, 1e-5, "norms")
        names, params = zip(*m64.named_parameters())
        acc = [torch.zeros_like(q) for q in params]
        for i in range(4):
            gs = torch.autograd.grad(F.cross_entropy(m64(ids[i:i + 1]), y[i:i + 1], reduction="sum"), params)
            acc = [a + 0.5 / (want_norms[i] + 0.01) * g for a, g in zip(acc, gs)]
        for name, want_g in zip(names, acc):
            _assert_rel(dict(model.named_parameters())[name].grad, want_g, 1e-5, name)
    kinds = {r["layer"]: (r["kind"], r["method"]) for r in engine.plan()}
    assert kinds["emb"] == ("embedding", "ghost") and kinds["ln1"] == ("layernorm", "instantiate")
    assert torch.all(model.emb.weight.grad[0] == 0), "padding row received a gradient"


def test_layernorm_2d_shape_and_shared_layernorm_match_loop():
    model = _randomise(LN2d())
    x = torch.randn(6, 5, 6) * 2
    y = torch.randint(0, 3, (6,))
    engine, _ = _check_engine(model, x, y, C=0.6)
    plan = {r["layer"]: r for r in engine.plan()}
    assert plan["ln"]["T"] == 2 * 5  # two calls of 5 positions each
    assert plan["ln_td"]["T"] == 1 and plan["ln_td"]["p"] == 30


def test_embedding_1d_ids_shared_embedding_and_no_padding():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 5)
            self.head = nn.Linear(5, 3)

        def forward(self, ids):  # ids [B] (one token) plus the same table on [B, T]
            return self.head(self.emb(ids[:, 0]) + torch.tanh(self.emb(ids[:, 1:])).sum(1))

    model = Bag()
    ids = torch.randint(0, 4, (5, 6))
    y = torch.randint(0, 3, (5,))
    _check_engine(model, ids, y, C=0.7)


def test_frozen_norm_weight_and_norms_without_affine():
    model = nn.Sequential(nn.Linear(6, 8), nn.Unflatten(1, (4, 2)), nn.GroupNorm(2, 4, affine=False),
                          nn.Flatten(), nn.Linear(8, 8), nn.LayerNorm(8), nn.LayerNorm(8, elementwise_affine=False),
                          nn.Linear(8, 3))
    _randomise(model)
    model[5].weight.requires_grad_(False)
    x = torch.randn(4, 6)
    y = torch.randint(0, 3, (4,))
    engine, _ = _check_engine(model, x, y, C=0.9)
    assert {h.name for h in engine.handlers} == {"0", "4", "5", "7"}  # affine-free norms are not wrapped
    assert model[5].weight.grad is None and model[5].bias.grad is not None


# --------------------------------------------------------------------------------------------
# against Opacus per-sample gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["groupnorm", "transformer"])
def test_matches_opacus(which):
    from opacus import GradSampleModule

    if which == "groupnorm":
        model = _randomise(GNNet(C=6, spatial=(2, 2), groups=3))
        inputs = torch.randn(6, 7) * 2
    else:
        # Opacus' Embedding grad sampler ignores padding_idx (it scatters the padding positions'
        # output gradients into the padding row, which torch's autograd never does): compare
        # without padding here; padding is checked against the loop above.
        model = _randomise(TinyTransformer(padding_idx=None))
        inputs = _ids(6, 8, 11)
    y = torch.randint(0, 4, (6,))
    C = 0.9
    twin = copy.deepcopy(model)
    gsm = GradSampleModule(twin, loss_reduction="sum")
    F.cross_entropy(gsm(inputs), y, reduction="sum").backward()
    per = {n: p.grad_sample.double() for n, p in gsm._module.named_parameters()}
    op_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per.values()))
    c = torch.clamp(C / (op_norms + 1e-6), max=1.0)
    op_sum = {n: torch.einsum("b,b...->...", c, g) for n, g in per.items()}

    engine = DPEngine(model, C)
    norms = engine.backward(F.cross_entropy(model(inputs), y, reduction="none"))
    _assert_rel(norms, op_norms, 1e-5, "norms vs opacus")
    for name, p in model.named_parameters():
        _assert_rel(p.grad, op_sum[name], 1e-5, f"{name} vs opacus")


# --------------------------------------------------------------------------------------------
# the per-layer closed forms of the JAX oracle
# --------------------------------------------------------------------------------------------
def test_layer_norms_match_reference_closed_forms():
    """Per-layer squared norms from the engine's handlers equal dpprims.reference's closed forms
    on the captured activations and output gradients."""
    jnp = pytest.importorskip("jax.numpy")
    from dpprims import reference as ref

    model = _randomise(TinyTransformer())
    ids = _ids(3, 7, 11)
    engine = DPEngine(model, 1.0)
    seen = {}
    for h in engine.handlers:
        orig = h.sq_norms

        def spy(B, h=h, orig=orig):
            out = orig(B)
            seen[h.name] = (out.clone(), [(c.saved, c.grad_out) for c in h.state.completed()])
            return out
        h.sq_norms = spy
    engine.backward(F.cross_entropy(model(ids), torch.zeros(3, dtype=torch.long), reduction="none"))
    out, [(saved, G)] = seen["emb"]
    want = ref.embedding_sq_norms(jnp.asarray(saved[0].numpy()), jnp.asarray(G.double().numpy()), 0, 11)
    _assert_rel(out, torch.tensor(np.asarray(want)), 1e-5, "embedding")
    for name, D in (("ln1", 12), ("ln2", 10)):
        out, [(saved, G)] = seen[name]
        xh = ref.layernorm_xhat(jnp.asarray(saved[0].double().numpy()), (D,))
        w, b = ref.norm_affine_sq_norms(xh, jnp.asarray(G.double().numpy()), -1)
        _assert_rel(out, torch.tensor(np.asarray(w) + np.asarray(b)), 1e-5, name)


# --------------------------------------------------------------------------------------------
# forward / input gradient / autocast identical to the plain modules
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,shape", [
    (lambda: nn.GroupNorm(3, 6), (4, 6, 5, 3)),
    (lambda: nn.GroupNorm(2, 4), (3, 4)),
    (lambda: nn.LayerNorm((3, 5)), (2, 4, 3, 5)),
    (lambda: nn.LayerNorm(7, bias=False), (3, 7)),
], ids=["gn-4d", "gn-2d", "ln-2d-shape", "ln-nobias"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "cpu-autocast-bf16"])
def test_wrapped_norm_is_the_plain_module(make, shape, autocast):
    """Forward output and input gradient are torch's own (bit for bit), also under CPU autocast
    (where torch runs group_norm / layer_norm in the input dtype, bf16 here)."""
    plain = _randomise(make())
    wrapped = copy.deepcopy(plain)
    engine = DPEngine(nn.Sequential(wrapped), 1.0)
    x = torch.randn(shape)
    if autocast:
        x = x.bfloat16()
    outs = []
    for m in (plain, wrapped):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(xi)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(y.dtype)
        if m is wrapped:
            engine.backward((y * g).flatten(1).sum(1))
        else:
            (y * g).sum().backward()
        outs.append((y.detach(), xi.grad))
    (y0, gx0), (y1, gx1) = outs
    assert y0.dtype == y1.dtype and gx0.dtype == gx1.dtype
    assert torch.equal(y0, y1), "forward differs from the plain module"
    assert torch.equal(gx0, gx1), "input gradient differs from the plain module"
    # the per-example affine gradients under autocast: against the loop in the same precision
    if autocast:
        for p_plain, p_dp in zip(plain.parameters(), wrapped.parameters()):
            assert p_dp.grad is not None and torch.isfinite(p_dp.grad).all()


def test_mixed_precision_groupnorm_under_cpu_autocast():
    """bf16 activations into an fp32 GroupNorm (CPU autocast keeps bf16): x is kept in bf16 and
    x_hat recomputed from it; clipped sums agree with the loop run under the same autocast."""
    model = _randomise(nn.Sequential(nn.GroupNorm(2, 6), nn.Flatten(), nn.Tanh()))
    x = (torch.randn(4, 6, 5) * 2).bfloat16()
    C = 0.5
    want = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for i in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            li = model(x[i:i + 1]).float().pow(2).sum()
        gs = torch.autograd.grad(li, list(model.parameters()))
        n = torch.sqrt(sum(g.double().pow(2).sum() for g in gs))
        c = min(1.0, C / (float(n) + 1e-6))
        for (name, _), g in zip(model.named_parameters(), gs):
            want[name] += c * g.double()
    engine = DPEngine(model, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().pow(2).sum(1)
    engine.backward(loss)
    for n, p in model.named_parameters():
        _assert_rel(p.grad, want[n], 2e-2, n)  # bf16 output gradients, differently rounded sums


# --------------------------------------------------------------------------------------------
# edge cases
# --------------------------------------------------------------------------------------------
def test_nonfinite_example_and_padding_rows_contribute_nothing():
    model = _randomise(GNNet(C=6, spatial=(2,), groups=3))
    x = torch.randn(6, 7)
    x[2, 1] = float("nan")
    y = torch.randint(0, 5, (6,))
    mask = torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool)
    engine = DPEngine(model, 0.7)
    norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"), mask=mask)
    assert not torch.isfinite(norms[2]) and int(engine.last_stats["nonfinite"]) == 1
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in got.values())
    keep = torch.tensor([0, 1, 4, 5])
    engine.detach()
    want, _ = _loop(model, x[keep], y[keep], 0.7)
    for n in got:
        _assert_rel(got[n], want[n], 1e-5, n)


def test_empty_batch_is_a_valid_step():
    model = TinyTransformer()
    engine = DPEngine(model, 1.0)
    ids = torch.zeros(0, 6, dtype=torch.long)
    norms = engine.backward(F.cross_entropy(model(ids), torch.zeros(0, dtype=torch.long), reduction="none"))
    assert norms.shape == (0,)
    assert all(p.grad is not None and torch.all(p.grad == 0) for p in model.parameters())


def test_physical_batches_accumulate():
    model = _randomise(TinyTransformer())
    ids = _ids(6, 5, 11)
    y = torch.randint(0, 4, (6,))
    want, _ = _loop(model, ids, y, 0.5)
    engine = DPEngine(model, 0.5)
    for s in (slice(0, 4), slice(4, 6)):
        engine.backward(F.cross_entropy(model(ids[s]), y[s], reduction="none"))
    for n, p in model.named_parameters():
        _assert_rel(p.grad, want[n], 1e-5, n)


@pytest.mark.parametrize("kw,match", [
    (dict(max_norm=1.0), "max_norm"),
    (dict(sparse=True), "sparse=True"),
    (dict(scale_grad_by_freq=True), "scale_grad_by_freq=True.*couples examples"),
])
def test_rejected_embedding_options_fail_at_build(kw, match):
    model = nn.Sequential(nn.Embedding(10, 4, **kw), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=rf"Embedding '0'.*{match}"):
        DPEngine(model, 1.0)
    # the option switched on after the engine was built: caught at the next forward
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    DPEngine(model, 1.0)
    for k, v in kw.items():
        setattr(model[0], k, v)
    with pytest.raises(ValueError, match=match):
        model(torch.randint(0, 10, (3, 2)))


def test_autograd_computes_no_affine_or_embedding_gradient():
    """The engine's layers return input gradients only: no aten op produces a parameter-shaped
    gradient (native_*_norm_backward runs with output_mask (True, False, False), and the
    embedding backward is never called)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func)
            if "norm_backward" in name:
                self.calls.append((name, tuple(args[-1])))
            if "embedding" in name and "backward" in name:
                self.calls.append((name, None))
            return out

    model = TinyTransformer()
    ids = _ids(3, 6, 11)
    with Recorder() as plain:
        model(ids).sum().backward()
    assert any("embedding" in n for n, _ in plain.calls) and any(m == (True, True, True) for _, m in plain.calls)
    model.zero_grad(set_to_none=True)
    engine = DPEngine(model, 1.0)
    loss = F.cross_entropy(model(ids), torch.zeros(3, dtype=torch.long), reduction="none")
    with Recorder() as dp:
        engine.backward(loss)
    assert dp.calls and all(m == (True, False, False) for n, m in dp.calls), dp.calls


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_on_gpu_matches_microbatch_loop(dtype):
    """CUDA: the norms run in fp32 under autocast (torch's policy), like the plain modules."""
    torch.manual_seed(0)
    model = _randomise(TinyTransformer(V=100, D=64, H=64, k=10)).cuda()
    ids = torch.randint(0, 100, (16, 33), device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    C = 1.0
    want = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for i in range(16):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            li = F.cross_entropy(model(ids[i:i + 1]), y[i:i + 1])
        gs = torch.autograd.grad(li, list(model.parameters()))
        n = torch.sqrt(sum(g.double().pow(2).sum() for g in gs))
        c = min(1.0, C / (float(n) + 1e-6))
        for (name, _), g in zip(model.named_parameters(), gs):
            want[name] += c * g.double()
    engine = DPEngine(model, C)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = model(ids)
        assert model.ln1(model.emb(ids)).dtype == torch.float32
        loss = F.cross_entropy(out, y, reduction="none")
    engine.backward(loss)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for n, p in model.named_parameters():
        _assert_rel(p.grad.cpu(), want[n].cpu(), tol, n)
