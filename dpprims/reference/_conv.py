"""Conv1d / Conv2d oracle with torch semantics and layouts (NCHW / NCL, weight OIHW / OIL).

Arguments follow torch.nn.Conv2d: `stride`, `dilation` an int or a pair; `padding` an int, a
pair (symmetric per spatial axis), ``"valid"`` or ``"same"`` (stride 1 only; an odd total
padding puts the extra row / column at the bottom / right, as torch does). As an extension a
pair of (low, high) pairs gives explicit asymmetric padding. Zero padding only (torch's
padding_mode="zeros"). `weight_shape` is [C_out, C_in / groups, kh, kw].

Per-example weight gradients come from jax.grad of a single-example
jax.lax.conv_general_dilated (vmapped over the batch); the closed forms of DESIGN.md section 1
(implicit im2col U_i = unfold(x_i), per-group Linear norms, summed over groups with no
cross-group terms) are available as the ``"direct"`` and ``"ghost"`` methods of
`conv2d_weight_sq_norms`.
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from ._core import clipped_sum, per_example_sq_norms
from ._jit import jit
from ._linear import HIGHEST, linear_weight_sq_norms_direct, linear_weight_sq_norms_ghost

CONV_NORM_METHODS = ("autodiff", "direct", "ghost")


# ----------------------------------------------------------------------------- argument parsing
def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _ints(value, n: int, name: str) -> tuple[int, ...]:
    if _is_int(value):
        return (int(value),) * n
    value = tuple(value)
    if len(value) != n or not all(_is_int(v) for v in value):
        raise ValueError(f"{name} must be an int or {n} ints, got {value!r}")
    return tuple(int(v) for v in value)


def _padding(padding, kernel, stride, dilation) -> tuple[tuple[int, int], ...]:
    """torch padding spec -> one explicit (low, high) pair per spatial axis."""
    n = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * n
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"padding='same' needs stride 1 (as in torch), got stride {stride}")
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return tuple((t // 2, t - t // 2) for t in total)
        raise ValueError(f"padding string must be 'same' or 'valid', got {padding!r}")
    if _is_int(padding):
        pads = ((int(padding), int(padding)),) * n
    else:
        padding = tuple(padding)
        if len(padding) != n:
            raise ValueError(f"padding must be an int, {n} ints, {n} (low, high) pairs, 'same' or 'valid'")
        pads = tuple((p, p) if _is_int(p) else tuple(p) for p in padding)
        if not all(len(p) == 2 and all(_is_int(v) for v in p) for p in pads):
            raise ValueError(f"bad padding {padding!r}")
        pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if any(v < 0 for p in pads for v in p):
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return pads


def _conv2d_spec(x_shape, weight_shape, stride, padding, dilation, groups):
    """Validate a conv2d configuration; returns (kernel, stride, pads, dilation, out_hw)."""
    if len(x_shape) != 4:
        raise ValueError(f"x must be [B, C_in, H, W], got {x_shape}")
    if len(weight_shape) != 4:
        raise ValueError(f"weight_shape must be [C_out, C_in/groups, kh, kw], got {weight_shape}")
    c_out, c_in_g, kh, kw = weight_shape
    if groups < 1 or x_shape[1] % groups or c_out % groups or c_in_g * groups != x_shape[1]:
        raise ValueError(f"groups={groups} does not fit x {x_shape} and weight {weight_shape}")
    kernel = (kh, kw)
    stride = _ints(stride, 2, "stride")
    dilation = _ints(dilation, 2, "dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(kernel) < 1:
        raise ValueError("stride, dilation and kernel size must be >= 1")
    pads = _padding(padding, kernel, stride, dilation)
    out = tuple(
        (n + lo + hi - d * (k - 1) - 1) // s + 1
        for n, k, s, d, (lo, hi) in zip(x_shape[2:], kernel, stride, dilation, pads)
    )
    if min(out) < 1:
        raise ValueError(f"the kernel does not fit: output spatial size {out}")
    return kernel, stride, pads, dilation, out


def _check_grad_out(G, x_shape, c_out, out):
    expected = (x_shape[0], c_out) + tuple(out)
    if tuple(np.shape(G)) != expected:
        raise ValueError(f"output gradient G must have shape {expected}, got {tuple(np.shape(G))}")


# ----------------------------------------------------------------------------- conv2d
# The computations are jitted, with the validated (hashable) configuration as static arguments:
# one XLA compile per shape instead of one per primitive in eager mode, which keeps the test
# suites that call the oracle fast. jit does not change what is computed.
@jit(static_argnames=("stride", "pads", "dilation", "groups"))
def _conv(x, w, stride, pads, dilation, groups):
    return jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=stride,
        padding=pads,
        rhs_dilation=dilation,
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
        feature_group_count=groups,
        precision=HIGHEST,
    )


@jit(static_argnames=("kernel", "stride", "pads", "dilation", "out"))
def _unfold(x, kernel, stride, pads, dilation, out):
    (kh, kw), (sh, sw), (dh, dw), (h_out, w_out) = kernel, stride, dilation, out
    batch, channels = x.shape[:2]
    xp = jnp.pad(x, ((0, 0), (0, 0), pads[0], pads[1]))
    # output position (h, w) with kernel tap (i, j) reads padded input (h*sh + i*dh, w*sw + j*dw)
    rows = np.arange(h_out)[:, None] * sh + np.arange(kh)[None, :] * dh  # [H_out, kh]
    cols = np.arange(w_out)[:, None] * sw + np.arange(kw)[None, :] * dw  # [W_out, kw]
    patches = xp[:, :, rows[:, None, :, None], cols[None, :, None, :]]  # [B, C_in, H_out, W_out, kh, kw]
    return patches.transpose(0, 2, 3, 1, 4, 5).reshape(batch, h_out * w_out, channels * kh * kw)


@jit(static_argnames=("weight_shape", "stride", "pads", "dilation", "groups"))
def _per_example_weight_grads(x, G, weight_shape, stride, pads, dilation, groups):
    w0 = jnp.zeros(weight_shape, jnp.result_type(x, G))

    def one(x_i, g_i):  # d/dw <conv(x_i, w), G_i>
        return jax.grad(lambda w: jnp.sum(_conv(x_i[None], w, stride, pads, dilation, groups)[0] * g_i))(w0)

    return jax.vmap(one)(x, G)


@jit(static_argnames=("weight_shape", "stride", "pads", "dilation", "groups", "out", "method"))
def _unfold_sq_norms(x, G, weight_shape, stride, pads, dilation, groups, out, method):
    c_out, c_in_g, kh, kw = weight_shape
    U = _unfold(x, (kh, kw), stride, pads, dilation, out)  # [B, T, C_in*kh*kw]
    Gt = G.reshape(G.shape[0], c_out, out[0] * out[1]).transpose(0, 2, 1)  # [B, T, C_out]
    per_group = linear_weight_sq_norms_direct if method == "direct" else linear_weight_sq_norms_ghost
    d, p = c_in_g * kh * kw, c_out // groups
    total = jnp.zeros((x.shape[0],), jnp.result_type(x, G))
    for g in range(groups):  # no cross-group terms
        total = total + per_group(U[:, :, g * d : (g + 1) * d], Gt[:, :, g * p : (g + 1) * p])
    return total


def conv2d_unfold(x, kernel_size, stride=1, padding=0, dilation=1):
    """Implicit-im2col matrix U: [B, T, C_in * kh * kw] with T = H_out * W_out.

    Equal to torch.nn.functional.unfold(x, kernel_size, dilation, padding, stride).transpose(1, 2):
    column index c * kh * kw + i * kw + j (channel-major, then kernel row, then kernel column),
    row index h_out * W_out + w_out. One gather from the zero-padded input at the window indices.
    """
    x_shape = np.shape(x)
    kernel = _ints(kernel_size, 2, "kernel_size")
    kernel, stride, pads, dilation, out = _conv2d_spec(x_shape, (1, x_shape[1], *kernel), stride, padding, dilation, 1)
    return _unfold(x, kernel, stride, pads, dilation, out)


def conv2d_forward(x, weight, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups) in JAX."""
    _, stride, pads, dilation, _ = _conv2d_spec(np.shape(x), np.shape(weight), stride, padding, dilation, groups)
    return _conv(x, weight, stride, pads, dilation, groups)


