"""DP-SGD's noise and normalisation as an optax ``GradientTransformation``.

    tx = optax.chain(dpj.dp_noise(plan, seed=0), optax.adam(1e-3))   # any optax optimizer after it
    opt_state = tx.init(params)
    updates, opt_state = tx.update(clipped_sums, opt_state, params)   # once per LOGICAL batch
    params = optax.apply_updates(params, updates)

``dp_noise`` maps the clipped gradient sum of a logical batch (``dpprims.jax.clipped_grad``,
summed over its physical batches) to

    g = (clipped_sum + sigma * C * z) / (q * N)

and leaves everything else to the optimizer chained after it. Privacy-relevant choices:

* z is dpprims' certified-tails generator (dpprims.noise: Philox4x32-10 keyed by the 64-bit seed,
  128-bit-uniform Box-Muller, |z| <= 13.32; truncation adds < 1e-12 to delta for sigma >= 0.3),
  not ``jax.random.normal`` (whose tails are not analysed);
* the counter layout is the fused ``noisy_update``'s and the torch side's: leaf i of
  ``jax.tree_util.tree_leaves`` owns the pair range ``dpprims.noise.pair_offsets`` gives it, and
  update number t (1-based) uses noise stream t. So ``chain(dp_noise(...), optax.sgd(lr))``
  releases exactly the gradients of ``noisy_update(..., optimizer="sgd", lr=lr)``;
* the state carries the count of updates (``DPNoiseState.count``, int32): each ``update`` is one
  logical batch and draws fresh noise; never call ``update`` per physical batch, and never reuse
  a (seed, count) - restore ``opt_state`` with the parameters when resuming;
* the normaliser is the public q*N (``plan.normaliser``), never the sampled batch size;
* an empty logical batch (zero clipped sums) is still noised: give ``update`` the zeros;
* it refuses to go past ``plan.steps`` only where it can check: outside jit (a concrete count);
  under jit that budget is the caller's contract (``PoissonBatches`` stops at plan.steps).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpprims import noise as _nz
from dpprims.plan import BudgetExhaustedError, DPPlan

__all__ = ["dp_noise", "DPNoiseState"]


class DPNoiseState(NamedTuple):
    """State of :func:`dp_noise`: ``count`` = noisy updates released so far (int32 scalar)."""

    count: jax.Array


def dp_noise(plan: DPPlan | None = None, *, seed: int, noise_std: float | None = None,
             normaliser: float | None = None, rank: int = 0):
    """optax GradientTransformation adding sigma*C*z and dividing by q*N (module docstring).

    plan: take noise_std = plan.noise_std (sigma * C) and normaliser = plan.normaliser (q * N),
        and refuse (outside jit) an update past plan.steps; or give noise_std and normaliser.
    seed: int in [0, 2^64) (e.g. dpprims.noise.secure_seed() for a deployment): keep it secret.
    rank: noise stream of the process (data-parallel: the one process that draws the noise).
    """
    if plan is not None:
        if noise_std is not None or normaliser is not None:
            raise ValueError("dp_noise: give a plan or noise_std/normaliser, not both")
        noise_std, normaliser, max_steps = plan.noise_std, plan.normaliser, plan.steps
    else:
        if noise_std is None or normaliser is None:
            raise ValueError("dp_noise: without a plan, noise_std (sigma * C) and normaliser (q * N) are required")
        max_steps = None
    noise_std, normaliser = float(noise_std), float(normaliser)
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"dp_noise: noise_std must be finite and >= 0, got {noise_std!r}")
    if not (math.isfinite(normaliser) and normaliser > 0):
        raise ValueError(f"dp_noise: normaliser (q * N) must be finite and > 0, got {normaliser!r}")
    _nz.seed_words(seed)  # validates the range
    _nz.stream_word(rank)
    import optax

    from dpprims.bindings.jax.noise import _is_traced, as_seed_array, gaussian_noise

    def init_fn(params):
        del params
        return DPNoiseState(count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        count = state.count
        if max_steps is not None and not _is_traced(count):
            done = int(np.asarray(count))
            if done >= max_steps:
                raise BudgetExhaustedError(f"dp_noise: {done} noisy updates released, the plan covers {max_steps}; "
                                           "another would exceed its privacy budget")
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        offsets, _ = _nz.pair_offsets([math.prod(jnp.shape(g)) for g in leaves])
        step = (count + 1).astype(jnp.int32).reshape(1)
        seed_a = as_seed_array(seed)
        noisy = [gaussian_noise(g, std=noise_std, seed=seed_a, step=step, pair_offset=off, rank=rank,
                                normaliser=normaliser, x=g) for g, off in zip(leaves, offsets)]
        return jax.tree_util.tree_unflatten(treedef, noisy), DPNoiseState(count=count + 1)

    return optax.GradientTransformation(init_fn, update_fn)
