"""DP layers for Flax (``flax.linen``): Dense, Conv, GroupNorm, LayerNorm, RMSNorm, Embed.

Each layer has the fields, parameter names, shapes and initialisers of its flax counterpart
(it subclasses it) and computes the same function; in addition it

* ``sow``s what the per-example gradients of its parameters need into the ``"dp_inputs"``
  collection (``ACTIVATIONS``): the input for Dense / Conv, the normalised input x_hat for
  GroupNorm / LayerNorm / RMSNorm, the token ids for Embed;
* ``perturb``s its output (``"perturbations"`` collection, one zero variable ``out<k>`` per
  call k): the gradient of the loss w.r.t. that zero perturbation is the output gradient B.

Outside the engine both are no-ops (``apply`` without those collections), so the layers are
drop-in replacements in any flax model. ``dpprims.jax.clipped_grad`` differentiates w.r.t. the
perturbations only and feeds (activations, output gradients) to the fused kernels; see
``dpprims.jax.engine``.

Requirements, checked when the layer runs: a leading batch axis (one example per row: Dense
and Embed accept [B, ..., features], Conv exactly [B, *spatial, C]); Conv without
``input_dilation``, ``mask`` or CIRCULAR/REFLECT padding; norms over the last (feature) axis
without cross-device ``axis_name``; no custom ``dot_general``.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from dpprims.bindings.jax.conv import conv_forward, conv_padding

ACTIVATIONS = "dp_inputs"
PERTURBATIONS = "perturbations"

__all__ = ["ACTIVATIONS", "PERTURBATIONS", "DPLayer", "Dense", "Conv", "GroupNorm", "LayerNorm", "RMSNorm", "Embed",
           "conv_geometry"]


class DPLayer:
    """Marker base of the DP layers (the engine finds its layers by this type)."""

    dp_kind: str = ""


def capture(module: nn.Module, saved, y):
    """Sow ``saved`` and return ``y`` plus the zero perturbation of this call."""
    prev = module.get_variable(ACTIVATIONS, "inputs")
    k = len(prev) if prev else 0
    module.sow(ACTIVATIONS, "inputs", saved)
    return module.perturb(f"out{k}", y)


def _batched(module: nn.Module, x, min_ndim: int, what: str):
    if jnp.ndim(x) < min_ndim:
        raise ValueError(f"dpprims {type(module).__name__} {module.path}: needs a leading example (batch) "
                         f"axis, {what}; got shape {jnp.shape(x)}")


# --------------------------------------------------------------------------------------------
class Dense(nn.Dense, DPLayer):
    """``flax.linen.Dense`` that records its input and output gradient for per-example clipping."""

    dp_kind = "dense"

    @nn.compact
    def __call__(self, inputs):
        if self.dot_general is not None or self.dot_general_cls is not None:
            raise NotImplementedError("dpprims Dense does not support a custom dot_general")
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        _batched(self, inputs, 2, "[B, ..., features]")
        y = lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return capture(self, inputs, y)


# --------------------------------------------------------------------------------------------
def _tuple(v, n: int) -> tuple:
    if v is None:
        v = 1
    return (int(v),) * n if isinstance(v, int) else tuple(int(e) for e in v)


def conv_geometry(module, in_spatial) -> tuple:
    """(kernel_size, strides, padding pairs, dilation) of a DP Conv on inputs of spatial shape
    ``in_spatial``: the same explicit padding the layer's forward used."""
    k = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
    n = len(k)
    s = _tuple(module.strides, n)
    d = _tuple(module.kernel_dilation, n)
    pads = conv_padding(module.padding, tuple(in_spatial), k, s, d)
    return k, s, pads, d


