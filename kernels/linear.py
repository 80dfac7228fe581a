"""Fused per-example clipping kernels for a Linear layer ``Y = A W^T + b``.

Shapes (per example ``i``; ``T`` is the sequence length, 1 for a plain dense layer):

* ``A``  [B, T, D]  layer input (activations),
* ``G``  [B, T, P]  output gradient dL_i/dY_i of the *per-example* loss,
* per-example weight gradient ``G_i^T A_i`` [P, D] (torch's nn.Linear weight layout),
  per-example bias gradient ``sum_t G_i[t]`` [P].

Math (shared/DESIGN.md, section 1):

* direct:  ||G_i^T A_i||_F^2, the [BLOCK_P, BLOCK_D] tile of G_i^T A_i built in registers over
  a loop on t, square-summed, never written. 2*T*D*P flops per example.
* ghost:   ||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T>_F = sum_{s,t} (a_s . a_t)(g_s . g_t), over
  [BLOCK_T, BLOCK_T] tiles of both Gram matrices, never written; only tiles with j <= k are
  computed and off-diagonal tiles count twice. About 2*T^2*(D+P) flops per example.
* T = 1:   ||g_i a_i^T||_F^2 = ||a_i||^2 ||g_i||^2 (two row reductions, no dot at all).
* clipped weight gradient (Book-Keeping): sum_i c_i G_i^T A_i = (c * G)^T A, ONE weight-gradient
  GEMM over the B*T rows with the per-example factor c_i fused into the load of G.

All reductions are deterministic: every program writes its own partial (a tile of the
norm, or a split-K slice of the weight gradient) and the binding sums the partials in a fixed
order (two-stage reduction, Triton tutorial 05). No atomics anywhere.

Precision: operands are loaded in their own dtype (fp32, fp16, bf16) and every dot accumulates
in fp32. The norm kernels multiply half-precision operands exactly (products of halves are
exact in fp32). ``DOT_PRECISION`` is the ``tl.dot`` precision for fp32 operands: "ieee"
(default) or "tf32x3" (near-fp32 accuracy on tensor cores). Plain "tf32" is not offered: a norm
~2^-11 too small, or a clipped sum rounded to TF32, lets a contribution exceed C. The clipped
weight gradient always runs on fp32 operands (see its kernel's docstring).

Non-finite inputs: rows of an example whose factor c_i is 0 are *masked* in the clipped
gradient (not multiplied by 0), so an example with an inf/NaN activation or gradient
contributes exactly nothing, as the clip-factor contract promises.

This module imports only triton; launch arithmetic lives in the ``*_spec`` functions below and
is shared by the torch and JAX bindings.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._launch import LaunchSpec, block, cdiv, interpreting


# --------------------------------------------------------------------------------------------
# per-example squared norms
# --------------------------------------------------------------------------------------------
@triton.jit
def _linear_norm_direct_kernel(
    a_ptr, g_ptr,
    out_ptr,
    T, D, P,
    stride_ab, stride_at, stride_ad,
    stride_gb, stride_gt, stride_gp,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[b, tile] = ||(G_b^T A_b)[tile]||_F^2 for one [BLOCK_P, BLOCK_D] tile of one example."""
    pid_b = tl.program_id(0)
    pid_tile = tl.program_id(1)
    n_d_tiles = tl.cdiv(D, BLOCK_D)
    pid_p = pid_tile // n_d_tiles
    pid_d = pid_tile % n_d_tiles

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    a_base = a_ptr + pid_b.to(tl.int64) * stride_ab
    g_base = g_ptr + pid_b.to(tl.int64) * stride_gb

    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)  # [BLOCK_P, BLOCK_D] tile of G_b^T A_b
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        g = tl.load(g_base + t[:, None] * stride_gt + offs_p[None, :] * stride_gp,
                    mask=(t[:, None] < T) & (offs_p[None, :] < P), other=0.0)  # [BLOCK_T, BLOCK_P]
        a = tl.load(a_base + t[:, None] * stride_at + offs_d[None, :] * stride_ad,
                    mask=(t[:, None] < T) & (offs_d[None, :] < D), other=0.0)  # [BLOCK_T, BLOCK_D]
        acc = tl.dot(tl.trans(g), a, acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + pid_b * tl.num_programs(1) + pid_tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton.jit
def _linear_norm_ghost_kernel(
    a_ptr, g_ptr,
    out_ptr,
    T, D, P,
    stride_ab, stride_at, stride_ad,
    stride_gb, stride_gt, stride_gp,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[b, j*nT + k] = w_jk * <(A_b A_b^T)[j,k], (G_b G_b^T)[j,k]>_F for tile rows j <= k
    (w = 2 off the diagonal, 1 on it); tiles with j > k write 0 (symmetry)."""
    pid_b = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_k = tl.program_id(2)
    n_t = tl.num_programs(1)
    out = out_ptr + (pid_b * n_t + pid_j) * n_t + pid_k
    if pid_j <= pid_k:
        offs_s = pid_j * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_t = pid_k * BLOCK_T + tl.arange(0, BLOCK_T)
        a_base = a_ptr + pid_b.to(tl.int64) * stride_ab
        g_base = g_ptr + pid_b.to(tl.int64) * stride_gb

        aa = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)  # [BLOCK_T, BLOCK_T] tile of A A^T
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            a_s = tl.load(a_base + offs_s[:, None] * stride_at + d[None, :] * stride_ad,
                          mask=(offs_s[:, None] < T) & (d[None, :] < D), other=0.0)  # [BLOCK_T, BLOCK_D]
            a_t = tl.load(a_base + offs_t[:, None] * stride_at + d[None, :] * stride_ad,
                          mask=(offs_t[:, None] < T) & (d[None, :] < D), other=0.0)  # [BLOCK_T, BLOCK_D]
            aa = tl.dot(a_s, tl.trans(a_t), aa, input_precision=DOT_PRECISION)

        gg = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)  # [BLOCK_T, BLOCK_T] tile of G G^T
        offs_p = tl.arange(0, BLOCK_P)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + offs_p
            g_s = tl.load(g_base + offs_s[:, None] * stride_gt + p[None, :] * stride_gp,
                          mask=(offs_s[:, None] < T) & (p[None, :] < P), other=0.0)  # [BLOCK_T, BLOCK_P]
            g_t = tl.load(g_base + offs_t[:, None] * stride_gt + p[None, :] * stride_gp,
                          mask=(offs_t[:, None] < T) & (p[None, :] < P), other=0.0)  # [BLOCK_T, BLOCK_P]
            gg = tl.dot(g_s, tl.trans(g_t), gg, input_precision=DOT_PRECISION)

        weight = tl.where(pid_j == pid_k, 1.0, 2.0)
        tl.store(out, weight * tl.sum(tl.sum(aa * gg, axis=1), axis=0))
    else:
        tl.store(out, 0.0)


@triton.jit
def _rows_sq_norm_kernel(
    x_ptr,
    out_ptr,
    N,
    stride_xb, stride_xn,
    BLOCK_N: tl.constexpr,
):
    """out[b] = sum_n x[b, n]^2 (fp32). Used for T = 1: ||G_i||^2 = ||a_i||^2 ||g_i||^2."""
    pid_b = tl.program_id(0)
    base = x_ptr + pid_b.to(tl.int64) * stride_xb
    offs = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs
        x = tl.load(base + n * stride_xn, mask=n < N, other=0.0).to(tl.float32)  # [BLOCK_N]
        acc += x * x
    tl.store(out_ptr + pid_b, tl.sum(acc, axis=0))


@triton.jit
def _linear_bias_norm_kernel(
    g_ptr,
    out_ptr,
    T, P,
    stride_gb, stride_gt, stride_gp,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """out[b, pb] = ||sum_t G_b[t, pb-block]||^2: one block of the per-example bias gradient."""
    pid_b = tl.program_id(0)
    pid_p = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_t = tl.arange(0, BLOCK_T)
    g_base = g_ptr + pid_b.to(tl.int64) * stride_gb
    acc = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)  # [BLOCK_T, BLOCK_P] partial sums over t
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        acc += tl.load(g_base + t[:, None] * stride_gt + offs_p[None, :] * stride_gp,
                       mask=(t[:, None] < T) & (offs_p[None, :] < P), other=0.0).to(tl.float32)
    s = tl.sum(acc, axis=0)  # [BLOCK_P] bias-gradient block of example b
    tl.store(out_ptr + pid_b * tl.num_programs(1) + pid_p, tl.sum(s * s, axis=0))


# --------------------------------------------------------------------------------------------
# clipped sums (Book-Keeping)
# --------------------------------------------------------------------------------------------
@triton.jit
def _linear_clipped_weight_grad_kernel(
    a_ptr, g_ptr, c_ptr,
    out_ptr,
    B, T, D, P, ROWS_PER_SPLIT,
    stride_ab, stride_at, stride_ad,
    stride_gb, stride_gt, stride_gp,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[s, P-tile, D-tile] = sum over rows r = (i, t) of split s of c_i G_i[t]^T A_i[t].

    The reduction dimension is the B*T rows; row r belongs to example i = r // T. The factor
    c_i is applied in fp32 while G is loaded and the product stays fp32: rounding c_i * G back
    to fp16/bf16 (or to TF32 inside the dot) would perturb example i's contribution by ~2^-11
    relative to sum_t |g_t||a_t|, which the norm pass never sees, and a contribution could then
    exceed C (by up to ~2x where positions cancel). So the dot runs on fp32 operands
    (DOT_PRECISION "ieee" or "tf32x3"), whatever the input dtype. Rows with c_i == 0 are
    masked in both operands so that non-finite values of a dropped example cannot leak in as
    NaN = 0 * inf.
    """
    pid_p = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    n_rows = B * T
    r_lo = pid_s * ROWS_PER_SPLIT
    r_hi = tl.minimum(r_lo + ROWS_PER_SPLIT, n_rows)

    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)  # [BLOCK_P, BLOCK_D]
    for r0 in range(r_lo, r_hi, BLOCK_K):
        r = r0 + offs_k  # [BLOCK_K] flat (example, position) rows
        in_rows = r < r_hi
        i = (r // T).to(tl.int64)
        t = (r % T).to(tl.int64)
        c = tl.load(c_ptr + i, mask=in_rows, other=0.0)  # [BLOCK_K] per-example clip factors
        keep = in_rows & (c != 0.0)
        g = tl.load(g_ptr + i[:, None] * stride_gb + t[:, None] * stride_gt + offs_p[None, :] * stride_gp,
                    mask=keep[:, None] & (offs_p[None, :] < P), other=0.0)  # [BLOCK_K, BLOCK_P]
        g = g.to(tl.float32) * c[:, None]  # scaled in fp32 and kept there (see docstring)
        a = tl.load(a_ptr + i[:, None] * stride_ab + t[:, None] * stride_at + offs_d[None, :] * stride_ad,
                    mask=keep[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_D]
        acc = tl.dot(tl.trans(g), a, acc, input_precision=DOT_PRECISION)

    out = out_ptr + pid_s.to(tl.int64) * P * D + offs_p[:, None] * D + offs_d[None, :]
    tl.store(out, acc, mask=(offs_p[:, None] < P) & (offs_d[None, :] < D))


@triton.jit
def _linear_clipped_bias_grad_kernel(
    g_ptr, c_ptr,
    out_ptr,
    B, T, P,
    stride_gb, stride_gt, stride_gp,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[P-block] = sum over rows r = (i, t) of c_i G_i[t] (rows with c_i == 0 masked)."""
    pid_p = tl.program_id(0)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_k = tl.arange(0, BLOCK_K)
    n_rows = B * T
    acc = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)  # [BLOCK_K, BLOCK_P]
    for r0 in range(0, n_rows, BLOCK_K):
        r = r0 + offs_k
        i = (r // T).to(tl.int64)
        t = (r % T).to(tl.int64)
        c = tl.load(c_ptr + i, mask=r < n_rows, other=0.0)  # [BLOCK_K]
        keep = (r < n_rows) & (c != 0.0)
        g = tl.load(g_ptr + i[:, None] * stride_gb + t[:, None] * stride_gt + offs_p[None, :] * stride_gp,
                    mask=keep[:, None] & (offs_p[None, :] < P), other=0.0).to(tl.float32)
        acc += tl.where(keep[:, None], g * c[:, None], 0.0)
    tl.store(out_ptr + offs_p, tl.sum(acc, axis=0), mask=offs_p < P)


# --------------------------------------------------------------------------------------------
# launch specs (shared by the torch and JAX bindings)
# --------------------------------------------------------------------------------------------
def linear_norm_direct_spec(B: int, T: int, D: int, P: int) -> LaunchSpec:
    bt = block(T, 32, 64)
    bd = block(D, 64, 128)
    bp = block(P, 64, 128)
    n_tiles = cdiv(P, bp) * cdiv(D, bd)
    return LaunchSpec(grid=(B, n_tiles), constexprs=dict(BLOCK_T=bt, BLOCK_D=bd, BLOCK_P=bp),
                      num_warps=4, outputs={"partials": (B, n_tiles)})


def linear_norm_ghost_spec(B: int, T: int, D: int, P: int) -> LaunchSpec:
    bt = block(T, 64, 64)
    bd = block(D, 64, 128)
    bp = block(P, 64, 128)
    n_t = cdiv(T, bt)
    return LaunchSpec(grid=(B, n_t, n_t), constexprs=dict(BLOCK_T=bt, BLOCK_D=bd, BLOCK_P=bp),
                      num_warps=4, outputs={"partials": (B, n_t * n_t)})


def rows_sq_norm_spec(B: int, N: int) -> LaunchSpec:
    return LaunchSpec(grid=(B,), constexprs=dict(BLOCK_N=block(N, 1024, 4096)), num_warps=4,
                      outputs={"out": (B,)})


def linear_bias_norm_spec(B: int, T: int, P: int) -> LaunchSpec:
    bt = block(T, 32, 64)
    bp = block(P, 128, 512)
    n_p = cdiv(P, bp)
    return LaunchSpec(grid=(B, n_p), constexprs=dict(BLOCK_T=bt, BLOCK_P=bp), num_warps=4,
                      outputs={"partials": (B, n_p)})


def linear_clipped_weight_grad_spec(B: int, T: int, D: int, P: int) -> LaunchSpec:
    """Tiles over (P, D); the B*T reduction rows are split into SPLIT slices when the output
    tile grid alone cannot fill the GPU (small layers, big batches). Each slice writes its own
    [P, D] partial that the binding sums in order: deterministic, no atomics."""
    bp = block(P, 64, 128)
    bd = block(D, 64, 128)
    bk = block(B * T, 32, 128)
    n_tiles = cdiv(P, bp) * cdiv(D, bd)
    rows = B * T
    if interpreting():
        split = 1
    else:
        # Aim for ~4 programs per SM on a 132-SM part, but give every slice >= 8 K-blocks.
        split = max(1, min(cdiv(528, n_tiles), cdiv(rows, 8 * bk), 64))
    rows_per_split = cdiv(cdiv(rows, split), bk) * bk
    split = max(1, cdiv(rows, rows_per_split))
    return LaunchSpec(grid=(cdiv(P, bp), cdiv(D, bd), split),
                      constexprs=dict(BLOCK_P=bp, BLOCK_D=bd, BLOCK_K=bk), num_warps=4,
                      outputs={"partials": (split, P, D), "rows_per_split": rows_per_split})


def linear_clipped_bias_grad_spec(B: int, T: int, P: int) -> LaunchSpec:
    bp = block(P, 128, 512)
    bk = block(B * T, 32, 128)
    return LaunchSpec(grid=(cdiv(P, bp),), constexprs=dict(BLOCK_P=bp, BLOCK_K=bk), num_warps=4,
                      outputs={"out": (P,)})


# --------------------------------------------------------------------------------------------
# cost model
# --------------------------------------------------------------------------------------------
def norm_flops(T: int, D: int, P: int) -> dict:
    """Flops per example of each norm strategy (shared/DESIGN.md, section 1).

    direct: 2*T*D*P (the per-example weight gradient built tile by tile);
    ghost:  2*T^2*(D+P) (both Gram matrices; the kernel's j <= k symmetry roughly halves it,
            which is not counted, so the model leans towards direct: stated, not hidden);
    outer:  T = 1 only, 2*(D+P) (two squared row norms).
    """
    costs = {"direct": 2 * T * D * P, "ghost": 2 * T * T * (D + P)}
    if T == 1:
        costs["outer"] = 2 * (D + P)
    return costs


def choose_norm_method(T: int, D: int, P: int, method: str = "auto") -> str:
    """The norm strategy for a layer: the user's ``method`` ("ghost" | "direct"), or with
    ``"auto"`` the cheapest by :func:`norm_flops`. T = 1 always uses the closed form
    ||a||^2 ||g||^2 ("outer"), which both ghost and direct reduce to."""
    if method not in ("auto", "ghost", "direct"):
        raise ValueError(f"norm_method must be 'auto', 'ghost' or 'direct', got {method!r}")
    if T == 1:
        return "outer"
    if method != "auto":
        return method
    costs = norm_flops(T, D, P)
    return "ghost" if costs["ghost"] < costs["direct"] else "direct"