def conv2d_per_example_weight_grads(x, G, weight_shape, stride=1, padding=0, dilation=1, groups=1):
    """Per-example conv weight gradients [B, C_out, C_in/groups, kh, kw] (materialised).

    vmap over examples of jax.grad, w.r.t. the weight, of <conv2d(x_i, w), G_i>: the exact
    vector-Jacobian product of one example's conv with its output gradient G_i
    [C_out, H_out, W_out]. The conv is linear in w, so the point w = 0 is as good as any.
    """
    weight_shape = tuple(int(v) for v in weight_shape)
    _, stride, pads, dilation, out = _conv2d_spec(np.shape(x), weight_shape, stride, padding, dilation, groups)
    _check_grad_out(G, np.shape(x), weight_shape[0], out)
    return _per_example_weight_grads(x, G, weight_shape, stride, pads, dilation, groups)


@jit
def conv2d_per_example_bias_grads(G):
    """Per-example bias gradients: G summed over its spatial axes, [B, C_out] (any conv rank)."""
    G = jnp.asarray(G)
    return jnp.sum(G, axis=tuple(range(2, G.ndim)))


def conv2d_weight_sq_norms(x, G, weight_shape, stride=1, padding=0, dilation=1, groups=1, method="autodiff"):
    """Squared per-example weight-gradient norms [B].

    method:
      * ``"autodiff"`` (default): square-sum of `conv2d_per_example_weight_grads`.
      * ``"direct"``: per group g, ||G_i,g^T U_i,g||_F^2 with U = `conv2d_unfold` (columns of the
        group's C_in/groups channels) and G_i,g [T, C_out/groups]; summed over groups.
      * ``"ghost"``: per group, <U_i,g U_i,g^T, G_i,g G_i,g^T>_F; summed over groups.
    The three agree; for groups > 1 there are no cross-group terms.
    """
    if method not in CONV_NORM_METHODS:
        raise ValueError(f"method must be one of {CONV_NORM_METHODS}, got {method!r}")
    if method == "autodiff":
        W = conv2d_per_example_weight_grads(x, G, weight_shape, stride, padding, dilation, groups)
        return per_example_sq_norms(W)
    weight_shape = tuple(int(v) for v in weight_shape)
    _, stride, pads, dilation, out = _conv2d_spec(np.shape(x), weight_shape, stride, padding, dilation, groups)
    _check_grad_out(G, np.shape(x), weight_shape[0], out)
    return _unfold_sq_norms(x, G, weight_shape, stride, pads, dilation, groups, out, method)


