"""RMSNorm on the JAX side: dpprims.jax.RMSNorm (drop-in for flax's), its per-example clipped
sums against the float64 oracle (dpprims.reference.clipped_grad: vmap of grad), the oracle's
rmsnorm_xhat against torch's F.rms_norm, and the same clipped sums as the torch engine."""
import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from test_jax_engine import check_against_oracle, engine, f32, init, labels, oracle  # noqa: E402

import dpprims.jax as dpj  # noqa: E402
from dpprims import reference as ref  # noqa: E402


class RMSNet(nn.Module):
    """Dense -> RMSNorm (called twice: per-example grads add) -> RMSNorm over (T, D) -> Dense."""

    @nn.compact
    def __call__(self, x):  # x [B, T, D]
        rms = dpj.RMSNorm(name="rms")
        h = rms(jnp.tanh(dpj.Dense(x.shape[-1], name="inp")(x)))
        h = dpj.RMSNorm(reduction_axes=(1, 2), epsilon=1e-3, name="rms2")(rms(h) * 1.5 + x)
        return dpj.Dense(3, name="head")(h.reshape(h.shape[0], -1))


def test_rmsnorm_is_drop_in_flax_rmsnorm():
    x = f32(2, 5, 6, 4, seed=3)
    for kw in (dict(), dict(reduction_axes=(1, 2, 3), epsilon=1e-3), dict(use_scale=False)):
        dp, flax_layer = dpj.RMSNorm(**kw), nn.RMSNorm(**kw)
        v = {"params": init(flax_layer, x)} if kw.get("use_scale", True) else {}
        np.testing.assert_allclose(np.asarray(dp.apply(v, x)), np.asarray(flax_layer.apply(v, x)),
                                   rtol=2e-6, atol=2e-6, err_msg=str(kw))


def test_rmsnorm_model_matches_oracle():
    x = f32(6, 5, 4, seed=4, scale=2.0)
    mask = jnp.asarray([1, 1, 0, 1, 1, 1], bool)
    check_against_oracle(RMSNet(), (x, labels(6, 3)), C=0.7, mask=mask)


