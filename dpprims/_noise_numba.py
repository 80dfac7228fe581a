"""numba kernels of dpprims.noise_cpu (a separate module so that importing dpprims never imports
numba, and module-level functions so that numba's on-disk cache hits: closures miss it)."""
import numba
import numpy as np

from .noise_cpu import _HALF_TURN, _K_LN2, _KEY_A, _KEY_B, _PHILOX_A, _PHILOX_B, _TWO_M32, _TWO_PI_M24

u64, u32 = np.uint64, np.uint32
A, B = u64(_PHILOX_A), u64(_PHILOX_B)
KA64, KB64, M32 = u64(_KEY_A), u64(_KEY_B), u64(0xFFFFFFFF)
S32, S8, Z32 = u64(32), u32(8), u32(0)
ZERO, ONE = np.float32(0.0), np.float32(1.0)
TWO_M32, TWO_PI_M24 = _TWO_M32, _TWO_PI_M24
K0, K1, K2, K3 = _K_LN2
HALF = np.int32(_HALF_TURN)

jit = numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=False, error_model="numpy")
# inlined in numba's IR (not only by LLVM, too late for its loop vectoriser): the pair loops
# then vectorise (16 pairs per AVX-512 iteration), ~4x faster
inline = numba.njit(inline="always", fastmath=False, error_model="numpy")


@inline
def philox(c0, c1, c2, c3, k0, k1):
    # uint32 words in, uint32 words out. The ten rounds run in 64-bit lanes that hold 32-bit
    # values: the 32 x 32 -> 64-bit products are exact in uint64, and every 32-bit result is
    # masked (& 0xFFFFFFFF) instead of truncated to uint32 and widened again. LLVM then keeps the
    # whole loop in 64-bit lanes (vpmuludq, vpsrlq, vpandq, vpxorq) with no pack / unpack
    # shuffles between rounds: 2.6x faster prep on an AVX-512 CPU (28 vs 73 us per 16k pairs,
    # AMD EPYC Zen 4) than 32-bit lanes, the same words (tests/test_noise_cpu.py).
    x0, x1, x2, x3, y0, y1 = u64(c0), u64(c1), u64(c2), u64(c3), u64(k0), u64(k1)
    for _ in range(10):
        pb = x2 * B
        pa = x0 * A
        x0, x1, x2, x3 = ((pb >> S32) ^ x1 ^ y0), (pb & M32), ((pa >> S32) ^ x3 ^ y1), (pa & M32)
        y0 = (y0 + KA64) & M32
        y1 = (y1 + KB64) & M32
    return u32(x0), u32(x1), u32(x2), u32(x3)


@inline
def select(w0, w1, w2, w3, x0):
    """kernels/noise.py::_normal_pair_from_words up to the transcendentals: (v, theta, k 32 ln 2)."""
    nz0, nz1, nz2 = w0 != Z32, w1 != Z32, w2 != Z32
    hi = w0 if nz0 else (w1 if nz1 else (w2 if nz2 else x0))
    lo = w1 if nz0 else (w2 if nz1 else x0)
    last = not (nz0 or nz1 or nz2)
    kl = K0 if nz0 else (K1 if nz1 else (K2 if nz2 else K3))
    hi_f = np.float32(hi) + (ONE if last else ZERO)
    lo_f = ZERO if last else np.float32(lo) + ONE
    v = (hi_f + lo_f * TWO_M32) * TWO_M32
    theta = np.float32(np.int32(w3 >> S8) - HALF) * TWO_PI_M24
    return v, theta, kl


@inline
def _check_scratch(m, a, b, c):
    # boundscheck is off in the loops: one check up front keeps them memory-safe
    if m < 0 or m > a.shape[0] or m > b.shape[0] or m > c.shape[0]:
        raise ValueError("dpprims.noise_cpu: chunk longer than its scratch buffers")


@inline
def _prep(c0_start, c1, m, k0, k1, c2, c3, v, th, kl, fmask, fval, forcing):
    _check_scratch(m, v, th, kl)
    smallest = u32(0xFFFFFFFF)  # min of (w0 | w1): a u32 min-reduction keeps the loop in 32-bit lanes
    for j in range(m):
        c0 = u32(c0_start + u32(j))
        w0, w1, w2, w3 = philox(c0, c1, c2, c3, k0, k1)
        if forcing:  # a compile-time constant after inlining: absent from prep's loop
            forced = (c0 & fmask) == fval
            w0 = Z32 if forced else w0
            w1 = Z32 if forced else w1
        a, b, c = select(w0, w1, w2, w3, Z32)
        v[j] = a
        th[j] = b
        kl[j] = c
        smallest = min(smallest, u32(w0 | w1))
    return smallest == Z32


