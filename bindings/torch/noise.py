"""torch ops for dpprims' Gaussian noise (kernels/noise.py; contract and tail analysis in
dpprims/noise.py).

Ops (torch.library.custom_op, with fake implementations for torch.compile):

* ``dpprims::gaussian_noise(x, seed, step, scal, pair_offset, rank, add_x) -> Tensor``
  out = (x + std z) / normaliser if add_x else std z / normaliser, shape/dtype/device of x.
* ``dpprims::add_gaussian_noise_(x, seed, step, scal, pair_offset, rank) -> ()``: the same, in place.

seed: int32[2] (the 64-bit seed's low/high words), step: int32[1], scal: fp32[>=2] = [std,
normaliser, ...] - device arrays, so a new step needs no recompile. Backends (``_backend.record``):
the Triton kernel for CUDA tensors and for CPU tensors under TRITON_INTERPRET=1, else the plain path:
``dpprims.noise_cpu`` when numba is installed (vectorised Philox, the kernel's epilogue fused, about
torch.randn's speed), otherwise a plain-torch Philox4x32-10 + the same Box-Muller in int64 / fp32
torch arithmetic (30-50x slower). Both give Philox words equal to the kernel's bit for bit, and on
CPU normals equal to the interpreter's bit for bit too (they take float32 log/cos/sin from numpy,
as the interpreter does). Compiled GPU kernels may use the
fast transcendental approximations: their normals agree with these to about 1e-6 (relative).

Helpers: :func:`gaussian_noise` (fresh noise), :func:`add_gaussian_noise_`, :func:`noisy_grads`
(the non-fused DP step: (clipped sum + sigma C z) / (q N) for a list of parameters).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dpprims import noise as _nz
from dpprims import noise_cpu as _ncpu
from dpprims.kernels import noise as _k

from ._backend import record

__all__ = [
    "gaussian_noise", "add_gaussian_noise_", "noisy_grads", "as_seed_tensor", "as_step_tensor",
    "philox4x32_words", "normal_pair_from_words", "gaussian_noise_torch",
]

_M32 = 0xFFFFFFFF
_PHILOX_A, _PHILOX_B = 0xD2511F53, 0xCD9E8D57  # round multipliers (Triton's philox_impl)
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_TWO_M32 = 2.3283064365386963e-10
_LN2_X32 = 22.18070977791825
_TWO_PI_M24 = 3.745070282923929e-07
_CHUNK_PAIRS = 1 << 20  # torch path: pairs per chunk (bounds the int64 temporaries)


# ----------------------------------------------------------------------------- device scalars
def as_seed_tensor(seed, device) -> Tensor:
    """int32[2] seed words on ``device`` from a Python int in [0, 2^64) or an int32[2] tensor."""
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int32 or seed.numel() != 2:
            raise ValueError(f"a seed tensor must be int32[2] (low, high word), got {seed.dtype}[{seed.numel()}]")
        return seed.reshape(2).to(device)
    return torch.tensor(_nz.seed_words(seed), dtype=torch.int32, device=device)


def as_step_tensor(step, device) -> Tensor:
    """int32[1] step on ``device`` from a Python int in [0, 2^31) or an int32 one-element tensor."""
    if isinstance(step, Tensor):
        if step.dtype != torch.int32 or step.numel() != 1:
            raise ValueError(f"a step tensor must be int32 with one element, got {step.dtype}[{step.numel()}]")
        return step.reshape(1).to(device)
    _nz.check_step(step)
    return torch.tensor([int(step)], dtype=torch.int32, device=device)


def _check_scalars(seed: Tensor, step: Tensor, scal: Tensor, device, n_scal: int = 2) -> None:
    for name, t, dtype, n in (("seed", seed, torch.int32, 2), ("step", step, torch.int32, 1),
                              ("scal", scal, torch.float32, n_scal)):
        if t.dtype != dtype or t.numel() < n or t.device != device or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} tensor with >= {n} elements on {device}, "
                             f"got {t.dtype}[{t.numel()}] on {t.device}")


# ----------------------------------------------------------------------------- plain torch
def _mul_hi_lo(c: int, x: Tensor):
    """High and low 32-bit words of c * x (c < 2^32 a constant, x int64 in [0, 2^32)), exactly,
    without int64 overflow: c = ch 2^16 + cl."""
    t = x * (c & 0xFFFF)  # < 2^48
    u = x * (c >> 16)  # < 2^48
    return (u + (t >> 16)) >> 16, (((u & 0xFFFF) << 16) + t) & _M32


def _philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 values; identical to triton's philox_impl."""
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def _normal_pair_from_words_torch(w0, w1, w2, w3, x0):
    """kernels/noise.py::_normal_pair_from_words in torch (int64 words in [0, 2^32))."""
    f32 = torch.float32
    nz0, nz1, nz2 = w0 != 0, w1 != 0, w2 != 0
    hi = torch.where(nz0, w0, torch.where(nz1, w1, torch.where(nz2, w2, x0)))
    lo = torch.where(nz0, w1, torch.where(nz1, w2, x0))
    one, zero = torch.ones((), dtype=f32), torch.zeros((), dtype=f32)
    k = torch.where(nz0, zero, torch.where(nz1, one, torch.where(nz2, 2 * one, 3 * one)))
    last = k == 3.0
    hi_f = hi.to(f32) + torch.where(last, one, zero)
    lo_f = torch.where(last, zero, lo.to(f32) + 1.0)
    v = (hi_f + lo_f * _TWO_M32) * _TWO_M32
    neg_log_u = k * _LN2_X32 - _ufunc(np.log, v)
    rho = _ufunc(np.sqrt, torch.clamp_min(neg_log_u + neg_log_u, 0.0))
    theta = ((w3 >> 8) - (1 << 23)).to(f32) * _TWO_PI_M24
    return rho * _ufunc(np.cos, theta), rho * _ufunc(np.sin, theta)


