"""JAX ops for the GroupNorm / LayerNorm affine kernels (dpprims.kernels.norm_affine).

Both layers compute ``y = x_hat * scale + bias`` with the affine parameters on the channel
(last) axis, so with G = dL_i/dy the per-example gradients are sums over positions:

    dscale_i[c] = sum_r x_hat_i[r, c] G_i[r, c],     dbias_i[c] = sum_r G_i[r, c].

``x_hat`` and ``G`` are [B, R, C] (the DP layers sow x_hat, channels last). They are tiny
(2*C values per example), so they are instantiated ([B, 2, C], row 0 dscale, row 1 dbias,
float32) in the norm pass, together with their squared norms, and the clipped sums are a
reduction over the B rows of that buffer (``clipped_rows_sum``), not a second pass over the
activations. Not differentiable; B = 0 is an empty batch; rows with c_i == 0 are masked.
"""
from __future__ import annotations

import jax.numpy as jnp

from dpprims.kernels import norm_affine as _k

from ._call import KernelCall, acc_dtype, dispatch, f32, launch, nondifferentiable, strides
from .linear import _kernel_dtype, arch, check_factors


def norm_affine_per_example_grads(xhat, G):
    """(pe [B, 2, C], sq [B, 2]): pe[:, 0] = dscale_i, pe[:, 1] = dbias_i, sq their squared norms."""
    xhat, G = jnp.asarray(xhat), jnp.asarray(G)
    if xhat.ndim != 3 or xhat.shape != G.shape:
        raise ValueError(f"x_hat and G must both be [B, R, C], got {xhat.shape} and {G.shape}")
    B, R, C = xhat.shape
    if B == 0 or R == 0 or C == 0:
        return jnp.zeros((B, 2, C), acc_dtype(xhat)), jnp.zeros((B, 2), acc_dtype(xhat))
    return nondifferentiable("norm_affine_per_example_grads", _per_example_grads, xhat, G)


def _per_example_grads(xhat, G):
    def plain(xhat, G):
        dt = acc_dtype(xhat, G)
        x, g = xhat.astype(dt), G.astype(dt)
        pe = jnp.stack([jnp.sum(x * g, axis=1), jnp.sum(g, axis=1)], axis=1)
        return pe, jnp.sum(pe * pe, axis=2)

    def kernel(path, xhat, G):
        outs = launch(norm_affine_grads_call(xhat, G), path)
        return outs["pe_ptr"], outs["sq_ptr"].sum(axis=2)

    return dispatch("norm_affine_per_example_grads", (xhat, G), plain, kernel)


def norm_affine_grads_call(xhat, G) -> KernelCall:
    xhat, G = _kernel_dtype(xhat), _kernel_dtype(G)
    B, R, C = xhat.shape
    spec = _k.norm_affine_grads_spec(B, R, C, row_stats=False, arch=arch())
    sx, sg = strides(xhat), strides(G)
    dummy = jnp.zeros((1,), jnp.float32)  # HAS_STATS=False: x is x_hat, mean/rstd are not read
    return KernelCall(
        _k._norm_affine_grads_kernel, spec.grid,
        inputs=dict(x_ptr=xhat, g_ptr=G, mean_ptr=dummy, rstd_ptr=dummy, R=R, C=C, CPG=1, NG=1,
                    stride_xb=sx[0], stride_xr=sx[1], stride_xc=sx[2],
                    stride_gb=sg[0], stride_gr=sg[1], stride_gc=sg[2]),
        outputs=dict(pe_ptr=f32(spec.outputs["per_example"]), sq_ptr=f32(spec.outputs["partials"])),
        constexprs=dict(spec.constexprs, HAS_STATS=False, ROW_STATS=False),
        num_warps=spec.num_warps, name="norm_affine_grads")


def clipped_rows_sum(rows, c):
    """sum_i c_i rows[i] over the B rows of per-example values [B, N] (float32); rows with
    c_i == 0 are selected away (a NaN row of a dropped example contributes 0). B = 0: zeros."""
    rows = jnp.asarray(rows)
    if rows.ndim != 2:
        raise ValueError(f"rows must be [B, N], got {rows.shape}")
    B, N = rows.shape
    c = check_factors(c, B)
    if B == 0 or N == 0:
        return jnp.zeros((N,), acc_dtype(rows))
    return nondifferentiable("clipped_rows_sum", _clipped_rows_sum, rows, c)


def _clipped_rows_sum(rows, c):
    def plain(rows, c):
        dt = acc_dtype(rows)
        keep = (c != 0)[:, None]
        return jnp.sum(jnp.where(keep, rows.astype(dt) * c.astype(dt)[:, None], 0), axis=0)

    return dispatch("clipped_rows_sum", (rows, c), plain,
                    lambda path, rows, c: launch(clipped_rows_sum_call(rows, c), path)["out_ptr"])


def clipped_rows_sum_call(rows, c) -> KernelCall:
    rows = _kernel_dtype(rows)
    B, N = rows.shape
    spec = _k.clipped_rows_sum_spec(B, N)
    s = strides(rows)
    return KernelCall(_k._clipped_rows_sum_kernel, spec.grid,
                      inputs=dict(x_ptr=rows, c_ptr=c.astype(jnp.float32), B=B, N=N,
                                  stride_xb=s[0], stride_xn=s[1]),
                      outputs=dict(out_ptr=f32(spec.outputs["out"])),
                      constexprs=dict(spec.constexprs), num_warps=spec.num_warps, name="clipped_rows_sum")


def norm_affine_sq_norms(xhat, G, *, has_scale: bool = True, has_bias: bool = True):
    """Per-example squared norm [B] of the affine gradients (scale and/or bias)."""
    _, sq = norm_affine_per_example_grads(xhat, G)
    total = jnp.zeros(sq.shape[:1], sq.dtype)
    if has_scale:
        total = total + sq[:, 0]
    if has_bias:
        total = total + sq[:, 1]
    return total


def norm_affine_clipped_grads(xhat, G, c):
    """(sum_i c_i dscale_i [C], sum_i c_i dbias_i [C])."""
    pe, _ = norm_affine_per_example_grads(xhat, G)
    B, _, C = pe.shape
    out = clipped_rows_sum(pe.reshape(B, 2 * C), c)
    return out[:C], out[C:]
