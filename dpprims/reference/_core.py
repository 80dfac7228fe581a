"""Model-agnostic oracle: vmap-of-grad per-example gradients, norms, clip factors, clipped sums."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ._jit import jit


CLIPPINGS = ("flat", "automatic")
"""The clipping rules `clip_factors` knows."""

FLAT_EPS = 1e-6
"""Added to the norm in flat clipping, c = min(1, C / (n + FLAT_EPS)), exactly as Opacus does."""


def _static_scalar(value, name: str) -> float | None:
    """`value` as a Python float, or None when it is traced (and so cannot be checked)."""
    if isinstance(value, jax.core.Tracer):
        return None
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
    return float(arr.reshape(()))


@jit(static_argnums=0)
def per_example_grads(loss_fn, params, batch):
    """Per-example gradients of `loss_fn` by `jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))`.

    Args:
      loss_fn: `loss_fn(params, example) -> scalar`, where `example` is a pytree holding ONE
        example (no batch axis).
      params: the parameter pytree (shared by all examples).
      batch: the same pytree as `example` with a leading batch axis B on every leaf.

    Returns:
      A pytree shaped like `params` whose leaves have a leading axis B: leaf[i] is
      d loss_fn(params, example_i) / d params. B = 0 gives leaves of shape [0, ...].

    The result is jitted with `loss_fn` static (cached per loss_fn object), so loss_fn must be
    traceable, as it must be for vmap anyway.
    """
    return jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, batch)


def _batch_size(leaves) -> int:
    if not leaves:
        raise ValueError("the pytree has no leaves, so it has no batch axis")
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if None in sizes or len(sizes) != 1:
        raise ValueError(f"every leaf needs the same leading batch axis, got leading sizes {sizes}")
    return sizes.pop()


@jit
def per_example_sq_norms(grads):
    """Squared L2 norm of each example's gradient, summed over all leaves: [B].

    `grads` is a pytree whose leaves all have a leading batch axis B (as returned by
    `per_example_grads`, or a pytree of per-layer per-example gradients). A non-finite entry
    makes that example's squared norm non-finite. The dtype is the promoted dtype of the leaves.
    """
    leaves = [jnp.asarray(leaf) for leaf in jax.tree_util.tree_leaves(grads)]
    batch = _batch_size(leaves)
    dtype = jnp.result_type(*leaves)
    total = jnp.zeros((batch,), dtype)
    for leaf in leaves:
        total = total + jnp.sum(jnp.square(leaf), axis=tuple(range(1, leaf.ndim))).astype(dtype)
    return total


@jit
def per_example_norms(grads):
    """L2 norm of each example's gradient over all leaves of `grads`: [B] (see `per_example_sq_norms`)."""
    return jnp.sqrt(per_example_sq_norms(grads))


def clip_factors(norms, max_grad_norm, clipping: str = "flat", gamma: float = 0.01, mask=None):
    """Per-example clip factors c_i, [B], in the dtype of `norms`.

    Rules (n_i = norms[i] >= 0, C = max_grad_norm):
      * ``"flat"`` (Abadi et al., Opacus): c_i = min(1, C / (n_i + 1e-6)), so that
        ||c_i g_i|| <= C.
      * ``"automatic"`` (Bu et al., "Automatic clipping"): c_i = C / (n_i + gamma), so that
        ||c_i g_i|| < C for every example, also the small ones.

    Guarantee: c_i >= 0, and c_i * n_i <= C (flat) or < C (automatic).

    Edge cases:
      * C = 0: every factor is 0 (the sum of clipped gradients is exactly zero).
      * C = inf: flat gives 1 for every finite norm (no clipping); automatic raises ValueError
        (it would give infinite factors).
      * n_i = 0: flat gives min(1, C / 1e-6) (1 unless C < 1e-6); automatic gives C / gamma.
        Either way c_i * g_i = 0.
      * non-finite n_i (NaN or inf): c_i = 0, the example contributes nothing. Count and
        report such examples; `clipped_sum` guarantees they add exactly 0, not NaN.
      * mask: padding rows (mask == 0 / False) get c_i = 0; any non-zero mask entry keeps the
        example with its unscaled factor. Shape [B].
      * empty batch (B = 0): returns an empty [0] array.
      * C negative or NaN, gamma <= 0 or non-finite (automatic), an unknown `clipping`:
        ValueError. When C or gamma is a traced value (under jit) it cannot be checked here.
    """
    if clipping not in CLIPPINGS:
        raise ValueError(f"clipping must be one of {CLIPPINGS}, got {clipping!r}")
    if np.ndim(norms) != 1:
        raise ValueError(f"norms must have shape [B], got {np.shape(norms)}")
    c_value = _static_scalar(max_grad_norm, "max_grad_norm")
    if c_value is not None and (math.isnan(c_value) or c_value < 0):
        raise ValueError(f"max_grad_norm must be >= 0 (inf allowed for flat clipping), got {c_value}")
    if clipping == "automatic":
        if c_value is not None and math.isinf(c_value):
            raise ValueError("automatic clipping needs a finite max_grad_norm: C = inf gives infinite factors")
        g_value = _static_scalar(gamma, "gamma")
        if g_value is not None and not (math.isfinite(g_value) and g_value > 0):
            raise ValueError(f"automatic clipping needs a finite gamma > 0, got {g_value}")
    if mask is not None and np.shape(mask) != np.shape(norms):
        raise ValueError(f"mask must have the shape of norms {np.shape(norms)}, got {np.shape(mask)}")
    return _clip_factors(norms, max_grad_norm, gamma, mask, clipping)