def _ufunc(f, t: Tensor) -> Tensor:
    # The torch path runs on CPU only (CUDA tensors always take the kernel). numpy's float32
    # log/cos/sin/sqrt are the ones Triton's interpreter uses, so CPU results match it bit for bit;
    # torch.log & co. differ in the last ulp (torch.sqrt too: not correctly rounded on this CPU).
    if t.device.type == "cpu":
        return torch.from_numpy(f(t.contiguous().numpy()))
    return getattr(torch, f.__name__)(t)


# Draws below this many elements stay on the calling thread (see dpprims.noise_cpu.THREADED_MIN).
THREADED_MIN = _ncpu.THREADED_MIN


def _cpu_threads(n: int | None = None) -> int:
    """Threads of dpprims.noise_cpu under torch for a draw of ``n`` elements: 1 below
    THREADED_MIN, else at most torch's intra-op thread count (torch.set_num_threads) and at most
    dpprims.noise_cpu.get_num_threads() (DPPRIMS_NOISE_THREADS). The numbers never depend on it."""
    return _cpu_pool(n)[0]


_TORCH_OPENMP = None  # torch's ATen parallel backend is OpenMP (read once)


def _torch_openmp() -> bool:
    global _TORCH_OPENMP
    if _TORCH_OPENMP is None:
        try:
            _TORCH_OPENMP = bool(torch.backends.openmp.is_available()) and \
                "parallel backend: OpenMP" in torch.__config__.parallel_info()
        except Exception:  # noqa: BLE001 - an unknown build: the thread path
            _TORCH_OPENMP = False
    return _TORCH_OPENMP


def _cpu_pool(n: int | None = None) -> tuple:
    """(threads, pool) of a dpprims.noise_cpu draw of ``n`` elements under torch. With torch's
    intra-op pool on OpenMP and more than one thread: pool "omp", the draw runs on torch's own
    OpenMP team (dpprims._noise_omp; the workers a step's GEMMs leave spinning take it at once),
    with as many threads as :func:`_cpu_threads` allows a large draw, whatever n. Otherwise the
    module's own threads: 1 below THREADED_MIN (a noise thread would share a core with a spinning
    torch worker), else that many. The numbers never depend on either."""
    team = max(1, min(torch.get_num_threads(), _ncpu.get_num_threads()))
    if team > 1 and _torch_openmp() and _ncpu.omp_available():
        return team, "omp"
    return (1 if n is not None and n < THREADED_MIN else team), None


