"""JAX ops for the Conv kernels (dpprims.kernels.conv), channels-last, each on three paths.

Layouts are flax's: ``x`` [B, *spatial, C_in] (NWC / NHWC), output gradient ``G``
[B, *out_spatial, C_out], weight (gradient) [*kernel_size, C_in/groups, C_out]. One or two
spatial dims (a 1-D conv runs the 2-D kernels with H = 1). The kernels take strides, so the
channels-last arrays are read in place (implicit im2col, nothing unfolded in memory).

``padding`` is explicit: one (low, high) pair per spatial dim (``conv_padding`` turns flax's
padding argument into that). The kernels use the low padding only; the high one is implied by
G's spatial shape and checked here.

Per-example norms are the sum over groups of the per-group norms (no cross-group terms).
The bias of a conv is a Linear bias over the T = prod(out_spatial) positions: use
``linear_bias_sq_norms`` / ``linear_clipped_bias_grad`` on G reshaped to [B, T, C_out].
Outputs are float32 (float64 stays float64 on the jnp path); not differentiable; B = 0 is an
empty batch. Rows of an example with c_i == 0 are masked in the clipped sum, never multiplied.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from dpprims.kernels import conv as _k
from dpprims.kernels.conv import Conv2dGeometry

from ._call import KernelCall, acc_dtype, dispatch, f32, launch, nondifferentiable
from .linear import _JNP_PRECISION, _kernel_dtype, arch, check_factors, clipped_sum_operand, dot_precision, split_outputs

CONV_NORM_METHODS = ("auto", "direct", "ghost")
_CHUNK_ELEMS = 1 << 24


def _tup(v, n: int, name: str) -> tuple:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(e) for e in v)
    if len(v) != n:
        raise ValueError(f"{name} must be an int or {n} ints, got {v}")
    return v


def conv_padding(padding, in_spatial, kernel_size, strides, dilation) -> tuple:
    """flax/lax padding ('SAME', 'VALID', 'CAUSAL' for 1-D, an int, ints, or (low, high) pairs)
    -> one explicit (low, high) pair per spatial dim, as ``flax.linen.Conv`` pads."""
    n = len(kernel_size)
    if isinstance(padding, str):
        p = padding.upper()
        if p in ("SAME", "VALID", "SAME_LOWER"):
            eff = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation))
            pads = lax.padtype_to_pads(tuple(in_spatial), eff, tuple(strides), p)
            return tuple((int(lo), int(hi)) for lo, hi in pads)
        if p == "CAUSAL":
            if n != 1:
                raise ValueError("CAUSAL padding is only implemented for 1-D convolutions")
            return ((dilation[0] * (kernel_size[0] - 1), 0),)
        raise NotImplementedError(f"dpprims Conv: padding {padding!r} is not supported (use SAME, VALID, "
                                  "CAUSAL, ints or (low, high) pairs; pad other modes explicitly)")
    if isinstance(padding, int):
        return ((padding, padding),) * n
    pads = []
    for p in padding:
        if isinstance(p, int):
            pads.append((p, p))
        else:
            lo, hi = p
            pads.append((int(lo), int(hi)))
    if len(pads) != n:
        raise ValueError(f"padding needs {n} entries, got {padding!r}")
    return tuple(pads)


def conv_out_spatial(in_spatial, kernel_size, strides, padding, dilation) -> tuple:
    return tuple(_k.conv_out_size(s, k, st, d, lo, hi)
                 for s, k, st, d, (lo, hi) in zip(in_spatial, kernel_size, strides, dilation, padding))


def _check(x, G, kernel_size, strides, padding, dilation, groups):
    x, G = jnp.asarray(x), jnp.asarray(G)
    kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    n = len(kernel_size)
    if n not in (1, 2):
        raise ValueError(f"dpprims conv ops support 1-D and 2-D convs, got kernel_size {kernel_size}")
    if x.ndim != n + 2 or G.ndim != n + 2:
        raise ValueError(f"a {n}-D conv needs x and G of rank {n + 2} ([B, *spatial, C]), got "
                         f"x {x.shape} and G {G.shape}")
    if x.shape[0] != G.shape[0]:
        raise ValueError(f"x {x.shape} and G {G.shape} must agree on the batch size")
    k = _tup(kernel_size, n, "kernel_size")
    s = _tup(strides, n, "strides")
    d = _tup(dilation, n, "dilation")
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(pads) != n or min(k) < 1 or min(s) < 1 or min(d) < 1 or min(lo for lo, _ in pads) < 0:
        raise ValueError(f"bad conv geometry kernel_size={k} strides={s} dilation={d} padding={pads}")
    C_in, C_out = x.shape[-1], G.shape[-1]
    if groups < 1 or C_in % groups or C_out % groups:
        raise ValueError(f"groups={groups} must divide C_in={C_in} and C_out={C_out}")
    out = conv_out_spatial(x.shape[1:-1], k, s, pads, d)
    if tuple(G.shape[1:-1]) != out:
        raise ValueError(f"G spatial shape {G.shape[1:-1]} does not match the conv output {out}")
    if x.dtype != G.dtype:
        dt = jnp.result_type(x.dtype, G.dtype)
        x, G = x.astype(dt), G.astype(dt)
    return x, G, k, s, pads, d


def geometry(x, G, k, s, pads, d, groups) -> Conv2dGeometry:
    """The kernels' 2-D geometry of a channels-last conv (1-D: H = H_out = KH = 1)."""
    if len(k) == 1:
        B, W, C_in = x.shape
        _, W_out, C_out = G.shape
        return Conv2dGeometry(B=B, C_in=C_in, H=1, W=W, C_out=C_out, H_out=1, W_out=W_out, KH=1, KW=k[0],
                              SH=1, SW=s[0], PH=0, PW=pads[0][0], DH=1, DW=d[0], groups=int(groups))
    B, H, W, C_in = x.shape
    _, H_out, W_out, C_out = G.shape
    return Conv2dGeometry(B=B, C_in=C_in, H=H, W=W, C_out=C_out, H_out=H_out, W_out=W_out, KH=k[0], KW=k[1],
                          SH=s[0], SW=s[1], PH=pads[0][0], PW=pads[1][0], DH=d[0], DW=d[1], groups=int(groups))


