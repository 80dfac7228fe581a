"""Gaussian noise with 128-bit-uniform Box-Muller tails (|z| up to 13.32, not tl.randn's 5.68).

    out[e] = (x[e] + std * z[e]) / normaliser        (HAS_X)      or   std * z[e] / normaliser

z[2j], z[2j+1] = the Box-Muller pair of noise pair P = pair_offset + j, drawn from
Philox4x32-10 with key = 64-bit seed and counter (c0, c1, c2, c3) = (P lo, P hi, step, stream_word)
(stream_word = 0x4E << 24 | rank << 4; bit 0 set for the extension word). The four words give a
128-bit uniform u = (J + 1) 2^-128 and a 24-bit angle; -ln u is computed in fp32 without forming u
(u can be 2^-128, subnormal in fp32), so the largest |z| is sqrt(256 ln 2) = 13.3209. Derivation
of the generator, the RNG contract and the delta the truncation costs: ``dpprims/noise.py``.

Runtime values that change per step are one-element device arrays: seed (int32[2]: the 64-bit
seed's low and high word), step (int32[1]), scal (fp32[>=2]: [std, normaliser, ...], the same
array as the fused update's hyper-parameters). pair_offset and stream_word are per-parameter /
per-process constants (plain ints). This module imports only triton (and stdlib-only _launch).
"""
import triton
import triton.language as tl

from ._launch import LaunchSpec, block, cdiv

_TWO_M32 = tl.constexpr(2.3283064365386963e-10)  # 2^-32
_LN2_X32 = tl.constexpr(22.18070977791825)  # 32 ln 2
_TWO_PI_M24 = tl.constexpr(3.745070282923929e-07)  # 2 pi / 2^24
_HALF_TURN = tl.constexpr(8388608)  # 2^23

# indices into the fp32 scalar array shared with kernels/update.py
SCAL_STD = 0
SCAL_NORMALISER = 1


