"""Sensitivity of the clipped gradient sum on real models (noise off): what DP-SGD's privacy
proof needs from the engines, checked end to end.

For a batch D, S(D) = sum_i c_i g_i (the engine's .grad, all parameters flattened). The
Gaussian mechanism's add/remove sensitivity is C if and only if

* remove / add: ||S(D) - S(D \\ {j})|| <= C for every j (here with every example clipped, so the
  difference is exactly one contribution: its norm is C up to fp32 rounding);
* isolation: example j's contribution (one-hot mask) does not depend on the other members of the
  batch - replacing all of them by fresh examples and moving j to another row changes nothing.
  This is what BatchNorm-like mixing breaks; the negative control (a parameter-free batch-mean
  subtraction, which the engine cannot see) must FAIL these checks;
* padding: rows with mask 0, whatever they contain (garbage, NaN, inf), change nothing.

Models: an MLP, a small CNN with GroupNorm, a transformer-like sequence model (Embedding,
LayerNorm, single-head self-attention from Linear projections, MLP, mean-pooled head) through
the torch DPEngine; an MLP (and the negative control) through the JAX engine
(dpprims.jax.clipped_grad; its kernels through the interpreter path on CPU).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpprims.torch import DPEngine
from dpprims.torch.handlers import handler_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # conftest's ``device`` fixture
C = 0.05  # small enough that every example below is clipped (asserted)
SLACK = 1e-5  # fp32 rounding (see tests/test_clipping_properties.py)
ISOLATION_TOL = 1e-5  # |contribution in batch 1 - contribution in batch 2| / C


# ============================================================================== models
class TinyTransformer(nn.Module):
    """tokens [B, T] -> Embedding -> LayerNorm -> self-attention (q, k, v, o Linear) + residual
    -> LayerNorm -> MLP + residual -> mean over T -> Linear head. Mixes positions, never examples."""

    def __init__(self, vocab=13, d=8, k=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, k)

    def forward(self, tokens):
        h = self.emb(tokens)
        z = self.ln1(h)
        att = torch.softmax(self.q(z) @ self.k(z).transpose(1, 2) / math.sqrt(z.shape[-1]), dim=-1)
        h = h + self.o(att @ self.v(z))
        h = h + self.fc2(torch.tanh(self.fc1(self.ln2(h))))
        return self.head(h.mean(1))


class BatchMeanMLP(nn.Module):
    """NEGATIVE CONTROL: Linear -> subtract the batch mean of the activations (no parameters, so
    the engine accepts it) -> tanh -> Linear. Every example's gradient depends on the others."""

    def __init__(self, d=12, h=16, k=5):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, k)

    def forward(self, x):
        z = self.fc1(x)
        return self.fc2(torch.tanh(z - z.mean(0, keepdim=True)))


def _mlp():
    from dpprims.models import mlp

    return mlp(12, (16,), 5)


def _cnn():
    from dpprims.models import small_cnn

    return small_cnn(1, 5, channels=(3, 4), hidden=6, num_groups=2)


def _supported(*modules) -> bool:
    return all(handler_for(m) is not None for m in modules)


CNN_OK = _supported(nn.Conv2d(1, 1, 3), nn.GroupNorm(1, 2))
SEQ_OK = _supported(nn.Embedding(3, 2), nn.LayerNorm(2))

# name -> (model factory, input factory (generator, n) -> tensor, number of classes)
CASES = {
    "mlp": (_mlp, lambda g, n: 3.0 * torch.randn(n, 12, generator=g), 5),
    "cnn-groupnorm": (_cnn, lambda g, n: 3.0 * torch.randn(n, 1, 6, 6, generator=g), 5),
    "transformer": (TinyTransformer, lambda g, n: torch.randint(0, 13, (n, 5), generator=g), 4),
    "batch-mean-mlp": (BatchMeanMLP, lambda g, n: 3.0 * torch.randn(n, 12, generator=g), 5),
}
_SKIP = {
    "cnn-groupnorm": None if CNN_OK else "Conv2d / GroupNorm handlers are not registered in dpprims.torch.handlers",
    "transformer": None if SEQ_OK else "Embedding / LayerNorm handlers are not registered in dpprims.torch.handlers",
}


def _torch_params():
    out = []
    for n in ("mlp", "cnn-groupnorm", "transformer"):
        marks = [pytest.mark.skip(reason=_SKIP[n])] if _SKIP.get(n) else []
        out.append(pytest.param(n, marks=marks, id=n))
    return out