def _nhwc_strides(geo: Conv2dGeometry, C: int, H: int, W: int) -> tuple:
    """(stride_b, stride_c, stride_h, stride_w) in elements of a dense [B, H, W, C] buffer."""
    return (H * W * C, 1, W * C, C)


def _geo_inputs(geo: Conv2dGeometry) -> dict:
    return dict(GROUPS=geo.groups, C_in_g=geo.C_in_g, H=geo.H, W=geo.W, W_out=geo.W_out, T=geo.T, D=geo.D,
                P=geo.P, SH=geo.SH, SW=geo.SW, PH=geo.PH, PW=geo.PW, DH=geo.DH, DW=geo.DW)


def _stride_inputs(geo: Conv2dGeometry) -> dict:
    sx = _nhwc_strides(geo, geo.C_in, geo.H, geo.W)
    sg = _nhwc_strides(geo, geo.C_out, geo.H_out, geo.W_out)
    return dict(stride_xb=sx[0], stride_xc=sx[1], stride_xh=sx[2], stride_xw=sx[3],
                stride_gb=sg[0], stride_gc=sg[1], stride_gh=sg[2], stride_gw=sg[3])


def choose_method(geo: Conv2dGeometry, method: str) -> str:
    if method not in CONV_NORM_METHODS:
        raise ValueError(f"conv norm method must be one of {CONV_NORM_METHODS}, got {method!r}")
    return _k.choose_conv_norm_method(geo.T, geo.D, geo.P, method)


# --------------------------------------------------------------------------------------------
# per-example squared weight-gradient norms
# --------------------------------------------------------------------------------------------
def conv_weight_sq_norms(x, G, *, kernel_size, strides, padding, dilation=1, groups: int = 1,
                         method: str = "auto", precision: str = "ieee"):
    """Per-example squared weight-gradient norms [B] of a conv: sum over groups g of
    ||G_i,g^T U_i,g||_F^2 (U the implicit im2col of x_i), by ``method`` "direct" | "ghost" |
    "auto" (the kernels' cost model). A non-finite value in example i gives a non-finite entry i."""
    x, G, k, s, pads, d = _check(x, G, kernel_size, strides, padding, dilation, groups)
    geo = geometry(x, G, k, s, pads, d, groups)
    m = choose_method(geo, method)
    prec = dot_precision(x, precision)
    if geo.B == 0 or geo.T == 0:
        return jnp.zeros((geo.B,), acc_dtype(x))
    op = f"conv_weight_sq_norms[{m}]"
    return nondifferentiable(op, _weight_sq_norms, x, G, op=op, geo=geo, pads=pads, method=m, precision=prec)


