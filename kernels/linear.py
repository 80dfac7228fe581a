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
* clipped weight gradient (Book-Keeping): sum_i c_i G_i^T A_i, ONE weight-gradient GEMM over the
  B*T rows on tensor cores in the input dtype. T > 1: each example's unscaled tiles are
  multiplied into an fp32 tile that is then scaled by c_i (design (a)); T = 1: c_i g_i is
  rounded toward zero onto the input dtype (design (b), rank one). docs/PRIVACY.md proves that
  either way no contribution exceeds c_i ||G_i^T A_i||. Design (c), "rounded rows" (small T in
  half precision): one GEMM over the B*T rows with c_i g_t rounded toward zero, whose rounding
  error the clip factor pays for (kernels/clip.py HAS_SLACK), so contributions stay <= C.

All reductions are deterministic: every program writes its own partial (a tile of the
norm, or a split-K slice of the weight gradient) and the binding sums the partials in a fixed
order (two-stage reduction, Triton tutorial 05). No atomics anywhere.

Precision: operands are loaded in their own dtype (fp32, fp16, bf16) and every dot accumulates
in fp32. The norm kernels multiply half-precision operands exactly (products of halves are
exact in fp32). ``DOT_PRECISION`` is the ``tl.dot`` precision for fp32 operands: "ieee"
(default), "tf32x3" (near-fp32 accuracy on tensor cores) or "tf32": safe only because the
clipped sums feed the tensor core the same operands the norm kernels measured (design (a)), or
TF32 values rounded toward zero (design (b)); docs/PRIVACY.md says which is which.

Non-finite inputs: an example whose factor c_i is 0 is *skipped* (design (a)) or its rows
*masked* (design (b), bias) in the clipped gradient, never multiplied by 0, so an example with
an inf/NaN activation or gradient contributes exactly nothing, as the clip-factor contract
promises.

This module imports only triton; launch arithmetic lives in the ``*_spec`` functions below and
is shared by the torch and JAX bindings.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._launch import LaunchSpec, block, cdiv, check_arch, interpreting