@triton.jit
def _cast_for_store(x, ptr):
    """fp32 x cast to ptr's element type with round-to-nearest-even. bf16 is rounded with integer
    ops: Triton's interpreter truncates fp32 -> bf16 (GPUs round to nearest even), and results must
    not depend on the backend."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        bits = tl.where(x != x, 0x7FC00000, bits)  # NaN stays NaN (no carry out of the mantissa)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ptr.dtype.element_ty)


@triton.jit
def _normal_pair_from_words(w0, w1, w2, w3, x0):
    """Box-Muller on the 128-bit uniform u = (w0 2^96 + w1 2^64 + w2 2^32 + x0 + 1) 2^-128 and
    the angle theta = 2 pi ((w3 >> 8) - 2^23) 2^-24; all words uint32 blocks. Returns fp32
    (rho cos theta, rho sin theta), rho = sqrt(-2 ln u) <= sqrt(256 ln 2)."""
    nz0 = w0 != 0
    nz1 = w1 != 0
    nz2 = w2 != 0
    # first nonzero word (hi), the next one (lo), and k = number of leading zero words
    hi = tl.where(nz0, w0, tl.where(nz1, w1, tl.where(nz2, w2, x0)))
    lo = tl.where(nz0, w1, tl.where(nz1, w2, x0))
    k = tl.where(nz0, 0.0, tl.where(nz1, 1.0, tl.where(nz2, 2.0, 3.0)))
    last = k == 3.0
    hi_f = hi.to(tl.float32) + tl.where(last, 1.0, 0.0)
    lo_f = tl.where(last, 0.0, lo.to(tl.float32) + 1.0)
    v = (hi_f + lo_f * _TWO_M32) * _TWO_M32  # u = 2^(-32 k) v, v in [2^-32, 1]
    neg_log_u = k * _LN2_X32 - tl.log(v)
    rho = tl.sqrt_rn(tl.maximum(neg_log_u + neg_log_u, 0.0))
    theta = ((w3 >> 8).to(tl.int32) - _HALF_TURN).to(tl.float32) * _TWO_PI_M24
    return rho * tl.cos(theta), rho * tl.sin(theta)


@triton.jit
def _gaussian_pairs(seed_lo, seed_hi, pair, step, stream_word):
    """The normal pairs of pair indices ``pair`` (int64 block). seed_lo, seed_hi, step: uint32
    scalars; stream_word: int (counter word c3 of the main block)."""
    c0 = (pair & 0xFFFFFFFF).to(tl.uint32)
    c1 = (pair >> 32).to(tl.uint32)
    zero = c0 * 0
    c2 = zero + step
    c3 = zero + stream_word
    w0, w1, w2, w3 = tl.philox_impl(c0, c1, c2, c3, seed_lo, seed_hi, 10)
    # the fourth 32-bit word of u matters only when w0 == w1 == 0 (probability 2^-64 per pair):
    # a block-uniform branch, so the second Philox block costs nothing in practice
    need = ((w0 == 0) & (w1 == 0)).to(tl.int32)
    x0 = zero
    if tl.max(need, axis=0) > 0:
        x0, _e1, _e2, _e3 = tl.philox_impl(c0, c1, c2, c3 | 1, seed_lo, seed_hi, 10)
    return _normal_pair_from_words(w0, w1, w2, w3, x0)


@triton.jit
def _noise_block(seed_ptr, step_ptr, pid, pair_offset, stream_word, BLOCK: tl.constexpr):
    """z for elements [pid * BLOCK, (pid + 1) * BLOCK) of a parameter: fp32 [BLOCK]."""
    HALF: tl.constexpr = BLOCK // 2
    seed_lo = tl.load(seed_ptr).to(tl.uint32, bitcast=True)
    seed_hi = tl.load(seed_ptr + 1).to(tl.uint32, bitcast=True)
    step = tl.load(step_ptr).to(tl.uint32, bitcast=True)
    pair = pid * HALF + tl.arange(0, HALF) + pair_offset  # [HALF] int64
    z0, z1 = _gaussian_pairs(seed_lo, seed_hi, pair, step, stream_word)
    return tl.interleave(z0, z1)  # [BLOCK]: element 2j <- z0[j], 2j+1 <- z1[j]


@triton.jit
def _gaussian_noise_kernel(x_ptr, seed_ptr, step_ptr, scal_ptr, n_elements, pair_offset, stream_word,
                           out_ptr,
                           HAS_X: tl.constexpr, BLOCK: tl.constexpr):
    """out = (x + std z) / normaliser over a flat contiguous array (x_ptr may equal out_ptr)."""
    pid = tl.program_id(0).to(tl.int64)
    z = _noise_block(seed_ptr, step_ptr, pid, pair_offset, stream_word, BLOCK)  # [BLOCK] fp32
    std = tl.load(scal_ptr + 0).to(tl.float32)  # SCAL_STD
    normaliser = tl.load(scal_ptr + 1).to(tl.float32)  # SCAL_NORMALISER
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] int64
    mask = offs < n_elements
    g = std * z
    if HAS_X:
        g = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + g
    g = tl.div_rn(g, normaliser)
    tl.store(out_ptr + offs, _cast_for_store(g, out_ptr), mask=mask)


@triton.jit
def _philox_words_kernel(seed_ptr, ctr_ptr, n, out_ptr, BLOCK: tl.constexpr):
    """Diagnostics: the raw Philox4x32-10 words of n counters. ctr: int32 [4, n] (c0..c3 bit
    patterns), out: int32 [4, n]."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    k0 = tl.load(seed_ptr).to(tl.uint32, bitcast=True)
    k1 = tl.load(seed_ptr + 1).to(tl.uint32, bitcast=True)
    c0 = tl.load(ctr_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    c1 = tl.load(ctr_ptr + n + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    c2 = tl.load(ctr_ptr + 2 * n + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    c3 = tl.load(ctr_ptr + 3 * n + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    w0, w1, w2, w3 = tl.philox_impl(c0, c1, c2, c3, k0, k1, 10)
    tl.store(out_ptr + offs, w0.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + n + offs, w1.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 2 * n + offs, w2.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 3 * n + offs, w3.to(tl.int32, bitcast=True), mask=mask)


@triton.jit
def _normal_from_words_kernel(words_ptr, n, out_ptr, BLOCK: tl.constexpr):
    """Diagnostics: Box-Muller of given words. words: int32 [5, n] (w0, w1, w2, w3, x0 bit
    patterns), out: fp32 [2, n] (z0, z1). Lets tests reach the extreme tail deterministically."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w0 = tl.load(words_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    w1 = tl.load(words_ptr + n + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    w2 = tl.load(words_ptr + 2 * n + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    w3 = tl.load(words_ptr + 3 * n + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    x0 = tl.load(words_ptr + 4 * n + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    z0, z1 = _normal_pair_from_words(w0, w1, w2, w3, x0)
    tl.store(out_ptr + offs, z0, mask=mask)
    tl.store(out_ptr + n + offs, z1, mask=mask)


def gaussian_noise_spec(n_elements: int) -> LaunchSpec:
    """Launch spec of ``_gaussian_noise_kernel`` (n_elements > 0; callers skip empty arrays).
    GPU: 1024 elements (512 Philox blocks) per program, 4 warps; interpreter: up to 2^16."""
    BLOCK = block(n_elements, gpu_max=1024, interp_max=1 << 16, lo=16)
    return LaunchSpec(grid=(cdiv(n_elements, BLOCK),), constexprs={"BLOCK": BLOCK}, num_warps=4)


def words_spec(n: int) -> LaunchSpec:
    """Launch spec of the two diagnostic kernels."""
    BLOCK = block(n, gpu_max=1024, interp_max=1 << 16, lo=16)
    return LaunchSpec(grid=(cdiv(n, BLOCK),), constexprs={"BLOCK": BLOCK}, num_warps=4)
