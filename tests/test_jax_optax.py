"""dpprims.jax.dp_noise (optax) and dpprims.jax.PoissonBatches: the noise has the right std (a KS
test that rejects a wrong sigma), chains with optax.sgd / adam like the fused noisy_update, counts
its steps, and the batches are the plan's Poisson draws with fixed shapes and masks."""
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
from scipy import stats  # noqa: E402

import dpprims.jax as dpj  # noqa: E402
from dpprims.bindings.jax.update import init_opt_state, noisy_update  # noqa: E402  (the fused reference)
from dpprims.plan import BudgetExhaustedError, DPPlan  # noqa: E402


def _plan(n=50, ebs=9.0, pbs=4, steps=5, sigma=1.3, C=0.7, cap=None):
    return DPPlan.create(num_examples=n, expected_batch_size=ebs, physical_batch_size=pbs, max_grad_norm=C,
                         delta=1e-5, steps=steps, noise_multiplier=sigma, max_batch_size=cap)


def _tree(rng, dtype=jnp.float32):
    return {"dense": {"kernel": jnp.asarray(rng.standard_normal((13, 7)), dtype),
                      "bias": jnp.asarray(rng.standard_normal((7,)), dtype)},
            "out": jnp.asarray(rng.standard_normal((5,)), dtype)}


def test_noise_std_ks_rejects_wrong_sigma():
    std, norm = 2.7, 11.0
    tx = dpj.dp_noise(noise_std=std, normaliser=norm, seed=1234)
    zeros = {"a": jnp.zeros((151, 67), jnp.float32), "b": jnp.zeros((4001,), jnp.float32)}
    g, state = tx.update(zeros, tx.init(zeros))
    z = np.concatenate([np.asarray(v).ravel() for v in jax.tree_util.tree_leaves(g)]) * norm
    assert z.size == 151 * 67 + 4001
    assert stats.kstest(z / std, "norm").pvalue > 1e-3
    for wrong in (2 / 3, 3 / 2):  # the test has the power to see a wrong sigma
        assert stats.kstest(z / (std * wrong), "norm").pvalue < 1e-6
    # the next update is fresh noise (stream count + 1), and the leaves never share pairs
    g2, state = tx.update(zeros, state)
    z2 = np.concatenate([np.asarray(v).ravel() for v in jax.tree_util.tree_leaves(g2)]) * norm
    assert abs(np.corrcoef(z, z2)[0, 1]) < 0.03
    a, b = np.asarray(g["a"]).ravel()[:4001], np.asarray(g["b"])
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.06
    assert int(state.count) == 2


def test_adds_clipped_sum_and_divides_by_public_normaliser():
    rng = np.random.default_rng()
    sums = _tree(rng)
    plan = _plan()
    tx = dpj.dp_noise(plan, seed=5)
    g, _ = tx.update(sums, tx.init(sums))
    tx0 = dpj.dp_noise(noise_std=0.0, normaliser=plan.normaliser, seed=5)
    g0, _ = tx0.update(sums, tx0.init(sums))
    for s, v in zip(jax.tree_util.tree_leaves(sums), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(np.asarray(v), np.asarray(s) / plan.normaliser, rtol=1e-6)
    # the noise part is (g - sums / qN) * qN / (sigma C): unit-variance-ish and not zero
    z = np.concatenate([(np.asarray(a) - np.asarray(b)).ravel()
                        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g0))])
    z = z * plan.normaliser / plan.noise_std
    assert 0.5 < z.std() < 1.6 and np.all(np.abs(z) < 13.33)


def test_released_gradients_are_noisy_updates_bit_for_bit():
    """Same seed, step and leaf order: dp_noise releases exactly the fused update's noisy gradients,
    eagerly and under jit."""
    rng = np.random.default_rng()
    params, sums = _tree(rng), _tree(rng)
    seed = int(rng.integers(0, 2**63))
    tx = dpj.dp_noise(noise_std=1.3, normaliser=9.0, seed=seed)
    state = tx.init(params)
    jitted = jax.jit(tx.update)
    for t in (1, 2):
        g, _ = tx.update(sums, state)
        gj, state = jitted(sums, state)
        _, _, ref = noisy_update(params, sums, {}, noise_std=1.3, normaliser=9.0, seed=seed, step=t, lr=0.1,
                                 return_noisy_grads=True)
        for a, b, c in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(gj), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
            np.testing.assert_array_equal(np.asarray(b), np.asarray(c))