# --------------------------------------------------------------------------------------------
# per-example squared norms
# --------------------------------------------------------------------------------------------
@triton.jit
def _linear_norm_direct_kernel(
    a_ptr, g_ptr,
    T, D, P,
    stride_ab, stride_at, stride_ad,
    stride_gb, stride_gt, stride_gp,
    out_ptr,
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
    T, D, P,
    stride_ab, stride_at, stride_ad,
    stride_gb, stride_gt, stride_gp,
    out_ptr,
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
    N,
    stride_xb, stride_xn,
    out_ptr,
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
    T, P,
    stride_gb, stride_gt, stride_gp,
    out_ptr,
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
def _round_toward_zero(x, ROUND_DTYPE: tl.constexpr):
    """fp32 ``x`` rounded toward zero onto the value set of ROUND_DTYPE, returned as fp32.

    ROUND_DTYPE: "fp32" (unchanged), "bf16", "fp16" or "tf32". Every result element y satisfies
    |y| <= |x| and y is exactly representable in ROUND_DTYPE (so a later cast to it, or the
    tensor core's own TF32 operand rounding, changes nothing). Done with integer bit operations,
    identical under the interpreter and on a GPU:

    * bf16 / tf32 (fp32's exponent range): keep the top 16 / 19 bits of the fp32 pattern,
      i.e. truncate the significand; this is rounding toward zero for normals and subnormals
      alike; +-inf is first clamped to +-FP32_MAX (whose truncation is the format's largest
      finite value).
    * fp16: clamp to +-65504 (fp16's largest finite value; rounding toward zero saturates),
      truncate the significand to 10 bits for |x| >= 2^-14, and below (fp16's subnormal range)
      truncate to a multiple of 2^-24 through an int32 conversion (which truncates toward 0).
    """
    y = x
    if ROUND_DTYPE == "bf16":
        y = tl.minimum(tl.maximum(y, -3.4028234663852886e38), 3.4028234663852886e38)
        y = (y.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
    if ROUND_DTYPE == "tf32":
        y = tl.minimum(tl.maximum(y, -3.4028234663852886e38), 3.4028234663852886e38)
        y = (y.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    if ROUND_DTYPE == "fp16":
        y = tl.minimum(tl.maximum(y, -65504.0), 65504.0)
        normal = (y.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        tiny = tl.minimum(tl.maximum(y, -6.103515625e-05), 6.103515625e-05)  # 2^-14: fp16's smallest normal
        subnormal = (tiny * 16777216.0).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08  # 2^24, 2^-24
        y = tl.where(tl.abs(y) < 6.103515625e-05, subnormal, normal)
    return y


@triton.jit
def _store_split_tile(acc, out_ptr, ws_ptr, cnt_ptr, rows, offs_d, mask, D,
                      BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Epilogue of the split-K clipped sums: deterministic, in-kernel, no float atomics.

    ``acc``: this program's fp32 [BLOCK_P, BLOCK_D] partial of output rows ``rows`` and columns
    ``offs_d`` (row stride D; ``mask`` the valid elements); grid axis 2 holds the split-K
    slices of the tile (program_id(0), program_id(1)). With one slice the tile is stored to
    ``out_ptr``. With n > 1, each slice stores its whole tile into its own slot of the workspace
    ``ws_ptr`` ([n, tiles, BLOCK_P, BLOCK_D] fp32: tile-contiguous and padded, so neither the
    store nor the loads need a mask), then takes a ticket from the tile's int32 counter (zeroed
    by the caller) with an acq_rel atomic at gpu scope, after a CTA barrier so that every
    thread's store precedes the release. The slice that draws the last ticket sums the n slots
    IN SLICE ORDER 0..n-1 (read through L2 with ``.cg``, its own included: the acquire makes
    the others' stores visible) and stores the valid part of the tile. The result is the same
    bits whichever slice finishes last; every slot read was written before its writer's release
    (no uninitialised workspace is ever read), and no program waits on another (no deadlock
    whatever the scheduling). Replaces the framework reduction over [n, P, D] partials that ran
    after the kernel: one pass less over them, and its traffic overlaps other tiles' MMAs."""
    n_split = tl.num_programs(2)
    res = acc
    last = n_split == 1
    if n_split > 1:
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        n_tiles = tl.num_programs(0) * tl.num_programs(1)
        slot_stride = n_tiles.to(tl.int64) * (BLOCK_P * BLOCK_D)
        local = tl.arange(0, BLOCK_P)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
        src = ws_ptr + tile.to(tl.int64) * (BLOCK_P * BLOCK_D) + local
        tl.store(src + tl.program_id(2) * slot_stride, acc, cache_modifier=".cg")
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        last = ticket == n_split - 1
        if last:
            # its own slot is read back too (written above): ``acc`` is dead from the store on,
            # so the reduction holds one tile, not two (two spilled at 128 x 128)
            res = tl.zeros_like(acc)
            for _ in range(0, n_split):
                res += tl.load(src, cache_modifier=".cg")
                src += slot_stride
    # one store for both cases: the tile when unsplit, the ordered sum by the last slice
    tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], res, mask=mask & last)


@triton.jit
def _linear_clipped_weight_grad_kernel(
    a_ptr, g_ptr, c_ptr,
    B, T, D, P, EXAMPLES_PER_SPLIT,
    stride_ab, stride_at, stride_ad,
    stride_gb, stride_gt, stride_gp,
    out_ptr, ws_ptr, cnt_ptr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[P-tile, D-tile] = sum over the examples i of c_i (G_i^T A_i)[tile] (split s sums its slice).

    Design (a), "scale outside the MMA" (docs/PRIVACY.md): the reduction walks one example at a
    time; the example's UNSCALED operand tiles, in the input dtype (bf16 / fp16 on tensor
    cores; fp32 with DOT_PRECISION), are multiplied into a fresh fp32 tile W_i = G_i^T A_i over
    its T positions (BLOCK_K rows per step, the last step masked at T: a K-block never holds
    two examples), and only then acc += c_i * W_i in fp32. Nothing is rounded after c_i is
    applied, so the contribution is c_i times the same product the norm pass measured (up to
    fp32 accumulation order). Splits own whole examples (none straddles a split) and are summed
    in slice order in the kernel (``_store_split_tile``: no float atomics). An example with c_i == 0 is skipped entirely
    (its possibly non-finite rows are never read).
    """
    pid_p = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    e_lo = pid_s * EXAMPLES_PER_SPLIT
    e_hi = tl.minimum(e_lo + EXAMPLES_PER_SPLIT, B)

    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)  # [BLOCK_P, BLOCK_D] sum_i c_i W_i
    for i in range(e_lo, e_hi):
        c = tl.load(c_ptr + i)  # example i's clip factor (fp32)
        if c != 0.0:
            a_base = a_ptr + tl.cast(i, tl.int64) * stride_ab
            g_base = g_ptr + tl.cast(i, tl.int64) * stride_gb
            w = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)  # [BLOCK_P, BLOCK_D] tile of W_i
            for t0 in range(0, T, BLOCK_K):
                t = t0 + offs_k
                g = tl.load(g_base + t[:, None] * stride_gt + offs_p[None, :] * stride_gp,
                            mask=(t[:, None] < T) & (offs_p[None, :] < P), other=0.0)  # [BLOCK_K, BLOCK_P]
                a = tl.load(a_base + t[:, None] * stride_at + offs_d[None, :] * stride_ad,
                            mask=(t[:, None] < T) & (offs_d[None, :] < D), other=0.0)  # [BLOCK_K, BLOCK_D]
                w = tl.dot(tl.trans(g), a, w, input_precision=DOT_PRECISION)
            acc += c * w

    _store_split_tile(acc, out_ptr, ws_ptr, cnt_ptr, offs_p, offs_d, (offs_p[:, None] < P) & (offs_d[None, :] < D),
                      D, BLOCK_P, BLOCK_D)


@triton.jit
def _linear_clipped_weight_grad_rank1_kernel(
    a_ptr, g_ptr, c_ptr,
    B, D, P, ROWS_PER_SPLIT,
    stride_ab, stride_ad,
    stride_gb, stride_gp,
    out_ptr, ws_ptr, cnt_ptr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROUND_DTYPE: tl.constexpr,
):
    """out[P-tile, D-tile] = sum over the examples i of y_i a_i^T, T = 1 (split s sums its slice), where
    y_i = round_toward_zero(c_i g_i) in ROUND_DTYPE.

    Design (b), rank one (docs/PRIVACY.md): example i's contribution y_i a_i^T has Frobenius
    norm ||y_i|| ||a_i||, and rounding toward zero never increases a magnitude, so
    |y_i[p]| <= |c_i g_i[p]| for every p: the contribution is at most c_i ||g_i|| ||a_i||,
    with no margin needed and no exception for subnormals or underflow (a value that underflows
    becomes 0, which is smaller). The products y_i[p] a_i[d] of two half (or TF32) values are
    exact in fp32. So the rows go straight into one ordinary GEMM in the input dtype (tensor
    cores for bf16/fp16; ROUND_DTYPE "tf32" with DOT_PRECISION "tf32" for fp32, where a_i is
    truncated too so that the tensor core's TF32 operand rounding is the identity). Under the
    interpreter the bindings pass bf16 operands as fp32 (its bf16 dot is broken) but keep
    ROUND_DTYPE "bf16", so the rounding tested on CPU is the one a GPU performs. Rows with
    c_i == 0 are masked in both operands (a dropped example's inf/NaN never enters).
    """
    pid_p = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    r_lo = pid_s * ROWS_PER_SPLIT
    r_hi = tl.minimum(r_lo + ROWS_PER_SPLIT, B)

    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)  # [BLOCK_P, BLOCK_D]
    for r0 in range(r_lo, r_hi, BLOCK_K):
        i = r0 + offs_k  # [BLOCK_K] examples
        in_rows = i < r_hi
        c = tl.load(c_ptr + i, mask=in_rows, other=0.0)  # [BLOCK_K] clip factors
        keep = in_rows & (c != 0.0)
        i64 = i.to(tl.int64)
        g = tl.load(g_ptr + i64[:, None] * stride_gb + offs_p[None, :] * stride_gp,
                    mask=keep[:, None] & (offs_p[None, :] < P), other=0.0)  # [BLOCK_K, BLOCK_P]
        a = tl.load(a_ptr + i64[:, None] * stride_ab + offs_d[None, :] * stride_ad,
                    mask=keep[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_K, BLOCK_D]
        y = _round_toward_zero(g.to(tl.float32) * c[:, None], ROUND_DTYPE).to(a.dtype)  # exact cast
        if ROUND_DTYPE == "tf32":
            a = _round_toward_zero(a, ROUND_DTYPE)
        acc = tl.dot(tl.trans(y), a, acc, input_precision=DOT_PRECISION)

    _store_split_tile(acc, out_ptr, ws_ptr, cnt_ptr, offs_p, offs_d, (offs_p[:, None] < P) & (offs_d[None, :] < D),
                      D, BLOCK_P, BLOCK_D)


@triton.jit
def _linear_clipped_weight_grad_rounded_kernel(
    a_ptr, g_ptr, c_ptr,
    B, T, D, P, ROWS_PER_SPLIT,
    stride_ab, stride_at, stride_ad,
    stride_gb, stride_gt, stride_gp,
    out_ptr, ws_ptr, cnt_ptr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROUND_DTYPE: tl.constexpr,
):
    """out[P-tile, D-tile] = sum over the rows r = (i, t) (split s: its slice) of y_r a_r^T, with
    y_r = round_toward_zero(c_i g_{i,t}) in ROUND_DTYPE ("rounded rows").

    Design (c), the rounding-aware clip factor (docs/PRIVACY.md): ONE weight-gradient GEMM over
    the B*T rows on tensor cores, c_i fused into the G load and the scaled row rounded onto the
    input dtype before tl.dot, so the K-blocks freely mix examples (no per-example fp32 pass
    as in design (a)). The rounding error of example i is NOT bounded by c_i n_i alone (rows
    can cancel): it is at most c_i u S_i + tau sqrt(P) sum_t ||a_t|| with
    S_i = sum_t ||g_t|| ||a_t||, and the engine charges that to the clip factor (HAS_SLACK of
    kernels/clip.py), so the contribution stays <= C. Use it only with factors computed that
    way. The products y a of two half (or TF32-truncated) values are exact in fp32. Under the
    interpreter bf16 operands arrive as fp32 (its bf16 dot is broken) but ROUND_DTYPE stays
    "bf16", so CPU tests check the GPU's rounding. Rows with c_i == 0 are masked in both
    operands (a dropped example's inf/NaN never enters). Splits own whole K-blocks of rows and
    are summed in slice order in the kernel (``_store_split_tile``).
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
        r = r0 + offs_k  # [BLOCK_K] rows (example, position)
        in_rows = r < r_hi
        i = (r // T).to(tl.int64)
        t = (r % T).to(tl.int64)
        c = tl.load(c_ptr + i, mask=in_rows, other=0.0)  # [BLOCK_K] clip factor of each row's example
        keep = in_rows & (c != 0.0)
        g = tl.load(g_ptr + i[:, None] * stride_gb + t[:, None] * stride_gt + offs_p[None, :] * stride_gp,
                    mask=keep[:, None] & (offs_p[None, :] < P), other=0.0)  # [BLOCK_K, BLOCK_P]
        a = tl.load(a_ptr + i[:, None] * stride_ab + t[:, None] * stride_at + offs_d[None, :] * stride_ad,
                    mask=keep[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_K, BLOCK_D]
        y = _round_toward_zero(g.to(tl.float32) * c[:, None], ROUND_DTYPE).to(a.dtype)  # exact cast
        if ROUND_DTYPE == "tf32":
            a = _round_toward_zero(a, ROUND_DTYPE)
        acc = tl.dot(tl.trans(y), a, acc, input_precision=DOT_PRECISION)

    _store_split_tile(acc, out_ptr, ws_ptr, cnt_ptr, offs_p, offs_d, (offs_p[:, None] < P) & (offs_d[None, :] < D),
                      D, BLOCK_P, BLOCK_D)


@triton.jit
def _linear_clipped_bias_grad_kernel(
    g_ptr, c_ptr,
    B, T, P,
    stride_gb, stride_gt, stride_gp,
    out_ptr,
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
def linear_norm_direct_spec(B: int, T: int, D: int, P: int, arch: int = 90) -> LaunchSpec:
    """[BLOCK_P, BLOCK_D] = 64 x 64 tiles over BLOCK_T = 32 positions. sm_90: 4 warps (60
    registers in bf16, no spills). sm_80: 8 warps: with 4 the bf16 build spills (16 bytes at 96
    registers, transformer q/v/o projections); 8 warps take 59 registers, no spills (compiled
    builds, bench/kernel_report.py, T = 512, d = 768, p = 3072)."""
    arch = check_arch(arch)
    bt = block(T, 32, 64)
    bd = block(D, 64, 128)
    bp = block(P, 64, 128)
    n_tiles = cdiv(P, bp) * cdiv(D, bd)
    warps = 4 if interpreting() or arch >= 90 else 8
    return LaunchSpec(grid=(B, n_tiles), constexprs=dict(BLOCK_T=bt, BLOCK_D=bd, BLOCK_P=bp),
                      num_warps=warps, outputs={"partials": (B, n_tiles)})


def linear_norm_ghost_spec(B: int, T: int, D: int, P: int, arch: int = 90) -> LaunchSpec:
    """[BLOCK_T, BLOCK_T] Gram tiles, per architecture (compiled builds, bench/kernel_report.py;
    T = 512, d = p = 768 at 64 x 64 operand tiles):

    * sm_90: BLOCK_T = 64 with 8 warps. With 4 warps each thread holds twice the tile: 214
      registers in fp32 (2 CTAs = 8 warps per SM), 105 in bf16; 8 warps take 128 (fp32, 16
      warps per SM) and 58 (bf16, 4 CTAs = 32 warps per SM), no spills, wgmma kept.
    * sm_80: BLOCK_T = 32 with 8 warps: 58 registers in fp32 and 48 in bf16 (4-5 CTAs, 32-40
      warps per SM) against 208 / 128 at BLOCK_T = 64 with 4 warps, and the lower roofline
      estimate (fewer idle CTA slots in the last wave on 108 SMs).
    """
    arch = check_arch(arch)
    bt = block(T, 64 if arch >= 90 else 32, 64)
    bd = block(D, 64, 128)
    bp = block(P, 64, 128)
    n_t = cdiv(T, bt)
    return LaunchSpec(grid=(B, n_t, n_t), constexprs=dict(BLOCK_T=bt, BLOCK_D=bd, BLOCK_P=bp),
                      num_warps=4 if interpreting() else 8, outputs={"partials": (B, n_t * n_t)})


def rows_sq_norm_spec(B: int, N: int, arch: int = 90) -> LaunchSpec:
    return LaunchSpec(grid=(B,), constexprs=dict(BLOCK_N=block(N, 1024, 4096)), num_warps=4,
                      outputs={"out": (B,)})


def linear_bias_norm_spec(B: int, T: int, P: int, arch: int = 90) -> LaunchSpec:
    bt = block(T, 32, 64)
    bp = block(P, 128, 512)
    n_p = cdiv(P, bp)
    return LaunchSpec(grid=(B, n_p), constexprs=dict(BLOCK_T=bt, BLOCK_P=bp), num_warps=4,
                      outputs={"partials": (B, n_p)})


def clipped_round_dtype(dtype: str, precision: str) -> str:
    """ROUND_DTYPE of the clipped-sum kernels for operands of ``dtype`` ("float32", "float16",
    "bfloat16"; torch/numpy names, a "torch." prefix is ignored) and the fp32 dot ``precision``:
    the value set the scaled operand is rounded onto (toward zero) before its dot."""
    name = str(dtype).replace("torch.", "")
    if name == "bfloat16":
        return "bf16"
    if name == "float16":
        return "fp16"
    if name == "float32":
        return "tf32" if precision == "tf32" else "fp32"
    raise ValueError(f"clipped sums take float32, float16 or bfloat16 operands, got {dtype}")


def sm_count(arch: int) -> int:
    """Streaming multiprocessors of the part the specs size grids for: 132 (H100/H200) from
    sm_90 on, 108 (A100) below."""
    return 132 if arch >= 90 else 108


# flops per byte at which a kernel turns from memory- to compute-bound (dense half-precision
# tensor-core peak over DRAM bandwidth: H100 SXM 989 TFLOP/s / 3.35 TB/s, A100 312 / 2.04)
RIDGE = {90: 295.0, 80: 153.0}

# The occupancy model shared by the split choice below and the compiled-kernel report
# (dpprims/kernel_report.py), two ASSUMPTIONS, not datasheet numbers: an SM reaches its compute
# peak with SATURATING_WARPS resident warps (two per sub-partition, e.g. two wgmma warpgroups)
# and gets a proportional share with fewer (one 4-warp CTA: half); one SM draws at most
# SM_DRAM_SHARE times its fair share (1 / SMs) of DRAM bandwidth, so a grid on few SMs cannot
# stream at the full bandwidth.
SATURATING_WARPS = 8
SM_DRAM_SHARE = 2.0


def busy_fraction(programs: int, sms: int, ctas_per_sm: int | None = None, num_warps: int = 8) -> float:
    """Fraction of the GPU's compute peak a grid of ``programs`` CTAs keeps busy (an estimate).

    CTAs are spread evenly over the ``sms`` SMs: the busiest runs ``n = ceil(programs / sms)``
    of them, ``ctas_per_sm`` at a time (occupancy; None: as many as it needs to saturate). While
    it holds ``r`` CTAs of ``num_warps`` warps it runs at ``e(r) = min(1, r * num_warps /
    SATURATING_WARPS)`` of its peak, so it takes ``sum over its rounds of r / e(r)`` CTA-times,
    against ``programs / sms`` for a balanced, saturated GPU. A grid smaller than the GPU, a last
    partial round, and an occupancy too low to hide latency (one 4-warp CTA per SM) lower it."""
    programs = max(int(programs), 1)
    n = cdiv(programs, sms)
    c = max(1, ctas_per_sm if ctas_per_sm else cdiv(SATURATING_WARPS, num_warps))

    def cta_times(r: int) -> float:
        return r / min(1.0, r * num_warps / SATURATING_WARPS)

    full, rem = divmod(n, c)
    return programs / (sms * (full * cta_times(c) + (cta_times(rem) if rem else 0.0)))


def dram_fraction(programs: int, sms: int) -> float:
    """Share of DRAM bandwidth a grid of ``programs`` CTAs can draw (an estimate):
    min(1, SMs in use * SM_DRAM_SHARE / sms)."""
    return min(1.0, min(max(int(programs), 1), sms) * SM_DRAM_SHARE / sms)


def clipped_sum_split(n_tiles: int, units: int, min_units: int, arch: int = 90, *, flops: float = 0.0,
                      nbytes: float = 0.0, split_bytes: float = 0.0, num_warps: int = 8) -> int:
    """Number of deterministic split-K slices when the output tiles alone cannot fill the GPU:
    at most ~4 programs per SM and 64 slices, every slice >= ``min_units`` reduction units, and
    among those the split whose grid fills its last wave of CTAs best (a grid of 5 tiles x 64
    slices on 132 SMs runs 2.4 waves, its last one 42% busy; 5 x 52 runs 1.97). Slices hold
    whole units (callers take ``cdiv(units, cdiv(units, split))`` slices), so the wave count is
    judged on that final number. Ties go to the larger split (more programs to balance).

    With the launch's ``flops``, operand ``nbytes`` (its fp32 [P, D] output included) and
    ``split_bytes`` (8 P D: one fp32 [P, D] partial written and read), the split minimises the
    kernel's roofline time in flop-equivalents (RIDGE flops per byte), ``max(flops / busy,
    RIDGE * bytes / dram)``: with s > 1 slices each writes its partial to the workspace and the
    last of a tile reads all s back (:func:`_store_split_tile`), so ``bytes = nbytes
    + s * split_bytes``; ``busy`` is :func:`busy_fraction` of the grid
    (``num_warps`` warps per CTA) and ``dram`` its :func:`dram_fraction`: the model of the
    compiled-kernel report. A memory-bound layer on many tiles (ResNet-50's 1x1 convs at
    56x56) then takes few slices, whose partials would add to its traffic, and one on few tiles
    (a 10-way head, a 1x1 conv with 64 channels) takes enough to draw the full bandwidth. Under
    the interpreter up to 3 slices, so CPU tests exercise the partial sums."""
    if interpreting():
        return max(1, min(3, units))
    sms = sm_count(arch)
    hi = max(1, min(cdiv(4 * sms, n_tiles), cdiv(units, min_units), 64))
    ridge = RIDGE.get(arch, RIDGE[90] if arch >= 90 else RIDGE[80])

    def programs(s: int) -> int:
        return cdiv(units, cdiv(units, s)) * n_tiles

    def cost(s: int) -> float:
        n = programs(s)
        if not flops:
            return (cdiv(n, sms) * sms) / n
        k = cdiv(units, cdiv(units, s))
        extra = k * split_bytes if k > 1 else 0.0  # (tile padding of the workspace not counted)
        return max(flops / busy_fraction(n, sms, None, num_warps),
                   ridge * (nbytes + extra) / dram_fraction(n, sms))

    best = min(cost(s) for s in range(1, hi + 1))
    return max(s for s in range(1, hi + 1) if cost(s) <= best * 1.01)


def split_workspace_numel(spec: LaunchSpec) -> int:
    """fp32 elements of the split-K workspace of a clipped weight-gradient launch
    (``_store_split_tile``): one BLOCK_P x BLOCK_D slot per tile and slice."""
    g = tuple(spec.grid) + (1,) * (3 - len(spec.grid))
    return g[0] * g[1] * g[2] * spec.constexprs["BLOCK_P"] * spec.constexprs["BLOCK_D"]


def segment_block_k(T: int, cap: int = 64) -> int:
    """BLOCK_K for design (a): K-blocks never cross examples, so the last block of every
    example is masked at T. Among 64, 32, 16 (at most ``cap``) take the largest with the least
    padding (T = 16 -> 16, 49 -> 64, 196 -> 16, 1024 -> 64)."""
    best = None
    for bk in (b for b in (64, 32, 16) if b <= max(cap, 16)):
        waste = cdiv(T, bk) * bk - T
        if best is None or waste < best[0]:
            best = (waste, bk)
    return best[1]


def linear_clipped_weight_grad_spec(B: int, T: int, D: int, P: int, arch: int = 90, itemsize: int = 2) -> LaunchSpec:
    """Launch of the clipped weight-gradient sum. ``outputs["kernel"]`` names the kernel:

    * T = 1: ``_linear_clipped_weight_grad_rank1_kernel`` (design (b)); the B rows are split
      into slices of ``outputs["rows_per_split"]`` rows (a multiple of BLOCK_K);
    * T > 1: ``_linear_clipped_weight_grad_kernel`` (design (a)); the B examples are split into
      slices of ``outputs["examples_per_split"]`` whole examples.

    Tiles over (P, D); the slices of a tile are summed in slice order by the last of them to
    finish (``_store_split_tile``): deterministic, no float atomics. ``arch``: compute capability (80, 90, ...). Design (a)
    holds two fp32 [BLOCK_P, BLOCK_D] tiles (the running sum and W_i) in registers: 128 x 128
    with 8 warps on sm_90 (two wgmma warpgroups), 128 x 64 with 4 warps on sm_80. ``itemsize``:
    operand bytes (2 for bf16/fp16, 4 for fp32). BLOCK_K is capped (compiled and counted with
    cuobjdump: no spills): 64 for half operands on sm_90, 32 on sm_80, 16 for fp32 operands,
    whose 64-row tiles spilled (~200 spill stores) at 255 registers; fp32 also takes
    BLOCK_D = 64 (its 128 x 128 conv build spilled)."""
    if T == 1:
        bp = block(P, 128, 128)
        bd = block(D, 128, 128)
        bk = block(B, 32, 128)
        n_tiles = cdiv(P, bp) * cdiv(D, bd)
        warps = 8 if (bp * bd >= 128 * 128 and not interpreting()) else 4
        # slices of whole K-blocks: a head with few tiles (10 x 1024: 8 tiles) splits its rows
        # until it draws the full DRAM bandwidth
        split = clipped_sum_split(n_tiles, cdiv(B, bk), 1, arch, flops=2.0 * B * D * P,
                                  nbytes=B * (D + P) * itemsize + 4.0 * P * D, split_bytes=8.0 * P * D,
                                  num_warps=warps)
        rows_per_split = cdiv(cdiv(B, split), bk) * bk
        split = max(1, cdiv(B, rows_per_split))
        return LaunchSpec(grid=(cdiv(P, bp), cdiv(D, bd), split),
                          constexprs=dict(BLOCK_P=bp, BLOCK_D=bd, BLOCK_K=bk),
                          num_warps=warps,
                          outputs={"partials": (split, P, D), "rows_per_split": rows_per_split,
                                   "kernel": "_linear_clipped_weight_grad_rank1_kernel"})
    wide = arch >= 90
    bp = block(P, 128, 128)
    bd = block(D, 128 if (wide and itemsize < 4) else 64, 128)
    bk = segment_block_k(T, 16 if itemsize >= 4 else (64 if wide else 32))
    n_tiles = cdiv(P, bp) * cdiv(D, bd)
    big = bp * bd >= 128 * 128 or (bp * bd >= 64 * 128 and (wide or itemsize >= 4))
    warps = 8 if (big and not interpreting()) else 4
    split = clipped_sum_split(n_tiles, B, max(1, cdiv(8 * bk, T)), arch, flops=2.0 * B * T * D * P,
                              nbytes=B * T * (D + P) * itemsize + 4.0 * P * D, split_bytes=8.0 * P * D,
                              num_warps=warps)
    examples_per_split = cdiv(B, split)
    split = max(1, cdiv(B, examples_per_split))
    return LaunchSpec(grid=(cdiv(P, bp), cdiv(D, bd), split),
                      constexprs=dict(BLOCK_P=bp, BLOCK_D=bd, BLOCK_K=bk), num_warps=warps,
                      outputs={"partials": (split, P, D), "examples_per_split": examples_per_split,
                               "kernel": "_linear_clipped_weight_grad_kernel"})


# Relative bound u of round-toward-zero onto each format on normal values (|RZ(x) - x| < u |x|:
# 7 / 10 / 10 fraction bits), and an absolute bound tau per element below the smallest normal
# (the subnormal spacing: bf16 2^-133, fp16 2^-24), raised for bf16 to 2^-126, bf16's smallest
# normal, so that a flush of subnormals to zero anywhere (fp32 product, tensor-core operand) is
# covered too. fp32 data ("fp32", exact fp32 products) has no rounding: u = tau = 0.
ROUNDED_ROWS_BOUNDS = {"bf16": (2.0 ** -7, 2.0 ** -126), "fp16": (2.0 ** -10, 2.0 ** -24),
                       "fp32": (0.0, 0.0)}

# design (c) replaces design (a) below this T: (a)'s per-example fp32 pass over the output tile
# costs ~14.8/T of the MMA time at H100 peaks (bf16 989 vs fp32 FMA 67 TFLOP/s), > ~10% there.
ROUNDED_ROWS_MAX_T = 128


def choose_clipped_sum_design(T: int, dtype: str, mode: str = "exact", automatic: bool = False) -> str:
    """Design of a layer's clipped weight-gradient sum (docs/PRIVACY.md): "rank1" (b) at T = 1,
    else "rounded" (c) when ``mode`` allows it, else "segments" (a).

    ``mode`` (DPEngine's ``clipped_sum``): "exact" (design (a) for every T > 1: no utility
    cost), "auto" (DPEngine's default; design (c) for half-precision operands with
    1 < T < ROUNDED_ROWS_MAX_T, the engine routing costly examples to (a)) or "rounded"
    (design (c) for every half-precision T > 1; tests and benchmarks). fp32 operands always use
    (a): they have no half rounding to save. fp16 with automatic clipping uses (a): its factor
    can exceed 1, and c_i g_t could then saturate at 65504, which the slack does not bound."""
    if mode not in ("exact", "auto", "rounded"):
        raise ValueError(f"clipped_sum must be 'exact', 'auto' or 'rounded', got {mode!r}")
    if T == 1:
        return "rank1"
    fmt = clipped_round_dtype(dtype, "ieee")
    if mode == "exact" or fmt == "fp32" or (fmt == "fp16" and automatic):
        return "segments"
    if mode == "auto" and T >= ROUNDED_ROWS_MAX_T:
        return "segments"
    return "rounded"


def linear_clipped_weight_grad_rounded_spec(B: int, T: int, D: int, P: int, arch: int = 90,
                                            itemsize: int = 2) -> LaunchSpec:
    """Launch of ``_linear_clipped_weight_grad_rounded_kernel`` (design (c)): the T = 1 rank-one
    spec's tiles over the B*T rows (one GEMM, K-blocks may mix examples); rows split into slices
    of ``outputs["rows_per_split"]`` rows (a multiple of BLOCK_K), each its own fp32 partial.
    128 x 128 tiles with 8 warps like the rank-one build (one fp32 accumulator; wgmma)."""
    check_arch(arch)
    rows = B * T
    bp = block(P, 128, 128)
    bd = block(D, 128, 128)
    bk = block(rows, 64 if itemsize < 4 else 32, 128)
    if not interpreting() and arch < 90:
        bk = min(bk, 32)
    n_tiles = cdiv(P, bp) * cdiv(D, bd)
    warps = 8 if (bp * bd >= 128 * 128 and not interpreting()) else 4
    split = clipped_sum_split(n_tiles, cdiv(rows, bk), 8, arch, flops=2.0 * rows * D * P,
                              nbytes=rows * (D + P) * itemsize + 4.0 * P * D, split_bytes=8.0 * P * D,
                              num_warps=warps)
    rows_per_split = cdiv(cdiv(rows, split), bk) * bk
    split = max(1, cdiv(rows, rows_per_split))
    return LaunchSpec(grid=(cdiv(P, bp), cdiv(D, bd), split),
                      constexprs=dict(BLOCK_P=bp, BLOCK_D=bd, BLOCK_K=bk),
                      num_warps=warps,
                      outputs={"partials": (split, P, D), "rows_per_split": rows_per_split,
                               "kernel": "_linear_clipped_weight_grad_rounded_kernel"})


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