class Conv(nn.Conv, DPLayer):
    """``flax.linen.Conv`` (1-D or 2-D, channels last) that records its input and output gradient.

    Supports ``strides``, ``padding`` (SAME, VALID, CAUSAL, ints, (low, high) pairs),
    ``kernel_dilation`` and ``feature_group_count``; the input must be exactly
    [B, *spatial, C] (one batch axis)."""

    dp_kind = "conv"

    @nn.compact
    def __call__(self, inputs):
        k = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        n = len(k)
        if n not in (1, 2):
            raise NotImplementedError(f"dpprims Conv supports 1-D and 2-D convolutions, got kernel_size {k}")
        if jnp.ndim(inputs) != n + 2:
            raise ValueError(f"dpprims Conv {self.path}: input must be [B, *spatial, C] with one batch axis "
                             f"and {n} spatial axes, got shape {jnp.shape(inputs)}")
        if _tuple(self.input_dilation, n) != (1,) * n:
            raise NotImplementedError("dpprims Conv does not support input_dilation")
        if self.mask is not None:
            raise NotImplementedError("dpprims Conv does not support a weight mask")
        if self.conv_general_dilated is not None or self.conv_general_dilated_cls is not None:
            raise NotImplementedError("dpprims Conv does not support a custom conv_general_dilated")
        _, s, pads, d = conv_geometry(self, inputs.shape[1:-1])
        in_features = jnp.shape(inputs)[-1]
        if in_features % self.feature_group_count:
            raise ValueError(f"feature_group_count={self.feature_group_count} must divide the "
                             f"{in_features} input features")
        kernel = self.param("kernel", self.kernel_init, k + (in_features // self.feature_group_count, self.features),
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = conv_forward(inputs, kernel, s, pads, d, self.feature_group_count, self.precision)
        if bias is not None:
            y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
        return capture(self, inputs, y)


# --------------------------------------------------------------------------------------------
def _stats(x, axes, dtype, use_fast_variance: bool):
    """mean and biased variance over ``axes`` in at least float32 (flax's _compute_stats)."""
    dt = jnp.promote_types(dtype if dtype is not None else x.dtype, jnp.float32)
    x = x.astype(dt)
    mean = jnp.mean(x, axis=axes, keepdims=True)
    if use_fast_variance:
        var = jnp.maximum(jnp.mean(x * x, axis=axes, keepdims=True) - mean * mean, 0.0)
    else:
        var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    return x, mean, var


def _affine(module, xhat, C: int, dtype):
    """y = x_hat * scale + bias over the last axis, with flax's parameter names and shapes."""
    y = xhat
    if module.use_scale:
        y = y * module.param("scale", module.scale_init, (C,), module.param_dtype)
    if module.use_bias:
        y = y + module.param("bias", module.bias_init, (C,), module.param_dtype)
    out_dtype = dtype if dtype is not None else jnp.result_type(xhat)
    return y.astype(out_dtype)


class GroupNorm(nn.GroupNorm, DPLayer):
    """``flax.linen.GroupNorm`` (channels last, statistics per example and group over all
    non-batch axes) that records x_hat and its output gradient."""

    dp_kind = "norm"

    @nn.compact
    def __call__(self, x, *, mask=None):
        if mask is not None or self.axis_name is not None:
            raise NotImplementedError("dpprims GroupNorm supports neither mask nor axis_name")
        if self.reduction_axes is not None:
            raise NotImplementedError("dpprims GroupNorm reduces over all non-batch axes (reduction_axes=None)")
        _batched(self, x, 2, "[B, ..., C]")
        C = x.shape[-1]
        if (self.num_groups is None) == (self.group_size is None):
            raise ValueError("Either `num_groups` or `group_size` should be specified.")
        G = C // self.group_size if self.group_size is not None else self.num_groups
        if G <= 0 or C % G:
            raise ValueError(f"Number of groups ({G}) does not divide the number of channels ({C}).")
        xg = x.reshape(x.shape[:-1] + (G, C // G))
        axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
        xg, mean, var = _stats(xg, axes, self.dtype, self.use_fast_variance)
        xhat = ((xg - mean) * lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        y = _affine(self, xhat, C, self.dtype or x.dtype)
        if not (self.use_scale or self.use_bias):
            return y
        return capture(self, xhat, y)


class LayerNorm(nn.LayerNorm, DPLayer):
    """``flax.linen.LayerNorm`` (affine on the last axis, statistics over ``reduction_axes``,
    default the last axis) that records x_hat and its output gradient."""

    dp_kind = "norm"

    @nn.compact
    def __call__(self, x, *, mask=None):
        if mask is not None or self.axis_name is not None:
            raise NotImplementedError("dpprims LayerNorm supports neither mask nor axis_name")
        _batched(self, x, 2, "[B, ..., C]")
        feat = (self.feature_axes,) if isinstance(self.feature_axes, int) else tuple(self.feature_axes)
        if tuple(a % x.ndim for a in feat) != (x.ndim - 1,):
            raise NotImplementedError("dpprims LayerNorm supports feature_axes=-1 only")
        red = (self.reduction_axes,) if isinstance(self.reduction_axes, int) else tuple(self.reduction_axes)
        red = tuple(sorted(a % x.ndim for a in red))
        if 0 in red:
            raise ValueError("dpprims LayerNorm: reduction_axes must not include the batch axis 0")
        xf, mean, var = _stats(x, red, self.dtype, self.use_fast_variance)
        xhat = (xf - mean) * lax.rsqrt(var + self.epsilon)
        y = _affine(self, xhat, x.shape[-1], self.dtype or x.dtype)
        if not (self.use_scale or self.use_bias):
            return y
        return capture(self, xhat, y)


class RMSNorm(nn.RMSNorm, DPLayer):
    """``flax.linen.RMSNorm`` (scale on the last axis, mean of squares over ``reduction_axes``,
    default the last axis; no bias) that records x_hat = x * rsqrt(mean(x^2) + eps) and its
    output gradient: the per-example scale gradient is sum over positions of x_hat * G, handled
    like the LayerNorm scale (dp_kind "norm", no "bias" parameter)."""

    dp_kind = "norm"

    @nn.compact
    def __call__(self, x, *, mask=None):
        if mask is not None or self.axis_name is not None:
            raise NotImplementedError("dpprims RMSNorm supports neither mask nor axis_name")
        _batched(self, x, 2, "[B, ..., C]")
        feat = (self.feature_axes,) if isinstance(self.feature_axes, int) else tuple(self.feature_axes)
        if tuple(a % x.ndim for a in feat) != (x.ndim - 1,):
            raise NotImplementedError("dpprims RMSNorm supports feature_axes=-1 only")
        red = (self.reduction_axes,) if isinstance(self.reduction_axes, int) else tuple(self.reduction_axes)
        red = tuple(sorted(a % x.ndim for a in red))
        if 0 in red:
            raise ValueError("dpprims RMSNorm: reduction_axes must not include the batch axis 0")
        dt = jnp.promote_types(self.dtype if self.dtype is not None else x.dtype, jnp.float32)
        xf = x.astype(dt)
        xhat = xf * lax.rsqrt(jnp.mean(xf * xf, axis=red, keepdims=True) + self.epsilon)
        out_dtype = self.dtype or x.dtype
        if not self.use_scale:
            return xhat.astype(out_dtype)
        scale = self.param("scale", self.scale_init, (x.shape[-1],), self.param_dtype)
        y = (xhat * scale).astype(out_dtype)
        return capture(self, xhat, y)


# --------------------------------------------------------------------------------------------
class Embed(nn.Embed, DPLayer):
    """``flax.linen.Embed`` that records the token ids and the output gradient. Ids [B, ...]."""

    dp_kind = "embed"

    def __call__(self, inputs):
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        _batched(self, inputs, 1, "ids [B, ...]")
        (embedding,) = self.promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
        if self.num_embeddings == 1:
            y = jnp.broadcast_to(embedding, inputs.shape + (self.features,))
        else:
            y = jnp.take(embedding, inputs, axis=0)
        return capture(self, inputs, y)