@jit
def conv2d_bias_sq_norms(G):
    """||sum over positions of G_i||^2: [B] (any conv rank)."""
    return jnp.sum(jnp.square(conv2d_per_example_bias_grads(G)), axis=1)


def conv2d_clipped_weight_grad(x, G, c, weight_shape, stride=1, padding=0, dilation=1, groups=1):
    """sum_i c_i dW_i: [C_out, C_in/groups, kh, kw]. An example with c_i = 0 adds exactly 0."""
    return clipped_sum(conv2d_per_example_weight_grads(x, G, weight_shape, stride, padding, dilation, groups), c)


@jit
def conv2d_clipped_bias_grad(G, c):
    """sum_i c_i db_i: [C_out]. An example with c_i = 0 adds exactly 0."""
    return clipped_sum(conv2d_per_example_bias_grads(G), c)


# ----------------------------------------------------------------------------- conv1d
# Conv1d is Conv2d on a unit height: x [B, C, L] -> [B, C, 1, L], weight [O, I, k] -> [O, I, 1, k].
def _as_2d(stride, padding, dilation):
    stride2 = (1, _ints(stride, 1, "stride")[0])
    dilation2 = (1, _ints(dilation, 1, "dilation")[0])
    if isinstance(padding, str):
        padding2 = padding
    elif _is_int(padding):
        padding2 = (0, int(padding))
    else:
        padding = tuple(padding)
        if len(padding) != 1:
            raise ValueError(f"conv1d padding must be an int, one (low, high) pair, 'same' or 'valid', got {padding!r}")
        padding2 = ((0, 0), padding[0])
    return stride2, padding2, dilation2