@jit
def prep(c0_start, c1, m, k0, k1, c2, c3, v, th, kl):
    """Pairs with counter words (c0_start + j, c1, c2, c3), j < m (no carry: c0_start + m <=
    2^32): v, theta, k 32 ln 2 with x0 = 0; returns whether some pair has w0 == w1 == 0 (where
    x0 matters: then fix_extension)."""
    return _prep(c0_start, c1, m, k0, k1, c2, c3, v, th, kl, Z32, u32(1), False)


@jit
def prep_forced(c0_start, c1, m, k0, k1, c2, c3, v, th, kl, fmask, fval):
    """Tests only: prep with w0 = w1 = 0 forced where (c0 & fmask) == fval, to reach the extension
    path (a separate function: the check costs ~80% in prep's vectorised loop)."""
    return _prep(c0_start, c1, m, k0, k1, c2, c3, v, th, kl, fmask, fval, True)


@jit
def fix_extension(c0_start, c1, m, k0, k1, c2, c3, v, th, kl, fmask, fval):
    """Recompute the pairs with w0 == w1 == 0 with x0 = the first word of the extension block
    (counter word 3 | 1); returns how many."""
    _check_scratch(m, v, th, kl)
    cnt = 0
    for j in range(m):
        c0 = u32(c0_start + u32(j))
        w0, w1, w2, w3 = philox(c0, c1, c2, c3, k0, k1)
        if (c0 & fmask) == fval:
            w0 = Z32
            w1 = Z32
        if (w0 | w1) == Z32:
            x0 = philox(c0, c1, c2, u32(c3 | u32(1)), k0, k1)[0]
            v[j], th[j], kl[j] = select(w0, w1, w2, w3, x0)
            cnt += 1
    return cnt


