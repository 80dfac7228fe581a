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
from test_jax_engine import check_against_oracle, f32, init, labels  # noqa: E402

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