def _seed_ints(seed: Tensor) -> tuple[int, int]:
    lo, hi = (int(w) & _M32 for w in seed.reshape(-1)[:2].tolist())
    return lo, hi


def gaussian_noise_torch(n: int, seed: Tensor, step: Tensor, pair_offset: int, rank: int) -> Tensor:
    """z (fp32 [n], on seed's device) computed without Triton: the same numbers as the kernel.

    On CPU with numba installed this is ``dpprims.noise_cpu`` (vectorised Philox + numpy's float32
    libm, about torch.randn's speed); otherwise plain int64 torch arithmetic (``_philox4x32_10``,
    30-50x slower). Both equal the interpreter's kernel bit for bit (tests/test_noise.py)."""
    device = seed.device
    k0, k1 = _seed_ints(seed)
    step_i = int(step.reshape(-1)[0].item()) & _M32
    if device.type == "cpu" and _ncpu.available():
        out = torch.empty(n, dtype=torch.float32)
        threads, pool = _cpu_pool(n)
        _ncpu.gaussian_noise(n, k0, k1, step_i, _nz.stream_word(rank), pair_offset, out=out.numpy(),
                             threads=threads, pool=pool)
        return out
    word3 = _nz.stream_word(rank)
    n_pairs = (n + 1) // 2
    out = torch.empty(2 * n_pairs, dtype=torch.float32, device=device)
    for start in range(0, n_pairs, _CHUNK_PAIRS):
        m = min(_CHUNK_PAIRS, n_pairs - start)
        pair = torch.arange(start, start + m, dtype=torch.int64, device=device) + int(pair_offset)
        c0, c1 = pair & _M32, pair >> 32
        c2 = torch.full_like(pair, step_i)
        c3 = torch.full_like(pair, word3)
        w0, w1, w2, w3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
        x0 = torch.zeros_like(w0)
        need = (w0 == 0) & (w1 == 0)
        if bool(need.any()):
            idx = need.nonzero().reshape(-1)
            x0[idx] = _philox4x32_10(c0[idx], c1[idx], c2[idx], c3[idx] | 1, k0, k1)[0]
        z0, z1 = _normal_pair_from_words_torch(w0, w1, w2, w3, x0)
        out[2 * start: 2 * (start + m)] = torch.stack([z0, z1], dim=-1).reshape(-1)
    return out[:n]


# ----------------------------------------------------------------------------- launch
def _launch_noise(x: Tensor, seed: Tensor, step: Tensor, scal: Tensor, pair_offset: int, rank: int,
                  add_x: bool, out: Tensor) -> None:
    if not x.is_contiguous() or not out.is_contiguous():
        raise ValueError("dpprims noise ops need contiguous tensors (no silent copies)")
    _check_scalars(seed, step, scal, x.device)
    n = x.numel()
    _nz.check_pair_range(pair_offset, n)
    backend = record("gaussian_noise", x)
    if n == 0:
        return
    if backend == "torch" and _ncpu.available() and x.device.type == "cpu" and out.dtype == torch.float32 and (
            not add_x or x.dtype == torch.float32):
        # one pass per noise chunk (dpprims.noise_cpu): the kernel's numbers and epilogue, in place
        k0, k1 = _seed_ints(seed)
        std, normaliser = scal.tolist()[:2]
        threads, pool = _cpu_pool(out.numel())
        _ncpu.scaled_noise(out.detach().numpy(), x.detach().numpy() if add_x else None, std=std,
                           normaliser=normaliser, k0=k0, k1=k1, step=int(step.reshape(-1)[0].item()) & _M32,
                           stream_word=_nz.stream_word(rank), pair_offset=pair_offset,
                           threads=threads, pool=pool)
        return
    if backend == "torch":
        z = gaussian_noise_torch(n, seed, step, pair_offset, rank).reshape(x.shape)
        g = scal[0] * z
        if add_x:
            g = x.to(torch.float32) + g
        out.copy_(g / scal[1])
        return
    spec = _k.gaussian_noise_spec(n)
    _k._gaussian_noise_kernel[spec.grid](
        x, seed, step, scal, n, int(pair_offset), _nz.stream_word(rank), out,
        HAS_X=bool(add_x), num_warps=spec.num_warps, **spec.constexprs)