# ============================================================================== harness
class Harness:
    """One model + engine; ``S(x, y, mask)`` is the clipped sum as a float64 vector."""

    def __init__(self, name, seed=0):
        build, self.make_x, self.k = CASES[name]
        torch.manual_seed(seed)
        self.model = build().to(DEVICE)
        self.engine = DPEngine(self.model, max_grad_norm=C)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def batch(self, seed, n):
        g = torch.Generator().manual_seed(seed)
        return self.make_x(g, n).to(DEVICE), torch.randint(0, self.k, (n,), generator=g).to(DEVICE)

    def S(self, x, y, mask=None):
        self.model.zero_grad(set_to_none=True)
        losses = F.cross_entropy(self.model(x), y, reduction="none")
        self.norms = self.engine.backward(losses, mask=mask)
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).double().flatten().cpu()
                          for p in self.params])

    def contribution(self, x, y, j):
        return self.S(x, y, mask=F.one_hot(torch.tensor(j, device=DEVICE), x.shape[0]))


def check_remove_add(h: Harness, B=4, j=1):
    """||S(D) - S(D without j)|| <= C (and, with j clipped, ~= C)."""
    x, y = h.batch(1, B)
    full = h.S(x, y)
    assert bool((h.norms > C).all()), f"every example must be clipped for a sharp test: norms {h.norms}"
    keep = [i for i in range(B) if i != j]
    removed = h.S(x[keep], y[keep])
    d = float((full - removed).norm())
    assert d <= C * (1 + SLACK), f"removing example {j} moved the clipped sum by {d / C:.6g} * C > C"
    assert d >= C * (1 - 1e-4), f"removing a clipped example moved the sum by only {d / C:.6g} * C"
    return d


def check_isolation(h: Harness, B=4, j=1):
    """Example j's contribution in D equals its contribution in D' = (fresh others, permuted, j
    at another row)."""
    x, y = h.batch(1, B)
    c1 = h.contribution(x, y, j)
    x2, y2 = h.batch(2, B)  # fresh examples
    j2 = (j + 2) % B
    x2[j2], y2[j2] = x[j], y[j]
    c2 = h.contribution(x2, y2, j2)
    err = float((c1 - c2).norm()) / C
    assert err <= ISOLATION_TOL, (f"contribution of example {j} changed by {err:.3g} * C when the other batch "
                                  "members were replaced: the model mixes examples")
    assert float(c1.norm()) <= C * (1 + SLACK)
    return err


def check_padding(h: Harness, B=4, pad=3):
    """Padding rows (mask 0) with garbage, NaN and inf contents change nothing."""
    x, y = h.batch(1, B)
    base = h.S(x, y)
    xp, yp = h.batch(3, pad)
    if xp.is_floating_point():
        xp = xp * 1e3
        xp[0] = float("nan")
        xp[1] = float("inf")
    xs, ys = torch.cat([xp[:1], x, xp[1:]]), torch.cat([yp[:1], y, yp[1:]])  # padding first and last
    mask = torch.tensor([0] + [1] * B + [0] * (pad - 1), device=DEVICE)
    padded = h.S(xs, ys, mask)
    err = float((base - padded).norm()) / C
    assert err <= ISOLATION_TOL, f"padding rows changed the clipped sum by {err:.3g} * C"
    assert int(h.engine.last_stats["nonfinite"]) == 0
    return err


# ============================================================================== torch tests
@pytest.mark.parametrize("name", _torch_params())
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN padding rows in numpy
def test_sensitivity_torch(name):
    h = Harness(name)
    check_remove_add(h)
    check_isolation(h)
    check_padding(h)


def test_sum_is_the_sum_of_contributions():
    """Linearity over one-hot masks (each example's contribution alone adds up to the batch sum)
    with every contribution of norm <= C (MLP)."""
    h = Harness("mlp")
    x, y = h.batch(1, 4)
    full = h.S(x, y)
    parts = [h.contribution(x, y, j) for j in range(4)]
    assert max(float(p.norm()) for p in parts) <= C * (1 + SLACK)
    assert float((full - sum(parts)).norm()) <= 1e-5 * C


def test_negative_control_batch_mixing_is_caught():
    """The same checks FAIL on a model that mixes examples through a parameter-free batch mean
    (what BatchNorm does); if they passed, they could not catch mixing."""
    h = Harness("batch-mean-mlp")
    with pytest.raises(AssertionError, match="mixes examples"):
        check_isolation(h)
    with pytest.raises(AssertionError, match="padding rows changed"):
        check_padding(h)
    with pytest.raises(AssertionError, match="removing example"):
        check_remove_add(h)


# ============================================================================== JAX
def _jax_engine():
    try:
        import dpprims.jax as dpj  # noqa: F401
    except Exception as e:  # not written yet, or jax / flax missing
        return None, f"dpprims.jax is not importable ({type(e).__name__}: {e})"
    if not hasattr(dpj, "clipped_grad"):
        return None, "dpprims.jax has no clipped_grad yet"
    return dpj, None


