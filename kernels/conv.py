"""Fused per-example clipping kernels for Conv2d (and Conv1d as a unit-height Conv2d).

Layouts are torch's: input ``x`` [B, C_in, H, W] (NCHW, any strides: channels-last works
without a copy), weight [C_out, C_in/groups, KH, KW], output gradient ``G`` [B, C_out, H_out,
W_out]. A Conv1d is the same code with H = H_out = KH = 1.

Implicit im2col: the unfolded input of example i and group g,

    U_i,g[t, d] = x_i[g*C_in_g + c, oh*SH - PH + ki*DH, ow*SW - PW + kj*DW]   (0 outside x)
    t = oh*W_out + ow,   d = (c*KH + ki)*KW + kj,   T = H_out*W_out,   D = C_in_g*KH*KW,

is never written to memory: every kernel computes the addresses of its [BLOCK_T, BLOCK_D] tile
of U from (t -> (oh, ow), d -> (c, ki, kj)) and masks the padding to 0 on load, like an
implicit-GEMM convolution. ``G_i,g`` [T, P] (P = C_out/groups) is read straight from the
channel-major output gradient. The per-example weight gradient of group g is G_i,g^T U_i,g
[P, D] (torch's weight layout of that group's rows), so per group everything is the Linear
math of kernels/linear.py (shared/DESIGN.md, section 1):

* direct:  ||G_i,g^T U_i,g||_F^2, a [BLOCK_P, BLOCK_D] tile built in registers over a loop on
  t, square-summed, never written. 2*T*D*P flops per example and group.
* ghost:   ||G_i,g^T U_i,g||_F^2 = <U U^T, G G^T>_F over [BLOCK_T, BLOCK_T] tiles of both Gram
  matrices (j <= k, off-diagonal tiles doubled), never written. 2*T^2*(D+P) flops.
* the per-example norm is the SUM over groups of the per-group norms: group g's weights only
  see group g's inputs, so there are no cross-group terms (fastDP and private-transformers
  get this wrong for groups > 1).
* clipped weight gradient (Book-Keeping): sum_i c_i G_i,g^T U_i,g, one implicit-GEMM
  weight-gradient conv on tensor cores in the input dtype, one example at a time, with c_i
  applied to each example's fp32 tile after the MMA (design (a), docs/PRIVACY.md); or, for
  small T in half precision, one implicit GEMM over all B*T rows with c_i g_t rounded toward
  zero and the rounding charged to the clip factor (design (c), "rounded rows").
* bias: per-example bias gradients sum_t G_i[c, t] [B, C_out] (fp32), from which the norm
  and the clipped sum are [B]- and [C_out]-sized epilogues.

Padding: only the low padding (PH, PW) enters the addresses; the high padding is implied by
H_out, W_out (the caller's G), so asymmetric padding such as torch's padding="same" with an
even effective kernel needs no copy. Non-zero padding modes are the caller's business (the
torch handler pads explicitly before the conv).

Determinism: every program writes its own partial (a tile's norm, a split-K slice of the
weight gradient) and the binding sums them in a fixed order. No atomics.

Precision and non-finite inputs: as kernels/linear.py (operands in their own dtype, fp32
accumulation, ``DOT_PRECISION`` for fp32 operands; an example with c_i == 0 is skipped in the
clipped sum, never multiplied, so inf/NaN of a dropped example cannot leak in).

Addresses within one example are int32 (C*H*W < 2^31 elements per example); the example
offset is int64.

This module imports only triton; launch arithmetic lives in the ``*_spec`` functions and the
geometry helpers at the bottom, shared by the torch and JAX bindings.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from ._launch import LaunchSpec, block, cdiv, check_arch, interpreting
from .linear import _round_toward_zero, _store_split_tile, clipped_sum_split, choose_norm_method, norm_flops, segment_block_k


# --------------------------------------------------------------------------------------------
# implicit im2col addressing
# --------------------------------------------------------------------------------------------
@triton.jit
def _im2col_offsets(
    t, d,
    T, D, H, W, W_out,
    SH, SW, PH, PW, DH, DW,
    stride_xc, stride_xh, stride_xw,
    KH: tl.constexpr, KW: tl.constexpr,
):
    """Offsets and mask of the tile U[t, d] of one example's group (relative to the group's
    first channel): [len(t), len(d)]. The mask is False for padding and out-of-range t, d."""
    oh = t // W_out
    ow = t % W_out
    c = d // (KH * KW)
    r = d % (KH * KW)
    ki = r // KW
    kj = r % KW
    ih = oh[:, None] * SH - PH + ki[None, :] * DH  # [BT, BD]
    iw = ow[:, None] * SW - PW + kj[None, :] * DW  # [BT, BD]
    mask = (t[:, None] < T) & (d[None, :] < D) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    offs = c[None, :] * stride_xc + ih * stride_xh + iw * stride_xw
    return offs, mask


@triton.jit
def _gout_offsets(t, p, T, P, W_out, stride_gc, stride_gh, stride_gw):
    """Offsets and mask of the tile G[t, p] of one example's group: [len(t), len(p)]."""
    oh = t // W_out
    ow = t % W_out
    offs = p[None, :] * stride_gc + oh[:, None] * stride_gh + ow[:, None] * stride_gw
    mask = (t[:, None] < T) & (p[None, :] < P)
    return offs, mask


