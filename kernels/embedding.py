"""Fused per-example clipping kernels for an Embedding layer ``Y[b, t] = W[ids[b, t]]``.

Shapes: ``ids`` [B, T] integer token ids, ``G`` [B, T, P] the output gradient dL_i/dY_i of
the *per-example* loss, ``W`` [V, P]. Example i's weight gradient is the scatter-sum

    dW_i[v] = sum_{t : ids_i[t] = v} G_i[t]                                        [V, P]

and positions holding ``padding_idx`` contribute nothing (torch semantics: the padding row
never receives a gradient).

Math (shared/DESIGN.md, section 1):

* norm, ghost identity with the indicator Gram (dW_i = E_i^T G_i with E_i the [T, V] one-hot
  matrix of ids_i, and E_i E_i^T = [id_s == id_t]):

      ||dW_i||_F^2 = <E_i E_i^T, G_i G_i^T>_F = sum_{s,t} [id_s == id_t] <g_s, g_t>,

  over [BLOCK_T, BLOCK_T] tiles of the two Gram matrices, never written, [V, P] never formed.
  Only tiles with j <= k are computed, off-diagonal tiles count twice, and a tile whose id
  block has no equal pair skips its dots. About 2*T^2*P flops per example.
* clipped sum: sum_i c_i dW_i = E^T (c * G) over all B*T rows. Deterministic, no atomics:
  the binding sorts the B*T row keys once (stable sort; key = the id, or V for rows that must
  not contribute: padding positions and examples with c_i == 0) and passes the sorted keys and
  the permutation, and the row range [lo, hi) of each BLOCK_V-wide id tile in the sorted keys
  (one searchsorted on the device: nothing is synchronised with the host). Each program owns
  one [BLOCK_V, BLOCK_P] tile of the output and accumulates onehot^T @ (c * G_rows) over its
  rows with tl.dot; every output element is written exactly once (rows of ids no example used
  are written as 0, so the output needs no memset). A frequent id's rows all land in one tile
  row of programs (load imbalance bounded by its count).
  Fixed row order inside a program and a fixed sort: reruns agree bit for bit.

Precision: dots accumulate in fp32; fp32 operands use ``DOT_PRECISION`` ("ieee" by default,
as for Linear). The clipped sum runs on tensor cores in the input dtype: G's rows stay unscaled
and c_i, rounded toward zero onto the input dtype, rides in the one-hot operand (see the
kernel), so no contribution can exceed c_i ||dW_i|| (docs/PRIVACY.md).

This module imports only triton; launch arithmetic lives in the ``*_spec`` functions below and
is shared by the torch and JAX bindings.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._launch import LaunchSpec, block, cdiv, check_arch, interpreting
from .linear import _round_toward_zero


# --------------------------------------------------------------------------------------------
# per-example squared norms (ghost, indicator Gram)
# --------------------------------------------------------------------------------------------
@triton.jit
def _embedding_norm_ghost_kernel(
    ids_ptr, g_ptr,
    T, P, pad,
    stride_ib, stride_it,
    stride_gb, stride_gt, stride_gp,
    out_ptr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[b, j*nT + k] = w_jk * sum over the [j, k] tile of [id_s == id_t] <g_s, g_t> for tile
    rows j <= k (w = 2 off the diagonal, 1 on it); tiles with j > k write 0 (symmetry).
    Positions with id == pad (pass -1 for no padding) are excluded; their G rows are not read."""
    pid_b = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_k = tl.program_id(2)
    n_t = tl.num_programs(1)
    out = out_ptr + (pid_b * n_t + pid_j) * n_t + pid_k
    if pid_j <= pid_k:
        offs_s = pid_j * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_t = pid_k * BLOCK_T + tl.arange(0, BLOCK_T)
        ids_base = ids_ptr + pid_b.to(tl.int64) * stride_ib
        g_base = g_ptr + pid_b.to(tl.int64) * stride_gb
        id_s = tl.load(ids_base + offs_s * stride_it, mask=offs_s < T, other=0)  # [BLOCK_T]
        id_t = tl.load(ids_base + offs_t * stride_it, mask=offs_t < T, other=0)  # [BLOCK_T]
        ok_s = (offs_s < T) & (id_s != pad)
        ok_t = (offs_t < T) & (id_t != pad)
        same = (id_s[:, None] == id_t[None, :]) & ok_s[:, None] & ok_t[None, :]  # [BLOCK_T, BLOCK_T]
        n_same = tl.sum(tl.sum(same.to(tl.int32), axis=1), axis=0)
        if n_same > 0:
            gg = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)  # [BLOCK_T, BLOCK_T] tile of G G^T
            offs_p = tl.arange(0, BLOCK_P)
            for p0 in range(0, P, BLOCK_P):
                p = p0 + offs_p
                g_s = tl.load(g_base + offs_s[:, None] * stride_gt + p[None, :] * stride_gp,
                              mask=ok_s[:, None] & (p[None, :] < P), other=0.0)  # [BLOCK_T, BLOCK_P]
                g_t = tl.load(g_base + offs_t[:, None] * stride_gt + p[None, :] * stride_gp,
                              mask=ok_t[:, None] & (p[None, :] < P), other=0.0)  # [BLOCK_T, BLOCK_P]
                gg = tl.dot(g_s, tl.trans(g_t), gg, input_precision=DOT_PRECISION)
            weight = tl.where(pid_j == pid_k, 1.0, 2.0)
            tl.store(out, weight * tl.sum(tl.sum(tl.where(same, gg, 0.0), axis=1), axis=0))
        else:
            tl.store(out, 0.0)
    else:
        tl.store(out, 0.0)