def _weight_sq_norms(x, G, *, op, geo, pads, method, precision):
    def kernel(path, x, G):
        (partials,) = launch(conv_norm_call(x, G, geo, method, precision), path).values()
        return partials.sum(axis=1)

    return dispatch(op, (x, G), lambda x, G: jnp_conv_weight_sq_norms(x, G, geo, pads, method, precision), kernel)


def conv_norm_call(x, G, geo: Conv2dGeometry, method: str, precision: str) -> KernelCall:
    x, G = _kernel_dtype(x), _kernel_dtype(G)
    if method == "direct":
        spec, kernel = _k.conv2d_norm_direct_spec(geo, arch=arch()), _k._conv2d_norm_direct_kernel
    else:
        spec, kernel = _k.conv2d_norm_ghost_spec(geo, arch=arch()), _k._conv2d_norm_ghost_kernel
    return KernelCall(kernel, spec.grid,
                      inputs=dict(x_ptr=x, g_ptr=G, **_geo_inputs(geo), **_stride_inputs(geo)),
                      outputs=dict(out_ptr=f32(spec.outputs["partials"])),
                      constexprs=dict(spec.constexprs, DOT_PRECISION=precision),
                      num_warps=spec.num_warps, name=f"conv2d_norm_{method}")


def _patches(x, geo: Conv2dGeometry, pads):
    """im2col of a channels-last x: [B, T, groups, D], features (c, kh, kw) within a group."""
    n = x.ndim - 2
    spatial = "HW"[-n:] if n == 2 else "W"
    dn = lax.conv_dimension_numbers(x.shape, (1,) * (n + 2), (f"N{spatial}C", f"OI{spatial}", f"N{spatial}C"))
    k = (geo.KH, geo.KW) if n == 2 else (geo.KW,)
    s = (geo.SH, geo.SW) if n == 2 else (geo.SW,)
    d = (geo.DH, geo.DW) if n == 2 else (geo.DW,)
    p = lax.conv_general_dilated_patches(x, k, s, pads, rhs_dilation=d, dimension_numbers=dn,
                                         precision=lax.Precision.HIGHEST)
    return p.reshape(x.shape[0], geo.T, geo.groups, geo.D)