# --------------------------------------------------------------------------------------------
# per-example squared norms
# --------------------------------------------------------------------------------------------
@triton.jit
def _conv2d_norm_direct_kernel(
    x_ptr, g_ptr,
    GROUPS, C_in_g, H, W, W_out, T, D, P,
    SH, SW, PH, PW, DH, DW,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_gb, stride_gc, stride_gh, stride_gw,
    out_ptr,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[b*GROUPS + g, tile] = ||(G_b,g^T U_b,g)[tile]||_F^2 for one [BLOCK_P, BLOCK_D] tile."""
    pid_bg = tl.program_id(0)
    pid_tile = tl.program_id(1)
    b = pid_bg // GROUPS
    grp = pid_bg % GROUPS
    n_d_tiles = tl.cdiv(D, BLOCK_D)
    pid_p = pid_tile // n_d_tiles
    pid_d = pid_tile % n_d_tiles

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    x_base = x_ptr + b.to(tl.int64) * stride_xb + grp * C_in_g * stride_xc
    g_base = g_ptr + b.to(tl.int64) * stride_gb + grp * P * stride_gc

    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)  # [BLOCK_P, BLOCK_D] tile of G^T U
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        go, gm = _gout_offsets(t, offs_p, T, P, W_out, stride_gc, stride_gh, stride_gw)
        g = tl.load(g_base + go, mask=gm, other=0.0)  # [BLOCK_T, BLOCK_P]
        uo, um = _im2col_offsets(t, offs_d, T, D, H, W, W_out, SH, SW, PH, PW, DH, DW,
                                 stride_xc, stride_xh, stride_xw, KH, KW)
        u = tl.load(x_base + uo, mask=um, other=0.0)  # [BLOCK_T, BLOCK_D]
        acc = tl.dot(tl.trans(g), u, acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + pid_bg * tl.num_programs(1) + pid_tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton.jit
def _conv2d_norm_ghost_kernel(
    x_ptr, g_ptr,
    GROUPS, C_in_g, H, W, W_out, T, D, P,
    SH, SW, PH, PW, DH, DW,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_gb, stride_gc, stride_gh, stride_gw,
    out_ptr,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[b*GROUPS + g, j*nT + k] = w_jk * <(U U^T)[j,k], (G G^T)[j,k]>_F of example b, group g,
    for tile rows j <= k (w = 2 off the diagonal, 1 on it); tiles with j > k write 0."""
    pid_bg = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_k = tl.program_id(2)
    n_t = tl.num_programs(1)
    out = out_ptr + (pid_bg * n_t + pid_j) * n_t + pid_k
    if pid_j <= pid_k:
        b = pid_bg // GROUPS
        grp = pid_bg % GROUPS
        offs_s = pid_j * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_t = pid_k * BLOCK_T + tl.arange(0, BLOCK_T)
        x_base = x_ptr + b.to(tl.int64) * stride_xb + grp * C_in_g * stride_xc
        g_base = g_ptr + b.to(tl.int64) * stride_gb + grp * P * stride_gc

        uu = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)  # [BLOCK_T, BLOCK_T] tile of U U^T
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            so, sm = _im2col_offsets(offs_s, d, T, D, H, W, W_out, SH, SW, PH, PW, DH, DW,
                                     stride_xc, stride_xh, stride_xw, KH, KW)
            u_s = tl.load(x_base + so, mask=sm, other=0.0)  # [BLOCK_T, BLOCK_D]
            to, tm = _im2col_offsets(offs_t, d, T, D, H, W, W_out, SH, SW, PH, PW, DH, DW,
                                     stride_xc, stride_xh, stride_xw, KH, KW)
            u_t = tl.load(x_base + to, mask=tm, other=0.0)  # [BLOCK_T, BLOCK_D]
            uu = tl.dot(u_s, tl.trans(u_t), uu, input_precision=DOT_PRECISION)

        gg = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)  # [BLOCK_T, BLOCK_T] tile of G G^T
        offs_p = tl.arange(0, BLOCK_P)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + offs_p
            so, sm = _gout_offsets(offs_s, p, T, P, W_out, stride_gc, stride_gh, stride_gw)
            g_s = tl.load(g_base + so, mask=sm, other=0.0)  # [BLOCK_T, BLOCK_P]
            to, tm = _gout_offsets(offs_t, p, T, P, W_out, stride_gc, stride_gh, stride_gw)
            g_t = tl.load(g_base + to, mask=tm, other=0.0)  # [BLOCK_T, BLOCK_P]
            gg = tl.dot(g_s, tl.trans(g_t), gg, input_precision=DOT_PRECISION)

        weight = tl.where(pid_j == pid_k, 1.0, 2.0)
        tl.store(out, weight * tl.sum(tl.sum(uu * gg, axis=1), axis=0))
    else:
        tl.store(out, 0.0)