# --------------------------------------------------------------------------------------------
# clipped sum (sorted segments, one program per output tile)
# --------------------------------------------------------------------------------------------
@triton.jit
def _embedding_clipped_grad_kernel(
    keys_ptr, perm_ptr, bounds_ptr, g_ptr, c_ptr,
    T, V, P,
    stride_gb, stride_gt, stride_gp,
    out_ptr,
    BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROUND_DTYPE: tl.constexpr,
):
    """out[v-tile, p-tile] = sum over sorted rows j with keys[j] in the v-tile of
    c'_i G_i[t] scattered to row keys[j], where perm[j] = i*T + t and c'_i is c_i rounded
    toward zero onto ROUND_DTYPE (the input dtype, or "tf32"). out is [V, P] fp32.

    Tensor cores with the bound kept (docs/PRIVACY.md): the clip factor goes into the one-hot
    operand, S[k, v] = c'_i [keys[k] == v], and G's rows stay UNSCALED in the input dtype, so the
    dot S^T G multiplies two input-dtype operands exactly in fp32. Example i then contributes
    exactly c'_i dW_i (up to fp32 accumulation), and c'_i <= c_i: its norm is at most
    c_i ||dW_i||, whatever the rounding, subnormals and saturation included.

    keys [N] are sorted ascending (any int dtype); rows that must not contribute carry a key
    >= V and are never visited. bounds [n_v_tiles + 1] (int64) holds, for each v-tile start
    v0 = pid_v * BLOCK_V, the first sorted position with key >= v0 (bounds[-1]: key >= V), so
    program pid_v reduces the rows [bounds[pid_v], bounds[pid_v + 1]). Rows with c_i == 0 are
    masked again here (not multiplied), so a NaN / inf example cannot leak in even if the
    caller kept its keys.
    """
    pid_v = tl.program_id(0)
    pid_p = tl.program_id(1)
    v0 = pid_v * BLOCK_V
    offs_v = v0 + tl.arange(0, BLOCK_V)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_k = tl.arange(0, BLOCK_K)
    lo = tl.load(bounds_ptr + pid_v)
    hi = tl.load(bounds_ptr + pid_v + 1)

    acc = tl.zeros((BLOCK_V, BLOCK_P), dtype=tl.float32)  # [BLOCK_V, BLOCK_P] tile of sum_i c'_i dW_i
    for j0 in range(lo, hi, BLOCK_K):
        j = j0 + offs_k  # [BLOCK_K] positions in the sorted order
        in_rows = j < hi
        key = tl.load(keys_ptr + j, mask=in_rows, other=-1)  # [BLOCK_K]
        row = tl.load(perm_ptr + j, mask=in_rows, other=0).to(tl.int64)  # [BLOCK_K] flat i*T + t
        i = row // T
        t = row % T
        c = tl.load(c_ptr + i, mask=in_rows, other=0.0)  # [BLOCK_K] clip factors
        keep = in_rows & (c != 0.0)
        g = tl.load(g_ptr + i[:, None] * stride_gb + t[:, None] * stride_gt + offs_p[None, :] * stride_gp,
                    mask=keep[:, None] & (offs_p[None, :] < P), other=0.0)  # [BLOCK_K, BLOCK_P] unscaled
        # [BLOCK_K] c'_i <= c_i, exact in the operand dtype (with "tf32" the tensor core's own
        # operand rounding then leaves it alone and rounds G exactly as in the norm kernel)
        c_r = _round_toward_zero(c, ROUND_DTYPE)
        hit = (key[:, None] == offs_v[None, :]) & keep[:, None]
        s = tl.where(hit, c_r[:, None], 0.0).to(g.dtype)  # [BLOCK_K, BLOCK_V] scaled one-hot (exact cast)
        acc = tl.dot(tl.trans(s), g, acc, input_precision=DOT_PRECISION)

    out = out_ptr + offs_v.to(tl.int64)[:, None] * P + offs_p[None, :]
    tl.store(out, acc, mask=(offs_v[:, None] < V) & (offs_p[None, :] < P))