def _x2d(x, name="x"):
    if np.ndim(x) != 3:
        raise ValueError(f"{name} must have shape [B, C, L], got {np.shape(x)}")
    return x[:, :, None, :]


def _w2d(weight_shape):
    weight_shape = tuple(int(v) for v in weight_shape)
    if len(weight_shape) != 3:
        raise ValueError(f"weight_shape must be [C_out, C_in/groups, k], got {weight_shape}")
    return (weight_shape[0], weight_shape[1], 1, weight_shape[2])


def conv1d_unfold(x, kernel_size, stride=1, padding=0, dilation=1):
    """[B, L_out, C_in * k], columns channel-major then kernel tap (torch unfold of the unit-height 2-D view)."""
    k = _ints(kernel_size, 1, "kernel_size")[0]
    return conv2d_unfold(_x2d(x), (1, k), *_as_2d(stride, padding, dilation))


def conv1d_forward(x, weight, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv1d(x, weight, None, stride, padding, dilation, groups) in JAX."""
    y = conv2d_forward(_x2d(x), weight.reshape(_w2d(np.shape(weight))), *_as_2d(stride, padding, dilation), groups)
    return y[:, :, 0, :]


def conv1d_per_example_weight_grads(x, G, weight_shape, stride=1, padding=0, dilation=1, groups=1):
    """Per-example conv1d weight gradients [B, C_out, C_in/groups, k] (see the conv2d version)."""
    W = conv2d_per_example_weight_grads(
        _x2d(x), _x2d(G, "G"), _w2d(weight_shape), *_as_2d(stride, padding, dilation), groups
    )
    return W[:, :, :, 0, :]


def conv1d_per_example_bias_grads(G):
    """Per-example conv1d bias gradients [B, C_out]."""
    return conv2d_per_example_bias_grads(G)


def conv1d_weight_sq_norms(x, G, weight_shape, stride=1, padding=0, dilation=1, groups=1, method="autodiff"):
    """Squared per-example conv1d weight-gradient norms [B] (methods as in `conv2d_weight_sq_norms`)."""
    return conv2d_weight_sq_norms(
        _x2d(x), _x2d(G, "G"), _w2d(weight_shape), *_as_2d(stride, padding, dilation), groups, method=method
    )


def conv1d_bias_sq_norms(G):
    """||sum_t G_i[:, t]||^2: [B]."""
    return conv2d_bias_sq_norms(G)


def conv1d_clipped_weight_grad(x, G, c, weight_shape, stride=1, padding=0, dilation=1, groups=1):
    """sum_i c_i dW_i: [C_out, C_in/groups, k]. An example with c_i = 0 adds exactly 0."""
    return clipped_sum(conv1d_per_example_weight_grads(x, G, weight_shape, stride, padding, dilation, groups), c)


def conv1d_clipped_bias_grad(G, c):
    """sum_i c_i db_i: [C_out]. An example with c_i = 0 adds exactly 0."""
    return conv2d_clipped_bias_grad(G, c)