@triton.jit
def _conv2d_bias_grads_kernel(
    g_ptr,
    C, T, W_out,
    stride_gb, stride_gc, stride_gh, stride_gw,
    out_ptr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """out[b, c] = sum_t G_b[c, t] (fp32): the per-example bias gradients [B, C_out]."""
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_t = tl.arange(0, BLOCK_T)
    g_base = g_ptr + pid_b.to(tl.int64) * stride_gb
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)  # [BLOCK_C, BLOCK_T] partial sums over t
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        oh = t // W_out
        ow = t % W_out
        acc += tl.load(g_base + offs_c[:, None] * stride_gc + oh[None, :] * stride_gh + ow[None, :] * stride_gw,
                       mask=(offs_c[:, None] < C) & (t[None, :] < T), other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_b.to(tl.int64) * C + offs_c, tl.sum(acc, axis=1), mask=offs_c < C)


# --------------------------------------------------------------------------------------------
# clipped weight-gradient sum (Book-Keeping)
# --------------------------------------------------------------------------------------------
@triton.jit
def _conv2d_clipped_weight_grad_kernel(
    x_ptr, g_ptr, c_ptr,
    B, GROUPS, C_in_g, H, W, W_out, T, D, P, EXAMPLES_PER_SPLIT,
    SH, SW, PH, PW, DH, DW,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_gb, stride_gc, stride_gh, stride_gw,
    out_ptr, ws_ptr, cnt_ptr,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[g*P + P-tile, D-tile] = sum over the examples i of c_i (G_i,g^T U_i,g)[tile] (split s: its slice).

    ``out`` is [C_out, D], i.e. the weight layout [C_out, C_in/groups, KH, KW].
    Design (a), as the Linear kernel (docs/PRIVACY.md): one example at a time, its UNSCALED
    input-dtype tiles of G and of the implicit im2col U over its T = H_out*W_out output
    positions (BLOCK_K positions per step, the last step masked at T) are multiplied on tensor
    cores into a fresh fp32 tile W_i, then acc += c_i * W_i. Splits own whole examples and
    are summed in slice order in the kernel (``_store_split_tile``); an example with c_i == 0 is skipped entirely.
    """
    pid_gp = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_p_tiles = tl.cdiv(P, BLOCK_P)
    grp = pid_gp // n_p_tiles
    pid_p = pid_gp % n_p_tiles
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    x_grp = x_ptr + grp * C_in_g * stride_xc
    g_grp = g_ptr + grp * P * stride_gc
    e_lo = pid_s * EXAMPLES_PER_SPLIT
    e_hi = tl.minimum(e_lo + EXAMPLES_PER_SPLIT, B)

    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)  # [BLOCK_P, BLOCK_D] sum_i c_i W_i
    for i in range(e_lo, e_hi):
        c = tl.load(c_ptr + i)  # example i's clip factor (fp32)
        if c != 0.0:
            x_base = x_grp + tl.cast(i, tl.int64) * stride_xb
            g_base = g_grp + tl.cast(i, tl.int64) * stride_gb
            w = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)  # [BLOCK_P, BLOCK_D] tile of W_i
            for t0 in range(0, T, BLOCK_K):
                t = t0 + offs_k
                go, gm = _gout_offsets(t, offs_p, T, P, W_out, stride_gc, stride_gh, stride_gw)
                g = tl.load(g_base + go, mask=gm, other=0.0)  # [BLOCK_K, BLOCK_P]
                uo, um = _im2col_offsets(t, offs_d, T, D, H, W, W_out, SH, SW, PH, PW, DH, DW,
                                         stride_xc, stride_xh, stride_xw, KH, KW)
                u = tl.load(x_base + uo, mask=um, other=0.0)  # [BLOCK_K, BLOCK_D]
                w = tl.dot(tl.trans(g), u, w, input_precision=DOT_PRECISION)
            acc += c * w

    rows = grp * P + offs_p
    _store_split_tile(acc, out_ptr, ws_ptr, cnt_ptr, rows, offs_d, (offs_p[:, None] < P) & (offs_d[None, :] < D),
                      D, BLOCK_P, BLOCK_D)


@triton.jit
def _conv2d_clipped_weight_grad_rounded_kernel(
    x_ptr, g_ptr, c_ptr,
    B, GROUPS, C_in_g, H, W, W_out, T, D, P, ROWS_PER_SPLIT,
    SH, SW, PH, PW, DH, DW,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_gb, stride_gc, stride_gh, stride_gw,
    out_ptr, ws_ptr, cnt_ptr,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROUND_DTYPE: tl.constexpr,
):
    """out[g*P + P-tile, D-tile] = sum over the rows r = (i, t) (split s: its slice) of
    round_toward_zero(c_i G_i,g[t]) U_i,g[t]^T ("rounded rows", design (c), docs/PRIVACY.md).

    One implicit-GEMM weight-gradient conv over the B*T output positions on tensor cores, K-blocks
    mixing examples: c_i is fused into the G load and the scaled row rounded toward zero onto
    ROUND_DTYPE before tl.dot. Its rounding error per example and group is at most
    c_i u S_i,g + tau sqrt(P) sum_t ||u_t|| with S_i,g = sum_t ||g_t|| ||u_t|| (u_t the
    im2col patch), which the engine charges to the clip factor (kernels/clip.py HAS_SLACK):
    use it only with such factors. Rows with c_i == 0 are masked in both operands; splits own
    whole K-blocks of rows, summed in slice order in the kernel (``_store_split_tile``).
    """
    pid_gp = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_p_tiles = tl.cdiv(P, BLOCK_P)
    grp = pid_gp // n_p_tiles
    pid_p = pid_gp % n_p_tiles
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    x_grp = x_ptr + grp * C_in_g * stride_xc
    g_grp = g_ptr + grp * P * stride_gc
    n_rows = B * T
    r_lo = pid_s * ROWS_PER_SPLIT
    r_hi = tl.minimum(r_lo + ROWS_PER_SPLIT, n_rows)

    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)  # [BLOCK_P, BLOCK_D]
    for r0 in range(r_lo, r_hi, BLOCK_K):
        r = r0 + offs_k  # [BLOCK_K] rows (example, output position)
        in_rows = r < r_hi
        i = (r // T).to(tl.int64)
        t = r % T
        c = tl.load(c_ptr + i, mask=in_rows, other=0.0)  # [BLOCK_K] factor of each row's example
        keep = in_rows & (c != 0.0)
        go, gm = _gout_offsets(t, offs_p, T, P, W_out, stride_gc, stride_gh, stride_gw)
        g = tl.load(g_grp + i[:, None] * stride_gb + go, mask=gm & keep[:, None], other=0.0)  # [BLOCK_K, BLOCK_P]
        uo, um = _im2col_offsets(t, offs_d, T, D, H, W, W_out, SH, SW, PH, PW, DH, DW,
                                 stride_xc, stride_xh, stride_xw, KH, KW)
        u = tl.load(x_grp + i[:, None] * stride_xb + uo, mask=um & keep[:, None], other=0.0)  # [BLOCK_K, BLOCK_D]
        y = _round_toward_zero(g.to(tl.float32) * c[:, None], ROUND_DTYPE).to(u.dtype)  # exact cast
        if ROUND_DTYPE == "tf32":
            u = _round_toward_zero(u, ROUND_DTYPE)
        acc = tl.dot(tl.trans(y), u, acc, input_precision=DOT_PRECISION)

    rows = grp * P + offs_p
    _store_split_tile(acc, out_ptr, ws_ptr, cnt_ptr, rows, offs_d, (offs_p[:, None] < P) & (offs_d[None, :] < D),
                      D, BLOCK_P, BLOCK_D)


# --------------------------------------------------------------------------------------------
# geometry (framework-neutral argument handling, shared by the bindings and the handlers)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Conv2dGeometry:
    """One conv call in 2-D form (a Conv1d has H = H_out = KH = 1, SH = DH = 1, PH = 0).

    ``PH, PW`` are the low (top / left) paddings; the high paddings are implied by H_out, W_out.
    """

    B: int
    C_in: int
    H: int
    W: int
    C_out: int
    H_out: int
    W_out: int
    KH: int
    KW: int
    SH: int
    SW: int
    PH: int
    PW: int
    DH: int
    DW: int
    groups: int

    @property
    def T(self) -> int:
        return self.H_out * self.W_out

    @property
    def C_in_g(self) -> int:
        return self.C_in // self.groups

    @property
    def D(self) -> int:
        return self.C_in_g * self.KH * self.KW

    @property
    def P(self) -> int:
        return self.C_out // self.groups

    def scalars(self) -> tuple:
        """Runtime scalars in kernel order: GROUPS, C_in_g, H, W, W_out, T, D, P."""
        return (self.groups, self.C_in_g, self.H, self.W, self.W_out, self.T, self.D, self.P)

    def conv_scalars(self) -> tuple:
        """SH, SW, PH, PW, DH, DW."""
        return (self.SH, self.SW, self.PH, self.PW, self.DH, self.DW)


def _tuple(value, n: int, name: str, layer: str = "") -> tuple:
    where = f"layer {layer!r}: " if layer else ""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) == 1 and n > 1:
        value = value * n
    if len(value) != n or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{where}{name} must be an int or {n} ints, got {value!r}")
    return value


def conv_pads(padding, kernel_size, stride, dilation, layer: str = "") -> tuple:
    """torch's ``padding`` argument -> one (low, high) pair per spatial dim.

    ``padding``: an int, a tuple of ints (symmetric per dim), "valid", or "same" (stride 1 only,
    as in torch; an odd total padding d*(k-1) puts the extra element at the high end, as torch
    does). ``layer`` names the layer in error messages.
    """
    n = len(kernel_size)
    where = f"layer {layer!r}: " if layer else ""
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * n
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"{where}padding='same' needs stride 1 (as in torch), got stride {tuple(stride)}")
            total = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
            return tuple((t // 2, t - t // 2) for t in total)
        raise ValueError(f"{where}padding must be 'same', 'valid', an int or {n} ints, got {padding!r}")
    pads = _tuple(padding, n, "padding", layer)
    if any(p < 0 for p in pads):
        raise ValueError(f"{where}padding must be non-negative, got {padding!r}")
    return tuple((p, p) for p in pads)


def conv_out_size(size: int, k: int, s: int, d: int, lo: int, hi: int) -> int:
    return (size + lo + hi - d * (k - 1) - 1) // s + 1


# --------------------------------------------------------------------------------------------
# launch specs (shared by the torch and JAX bindings)
# --------------------------------------------------------------------------------------------
def _kernel_constexprs(geo: Conv2dGeometry) -> dict:
    return dict(KH=geo.KH, KW=geo.KW)


def conv2d_norm_direct_spec(geo: Conv2dGeometry, arch: int = 90) -> LaunchSpec:
    """Grid (B*groups, P-tiles x D-tiles); one fp32 partial per program."""
    bt = block(geo.T, 32, 128)
    bd = block(geo.D, 64, 128)
    bp = block(geo.P, 64, 128)
    n_tiles = cdiv(geo.P, bp) * cdiv(geo.D, bd)
    return LaunchSpec(grid=(geo.B * geo.groups, n_tiles),
                      constexprs=dict(**_kernel_constexprs(geo), BLOCK_T=bt, BLOCK_D=bd, BLOCK_P=bp),
                      num_warps=4, outputs={"partials": (geo.B, geo.groups * n_tiles)})


def conv2d_norm_ghost_spec(geo: Conv2dGeometry, arch: int = 90) -> LaunchSpec:
    """Grid (B*groups, T-tiles, T-tiles); tiles below the diagonal exit after writing 0.

    Register pressure (compiled builds, bench/kernel_report.py; ResNet-18 stage 3, T = 64,
    d = 2304, p = 256): the implicit-im2col address math makes this the heaviest norm kernel.
    At BLOCK_T = 64 with 64 x 64 operand tiles and 4 warps it takes 254 registers in bf16 (1-2
    CTAs per SM) and spills in fp32 on sm_90 and sm_80 (fp16 spills too, 255 registers), as it
    does at BLOCK_T = 32 with 64-wide tiles in fp32. 32 x 32 x 32 tiles with 8 warps compile
    without spills on both: 75 registers in fp32 on sm_90 (3 CTAs = 24 warps per SM), 104 on
    sm_80. Same choice on both architectures."""
    check_arch(arch)
    bt = block(geo.T, 32, 128)
    bd = block(geo.D, 32, 128)
    bp = block(geo.P, 32, 128)
    n_t = cdiv(geo.T, bt)
    return LaunchSpec(grid=(geo.B * geo.groups, n_t, n_t),
                      constexprs=dict(**_kernel_constexprs(geo), BLOCK_T=bt, BLOCK_D=bd, BLOCK_P=bp),
                      num_warps=4 if interpreting() else 8, outputs={"partials": (geo.B, geo.groups * n_t * n_t)})


def conv2d_bias_grads_spec(B: int, C: int, T: int, arch: int = 90) -> LaunchSpec:
    bc = block(C, 32, 256, lo=1)
    bt = block(T, 128, 1024, lo=1)
    return LaunchSpec(grid=(B, cdiv(C, bc)), constexprs=dict(BLOCK_C=bc, BLOCK_T=bt), num_warps=4,
                      outputs={"out": (B, C)})


def _split_roofline(geo: Conv2dGeometry, itemsize: int) -> dict:
    """The clipped sum's work for :func:`dpprims.kernels.linear.clipped_sum_split`: flops
    2*B*T*D*P per group, operand bytes (x and G once, the fp32 [C_out, D] output) and the
    bytes each split-K slice adds (its fp32 partial written and read back)."""
    wsize = geo.C_out * geo.D
    return dict(flops=2.0 * geo.B * geo.T * geo.D * geo.P * geo.groups,
                nbytes=geo.B * (geo.C_in * geo.H * geo.W + geo.C_out * geo.T) * itemsize + 4.0 * wsize,
                split_bytes=8.0 * wsize)


def conv2d_clipped_weight_grad_spec(geo: Conv2dGeometry, arch: int = 90, itemsize: int = 2) -> LaunchSpec:
    """Design (a) launch (see the kernel): tiles over (groups x P, D); the B examples are split
    into slices of ``outputs["examples_per_split"]`` whole examples when the tile grid alone
    cannot fill the GPU. The slices of a tile are summed in slice order by the last of them
    to finish (kernels/linear.py ``_store_split_tile``): deterministic, no float atomics. BLOCK_K pads T least
    (:func:`dpprims.kernels.linear.segment_block_k`), capped at 32: the implicit-im2col address
    tile of BLOCK_K = 64 took a 64 x 128 build to 255 registers on sm_90 (188 at 32). ``arch``:
    compute capability; two fp32 [BLOCK_P, BLOCK_D] tiles (the running sum and W_i) live in
    registers. Compiled for the target and read with cuobjdump / ptxas -v (ResNet-18-GN CIFAR
    and ResNet-50-GN 224 steps, bench/kernel_report.py):

    * sm_90, half operands: 128 x 128 at 8 warps (two wgmma warpgroups).
    * sm_80 (mma.sync), half operands: 128 x 64 at 8 warps (64 accumulator registers a
      thread), BLOCK_K <= 32.
      At 4 warps (128 accumulator registers) the same tile took 255 registers and spilled
      with BLOCK_K = 32 (ResNet-50's 1x1 convs) and sat at 210-255 registers, 2 CTAs per SM,
      at 16; at 8 warps it compiles to 99-178 registers without spills (64 x 64: 99-115), and
      one 8-warp CTA keeps an SM busy where the grid is smaller than the GPU. 128 x 128 at 8
      warps (as sm_90) also compiles without spills (up to 237 registers) but estimates slower
      (more padding, fewer programs: ResNet-50 bf16 clipped sums 2425 us against 2314 us).
    * fp32 operands, both architectures (compiled with DOT_PRECISION ieee, CUDA-core FMA):
      32 x 32 at 4 warps, BLOCK_K <= 32 on sm_80 (52-154 registers), <= 16 on sm_90 (no spills).
      On sm_90 the former 128 x 64 (8 warps) / 64 x 64 (4 warps), BLOCK_K 16, spilled 16-76
      bytes in 7 ResNet-18 launches and estimated ResNet-18 6498 us / ResNet-50 12091 us
      against 5393 / 9905 us now. ptxas settles fp32 builds on an occupancy step (56, 64, 72,
      80, 96, 128 ... registers) and then spills a few bytes in some specialisations. sm_80:
      8-warp 64 x 64, 128 x 64 and 128 x 32 builds spilled 4-28 bytes at 128 (or 80)
      registers, 4-warp 64 x 64 / 64 x 32 / 32 x 64 ones at 128-255, and 32 x 32 with
      BLOCK_K = 16 one 1x1 stride-2 build (4 bytes at 72). The price is operand reuse (8
      outputs a thread per K step), which a shared-memory-bound FMA loop may feel on a GPU;
      the estimate (flops at the FMA peak) does not see it."""
    check_arch(arch)
    half = itemsize < 4
    if not half:
        bp, bd, big = block(geo.P, 32, 128), block(geo.D, 32, 128), False
    elif arch >= 90:
        bp = block(geo.P, 128, 128)
        bd = block(geo.D, 128, 128)
        # 8 warps from 64 x 128 up: at 4 warps the im2col address tiles push 64 x 128 past 255
        # registers (spills, measured on sm_90).
        big = bp * bd >= 64 * 128
    else:
        bp, bd, big = block(geo.P, 128, 128), block(geo.D, 64, 128), True
    # BLOCK_K <= 32, except 16 for fp32 on sm_90: there 32 x 32 x 32 spilled 4 bytes in 4 JAX
    # builds (56 / 96 registers) and x 16 none; on sm_80 x 16 spilled one 4-byte build, x 32 none
    bk = segment_block_k(geo.T, 16 if (not half and arch >= 90) else 32)
    warps = 8 if (big and not interpreting()) else 4
    n_tiles = geo.groups * cdiv(geo.P, bp) * cdiv(geo.D, bd)
    split = clipped_sum_split(n_tiles, geo.B, max(1, cdiv(8 * bk, geo.T)), arch, num_warps=warps,
                              **_split_roofline(geo, itemsize))
    examples_per_split = cdiv(geo.B, split)
    split = max(1, cdiv(geo.B, examples_per_split))
    return LaunchSpec(grid=(geo.groups * cdiv(geo.P, bp), cdiv(geo.D, bd), split),
                      constexprs=dict(**_kernel_constexprs(geo), BLOCK_P=bp, BLOCK_D=bd, BLOCK_K=bk),
                      num_warps=warps,
                      outputs={"partials": (split, geo.C_out, geo.D), "examples_per_split": examples_per_split})


def conv2d_clipped_weight_grad_rounded_spec(geo: Conv2dGeometry, arch: int = 90, itemsize: int = 2) -> LaunchSpec:
    """Design (c) launch (``_conv2d_clipped_weight_grad_rounded_kernel``): tiles over
    (groups x P, D) as design (a), the B*T rows split into slices of ``outputs["rows_per_split"]``
    rows (a multiple of BLOCK_K, K-blocks may mix examples), the slices summed in slice order in
    the kernel (kernels/linear.py ``_store_split_tile``). BLOCK_K 32 (the implicit-im2col address tile, as
    design (a)); one fp32 accumulator, 128 x 128 at 8 warps for half operands on sm_90 and on
    sm_80 (compiled for sm_80: 216-239 registers, no spills, where 128 x 64 at 4 warps took
    255 registers and spilled 64-124 bytes in ResNet-50's stage 4; 128 x 64 at 8 warps also
    compiles clean but estimates slower), 128 x 64 for fp32 operands."""
    check_arch(arch)
    rows = geo.B * geo.T  # the same choice on sm_80 and sm_90 (arch is checked, not used)
    bp = block(geo.P, 128, 128)
    bd = block(geo.D, 128 if itemsize < 4 else 64, 128)
    bk = block(rows, 32 if itemsize < 4 else 16, 64)
    n_tiles = geo.groups * cdiv(geo.P, bp) * cdiv(geo.D, bd)
    warps = 8 if (bp * bd >= 64 * 128 and not interpreting()) else 4
    split = clipped_sum_split(n_tiles, cdiv(rows, bk), 8, arch, num_warps=warps, **_split_roofline(geo, itemsize))
    rows_per_split = cdiv(cdiv(rows, split), bk) * bk
    split = max(1, cdiv(rows, rows_per_split))
    return LaunchSpec(grid=(geo.groups * cdiv(geo.P, bp), cdiv(geo.D, bd), split),
                      constexprs=dict(**_kernel_constexprs(geo), BLOCK_P=bp, BLOCK_D=bd, BLOCK_K=bk),
                      num_warps=warps,
                      outputs={"partials": (split, geo.C_out, geo.D), "rows_per_split": rows_per_split,
                               "kernel": "_conv2d_clipped_weight_grad_rounded_kernel"})


# --------------------------------------------------------------------------------------------
# cost model (the Linear one, per group)
# --------------------------------------------------------------------------------------------
def conv_norm_flops(T: int, D: int, P: int, groups: int = 1) -> dict:
    """Flops per example of each norm strategy: :func:`dpprims.kernels.linear.norm_flops` with
    T = H_out*W_out, d = C_in/groups*KH*KW, p = C_out/groups, times groups."""
    costs = norm_flops(T, D, P)
    return {k: groups * v for k, v in costs.items() if k != "outer"}


def choose_conv_norm_method(T: int, D: int, P: int, method: str = "auto") -> str:
    """"direct" or "ghost" for a conv layer: the user's choice, or with "auto" the Linear cost
    model (:func:`dpprims.kernels.linear.choose_norm_method`) on one group (groups scales both
    costs alike). At T = 1 Linear's closed form ("outer") is what the ghost kernel computes
    with a single 1x1 Gram tile, so it maps to "ghost"."""
    m = choose_norm_method(T, D, P, method)
    if m == "outer":
        return "ghost" if method == "auto" else method
    return m