# --------------------------------------------------------------------------------------------
# launch specs (shared by the torch and JAX bindings)
# --------------------------------------------------------------------------------------------
def embedding_norm_ghost_spec(B: int, T: int, P: int, arch: int = 90) -> LaunchSpec:
    """8 warps on both architectures; BLOCK_T = 64 on sm_90 (122 registers in fp32, 64 in bf16,
    no spills; with 4 warps fp32 spills at 168), 32 on sm_80 (58 / 32 registers, 4-8 CTAs per SM,
    the lower roofline estimate). Compiled builds: bench/kernel_report.py, T = 512, p = 768."""
    arch = check_arch(arch)
    bt = block(T, 64 if arch >= 90 else 32, 64)
    bp = block(P, 64, 128)
    n_t = cdiv(T, bt)
    return LaunchSpec(grid=(B, n_t, n_t), constexprs=dict(BLOCK_T=bt, BLOCK_P=bp),
                      num_warps=4 if interpreting() else 8, outputs={"partials": (B, n_t * n_t)})


def embedding_clipped_grad_spec(N: int, V: int, P: int, arch: int = 90) -> LaunchSpec:
    """Grid over [BLOCK_V, BLOCK_P] output tiles; N = B*T sorted rows; ``arch`` the compute
    capability. A small BLOCK_V keeps the one-hot dot cheap (2*N*BLOCK_V*P flops in all).
    ``outputs["bounds"]`` is the length of the tile-bounds array the binding fills
    (searchsorted of the tile starts and V in the keys)."""
    # GPU tiles: the [BLOCK_K, BLOCK_P] gather of G rows carries one 64-bit address per element.
    # sm_90: BLOCK_V = 64 so the scaled one-hot fills a wgmma M = 64 tile; 64 x 64 x 32 at 4
    # warps compiles to 168 registers, no spills (32 x 64 x 32 fell back to mma.sync at 254).
    # sm_80: 32 x 64 x 32 (mma.sync).
    bv = block(V, 64 if arch >= 90 else 32, 64)
    bp = block(P, 64, 128)
    bk = block(N, 32, 128)
    n_v = cdiv(V, bv)
    return LaunchSpec(grid=(n_v, cdiv(P, bp)),
                      constexprs=dict(BLOCK_V=bv, BLOCK_P=bp, BLOCK_K=bk), num_warps=4,
                      outputs={"out": (V, P), "bounds": n_v + 1})


# --------------------------------------------------------------------------------------------
# cost model
# --------------------------------------------------------------------------------------------
def embedding_flops(T: int, P: int) -> dict:
    """Flops per example: the ghost norm forms G G^T (2*T^2*P; the j <= k symmetry roughly halves
    it, not counted) and the masked sum (T^2); the scatter-add of the gradient is T*P."""
    return {"ghost": 2 * T * T * P + T * T, "scatter": T * P}