@torch.library.custom_op("dpprims::gaussian_noise", mutates_args=())
def _gaussian_noise_op(x: Tensor, seed: Tensor, step: Tensor, scal: Tensor, pair_offset: int, rank: int,
                       add_x: bool) -> Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch_noise(x, seed, step, scal, pair_offset, rank, add_x, out)
    return out


@_gaussian_noise_op.register_fake
def _(x, seed, step, scal, pair_offset, rank, add_x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("dpprims::add_gaussian_noise_", mutates_args=("x",))
def _add_gaussian_noise_op(x: Tensor, seed: Tensor, step: Tensor, scal: Tensor, pair_offset: int,
                           rank: int) -> None:
    _launch_noise(x, seed, step, scal, pair_offset, rank, True, x)


@_add_gaussian_noise_op.register_fake
def _(x, seed, step, scal, pair_offset, rank):
    return None


# ----------------------------------------------------------------------------- user API
def _scal(std, normaliser, device) -> Tensor:
    if isinstance(std, Tensor) or isinstance(normaliser, Tensor):
        return torch.stack([torch.as_tensor(std, dtype=torch.float32, device=device).reshape(()),
                            torch.as_tensor(normaliser, dtype=torch.float32, device=device).reshape(())])
    return torch.tensor([float(std), float(normaliser)], dtype=torch.float32, device=device)


def gaussian_noise(like, *, std=1.0, seed, step, pair_offset: int = 0, rank: int = 0, normaliser=1.0,
                   dtype=torch.float32, device=None) -> Tensor:
    """std * z / normaliser, z ~ N(0, 1) from dpprims' generator (|z| up to 13.32).

    like: an int (numel, flat result) or a tensor (shape/dtype/device taken from it).
    seed: int in [0, 2^64) or int32[2] tensor; step: int in [0, 2^31) or int32[1] tensor;
    pair_offset: first noise-pair index (a parameter's range start, dpprims.noise.pair_offsets);
    rank: process rank (< 2^20). Same arguments, same numbers, on every backend.
    """
    if isinstance(like, Tensor):
        x = torch.empty_like(like, memory_format=torch.contiguous_format)
    else:
        x = torch.empty(int(like), dtype=dtype, device=device)
    d = x.device
    return _gaussian_noise_op(x, as_seed_tensor(seed, d), as_step_tensor(step, d), _scal(std, normaliser, d),
                              int(pair_offset), int(rank), False)


def add_gaussian_noise_(x: Tensor, *, std, seed, step, pair_offset: int = 0, rank: int = 0, normaliser=1.0) -> Tensor:
    """x <- (x + std z) / normaliser in place (x contiguous); returns x."""
    d = x.device
    _add_gaussian_noise_op(x, as_seed_tensor(seed, d), as_step_tensor(step, d), _scal(std, normaliser, d),
                           int(pair_offset), int(rank))
    return x


def noisy_grads(params, *, noise_std, normaliser, seed, step, rank: int = 0, in_place: bool = False) -> list:
    """The noised, normalised DP gradients of a parameter list (non-fused path):

        g_i = (p_i.grad + noise_std * z_i) / normaliser

    params: list of tensors whose ``.grad`` holds the clipped gradient sum (None counts as zero:
    an empty Poisson batch still gets its noise). noise_std = sigma * C, normaliser = q * N (the
    expected batch size, never the sampled one). The noise of parameter i uses pair range
    dpprims.noise.pair_offsets([p.numel() for p in params])[0][i] - the same numbers the fused
    ``add_noise_and_step`` draws for the same (seed, step, rank) and parameter list; never reuse a
    (seed, step, rank) for two different noise draws. in_place=True writes into p.grad (allocating
    it when None) and returns the .grad tensors. Guarantee: with z ~ N(0, I) and clipped sums of
    per-example norm <= C this is the Gaussian mechanism of sensitivity C, std noise_std; the
    truncation of z adds at most dpprims.noise.truncation_delta_bound(...) to delta.
    """
    params = list(params)
    if not normaliser > 0:
        raise ValueError(f"normaliser (q * N) must be > 0, got {normaliser}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    offsets, _ = _nz.pair_offsets([p.numel() for p in params])
    cache: dict = {}
    out = []
    for p, off in zip(params, offsets):
        d = p.device
        if d not in cache:
            cache[d] = (as_seed_tensor(seed, d), as_step_tensor(step, d), _scal(noise_std, normaliser, d))
        seed_t, step_t, scal = cache[d]
        g = p.grad
        if g is None:
            g = torch.zeros_like(p, memory_format=torch.contiguous_format)
            if in_place:
                p.grad = g
        if g.shape != p.shape:
            raise ValueError(f"grad shape {tuple(g.shape)} != parameter shape {tuple(p.shape)}")
        with torch.no_grad():
            if in_place:
                _add_gaussian_noise_op(g, seed_t, step_t, scal, off, int(rank))
                out.append(g)
            else:
                out.append(_gaussian_noise_op(g, seed_t, step_t, scal, off, int(rank), True))
    return out


# ----------------------------------------------------------------------------- diagnostics
def philox4x32_words(seed, counters: Tensor) -> Tensor:
    """Raw Philox4x32-10 words (int64 [4, n], values in [0, 2^32)) of counters (int64 [4, n],
    uint32 values) under ``seed``; kernel or torch path per ``_backend``."""
    counters = counters.to(torch.int64)
    n = counters.shape[1]
    seed_t = as_seed_tensor(seed, counters.device)
    if record("philox4x32_words", counters) == "torch":
        k0, k1 = _seed_ints(seed_t)
        if counters.device.type == "cpu" and _ncpu.available():
            ctr = (counters & _M32).numpy().astype(np.uint32)
            return torch.from_numpy(_ncpu.philox_words(*ctr, k0, k1).astype(np.int64))
        return torch.stack(_philox4x32_10(*(counters[i] & _M32 for i in range(4)), k0, k1))
    ctr32 = (counters & _M32).to(torch.int64)
    ctr32 = torch.where(ctr32 >= 2**31, ctr32 - 2**32, ctr32).to(torch.int32).contiguous()
    out = torch.full((4, n), -1, dtype=torch.int32, device=counters.device)
    spec = _k.words_spec(n)
    _k._philox_words_kernel[spec.grid](seed_t, ctr32, n, out, num_warps=spec.num_warps, **spec.constexprs)
    return out.to(torch.int64) & _M32


def normal_pair_from_words(words: Tensor) -> Tensor:
    """Box-Muller of given words (int64 [5, n]: w0, w1, w2, w3, x0 as uint32 values) -> fp32
    [2, n]; kernel or torch path per ``_backend``. u = (w0 2^96 + w1 2^64 + w2 2^32 + x0 + 1)
    2^-128, so all-zero words give the largest |z| = sqrt(256 ln 2) (theta = 0 at w3 = 2^31)."""
    words = words.to(torch.int64) & _M32
    n = words.shape[1]
    if record("normal_pair_from_words", words) == "torch":
        if words.device.type == "cpu" and _ncpu.available():
            return torch.from_numpy(_ncpu.normal_pairs_from_words(words.numpy().astype(np.uint32)))
        return torch.stack(_normal_pair_from_words_torch(*(words[i] for i in range(5))))
    w32 = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()
    out = torch.full((2, n), float("nan"), dtype=torch.float32, device=words.device)
    spec = _k.words_spec(n)
    _k._normal_from_words_kernel[spec.grid](w32, n, out, num_warps=spec.num_warps, **spec.constexprs)
    return out