def jnp_conv_weight_sq_norms(x, G, geo: Conv2dGeometry, pads, method: str, precision: str = "ieee"):
    dt = acc_dtype(x)
    prec = _JNP_PRECISION[precision]
    B = geo.B
    per_example = geo.T * (geo.C_in * geo.KH * geo.KW + geo.C_out) + geo.groups * (
        geo.P * geo.D if method == "direct" else 2 * geo.T * geo.T)
    chunk = max(1, min(B, _CHUNK_ELEMS // max(1, per_example)))
    chunk = -(-B // -(-B // chunk))  # equal chunks: the padded tail wastes < one example per chunk

    def norms(xg):
        xc, gc = xg
        U = _patches(xc.astype(dt), geo, pads)  # [b, T, g, D]
        Gg = gc.astype(dt).reshape(xc.shape[0], geo.T, geo.groups, geo.P)  # [b, T, g, P]
        if method == "direct":
            w = jnp.einsum("btgp,btgd->bgpd", Gg, U, precision=prec)
            return jnp.sum(w * w, axis=(1, 2, 3))
        uu = jnp.einsum("bsgd,btgd->bgst", U, U, precision=prec)
        gg = jnp.einsum("bsgp,btgp->bgst", Gg, Gg, precision=prec)
        return jnp.sum(uu * gg, axis=(1, 2, 3))

    return map_batch_chunks(norms, x, G, chunk)


def map_batch_chunks(norms, x, G, chunk: int):
    """``norms((x, G))`` [B] evaluated over the batch in chunks of ``chunk`` examples (lax.map;
    the last chunk zero-padded and its rows dropped), so per-chunk temporaries stay bounded."""
    B = x.shape[0]
    if chunk >= B:
        return norms((x, G))
    nb = math.ceil(B / chunk)
    pad = nb * chunk - B
    xs = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape((nb, chunk) + x.shape[1:])
    gs = jnp.pad(G, ((0, pad),) + ((0, 0),) * (G.ndim - 1)).reshape((nb, chunk) + G.shape[1:])
    return lax.map(norms, (xs, gs)).reshape(-1)[:B]


# --------------------------------------------------------------------------------------------
# clipped weight-gradient sum
# --------------------------------------------------------------------------------------------
def conv_clipped_weight_grad(x, G, c, *, kernel_size, strides, padding, dilation=1, groups: int = 1,
                             precision: str = "ieee"):
    """sum_i c_i dW_i in flax's kernel layout [*kernel_size, C_in/groups, C_out]: one
    weight-gradient conv over all examples with c_i fused into G. Rows of examples with
    c_i == 0 are masked, not multiplied; B = 0 gives zeros."""
    x, G, k, s, pads, d = _check(x, G, kernel_size, strides, padding, dilation, groups)
    geo = geometry(x, G, k, s, pads, d, groups)
    c = check_factors(c, geo.B)
    prec = dot_precision(x, precision)
    wshape = tuple(k) + (geo.C_in_g, geo.C_out)
    if geo.B == 0 or geo.T == 0:
        return jnp.zeros(wshape, acc_dtype(x))
    return nondifferentiable("conv_clipped_weight_grad", _clipped_weight_grad, x, G, c, geo=geo, k=k, s=s,
                             pads=pads, d=d, precision=prec)


def _clipped_weight_grad(x, G, c, *, geo, k, s, pads, d, precision):
    def kernel(path, x, G, c):
        w = launch(conv_clipped_weight_grad_call(x, G, c, geo, precision), path)["out_ptr"]  # [C_out, D], D = (c, kh, kw)
        w = w.reshape(geo.C_out, geo.C_in_g, geo.KH, geo.KW)
        w = jnp.transpose(w, (2, 3, 1, 0))  # [KH, KW, C_in_g, C_out]
        return w[0] if len(k) == 1 else w

    return dispatch("conv_clipped_weight_grad", (x, G, c),
                    lambda x, G, c: jnp_conv_clipped_weight_grad(x, G, c, k, s, pads, d, geo.groups, precision),
                    kernel)


def conv_clipped_weight_grad_call(x, G, c, geo: Conv2dGeometry, precision: str) -> KernelCall:
    """Design (a) (scale outside the MMA), see kernels/conv.py and docs/PRIVACY.md."""
    kernel = _k._conv2d_clipped_weight_grad_kernel
    x, G = clipped_sum_operand(x, kernel), clipped_sum_operand(G, kernel)
    spec = _k.conv2d_clipped_weight_grad_spec(geo, arch=arch(), itemsize=_kernel_dtype(x).dtype.itemsize)
    return KernelCall(kernel, spec.grid,
                      inputs=dict(x_ptr=x, g_ptr=G, c_ptr=c.astype(jnp.float32), B=geo.B,
                                  EXAMPLES_PER_SPLIT=spec.outputs["examples_per_split"],
                                  **_geo_inputs(geo), **_stride_inputs(geo)),
                      outputs=split_outputs(spec),
                      constexprs=dict(spec.constexprs, DOT_PRECISION=precision),
                      num_warps=spec.num_warps, name="conv2d_clipped_weight_grad", zeroed=("cnt_ptr",))


def conv_forward(x, w, strides, pads, dilation, groups, precision=None):
    """The channels-last conv the DP Conv layer runs (lax.conv_general_dilated)."""
    n = x.ndim - 2
    spatial = "HW" if n == 2 else "W"
    dn = lax.conv_dimension_numbers(x.shape, w.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    return lax.conv_general_dilated(x, w, tuple(strides), tuple(pads), rhs_dilation=tuple(dilation),
                                    dimension_numbers=dn, feature_group_count=groups, precision=precision)


def jnp_conv_clipped_weight_grad(x, G, c, k, s, pads, d, groups, precision: str = "ieee"):
    dt = acc_dtype(x)
    nsp = x.ndim - 2
    keep = (c != 0).reshape((-1,) + (1,) * (nsp + 1))
    cs = c.astype(dt).reshape((-1,) + (1,) * (nsp + 1))
    xs = jnp.where(keep, x.astype(dt), 0)
    gs = jnp.where(keep, G.astype(dt) * cs, 0)
    w0 = jnp.zeros(tuple(k) + (x.shape[-1] // groups, G.shape[-1]), dt)
    _, vjp = jax.vjp(lambda w: conv_forward(xs, w, s, pads, d, groups, _JNP_PRECISION[precision]), w0)
    return vjp(gs)[0]
