"""Fused per-example clipping kernels for the affine parameters of GroupNorm and LayerNorm.

Both layers compute ``y = x_hat * weight + bias`` with the affine parameters living on a
channel axis and broadcast over every other non-batch position. With ``G = dL_i/dy`` the
per-example gradients are sums over positions (shared/DESIGN.md, section 1):

    dweight_i[c] = sum_r x_hat_i[r, c] * G_i[r, c],        dbias_i[c] = sum_r G_i[r, c].

Both layers are read as a strided ``[B, R, C]`` view (no copy): ``R`` the summed positions,
``C`` the affine channels.

* GroupNorm, x [B, C, *spatial]: R = prod(spatial) (stride 1), C the channels (stride R);
  statistics per (example, group), group = c // (C / num_groups)            (GROUP stats).
* LayerNorm, x [B, *lead, *normalized_shape]: R = prod(lead) (stride C), C = prod(normalized
  shape) (stride 1); statistics per (example, leading position r)            (ROW stats).

x_hat is *recomputed* in the kernel from x and the saved mean / rstd, (x - mean) * rstd in fp32,
not saved in forward. The layer keeps x anyway (its input gradient needs x or x_hat), and x is
usually the very tensor the previous layer produced, so keeping it costs no new memory, while a
saved x_hat would be a fresh activation-sized buffer (in fp32 under CUDA autocast, where the norm
runs in fp32: twice a half-precision x). The recompute is one subtract and one multiply per
element of a memory-bound kernel: free. ``HAS_STATS=False`` reads x as x_hat directly (for a
caller that has x_hat at hand).

Instantiate-and-reduce: the per-example gradients are tiny (2*C values per example against
R*C activations), so the norm kernel *writes* them, [B, 2, C] in fp32 (row 0 dweight_i, row 1
dbias_i), together with their squared norms, and the clipped sums sum_i c_i dweight_i,
sum_i c_i dbias_i are a reduction over the B rows of that buffer (``_clipped_rows_sum_kernel``)
instead of a second pass over the activations.

Deterministic: each norm program owns one (example, channel block) and reduces its positions in
a fixed order; squared-norm partials per channel block are summed by the binding in a fixed
order; the clipped sum is one program per column block looping over the examples in order. No
atomics. Rows of an example whose factor c_i is 0 are *masked* in the clipped sum (not
multiplied by 0): a NaN / inf example contributes exactly nothing.

This module imports only triton; launch arithmetic lives in the ``*_spec`` functions below and
is shared by the torch and JAX bindings.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._launch import LaunchSpec, block, cdiv, interpreting


# --------------------------------------------------------------------------------------------
# per-example affine gradients and their squared norms
# --------------------------------------------------------------------------------------------
@triton.jit
def _norm_affine_grads_kernel(
    x_ptr, g_ptr, mean_ptr, rstd_ptr,
    R, C, CPG, NG,
    stride_xb, stride_xr, stride_xc,
    stride_gb, stride_gr, stride_gc,
    pe_ptr, sq_ptr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_STATS: tl.constexpr, ROW_STATS: tl.constexpr,
):
    """One (example b, channel block) program:

        pe[b, 0, c] = sum_r x_hat[b, r, c] * G[b, r, c],   pe[b, 1, c] = sum_r G[b, r, c],
        sq[b, 0, cb] = ||pe[b, 0, c-block]||^2,            sq[b, 1, cb] = ||pe[b, 1, c-block]||^2,

    with x_hat = (x - mean) * rstd; mean / rstd are [B, NG] (GROUP stats, index c // CPG) or
    [B, R] (ROW_STATS, index r), any float dtype, read in fp32. pe is [B, 2, C] fp32, sq is
    [B, 2, n_c_blocks] fp32 (summed over the last axis by the binding).
    """
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_cb = tl.num_programs(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_in = offs_c < C
    b64 = pid_b.to(tl.int64)
    x_base = x_ptr + b64 * stride_xb
    g_base = g_ptr + b64 * stride_gb

    if HAS_STATS:
        if not ROW_STATS:
            grp = b64 * NG + offs_c // CPG
            mu_c = tl.load(mean_ptr + grp, mask=c_in, other=0.0).to(tl.float32)  # [BLOCK_C]
            rs_c = tl.load(rstd_ptr + grp, mask=c_in, other=0.0).to(tl.float32)  # [BLOCK_C]

    acc_w = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)  # [BLOCK_R, BLOCK_C] partial x_hat * G
    acc_b = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)  # [BLOCK_R, BLOCK_C] partial G
    for r0 in range(0, R, BLOCK_R):
        r = r0 + offs_r
        m = (r[:, None] < R) & c_in[None, :]
        x = tl.load(x_base + r[:, None] * stride_xr + offs_c[None, :] * stride_xc,
                    mask=m, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_C]
        g = tl.load(g_base + r[:, None] * stride_gr + offs_c[None, :] * stride_gc,
                    mask=m, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_C]
        if HAS_STATS:
            if ROW_STATS:
                row = b64 * R + r
                mu_r = tl.load(mean_ptr + row, mask=r < R, other=0.0).to(tl.float32)  # [BLOCK_R]
                rs_r = tl.load(rstd_ptr + row, mask=r < R, other=0.0).to(tl.float32)  # [BLOCK_R]
                xh = (x - mu_r[:, None]) * rs_r[:, None]
            else:
                xh = (x - mu_c[None, :]) * rs_c[None, :]
        else:
            xh = x
        acc_w += xh * g  # masked lanes: g == 0 and x_hat finite
        acc_b += g
    dw = tl.sum(acc_w, axis=0)  # [BLOCK_C] dweight_b on this channel block
    db = tl.sum(acc_b, axis=0)  # [BLOCK_C] dbias_b on this channel block
    pe = pe_ptr + b64 * 2 * C + offs_c
    tl.store(pe, dw, mask=c_in)
    tl.store(pe + C, db, mask=c_in)
    sq = sq_ptr + (b64 * 2) * n_cb + pid_c
    tl.store(sq, tl.sum(dw * dw, axis=0))
    tl.store(sq + n_cb, tl.sum(db * db, axis=0))


# --------------------------------------------------------------------------------------------
# clipped sum of materialised per-example rows
# --------------------------------------------------------------------------------------------
@triton.jit
def _clipped_rows_sum_kernel(
    x_ptr, c_ptr,
    B, N,
    stride_xb, stride_xn,
    out_ptr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[n] = sum_i c_i x[i, n] over the B rows in order; rows with c_i == 0 are masked, so a
    dropped example's NaN / inf never reaches the sum (fp32 accumulation and output)."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_B)
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)  # [BLOCK_B, BLOCK_N]
    for b0 in range(0, B, BLOCK_B):
        i = b0 + offs_b
        c = tl.load(c_ptr + i, mask=i < B, other=0.0)  # [BLOCK_B] clip factors
        keep = (i < B) & (c != 0.0)
        x = tl.load(x_ptr + i.to(tl.int64)[:, None] * stride_xb + offs_n[None, :] * stride_xn,
                    mask=keep[:, None] & (offs_n[None, :] < N), other=0.0).to(tl.float32)  # [BLOCK_B, BLOCK_N]
        acc += tl.where(keep[:, None], x * c[:, None], 0.0)
    tl.store(out_ptr + offs_n, tl.sum(acc, axis=0), mask=offs_n < N)


# --------------------------------------------------------------------------------------------
# launch specs (shared by the torch and JAX bindings)
# --------------------------------------------------------------------------------------------
def norm_affine_grads_spec(B: int, R: int, C: int, row_stats: bool, arch: int = 90) -> LaunchSpec:
    """Grid (B, channel blocks); each program loops over all R positions of its example (the
    squared norm needs the complete per-channel sums). GPU tiles hold 4096 elements at 8 warps
    (two fp32 accumulators and two loads: about 112 registers, no spills on sm_90). GroupNorm
    (GROUP stats) reads along R, which is contiguous, so its channel blocks are narrow (32);
    LayerNorm (ROW stats) reads along C and takes wide channel blocks (128)."""
    if interpreting():
        bc = block(C, 128, 128, lo=1)
        br = block(R, 256, 256, lo=1)
        warps = 4
    else:
        bc = block(C, 128 if row_stats else 32, lo=1)
        br = min(4096 // bc, block(R, 4096, lo=1))
        warps = 8
    n_cb = cdiv(C, bc)
    return LaunchSpec(grid=(B, n_cb), constexprs=dict(BLOCK_R=br, BLOCK_C=bc), num_warps=warps,
                      outputs={"per_example": (B, 2, C), "partials": (B, 2, n_cb)})


def clipped_rows_sum_spec(B: int, N: int) -> LaunchSpec:
    """One program per BLOCK_N columns, looping over the B rows in order (deterministic)."""
    bn = block(N, 256, 1024, lo=1)
    bb = block(B, 16, 256, lo=1)
    return LaunchSpec(grid=(cdiv(N, bn),), constexprs=dict(BLOCK_B=bb, BLOCK_N=bn), num_warps=4,
                      outputs={"out": (N,)})


# --------------------------------------------------------------------------------------------
# cost model
# --------------------------------------------------------------------------------------------
def norm_affine_flops(R: int, C: int) -> dict:
    """Flops per example: the norm pass recomputes x_hat and forms x_hat * G and G sums
    (about 4*R*C) plus 4*C for the squares; the clipped sum is 2*2*C per example. Autograd's
    own affine-gradient reduction would be 3*R*C per example."""
    return {"instantiate": 4 * R * C + 4 * C, "clipped_sum": 4 * C, "nonprivate": 3 * R * C}
