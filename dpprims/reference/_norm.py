"""GroupNorm / LayerNorm / RMSNorm oracle: the normalised input x_hat and the affine per-example gradients.

The affine output is y = x_hat * weight + bias, broadcast over every non-channel position, so
with G = dL_i/dy the per-example gradients are sums over positions: dweight_i = sum x_hat_i * G_i,
dbias_i = sum G_i (DESIGN.md section 1).
"""
from __future__ import annotations

import math
import numbers

import jax.numpy as jnp
import numpy as np

from ._core import clipped_sum, per_example_sq_norms
from ._jit import jit


@jit(static_argnames="num_groups")
def groupnorm_xhat(x, num_groups: int, eps: float = 1e-5):
    """x_hat of torch.nn.GroupNorm: x [B, C, *spatial], statistics per (example, group) over the
    group's C/num_groups channels and all spatial positions, biased variance, (x - mean) / sqrt(var + eps)."""
    x = jnp.asarray(x)
    if x.ndim < 2 or num_groups < 1 or x.shape[1] % num_groups:
        raise ValueError(f"x {x.shape} must be [B, C, ...] with C divisible by num_groups={num_groups}")
    per_group = (x.shape[1] // num_groups) * math.prod(x.shape[2:])
    xg = x.reshape(x.shape[0], num_groups, per_group)
    mean = jnp.mean(xg, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=-1, keepdims=True)
    return ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape)


def layernorm_xhat(x, normalized_shape, eps: float = 1e-5):
    """x_hat of torch.nn.LayerNorm(normalized_shape): statistics per example and leading position
    over the trailing len(normalized_shape) axes, biased variance, (x - mean) / sqrt(var + eps)."""
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    shape = tuple(int(n) for n in normalized_shape)
    return _layernorm_xhat(x, shape, eps)


@jit(static_argnames="shape")
def _layernorm_xhat(x, shape, eps):
    if not shape or x.shape[x.ndim - len(shape) :] != shape:
        raise ValueError(f"x {x.shape} does not end with normalized_shape {shape}")
    axes = tuple(range(x.ndim - len(shape), x.ndim))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps)


def rmsnorm_xhat(x, normalized_shape, eps: float | None = None):
    """x_hat of torch.nn.RMSNorm(normalized_shape) / flax RMSNorm: x / sqrt(mean(x^2) + eps) over
    the trailing len(normalized_shape) axes (no mean subtracted). eps=None is torch's default, the
    machine epsilon of x's dtype (float64 -> 2.2e-16, float32 -> 1.2e-7). The affine gradient of
    RMSNorm's weight is norm_affine_per_example_grads(x_hat, G, ...)[0] (there is no bias)."""
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    shape = tuple(int(n) for n in normalized_shape)
    x = jnp.asarray(x)
    if eps is None:
        eps = float(jnp.finfo(x.dtype).eps)
    return _rmsnorm_xhat(x, shape, eps)


@jit(static_argnames="shape")
def _rmsnorm_xhat(x, shape, eps):
    if not shape or x.shape[x.ndim - len(shape) :] != shape:
        raise ValueError(f"x {x.shape} does not end with normalized_shape {shape}")
    axes = tuple(range(x.ndim - len(shape), x.ndim))
    return x / jnp.sqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True) + eps)


def _channel_axes(channel_axis, ndim: int) -> tuple[int, ...]:
    axes = (channel_axis,) if isinstance(channel_axis, int) else tuple(channel_axis)
    axes = tuple(sorted({a % ndim if -ndim <= a < ndim else -1 for a in axes}))
    if not axes or axes[0] < 1:
        raise ValueError(f"channel_axis {channel_axis!r} must name axes in 1..{ndim - 1} (axis 0 is the batch)")
    return axes


def norm_affine_per_example_grads(x_hat, G, channel_axis):
    """Per-example affine gradients (dweight [B, *C], dbias [B, *C]).

    channel_axis: the axis (or axes) the affine parameters live on, kept in array order; every
    other non-batch axis is summed over. GroupNorm on [B, C, H, W]: channel_axis=1 -> [B, C].
    LayerNorm over normalized_shape: the trailing axes, e.g. x [B, T, D] with normalized_shape
    (D,): channel_axis=-1 -> [B, D]; with (T, D): channel_axis=(1, 2) -> [B, T, D].
    """
    if np.shape(x_hat) != np.shape(G):
        raise ValueError(f"x_hat {np.shape(x_hat)} and G {np.shape(G)} must have the same shape")
    return _affine_grads(x_hat, G, _channel_axes(channel_axis, np.ndim(G)))


@jit(static_argnames="keep")
def _affine_grads(x_hat, G, keep):
    summed = tuple(a for a in range(1, G.ndim) if a not in keep)
    return jnp.sum(x_hat * G, axis=summed), jnp.sum(G, axis=summed)


def norm_affine_sq_norms(x_hat, G, channel_axis):
    """(||dweight_i||^2, ||dbias_i||^2), each [B]."""
    dw, db = norm_affine_per_example_grads(x_hat, G, channel_axis)
    return per_example_sq_norms(dw), per_example_sq_norms(db)


def norm_affine_clipped_grads(x_hat, G, c, channel_axis):
    """(sum_i c_i dweight_i, sum_i c_i dbias_i), each [*C]. An example with c_i = 0 adds exactly 0."""
    return clipped_sum(norm_affine_per_example_grads(x_hat, G, channel_axis), c)