@jit
def finish(kl, logv, cos_t, sin_t, m, out, o0, n):
    """out[o0 + 2j], out[o0 + 2j + 1] = rho cos, rho sin of pair j (elements >= n dropped).
    Overwrites logv[:m] with rho (scratch): two loops, the first (rho) vectorises fully, the
    second is only the interleaving store - about 1.8x faster than one fused loop."""
    _check_scratch(m, kl, logv, cos_t)
    if m > sin_t.shape[0] or n > out.shape[0] or o0 < 0 or o0 + 2 * m - 1 > n:
        raise ValueError("dpprims.noise_cpu: output range out of bounds")
    _rho_all(kl, logv, m)
    full = min(m, (n - o0) // 2)  # pairs whose both elements are kept: a branch-free loop
    dst = out[o0:]  # sliced first: indexing out at o0 + 2j in the loop kept it from vectorising
    for j in range(full):
        for h in range(2):
            dst[2 * j + h] = logv[j] * cos_t[j] if h == 0 else logv[j] * sin_t[j]
    for j in range(full, m):  # at most one pair: its z1 is dropped when n is odd
        e = o0 + 2 * j
        out[e] = logv[j] * cos_t[j]
        if e + 1 < n:
            out[e + 1] = logv[j] * sin_t[j]


@inline
def _rho(kl, logv):
    t = kl - logv
    t = t + t
    t = t if not (t < ZERO) else ZERO  # tl.maximum(t, 0) (a NaN would stay NaN)
    return np.sqrt(t)


@jit
def words(c0, c1, c2, c3, k0, k1, out):
    for j in range(c0.shape[0]):
        out[0, j], out[1, j], out[2, j], out[3, j] = philox(c0[j], c1[j], c2[j], c3[j], k0, k1)


@jit
def select_all(w, v, th, kl):
    for j in range(w.shape[1]):
        v[j], th[j], kl[j] = select(w[0, j], w[1, j], w[2, j], w[3, j], w[4, j])


@jit
def sgd_update(z, grad, param, buf, gout, std, norm, lr, mu, wd, has_buf, nesterov, write_grad):
    """kernels/update.py, OPTIMIZER == SGD, on one chunk (all fp32, in place), z given: the
    reference the tests hold :func:`sgd_update_pairs` (what noisy_update runs) to."""
    m = z.shape[0]
    if grad.shape[0] != m or param.shape[0] != m or (has_buf and buf.shape[0] != m) or \
            (write_grad and gout.shape[0] != m):
        raise ValueError("dpprims.noise_cpu: update chunk shapes differ")
    for i in range(m):
        g = (grad[i] + std * z[i]) / norm
        if write_grad:
            gout[i] = g
        p = param[i]
        d = g + wd * p
        if has_buf:
            b = buf[i] * mu + d
            buf[i] = b
            if nesterov:
                d = d + mu * b
            else:
                d = b
        param[i] = p - lr * d


@inline
def _rho_all(kl, logv, m):
    for j in range(m):
        logv[j] = _rho(kl[j], logv[j])


@jit
def rho_inplace(kl, logv, m):
    """logv[j] <- rho of pair j (j < m): the first loop of :func:`finish`, for the fused updates
    below, which read z = rho cos / rho sin straight from the chunk's pair arrays."""
    _check_scratch(m, kl, logv, logv)
    _rho_all(kl, logv, m)


@inline
def _check_pairs(m, rho, cos_t, sin_t, j0, grad, param, arrays_ok):
    if m > param.shape[0] or m > grad.shape[0] or not arrays_ok or j0 < 0 or \
            j0 + (m + 1) // 2 > min(rho.shape[0], cos_t.shape[0], sin_t.shape[0]):
        raise ValueError("dpprims.noise_cpu: update chunk shapes differ")


@inline
def _sgd_one(z, gr, p, b, std, norm, lr, mu, wd, has_buf, nesterov):
    # sgd_update's arithmetic for one element: (g, new param, new buffer)
    g = (gr + std * z) / norm
    d = g + wd * p
    if has_buf:
        b = b * mu + d
        if nesterov:
            d = d + mu * b
        else:
            d = b
    return g, p - lr * d, b


@inline
def _sgd_pairs(rho, cos_t, sin_t, j0, grad, param, buf, gout, std, norm, lr, mu, wd, has_buf, nesterov, write_grad):
    m = grad.shape[0]
    _check_pairs(m, rho, cos_t, sin_t, j0, grad, param,
                 (not has_buf or buf.shape[0] == m) and (not write_grad or gout.shape[0] == m))
    rr, cc, ss = rho[j0:], cos_t[j0:], sin_t[j0:]
    for k in range(m // 2):
        r = rr[k]
        for h in range(2):
            i = 2 * k + h
            z = r * cc[k] if h == 0 else r * ss[k]
            g, p, b = _sgd_one(z, grad[i], param[i], buf[i] if has_buf else ZERO, std, norm, lr, mu, wd, has_buf,
                               nesterov)
            if write_grad:
                gout[i] = g
            if has_buf:
                buf[i] = b
            param[i] = p
    if m % 2:  # an odd segment end: its last element is z0 of one more pair (the loop body
        # again: one inline helper for the element's loads and stores, shared by loop and tail,
        # made this function ~35x slower)
        i = m - 1
        k = i // 2
        g, p, b = _sgd_one(rr[k] * cc[k], grad[i], param[i], buf[i] if has_buf else ZERO, std, norm, lr, mu, wd,
                           has_buf, nesterov)
        if write_grad:
            gout[i] = g
        if has_buf:
            buf[i] = b
        param[i] = p


@jit
def sgd_update_pairs(rho, cos_t, sin_t, j0, grad, param, buf, gout, std, norm, lr, mu, wd, nesterov, write_grad):
    """:func:`sgd_update` (with a momentum buffer) of m = grad.shape[0] elements whose noise is
    element i -> z0 (i even) or z1 (i odd) of chunk pair j0 + i // 2, z = rho cos theta /
    rho sin theta (rho from :func:`rho_inplace`): finish's multiply, the same fp32 numbers, without
    writing z to memory and reading it back. Two functions (buffer / none) because a runtime
    has_buf flag, like indexing the pair arrays at j0 + k instead of slicing them first, kept
    LLVM from vectorising the loop (3-5x slower)."""
    _sgd_pairs(rho, cos_t, sin_t, j0, grad, param, buf, gout, std, norm, lr, mu, wd, True, nesterov, write_grad)


@jit
def sgd_update_pairs_nobuf(rho, cos_t, sin_t, j0, grad, param, gout, std, norm, lr, wd, write_grad):
    """:func:`sgd_update_pairs` without momentum."""
    _sgd_pairs(rho, cos_t, sin_t, j0, grad, param, grad[:0], gout, std, norm, lr, ZERO, wd, False, False, write_grad)


@inline
def _adam_one(z, gr, p, mm, vv, std, norm, omb1, b2, omb2, eps, wd, step_size, bc2_sqrt, decay, decoupled):
    # adam_update's arithmetic for one element: (g, new param, new exp_avg, new exp_avg_sq)
    g = (gr + std * z) / norm
    g_out = g
    if decoupled:
        p = p * decay
    else:
        g = g + wd * p
    mm = mm + omb1 * (g - mm)
    vv = vv * b2 + omb2 * g * g
    denom = np.sqrt(vv) / bc2_sqrt + eps
    return g_out, p - (step_size * mm) / denom, mm, vv


@jit
def adam_update_pairs(rho, cos_t, sin_t, j0, grad, param, exp_avg, exp_avg_sq, gout, std, norm, omb1, b2, omb2, eps,
                      wd, step_size, bc2_sqrt, decay, decoupled, write_grad):
    """:func:`adam_update` with the noise read from the chunk's pair arrays, as
    :func:`sgd_update_pairs`."""
    m = grad.shape[0]
    _check_pairs(m, rho, cos_t, sin_t, j0, grad, param,
                 exp_avg.shape[0] == m and exp_avg_sq.shape[0] == m and (not write_grad or gout.shape[0] == m))
    rr, cc, ss = rho[j0:], cos_t[j0:], sin_t[j0:]
    for k in range(m // 2):
        r = rr[k]
        for h in range(2):
            i = 2 * k + h
            z = r * cc[k] if h == 0 else r * ss[k]
            g, p, mm, vv = _adam_one(z, grad[i], param[i], exp_avg[i], exp_avg_sq[i], std, norm, omb1, b2, omb2, eps,
                                     wd, step_size, bc2_sqrt, decay, decoupled)
            if write_grad:
                gout[i] = g
            exp_avg[i] = mm
            exp_avg_sq[i] = vv
            param[i] = p
    if m % 2:  # an odd segment end: its last element is z0 of one more pair
        i = m - 1
        k = i // 2
        g, p, mm, vv = _adam_one(rr[k] * cc[k], grad[i], param[i], exp_avg[i], exp_avg_sq[i], std, norm, omb1, b2,
                                 omb2, eps, wd, step_size, bc2_sqrt, decay, decoupled)
        if write_grad:
            gout[i] = g
        exp_avg[i] = mm
        exp_avg_sq[i] = vv
        param[i] = p


@jit
def adam_update(z, grad, param, exp_avg, exp_avg_sq, gout, std, norm, omb1, b2, omb2, eps, wd, step_size, bc2_sqrt,
                decay, decoupled, write_grad):
    """kernels/update.py, OPTIMIZER == ADAM / ADAMW (decoupled), on one chunk (all fp32, in place), z
    given: the reference of :func:`adam_update_pairs` in the tests."""
    m = z.shape[0]
    if grad.shape[0] != m or param.shape[0] != m or exp_avg.shape[0] != m or exp_avg_sq.shape[0] != m or \
            (write_grad and gout.shape[0] != m):
        raise ValueError("dpprims.noise_cpu: update chunk shapes differ")
    for i in range(m):
        g = (grad[i] + std * z[i]) / norm
        if write_grad:
            gout[i] = g
        p = param[i]
        if decoupled:
            p = p * decay
        else:
            g = g + wd * p
        mm = exp_avg[i]
        mm = mm + omb1 * (g - mm)
        vv = exp_avg_sq[i] * b2 + omb2 * g * g
        exp_avg[i] = mm
        exp_avg_sq[i] = vv
        denom = np.sqrt(vv) / bc2_sqrt + eps
        param[i] = p - (step_size * mm) / denom


@jit
def scale_into(z, x, out, std, norm, has_x):
    """kernels/noise.py::_gaussian_noise_kernel's epilogue on one chunk: out = (x + std z) / norm
    (has_x) or std z / norm, fp32, in the kernel's order."""
    m = z.shape[0]
    if out.shape[0] != m or (has_x and x.shape[0] != m):
        raise ValueError("dpprims.noise_cpu: noise chunk shapes differ")
    for i in range(m):
        g = std * z[i]
        if has_x:
            g = x[i] + g
        out[i] = g / norm
