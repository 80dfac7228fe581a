"""JAX op for dpprims' Gaussian noise (kernels/noise.py; contract and tail analysis in
dpprims/noise.py), on the three paths of ``_call``.

    gaussian_noise(shape_or_like, std=, seed=, step=, pair_offset=, rank=, normaliser=, x=)
        = (x + std z) / normaliser      (x given)     or     std z / normaliser

z is the generator of ``dpprims.noise``: Philox4x32-10 with key = the 64-bit seed and counter
(pair index lo, pair index hi, step, stream_word(rank)), Box-Muller on a 128-bit uniform, so
|z| <= sqrt(256 ln 2) = 13.3209. The same (seed, step, pair_offset, rank) gives the same numbers as
the torch ops (``dpprims.bindings.torch.noise``) and the fused update (``.update``).

Runtime values are device arrays, so a new step or seed never recompiles: seed int32[2] (the
64-bit seed's low and high word as bit patterns, :func:`as_seed_array`; no x64 mode needed),
step int32[1] (:func:`as_step_array`), std / normaliser one fp32[2] array. pair_offset and rank
are Python ints (per parameter / per process): compile-time scalars of the kernel launch, runtime
words of the jnp path (which compiles once per array size and LIBM, see :func:`gaussian_noise_jnp`).

Paths:

* ``"jax-triton"``: ``_gaussian_noise_kernel`` with its launch spec ``gaussian_noise_spec``.
* ``"interpreter"``: the same kernel, spec and argument list through Triton's CPU interpreter
  (``jax.pure_callback``). Equal, bit for bit, to the torch plain path and the torch interpreter.
* ``"jnp"``: :func:`gaussian_noise_jnp` - Philox4x32-10 in uint32 jnp arithmetic (16-bit limbs for
  the 32x32 -> 64-bit products, so it runs without x64), the same word selection and fp32
  Box-Muller as the kernel. Exactness against the kernel / torch path:

  - the Philox words, the leading-zero-word count k, hi/lo, the angle integer, and hence which
    pairs reach the far tail and how far (all-zero words give exactly the kernel's 13.3209...)
    are identical bit for bit;
  - the fp32 arithmetic is the kernel's operation for operation, with XLA's two rewrites that
    change results blocked (FMA contraction of ``x + std z``, and ``a / s`` -> ``a * (1/s)`` for
    a broadcast scalar ``s``: see :func:`fp32_exact`, :func:`div_rn`);
  - log / cos / sin come from ``LIBM``: ``"numpy"`` (a ``pure_callback`` into numpy's float32
    ufuncs - the ones Triton's interpreter and the torch plain path use) makes the jnp path equal
    to them **bit for bit**; ``"xla"`` keeps the path pure XLA, and then z differs from the
    interpreter / torch path by at most ``XLA_LIBM_RTOL`` relative (numpy's float32 log is a
    3.5-ulp approximation, XLA's 1.2 ulp, cos/sin 1.4 vs 0.6 ulp; measured: at most 5 ulp of z
    over 4M draws, i.e. the same values to ~6 significant digits).
    ``"auto"`` (default; env ``DPPRIMS_JAX_LIBM``) = numpy when JAX's default backend is the CPU,
    xla otherwise (a GPU without jax-triton). Read at trace time. With numpy and numba installed
    the whole generator runs in one ``pure_callback`` into ``dpprims.noise_cpu`` (the torch plain
    path's code: the same numbers, ~3x faster than XLA's uint32 Philox here; ``DPPRIMS_NOISE_CPU=0``
    keeps the XLA Philox + numpy libm callback). That callback is a ``buffer_callback`` writing z into
    XLA's output buffer (no result copy; ``BUFFER_NOISE``). Call a step holding it through
    ``jax.jit`` (dpprims' trainer does): jax's ahead-of-time ``lower().compile()`` object has no
    C++ dispatch for an executable with a host callback, and its Python dispatch cost ~0.4 ms per
    call on the 2-core machine (the default MLP's DP step: 2.26 vs 1.85 ms).

  Compiled GPU kernels use the GPU's transcendentals (and FMA): ~1e-6 relative from both.

Diagnostics with the same paths: :func:`philox4x32_words` (raw words, for known-answer tests) and
:func:`normal_pair_from_words` (Box-Muller of given words: reaches the extreme tail on demand).
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dpprims import noise as _nz
from dpprims import noise_cpu as _ncpu
from dpprims.kernels import noise as _k

from ._call import KernelCall, dispatch, launch, nondifferentiable, record

__all__ = [
    "gaussian_noise", "gaussian_noise_jnp", "as_seed_array", "as_step_array", "noise_scalars",
    "philox4x32_words", "normal_pair_from_words", "philox4x32_10", "normal_pair_from_words_jnp",
    "noise_words", "fp32_exact", "div_rn", "LIBM", "LIBMS", "XLA_LIBM_RTOL",
]

LIBMS = ("auto", "numpy", "xla")
LIBM = os.environ.get("DPPRIMS_JAX_LIBM", "auto").strip().lower() or "auto"
"""Where the jnp path takes float32 log / cos / sin from ("auto" | "numpy" | "xla"; module doc)."""

XLA_LIBM_RTOL = 2.0 ** -19
"""|z_jnp - z_kernel| <= XLA_LIBM_RTOL * |z| elementwise with LIBM = "xla" (CPU interpreter or torch
plain path as the reference). Budget: log 3.5 + 1.2 ulp -> -ln u within ~5 ulp relative -> rho
~2.5 ulp + 1 rounding, cos/sin 2 ulp, the product 1 rounding: ~7 ulp = 2^-20.2; bound 2^-19."""

_M32 = 0xFFFFFFFF
_PHILOX_A, _PHILOX_B = 0xD2511F53, 0xCD9E8D57  # round multipliers (Triton's philox_impl)
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_U32 = jnp.uint32
_F32 = jnp.float32
# fp32 constants exactly as the kernel rounds its Python-float constexprs
_kv = lambda c: getattr(c, "value", c)  # noqa: E731 - the kernel module's tl.constexpr constants
_TWO_M32 = np.float32(_kv(_k._TWO_M32))
_TWO_PI_M24 = np.float32(_kv(_k._TWO_PI_M24))
_HALF_TURN = int(_kv(_k._HALF_TURN))
# k * 32 ln 2 for k = 0..3, each rounded like the kernel's fp32 product k * _LN2_X32 (a table, so
# XLA cannot contract the product into the subtraction that follows)
_K_LN2_X32 = tuple(np.float32(k) * np.float32(_kv(_k._LN2_X32)) for k in range(4))


# ----------------------------------------------------------------------------- fp32 exactness
def fp32_exact(x):
    """x, rounded to fp32 *here*: keeps XLA (whose CPU and GPU backends contract a*b + c into an
    FMA) from fusing the product x into the add that consumes it, as the Triton interpreter and
    torch do not. The guard is an integer OR of x's bits with isnan(x): a no-op for every value
    (a NaN stays a NaN), but opaque to the compiler."""
    bits = lax.bitcast_convert_type(x, _U32)
    return lax.bitcast_convert_type(bits | (x != x).astype(_U32), _F32)


def div_rn(a, s):
    """a / s, IEEE-rounded, for an array a and a scalar s. XLA rewrites a / broadcast(s) into
    a * (1 / s) (two roundings); the divisor here carries an elementwise guard that is a no-op for
    every value (isnan(a): a NaN numerator gives NaN either way) but keeps it a true division."""
    a = jnp.asarray(a, _F32)
    d = jnp.broadcast_to(jnp.asarray(s, _F32), a.shape)
    d = lax.bitcast_convert_type(lax.bitcast_convert_type(d, _U32) | (a != a).astype(_U32), _F32)
    return a / d


def _libm() -> str:
    """The resolved LIBM: "xla", "numpy", or "host" (= numpy with ``dpprims.noise_cpu`` available:
    the whole generator in one host callback, the same numbers ~10x faster than XLA's Philox)."""
    p = str(LIBM).strip().lower()
    if p not in LIBMS:
        raise ValueError(f"dpprims.bindings.jax.noise.LIBM must be one of {LIBMS}, got {LIBM!r}")
    if p == "auto":
        p = "numpy" if jax.default_backend() == "cpu" else "xla"
    if p == "numpy" and _ncpu.available():
        return "host"
    return p


def _log_cos_sin(v, theta, libm: str):
    """float32 (log v, cos theta, sin theta) from numpy (host callback) or XLA."""
    if libm == "xla":
        return jnp.log(v), jnp.cos(theta), jnp.sin(theta)

    def host(v, th):
        v, th = np.asarray(v, np.float32), np.asarray(th, np.float32)
        return np.log(v), np.cos(th), np.sin(th)

    sds = (jax.ShapeDtypeStruct(v.shape, _F32), jax.ShapeDtypeStruct(theta.shape, _F32),
           jax.ShapeDtypeStruct(theta.shape, _F32))
    return jax.pure_callback(host, sds, v, theta, vmap_method="broadcast_all")


# ----------------------------------------------------------------------------- runtime scalars
def _is_traced(v) -> bool:
    return isinstance(v, jax.core.Tracer)


def as_seed_array(seed):
    """int32[2] seed words [low, high] from a Python int in [0, 2^64) or an int32/uint32 array of 2
    elements (bit patterns; a traced array is taken as is)."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jnp.asarray(np.array(_nz.seed_words(int(seed)), dtype=np.int32))
    s = jnp.asarray(seed)
    if s.size != 2 or s.dtype not in (jnp.int32, jnp.uint32):
        raise ValueError(f"a seed array must be int32[2] (low, high word), got {s.dtype}{list(s.shape)}")
    s = s.reshape(2)
    return lax.bitcast_convert_type(s, jnp.int32) if s.dtype == jnp.uint32 else s


def as_step_array(step):
    """int32[1] step from a Python int in [0, 2^31) or a one-element integer array (cast to int32;
    a traced step cannot be range-checked: 0 <= step < 2^31 is then the caller's contract)."""
    if isinstance(step, (int, np.integer)) and not isinstance(step, bool):
        _nz.check_step(int(step))
        return jnp.asarray(np.array([int(step)], dtype=np.int32))
    s = jnp.asarray(step)
    if s.size != 1 or not jnp.issubdtype(s.dtype, jnp.integer):
        raise ValueError(f"a step array must be an integer array with one element, got {s.dtype}{list(s.shape)}")
    if not _is_traced(s):
        _nz.check_step(int(np.asarray(s).reshape(())))
    return s.reshape(1).astype(jnp.int32)


def _f32_scalar(v, name: str):
    if _is_traced(v) or isinstance(v, (jax.Array, np.ndarray)):
        a = jnp.asarray(v)
        if a.size != 1:
            raise ValueError(f"{name} must be a scalar, got shape {a.shape}")
        return a.reshape(()).astype(_F32)
    return jnp.asarray(np.float32(float(v)))


def noise_scalars(std, normaliser):
    """The fp32[2] [std, normaliser] array the kernel reads (values may be traced). Concrete values
    are checked: std >= 0, normaliser > 0 (both finite)."""
    for name, v, ok in (("std", std, lambda x: x >= 0), ("normaliser", normaliser, lambda x: x > 0)):
        if not _is_traced(v):
            f = float(np.asarray(v).reshape(()))
            if not (math.isfinite(f) and ok(f)):
                raise ValueError(f"{name} must be finite and {'>= 0' if name == 'std' else '> 0'}, got {f!r}")
    return jnp.stack([_f32_scalar(std, "std"), _f32_scalar(normaliser, "normaliser")])


# ----------------------------------------------------------------------------- jnp generator
def _mulhilo(a: int, b):
    """(hi, lo) 32-bit words of the 64-bit product a * b, a a uint32 constant, b a uint32 array,
    in uint32 arithmetic only (16-bit limbs): no x64 mode needed."""
    al, ah = np.uint32(a & 0xFFFF), np.uint32(a >> 16)
    bl, bh = b & np.uint32(0xFFFF), b >> np.uint32(16)
    ll, lh, hl, hh = al * bl, al * bh, ah * bl, ah * bh  # each < 2^32
    mid = (ll >> 16) + (lh & np.uint32(0xFFFF)) + (hl & np.uint32(0xFFFF))  # < 3 * 2^16
    hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    return hi, b * np.uint32(a)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 arrays (counter words c0..c3 broadcastable to one shape, key words
    k0, k1 scalars); operation for operation triton's ``tl.philox_impl``. Returns the four uint32
    output words. The ten rounds are a ``fori_loop``: unrolled, XLA's loop fusion recomputes the
    shared 16-bit limbs and both compiles and runs several times slower."""
    words = [jnp.asarray(w) for w in (c0, c1, c2, c3)]
    shape = jnp.broadcast_shapes(*(w.shape for w in words))
    words = [jnp.broadcast_to(_as_u32(w), shape) for w in words]
    k0, k1 = _as_u32(jnp.asarray(k0)), _as_u32(jnp.asarray(k1))

    def round_(_, st):
        c0, c1, c2, c3, k0, k1 = st
        hi_b, lo_b = _mulhilo(_PHILOX_B, c2)
        hi_a, lo_a = _mulhilo(_PHILOX_A, c0)
        return hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a, k0 + np.uint32(_KEY_A), k1 + np.uint32(_KEY_B)

    return lax.fori_loop(0, 10, round_, (*words, k0, k1))[:4]


def _as_u32(w):
    if w.dtype == _U32:
        return w
    if w.dtype == jnp.int32:
        return lax.bitcast_convert_type(w, _U32)
    return w.astype(_U32)


def normal_pair_from_words_jnp(w0, w1, w2, w3, x0, *, libm=None):
    """kernels/noise.py::_normal_pair_from_words in jnp (uint32 words): fp32 (z0, z1). libm:
    "numpy" | "xla" (default: from ``LIBM``)."""
    nz0, nz1, nz2 = w0 != 0, w1 != 0, w2 != 0
    hi = jnp.where(nz0, w0, jnp.where(nz1, w1, jnp.where(nz2, w2, x0)))
    lo = jnp.where(nz0, w1, jnp.where(nz1, w2, x0))
    last = ~(nz0 | nz1 | nz2)  # k == 3
    k_ln2 = jnp.where(nz0, _K_LN2_X32[0], jnp.where(nz1, _K_LN2_X32[1], jnp.where(nz2, _K_LN2_X32[2],
                                                                                    _K_LN2_X32[3])))
    hi_f = hi.astype(_F32) + jnp.where(last, np.float32(1.0), np.float32(0.0))
    lo_f = jnp.where(last, np.float32(0.0), lo.astype(_F32) + np.float32(1.0))
    v = (hi_f + lo_f * _TWO_M32) * _TWO_M32  # lo_f * 2^-32 is exact: an FMA here changes nothing
    theta = ((w3 >> 8).astype(jnp.int32) - np.int32(_HALF_TURN)).astype(_F32) * _TWO_PI_M24
    log_v, cos_t, sin_t = _log_cos_sin(v, theta, libm or _libm())
    neg_log_u = k_ln2 - log_v
    rho = jnp.sqrt(jnp.maximum(neg_log_u + neg_log_u, np.float32(0.0)))  # IEEE sqrt, as sqrt_rn
    return rho * cos_t, rho * sin_t


def _seed_u32(seed):
    s = lax.bitcast_convert_type(seed.reshape(2), _U32)
    return s[0], s[1]


def gaussian_noise_jnp(n: int, seed, step, pair_offset: int, rank: int):
    """z (fp32 [n]) in plain jnp: the kernel's numbers (see the module docstring for exactness).
    seed int32[2], step int32[1] (arrays, may be traced); pair_offset, rank ints. One compiled
    computation per (n, LIBM): pair_offset and rank are runtime words, so eager calls for many
    parameters of one size compile once (under an outer jit it is inlined)."""
    n, pair_offset = int(n), int(pair_offset)
    _nz.check_pair_range(pair_offset, n)
    words = noise_words(pair_offset, rank)
    n_pairs = (n + 1) // 2
    if n_pairs == 0:
        return jnp.zeros((0,), _F32)
    if n_pairs > 2**32:
        raise ValueError(f"the jnp noise path draws at most 2^32 pairs per call, got {n_pairs}")
    return _noise_z(seed, step, words, n=n, libm=_libm())


def noise_words(pair_offset: int, rank: int):
    """uint32[3] (pair_offset low word, high word, stream_word(rank)): the per-parameter counter
    words of the jnp path, as one runtime array."""
    pair_offset = int(pair_offset)
    return np.array([pair_offset & _M32, pair_offset >> 32, _nz.stream_word(rank)], dtype=np.uint32)


@functools.partial(jax.jit, static_argnames=("n", "libm"))
def _noise_z(seed, step, words, *, n: int, libm: str):
    if libm == "host":
        return _noise_z_host(seed, step, words, n)
    n_pairs = (n + 1) // 2
    k0, k1 = _seed_u32(seed)
    c2 = lax.bitcast_convert_type(step.reshape(1)[0].astype(jnp.int32), _U32)
    # 64-bit pair index P = pair_offset + j as two uint32 words (carry by comparison)
    j = lax.iota(_U32, n_pairs)
    c0 = j + words[0]
    c1 = (c0 < j).astype(_U32) + words[1]
    c3 = jnp.broadcast_to(words[2], (n_pairs,))
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    need = (w0 == 0) & (w1 == 0)  # the fourth word of u is read only then (probability 2^-64)

    def extension(_):
        x0 = philox4x32_10(c0, c1, c2, c3 | np.uint32(_nz.SUB_EXTENSION), k0, k1)[0]
        return jnp.where(need, x0, np.uint32(0))

    x0 = lax.cond(jnp.any(need), extension, lambda _: jnp.zeros_like(w0), None)
    z0, z1 = normal_pair_from_words_jnp(w0, w1, w2, w3, x0, libm=libm)
    return jnp.stack([z0, z1], axis=-1).reshape(-1)[:n]  # element 2j <- z0[j], 2j+1 <- z1[j]


try:  # in place on XLA's buffers from Python (JAX >= 0.7; experimental API)
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # pragma: no cover
    _buffer_callback = None

BUFFER_NOISE = os.environ.get("DPPRIMS_JAX_BUFFER_NOISE", "1").strip() != "0"
"""The host noise writes into XLA's output buffer (``buffer_callback``) instead of returning an
array that ``pure_callback`` copies (``DPPRIMS_JAX_BUFFER_NOISE=0``: pure_callback). Same numbers."""


def _threads(n: int):
    """Threads of a host draw of n elements: 1 below dpprims.noise_cpu.THREADED_MIN (the callback
    overlaps XLA's clipping pass, whose threads hold the cores), else noise_cpu's default. The
    numbers never depend on it."""
    return 1 if n < _ncpu.THREADED_MIN else None


def _noise_z_host(seed, step, words, n: int):
    """_noise_z through ``dpprims.noise_cpu`` (numba Philox + numpy's float32 libm, as the torch plain
    path): one ``pure_callback``, bit for bit the interpreter's kernel."""

    def host(seed, step, words):
        k0, k1 = (int(w) & _M32 for w in np.asarray(seed).reshape(-1)[:2])
        st = int(np.asarray(step).reshape(-1)[0]) & _M32
        w = [int(x) for x in np.asarray(words).reshape(-1)[:3]]
        return _ncpu.gaussian_noise(n, k0, k1, st, w[2], w[0] | (w[1] << 32), threads=_threads(n))

    if _buffer_callback is None or not BUFFER_NOISE:  # pragma: no cover - older JAX
        return jax.pure_callback(host, jax.ShapeDtypeStruct((n,), _F32), seed, step, words, vmap_method="sequential")

    def host_into(ctx, out, seed, step, words):
        # z straight into XLA's output buffer: no result copy (pure_callback copies what it returns)
        del ctx
        k0, k1 = (int(w) & _M32 for w in np.asarray(seed).reshape(-1)[:2])
        st = int(np.asarray(step).reshape(-1)[0]) & _M32
        w = [int(x) for x in np.asarray(words).reshape(-1)[:3]]
        _ncpu.gaussian_noise(n, k0, k1, st, w[2], w[0] | (w[1] << 32), out=np.asarray(out),
                             threads=_threads(n))

    return _buffer_callback(host_into, jax.ShapeDtypeStruct((n,), _F32), vmap_method="sequential")(seed, step, words)


# ----------------------------------------------------------------------------- the op
def _shape_dtype(shape_or_like, x, dtype):
    if isinstance(shape_or_like, (int, np.integer)):
        shape, like_dtype = (int(shape_or_like),), None
    elif isinstance(shape_or_like, (tuple, list)):
        shape, like_dtype = tuple(int(s) for s in shape_or_like), None
    else:
        like = shape_or_like
        shape, like_dtype = tuple(like.shape), jnp.dtype(like.dtype)
        if not jnp.issubdtype(like_dtype, jnp.floating):
            like_dtype = None
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    if x is not None:
        if tuple(x.shape) != shape:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected {shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"x must be a floating-point array, got {x.dtype}")
        out_dtype = jnp.dtype(x.dtype)
    else:
        out_dtype = jnp.dtype(dtype) if dtype is not None else (like_dtype or jnp.dtype(_F32))
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise ValueError(f"the noise dtype must be floating point, got {out_dtype}")
    return shape, out_dtype


def gaussian_noise(shape_or_like, *, std=1.0, seed, step, pair_offset: int = 0, rank: int = 0, normaliser=1.0,
                   x=None, dtype=None):
    """(x + std z) / normaliser, or std z / normaliser without x; z ~ N(0, 1) from dpprims'
    generator (|z| <= 13.32; extra delta of the truncation: dpprims.noise.truncation_delta_bound).

    shape_or_like: an int (flat), a shape tuple, or an array (its shape, and its dtype if floating).
    std, normaliser: floats or scalar arrays (traced under jit is fine: one fp32 runtime array);
        concrete values must have std >= 0, normaliser > 0.
    seed: int in [0, 2^64) or int32[2] array; step: int in [0, 2^31) or a one-element int array.
    pair_offset: this array's first noise-pair index (dpprims.noise.pair_offsets), static;
    rank: process rank (< 2^20), static. x: optional floating array of the same shape.
    dtype: result dtype (default: x's, else the like-array's, else float32); arithmetic is fp32,
        rounded to nearest even on the final cast.

    Element e of the (row-major flattened) result uses pair pair_offset + e // 2 (z0 for even e,
    z1 for odd). The same arguments give the same numbers on every path and in the torch ops.
    Never reuse (seed, step, rank) with overlapping pair ranges for two noise draws. Works under
    jit; not differentiable (like every dpprims JAX op). Zero-size shapes give an empty array.
    """
    shape, out_dtype = _shape_dtype(shape_or_like, x, dtype)
    n = math.prod(shape)
    _nz.check_pair_range(pair_offset, n)
    stream = _nz.stream_word(rank)
    seed_a, step_a, scal = as_seed_array(seed), as_step_array(step), noise_scalars(std, normaliser)
    if n == 0:
        return jnp.zeros(shape, out_dtype)
    static = dict(n=n, pair_offset=int(pair_offset), rank=int(rank), stream=stream, out_dtype=out_dtype)
    if x is None:
        out = nondifferentiable("gaussian_noise", _noise_only, seed_a, step_a, scal, **static)
    else:
        out = nondifferentiable("gaussian_noise", _noise_plus_x, jnp.asarray(x).reshape(-1), seed_a, step_a, scal,
                                **static)
    return out.reshape(shape)


def _noise_only(seed, step, scal, **static):
    return _noise(None, seed, step, scal, **static)


def _noise_plus_x(x, seed, step, scal, **static):
    return _noise(x, seed, step, scal, **static)


def _noise(x, seed, step, scal, *, n, pair_offset, rank, stream, out_dtype):
    def plain(x, seed, step, scal):
        return _noise_jnp(x, seed, step, scal, noise_words(pair_offset, rank), n=n, out_dtype=out_dtype,
                          libm=_libm())

    def kernel(path, x, seed, step, scal):
        spec = _k.gaussian_noise_spec(n)
        call = KernelCall(
            _k._gaussian_noise_kernel, spec.grid,
            inputs=dict(x_ptr=x if x is not None else jnp.zeros((1,), _F32),  # HAS_X=False: never read
                        seed_ptr=seed, step_ptr=step, scal_ptr=scal, n_elements=n, pair_offset=pair_offset,
                        stream_word=stream),
            outputs=dict(out_ptr=jax.ShapeDtypeStruct((n,), out_dtype)),
            constexprs=dict(spec.constexprs, HAS_X=x is not None), num_warps=spec.num_warps,
            name="gaussian_noise")
        return launch(call, path)["out_ptr"]

    return dispatch("gaussian_noise", (x, seed, step, scal), plain, kernel)


@functools.partial(jax.jit, static_argnames=("n", "out_dtype", "libm"))
def _noise_jnp(x, seed, step, scal, words, *, n, out_dtype, libm):
    """The kernel's (x + std z) / normaliser in jnp (x None: std z / normaliser)."""
    g = fp32_exact(scal[0] * _noise_z(seed, step, words, n=n, libm=libm))
    if x is not None:
        g = x.astype(_F32) + g
    return div_rn(g, scal[1]).astype(out_dtype)


# ----------------------------------------------------------------------------- diagnostics
def _u32_rows(a, rows: int, what: str):
    """[rows, n] uint32 from an integer array holding uint32 values (numpy int64 values are
    reduced mod 2^32 on the host; jax arrays must be int32 / uint32 bit patterns)."""
    if isinstance(a, np.ndarray) or isinstance(a, (list, tuple)):
        a = np.asarray(a)
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{what} must be integers, got {a.dtype}")
        a = jnp.asarray((a.astype(np.int64) & _M32).astype(np.uint32))
    a = jnp.asarray(a)
    if a.ndim != 2 or a.shape[0] != rows:
        raise ValueError(f"{what} must be [{rows}, n], got shape {a.shape}")
    if a.dtype == jnp.int32:
        a = lax.bitcast_convert_type(a, _U32)
    if a.dtype != _U32:
        raise ValueError(f"{what} must be uint32 or int32 bit patterns, got {a.dtype}")
    return a


def philox4x32_words(seed, counters):
    """Raw Philox4x32-10 output words (uint32 [4, n]) of counters (uint32 [4, n]: c0..c3) under
    ``seed`` (int or int32[2]); jnp or kernel (``_philox_words_kernel``) per the path."""
    ctr = _u32_rows(counters, 4, "counters")
    seed_a = as_seed_array(seed)
    n = ctr.shape[1]
    path = record("philox4x32_words")
    if n == 0:
        return jnp.zeros((4, 0), _U32)
    if path == "jnp":
        k0, k1 = _seed_u32(seed_a)
        return jnp.stack(philox4x32_10(ctr[0], ctr[1], ctr[2], ctr[3], k0, k1))
    spec = _k.words_spec(n)
    call = KernelCall(_k._philox_words_kernel, spec.grid,
                      inputs=dict(seed_ptr=seed_a, ctr_ptr=lax.bitcast_convert_type(ctr, jnp.int32).reshape(-1),
                                  n=n),
                      outputs=dict(out_ptr=jax.ShapeDtypeStruct((4 * n,), jnp.int32)),
                      constexprs=dict(spec.constexprs), num_warps=spec.num_warps, name="philox4x32_words")
    return lax.bitcast_convert_type(launch(call, path)["out_ptr"].reshape(4, n), _U32)


def normal_pair_from_words(words):
    """Box-Muller of given words (uint32 [5, n]: w0, w1, w2, w3, x0) -> fp32 [2, n] (z0, z1);
    jnp or kernel (``_normal_from_words_kernel``) per the path. All-zero w0..w2, x0 give
    u = 2^-128 and the largest radius sqrt(256 ln 2) = 13.3209 (theta = 0 at w3 = 2^31)."""
    w = _u32_rows(words, 5, "words")
    n = w.shape[1]
    path = record("normal_pair_from_words")
    if n == 0:
        return jnp.zeros((2, 0), _F32)
    if path == "jnp":
        return jnp.stack(normal_pair_from_words_jnp(w[0], w[1], w[2], w[3], w[4]))
    spec = _k.words_spec(n)
    call = KernelCall(_k._normal_from_words_kernel, spec.grid,
                      inputs=dict(words_ptr=lax.bitcast_convert_type(w, jnp.int32).reshape(-1), n=n),
                      outputs=dict(out_ptr=jax.ShapeDtypeStruct((2 * n,), _F32)),
                      constexprs=dict(spec.constexprs), num_warps=spec.num_warps, name="normal_pair_from_words")
    return launch(call, path)["out_ptr"].reshape(2, n)