@pytest.mark.parametrize("name", ["sgd", "sgd-momentum", "adam"])
def test_chain_equals_fused_noisy_update(name):
    rng = np.random.default_rng()
    params = _tree(rng)
    plan = _plan()
    lr, mu = 0.05, 0.9
    if name == "adam":
        inner, kw, opt = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8), {}, "adam"
    else:
        m = mu if name == "sgd-momentum" else 0.0
        inner, kw, opt = optax.sgd(lr, momentum=m or None), dict(momentum=m), "sgd"
    tx = optax.chain(dpj.dp_noise(plan, seed=77), inner)
    state = tx.init(params)
    step = jax.jit(lambda p, s, st: (lambda u, st2: (optax.apply_updates(p, u), st2))(*tx.update(s, st, p)))
    ref, ref_state = params, init_opt_state(params, opt, **kw)
    mine = params
    for t in range(1, 4):
        sums = _tree(rng)
        mine, state = step(mine, sums, state)
        ref, ref_state = noisy_update(ref, sums, ref_state, noise_std=plan.noise_std, normaliser=plan.normaliser,
                                      seed=77, step=t, optimizer=opt, lr=lr, **kw)
    for a, b in zip(jax.tree_util.tree_leaves(mine), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    assert int(state[0].count) == 3


def test_budget_and_argument_checks():
    plan = _plan(steps=2)
    p = {"w": jnp.zeros((3,), jnp.float32)}
    tx = dpj.dp_noise(plan, seed=0)
    s = tx.init(p)
    for _ in range(2):
        _, s = tx.update(p, s)
    with pytest.raises(BudgetExhaustedError):
        tx.update(p, s)
    with pytest.raises(ValueError, match="not both"):
        dpj.dp_noise(plan, seed=0, noise_std=1.0)
    with pytest.raises(ValueError, match="normaliser"):
        dpj.dp_noise(noise_std=1.0, normaliser=0.0, seed=0)
    with pytest.raises(ValueError, match="noise_std"):
        dpj.dp_noise(noise_std=float("nan"), normaliser=3.0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        dpj.dp_noise(plan, seed=-1)


def test_poisson_batches_are_the_plans_draws():
    plan = _plan(n=37, ebs=8.5, pbs=3, steps=25)
    x = np.arange(37 * 2, dtype=np.float32).reshape(37, 2)
    y = np.arange(37)
    batches = dpj.PoissonBatches(plan, (x, y), seed=4)
    ref = plan.make_sampler(seed=4)  # an independent sampler with the same seed
    assert len(batches) == 25
    for t, logical in enumerate(batches):
        idx = ref.sample()
        assert logical.step == t and logical.batch_size == idx.size
        assert len(logical) == max(1, math.ceil(idx.size / 3))
        got = []
        for xb, yb, mask in logical:
            assert xb.shape == (3, 2) and yb.shape == (3,) and mask.shape == (3,) and mask.dtype == bool
            np.testing.assert_array_equal(xb[:, 0], 2 * yb)  # rows stay aligned across arrays
            got.extend(yb[mask].tolist())
            assert np.all(yb[~mask] == 0)  # padding repeats example 0, masked out
        assert got == idx.tolist()
    assert batches.steps_taken == 25 and len(batches) == 0 and list(batches) == []
    with pytest.raises(BudgetExhaustedError):
        batches.next()


def test_poisson_batches_resume_and_fixed_count():
    plan = _plan(n=40, ebs=10.0, pbs=4, steps=6, cap=14)
    x = np.arange(40)
    full = [[b[0].copy() for b in lb] for lb in dpj.PoissonBatches(plan, x, seed=3)]
    first = dpj.PoissonBatches(plan, x, seed=3)
    part = [[b[0].copy() for b in first.next()] for _ in range(2)]
    resumed = dpj.PoissonBatches(plan, x, seed=999)
    resumed.load_state_dict(first.state_dict())
    rest = [[b[0].copy() for b in lb] for lb in resumed]
    assert len(part + rest) == len(full)
    for a, b in zip(part + rest, full):
        assert len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))
    fixed = dpj.PoissonBatches(plan, x, seed=3, num_batches="max")
    assert all(len(lb) == plan.max_physical_batches == 4 for lb in fixed)
    with pytest.raises(ValueError, match="max_batch_size"):
        dpj.PoissonBatches(_plan(n=40), x, num_batches="max")
    with pytest.raises(ValueError, match="num_examples"):
        dpj.PoissonBatches(plan, x[:39])
    with pytest.raises(ValueError, match="different lengths"):
        dpj.PoissonBatches(plan, (x, x[:39]))