@jit(static_argnames="clipping")
def _clip_factors(norms, clip, gamma, mask, clipping):
    norms = jnp.asarray(norms)
    dtype = norms.dtype if jnp.issubdtype(norms.dtype, jnp.floating) else jnp.result_type(float)
    norms, clip, gamma = norms.astype(dtype), jnp.asarray(clip, dtype), jnp.asarray(gamma, dtype)
    if clipping == "flat":
        factors = jnp.minimum(1, clip / (norms + FLAT_EPS))
    else:
        factors = clip / (norms + gamma)
    keep = jnp.isfinite(norms)
    if mask is not None:
        keep = keep & (mask != 0)
    return jnp.where(keep, factors, 0).astype(dtype)


@jit
def clipped_sum(grads, factors):
    """sum_i c_i g_i over the batch axis, leaf by leaf.

    Args:
      grads: pytree of per-example gradients, every leaf with leading batch axis B.
      factors: [B] clip factors (e.g. from `clip_factors`).

    Returns:
      A pytree shaped like one example's gradient (batch axis summed away), each leaf in its own
      dtype. An example with c_i == 0 contributes exactly 0, even when its gradient holds NaN or
      inf (selected away with `jnp.where`, never multiplied by 0). B = 0 gives zeros.
    """
    factors = jnp.asarray(factors)
    if factors.ndim != 1:
        raise ValueError(f"factors must have shape [B], got {factors.shape}")

    def one(leaf):
        leaf = jnp.asarray(leaf)
        if leaf.ndim == 0 or leaf.shape[0] != factors.shape[0]:
            raise ValueError(f"leaf of shape {leaf.shape} has no batch axis of size {factors.shape[0]}")
        c = factors.astype(leaf.dtype).reshape(factors.shape + (1,) * (leaf.ndim - 1))
        return jnp.sum(jnp.where(c != 0, c * leaf, 0), axis=0).astype(leaf.dtype)

    return jax.tree_util.tree_map(one, grads)


def clipped_grad(loss_fn, params, batch, max_grad_norm, mask=None, clipping: str = "flat", gamma: float = 0.01):
    """The whole oracle DP-SGD gradient step before noise: (sum_i c_i g_i, norms).

    g_i come from `per_example_grads(loss_fn, params, batch)`, n_i = ||g_i|| over all leaves,
    c_i = `clip_factors(n, max_grad_norm, clipping, gamma, mask)`. Returns the clipped sum (a
    pytree like `params`) and the unclipped per-example norms [B]. No noise, no division by the
    batch size. Edge cases are those of `clip_factors` and `clipped_sum`.
    """
    grads = per_example_grads(loss_fn, params, batch)
    norms = per_example_norms(grads)
    factors = clip_factors(norms, max_grad_norm, clipping=clipping, gamma=gamma, mask=mask)
    return clipped_sum(grads, factors), norms