class JaxHarness:
    """The same checks through dpprims.jax.clipped_grad (flax MLP of dpprims.jax.Dense layers)."""

    def __init__(self, mixing: bool, seed=0):
        import flax.linen as fnn
        import jax
        import jax.numpy as jnp

        dpj, _ = _jax_engine()
        self.jnp, self.dpj = jnp, dpj

        class MLP(fnn.Module):
            @fnn.compact
            def __call__(self, x):
                z = dpj.Dense(16)(x)
                if mixing:
                    z = z - z.mean(0, keepdims=True)
                return dpj.Dense(5)(jnp.tanh(z))

        def ce(logits, batch):
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch[1][:, None], axis=1)[:, 0]

        self.model = MLP()
        self.params = self.model.init(jax.random.PRNGKey(seed), jnp.zeros((2, 12), jnp.float32))["params"]
        self.loss_fn = dpj.make_loss_fn(self.model, ce)

    def batch(self, seed, n):
        rng = np.random.default_rng(seed)
        return (3.0 * rng.standard_normal((n, 12))).astype(np.float32), rng.integers(0, 5, n).astype(np.int32)

    def S(self, x, y, mask=None):
        import jax

        grads, norms = self.dpj.clipped_grad(self.loss_fn, self.params, (self.jnp.asarray(x), self.jnp.asarray(y)),
                                             max_grad_norm=C, mask=None if mask is None else self.jnp.asarray(mask))
        self.norms = np.asarray(norms)
        leaves = jax.tree_util.tree_leaves(grads)
        return torch.from_numpy(np.concatenate([np.asarray(v, np.float64).ravel() for v in leaves]))

    def contribution(self, x, y, j):
        m = np.zeros(x.shape[0], bool)
        m[j] = True
        return self.S(x, y, m)


# The JAX checks keep ONE physical shape (P rows, B real + padding, always with a mask), as the
# trainer does: every new shape costs a compilation (~7 s on CPU); removing an example is turning
# its row into padding.
P_JAX = 7


def _jax_padded(h, seed, B=4):
    x, y = h.batch(seed, P_JAX)
    x[B:] = 0.0
    mask = np.arange(P_JAX) < B
    return x, y, mask


def _jax_remove_add(h, B=4, j=1):
    x, y, mask = _jax_padded(h, 1, B)
    full = h.S(x, y, mask)
    assert (h.norms[:B] > C).all()
    m2 = mask.copy()
    m2[j] = False
    d = float((full - h.S(x, y, m2)).norm())
    assert d <= C * (1 + SLACK), f"removing example {j} moved the clipped sum by {d / C:.6g} * C > C"
    assert d >= C * (1 - 1e-4)


def _jax_isolation(h, B=4, j=1):
    x, y, _ = _jax_padded(h, 1, B)
    c1 = h.contribution(x, y, j)
    x2, y2, _ = _jax_padded(h, 2, B)
    j2 = (j + 2) % B
    x2[j2], y2[j2] = x[j], y[j]
    err = float((c1 - h.contribution(x2, y2, j2)).norm()) / C
    assert err <= ISOLATION_TOL, f"contribution changed by {err:.3g} * C: the model mixes examples"


def _jax_padding(h, B=4):
    x, y, mask = _jax_padded(h, 1, B)
    base = h.S(x, y, mask)
    xg = x.copy()
    xg[B:] = 1e3 * h.batch(3, P_JAX - B)[0]
    xg[B], xg[B + 1] = np.nan, np.inf
    err = float((base - h.S(xg, y, mask)).norm()) / C
    assert err <= ISOLATION_TOL, f"padding rows changed the clipped sum by {err:.3g} * C"


def test_sensitivity_jax():
    """Through the kernels: the interpreter path on CPU (CI), jax-triton on a GPU."""
    dpj, why = _jax_engine()
    if dpj is None:
        pytest.skip(why)
    import contextlib

    from dpprims.kernels._launch import interpreting

    on_cpu = not torch.cuda.is_available()
    ctx = dpj.use_path("interpreter") if on_cpu and interpreting() else contextlib.nullcontext()
    with ctx:
        dpj.LAST_PATH.clear()  # process-global: keep only the paths this test's ops take
        h = JaxHarness(mixing=False)
        _jax_remove_add(h)
        _jax_isolation(h)
        _jax_padding(h)
        if on_cpu and interpreting():
            assert set(dpj.LAST_PATH.values()) == {"interpreter"}, dict(dpj.LAST_PATH)


def test_negative_control_batch_mixing_is_caught_jax():
    dpj, why = _jax_engine()
    if dpj is None:
        pytest.skip(why)
    h = JaxHarness(mixing=True)
    with pytest.raises(AssertionError, match="mixes examples"):
        _jax_isolation(h)
    with pytest.raises(AssertionError, match="padding rows changed"):
        _jax_padding(h)