def test_rmsnorm_reference_equals_torch_and_torch_engine_equals_jax():
    """rmsnorm_xhat is torch's F.rms_norm without weight (eps=None: torch's default), and the
    torch engine's RMSNorm clipped sum equals dpprims.jax's on the same weights and data."""
    from dpprims.torch import DPEngine

    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3, 5)) * 1e-3  # small: eps matters
    for eps, shape in ((None, (5,)), (1e-4, (3, 5))):
        want = F.rms_norm(torch.tensor(x), list(shape), eps=eps).numpy()
        np.testing.assert_allclose(np.asarray(ref.rmsnorm_xhat(x, shape, eps)), want, rtol=1e-12)

    B, T, D = 5, 4, 6
    xb = f32(B, T, D, seed=8)
    y = labels(B, 3, seed=9)

    class J(nn.Module):
        @nn.compact
        def __call__(self, x):
            return dpj.Dense(3, name="head")(dpj.RMSNorm(epsilon=1e-5, name="rms")(x).mean(1))

    params = init(J(), xb)
    g, n, _ = check_against_oracle(J(), (xb, y), C=0.5, params=params)
    tm = torch.nn.Sequential(torch.nn.RMSNorm(D, eps=1e-5), torch.nn.Linear(D, 3))

    class Mean(torch.nn.Module):
        def forward(self, z):
            return z.mean(1)

    tm = torch.nn.Sequential(tm[0], Mean(), tm[1])
    with torch.no_grad():
        tm[0].weight.copy_(torch.tensor(np.asarray(params["rms"]["scale"])))
        tm[2].weight.copy_(torch.tensor(np.asarray(params["head"]["kernel"]).T))
        tm[2].bias.copy_(torch.tensor(np.asarray(params["head"]["bias"])))
    eng = DPEngine(tm, 0.5)
    xt = torch.tensor(np.asarray(xb))
    norms = eng.backward(F.cross_entropy(tm(xt), torch.tensor(np.asarray(y), dtype=torch.long), reduction="none"))
    np.testing.assert_allclose(norms.numpy(), np.asarray(n), rtol=1e-5)
    np.testing.assert_allclose(tm[0].weight.grad.numpy(), np.asarray(g["rms"]["scale"]), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# the Flax twin of the small transformer
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_flax_transformer_twin_equals_torch(norm):
    """torch_to_flax of the torch model's state dict gives the same logits (NCHW vs NHWC input)."""
    from dpprims.models import torch_to_flax
    from dpprims.models.jax_transformer import small_transformer as jax_tf
    from dpprims.models.torch_transformer import small_transformer as torch_tf

    torch.manual_seed(14)
    kw = dict(dim=8, depth=2, heads=2, norm=norm)
    tm = torch_tf(3, in_channels=3, input_size=(4, 6), patch=2, **kw)
    with torch.no_grad():
        for prm in tm.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
    jm = jax_tf(3, patch=2, **kw)
    for size in (28, 8, (4, 6), 7):  # the same default patch rule as the torch model
        assert jax_tf(input_size=size).patch == torch_tf(input_size=size).patch
    x_nchw = np.random.default_rng(15).random((3, 3, 4, 6)).astype(np.float32)
    x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
    params = torch_to_flax(tm.state_dict(), jax.eval_shape(lambda: jm.init(jax.random.key(0), x))["params"])
    np.testing.assert_allclose(np.asarray(jm.apply({"params": params}, x)), tm(torch.tensor(x_nchw)).detach().numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~60-90 s on the shared 2-core CI box: two JAX compilations through the interpreter
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_flax_transformer_twin_matches_oracle_and_torch_engine(norm):
    """Same weights (torch_to_flax) -> same logits; clipped_grad on the twin vs the vmap oracle;
    the torch engine's clipped sums equal the JAX ones after flax_to_torch-style mapping."""
    from dpprims.models import torch_to_flax
    from dpprims.models.jax_transformer import small_transformer as jax_tf
    from dpprims.models.torch_transformer import small_transformer as torch_tf
    from dpprims.torch import DPEngine

    torch.manual_seed(11)
    kw = dict(dim=8, depth=1, heads=2, norm=norm)
    tm = torch_tf(4, in_channels=2, input_size=(6, 4), patch=2, **kw)
    with torch.no_grad():
        for prm in tm.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
    jm = jax_tf(4, input_size=(6, 4), patch=2, **kw)
    x_nchw = np.random.default_rng(12).random((5, 2, 6, 4)).astype(np.float32)
    x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))  # NHWC
    template = jax.eval_shape(lambda: jm.init(jax.random.key(0), x))["params"]
    params = torch_to_flax(tm.state_dict(), template)
    np.testing.assert_allclose(np.asarray(jm.apply({"params": params}, x)), tm(torch.tensor(x_nchw)).detach().numpy(),
                               rtol=1e-5, atol=1e-5)
    y = labels(5, 4, seed=13)
    g, n = engine(jm, params, (x, y), 0.4)
    gr, nr = oracle(jm, params, (x, y), 0.4)
    np.testing.assert_allclose(np.asarray(n), np.asarray(nr), rtol=1e-5)
    scale = max(float(np.abs(np.asarray(b)).max()) for b in jax.tree.leaves(gr))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(gr)):
        # floor: the key bias's exact gradient is 0 (softmax is shift-invariant), compare absolutely
        err = np.abs(np.asarray(a, np.float64) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-3 * scale)
        assert err <= 1e-5, f"{jax.tree_util.keystr(path)}: relative error {err:.2e} vs the oracle"
    eng = DPEngine(tm, 0.4)
    norms = eng.backward(F.cross_entropy(tm(torch.tensor(x_nchw)), torch.tensor(np.asarray(y), dtype=torch.long),
                                         reduction="none"))
    np.testing.assert_allclose(norms.numpy(), np.asarray(n), rtol=1e-4)
    gt = torch_to_flax({k: v.grad for k, v in tm.named_parameters()}, template)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(gt)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=jax.tree_util.keystr(path))
