"""dpprims' Gaussian noise generator on a CPU: numpy + numba, the kernel's numbers bit for bit.

The generator, its RNG contract and its tail guarantee are those of :mod:`dpprims.noise` (Philox4x32-10,
128-bit uniform, Box-Muller, |z| <= sqrt(256 ln 2) = 13.3209); this module only evaluates it fast on a
CPU, for the torch plain path (``dpprims.bindings.torch.noise`` / ``.update``) and the JAX jnp path on
a CPU (``dpprims.bindings.jax.noise``, through one ``jax.pure_callback``). Framework-neutral: imports
numpy, and numba when installed.

Per chunk of pairs (``CHUNK_PAIRS``, sized for the L2 cache):

1. ``_prep`` (numba, one vectorised loop): the Philox words of each pair (32 x 32 -> 64-bit products
   in uint64, exact), the word selection of kernels/noise.py::_normal_pair_from_words, and from it the
   fp32 values v, theta and k * 32 ln 2 - the kernel's operations in the kernel's order, IEEE fp32,
   no FMA contraction (numba's default, fastmath off);
2. numpy's float32 ``log(v)``, ``cos(theta)``, ``sin(theta)`` - the very ufuncs Triton's interpreter
   evaluates ``tl.log`` / ``tl.cos`` / ``tl.sin`` with, so the result equals the interpreter's bit
   for bit (numba's own log/cos/sin would not);
3. ``_finish`` (numba): rho = sqrt(max(2 (k 32 ln 2 - log v), 0)) (IEEE sqrt, = ``tl.sqrt_rn``),
   z0 = rho cos theta, z1 = rho sin theta, interleaved (element 2j <- z0 of pair j, 2j+1 <- z1).
   The fused updates (:func:`noisy_update`, :func:`noisy_update_many`) never write z: per chunk,
   rho in place (``rho_inplace``), then ``sgd_update_pairs`` / ``adam_update_pairs`` form
   rho cos / rho sin in registers and apply the update (the same multiplies, the same numbers;
   0.49 vs 0.58 ms for the default MLP's 203,530 parameters, SGD momentum, on the 2-core machine).

The fourth word of u (first word x0 of the extension block, counter word 3 | 1) matters only when
w0 == w1 == 0 (probability 2^-64 per pair). Step 1 flags those pairs and counts them; for a nonzero
count :func:`_fix_extension` recomputes exactly those pairs with x0 (Philox of the extension counter
and the same word selection), so no branch slows the common loop and the rare case stays exact.

Threads: a draw of at least ``2 * MIN_PAIRS_PER_THREAD`` pairs is split into contiguous pair ranges of at
most ``CHUNK_PAIRS`` pairs, which the caller's thread and a module-level pool take from a shared
counter (dynamic: a thread without a core on a loaded machine does not hold the draw up). Every pair's numbers
depend only on its counter (Philox is counter-based) and every epilogue is elementwise, so the split
changes no bit of the output (tests/test_noise_parallel.py checks it against ``threads=1``). The
numba functions release the GIL (``nogil=True``) and so do numpy's float32 ufuncs, so the threads
run in parallel without numba's threading layer (no TBB / OpenMP needed: a plain pip install
works, and the on-disk cache of the serial functions is unchanged). The thread count is the
``threads`` argument of each function, else :func:`get_num_threads`: ``DPPRIMS_NOISE_THREADS`` if
set, else the CPUs this process may run on (:func:`set_num_threads` overrides both). The torch
binding passes ``min(torch.get_num_threads(), get_num_threads())``; both bindings draw fewer than
``THREADED_MIN`` elements on the calling thread (inside a training step the framework's threads hold
the cores).

``pool="omp"`` (what the torch binding passes where torch's intra-op pool is OpenMP) runs the draw
on the process's OpenMP team instead: dpprims._noise_omp, one parallel region whose tasks run this
pipeline's own kernels and numpy's own float32 log / cos / sin loops, on the workers torch's GEMMs
leave spinning, whatever the draw's size. The same numbers (tests/test_noise_omp.py).

Without numba, :func:`available` is False and callers use their own framework path (the same numbers,
about 30-50x slower): nothing here is required for correctness.
"""
from __future__ import annotations

import logging
import os
import threading

import numpy as np

from dpprims import noise as _nz

log = logging.getLogger("dpprims")

__all__ = ["available", "gaussian_noise", "scaled_noise", "noisy_update", "noisy_update_many",
           "normal_pairs_from_words", "philox_words", "CHUNK_PAIRS", "MIN_PAIRS_PER_THREAD", "THREADED_MIN",
           "get_num_threads", "set_num_threads"]

CHUNK_PAIRS = 1 << 14  # pairs per chunk: 6 fp32 scratch arrays of 64 KiB, in L2 on every current CPU
# a thread gets at least this many pairs (~40-80 us of work on the project's CPUs): below it the
# hand-off to the pool (~10-30 us) would eat the gain, so small parameters (biases) stay serial
MIN_PAIRS_PER_THREAD = 1 << 13
# Framework bindings draw below this many elements on the calling thread (threads=1): inside a
# training step the framework's own workers (torch's intra-op OpenMP threads, still spinning after
# the step's GEMMs; XLA's CPU threads running the clipping pass the noise callback overlaps) hold
# both cores, and a noise pool thread competing with them cost more than it saved (default MLP,
# 203k parameters, 2-core machine: torch DP step 3.1 -> 2.45 ms, JAX 3.1-4.1 -> 2.6-3.4 ms with one
# thread); a draw of millions of elements gains from the split (11M: bench/noise_cpu.py).
THREADED_MIN = 1 << 21

_M32 = 0xFFFFFFFF
_PHILOX_A, _PHILOX_B = 0xD2511F53, 0xCD9E8D57  # round multipliers (Triton's philox_impl)
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
# fp32 constants exactly as the kernel rounds its Python-float constexprs (kernels/noise.py)
_TWO_M32 = np.float32(2.3283064365386963e-10)
_TWO_PI_M24 = np.float32(3.745070282923929e-07)
_HALF_TURN = 8388608
_K_LN2 = tuple(np.float32(k) * np.float32(22.18070977791825) for k in range(4))  # fp32 k * (32 ln 2)

_FORCE_EXTENSION = None  # tests only: (mask, value): pairs with (c0 & mask) == value get w0 = w1 = 0
_jit = None  # the compiled functions: None (not loaded yet), False (no numba), or a dict


def available() -> bool:
    """True when numba is importable (then the fast CPU generator runs). ``DPPRIMS_NOISE_CPU=0``
    switches it off (the framework paths then run: the same numbers, slower). The first call loads
    numba and the compiled functions (from numba's on-disk cache after the first run): about 1-3 s
    once per process on a 2-core machine. (Loading in a background thread while the first steps
    take the framework path was tried: numba's load holds the GIL and starved those steps.)"""
    if os.environ.get("DPPRIMS_NOISE_CPU", "1").strip() == "0":
        return False
    return _compiled() is not None


def _compiled():
    global _jit
    if _jit is None:
        try:
            _jit = _build()
        except ImportError:
            log.info("numba is not installed: dpprims' CPU noise falls back to plain torch / jnp (slower)")
            _jit = False
    return _jit or None


def _build():
    from . import _noise_numba as k

    return dict(prep=k.prep, prep_forced=k.prep_forced, fix_extension=k.fix_extension, finish=k.finish,
                words=k.words, select_all=k.select_all, sgd_update=k.sgd_update, adam_update=k.adam_update,
                rho_inplace=k.rho_inplace, sgd_update_pairs=k.sgd_update_pairs,
                sgd_update_pairs_nobuf=k.sgd_update_pairs_nobuf,
                adam_update_pairs=k.adam_update_pairs,
                scale_into=k.scale_into)


_threads_override = None  # set_num_threads
_pool = None  # (pid, ThreadPoolExecutor): recreated after a fork (a forked child has no pool threads)
_pool_lock = threading.Lock()


def get_num_threads() -> int:
    """Threads the generator uses when a call passes no ``threads``: :func:`set_num_threads`'s value,
    else ``DPPRIMS_NOISE_THREADS`` (a positive integer), else the number of CPUs this process may run
    on (``os.sched_getaffinity``). The numbers never depend on it."""
    if _threads_override is not None:
        return _threads_override
    env = os.environ.get("DPPRIMS_NOISE_THREADS", "").strip()
    if env:
        try:
            t = int(env)
        except ValueError:
            t = 0
        if t < 1:
            raise ValueError(f"DPPRIMS_NOISE_THREADS must be a positive integer, got {env!r}")
        return t
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_num_threads(threads) -> None:
    """Set the default thread count of the generator (``None``: back to :func:`get_num_threads`'s
    environment / CPU default)."""
    global _threads_override
    if threads is not None and (not isinstance(threads, (int, np.integer)) or int(threads) < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    _threads_override = None if threads is None else int(threads)


def _resolve_threads(threads) -> int:
    if threads is None:
        return get_num_threads()
    if not isinstance(threads, (int, np.integer)) or int(threads) < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    return int(threads)


def _executor(workers: int):
    global _pool
    from concurrent.futures import ThreadPoolExecutor

    with _pool_lock:
        pid = os.getpid()
        if _pool is None or _pool[0] != pid or _pool[1]._max_workers < workers:
            if _pool is not None and _pool[0] == pid:
                _pool[1].shutdown(wait=False)
            _pool = (pid, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dpprims-noise"))
        return _pool[1]


def _split(n: int, threads) -> tuple:
    """(workers, [(lo, hi)]): the element ranges (tasks) of an n-element draw and how many threads
    share them. Every lo is even (a task starts at a pair); tasks hold at most CHUNK_PAIRS pairs and
    at least MIN_PAIRS_PER_THREAD (the last may be shorter), and there are at least ``workers``."""
    n_pairs = (n + 1) // 2
    workers = min(_resolve_threads(threads), n_pairs // MIN_PAIRS_PER_THREAD)
    if workers <= 1:
        return 1, [(0, n)]
    size = max(MIN_PAIRS_PER_THREAD, min(CHUNK_PAIRS, -(-n_pairs // workers)))
    return workers, [(2 * s, min(2 * (s + size), n)) for s in range(0, n_pairs, size)]


def _run_parts(n: int, threads, fn) -> None:
    """fn(lo, hi) over the tasks of :func:`_split`, pulled from a shared counter by this thread and
    workers - 1 pool threads (dynamic scheduling: on a loaded machine a thread that gets no core
    leaves its tasks to the others instead of holding up the draw); waits for all and re-raises the
    first error (a failed task stops the others from taking new ones)."""
    import itertools

    workers, tasks = _split(n, threads)
    if workers == 1:
        fn(0, n)
        return
    counter = itertools.count()  # next() on it is atomic under the GIL
    failed = []

    def worker():
        while not failed:
            i = next(counter)
            if i >= len(tasks):
                return
            try:
                fn(*tasks[i])
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller below
                failed.append(e)
                return

    futures = [_executor(workers - 1).submit(worker) for _ in range(workers - 1)]
    try:
        worker()
    finally:
        for f in futures:  # every task has finished (or was never started) before returning
            f.result()
    if failed:
        raise failed[0]


# ----------------------------------------------------------------------------- the OpenMP team
OMP_TASK_PAIRS = 1 << 13  # pairs per task of the OpenMP path: 8 fp32 scratch arrays of 32 KiB per thread
# OpenMP runtimes that export the GCC ABI (GOMP_parallel), looked up among the libraries this
# process has ALREADY loaded (RTLD_NOLOAD): the framework's own runtime, never a second one
_OMP_LIBS = ("libgomp.so.1", "libomp.so", "libomp.so.5", "libiomp5.so", "libomp.dylib", "libiomp5.dylib")
_omp_rt = None  # None: not looked up yet; False: not available; else _OmpRuntime
_omp_lock = threading.Lock()


class _OmpRuntime:
    """GOMP_parallel and omp_get_thread_num of a loaded OpenMP runtime, the compiled region, and
    numpy's float32 log / cos / sin strided loops (their capsules kept alive here)."""

    def __init__(self, lib, name: str):
        import ctypes

        from . import _noise_omp as o

        self.o, self.name, self.pid = o, name, os.getpid()
        self.parallel = lib.GOMP_parallel
        self.parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        self.parallel.restype = None
        self.tid_fn = ctypes.cast(lib.omp_get_thread_num, ctypes.c_void_p).value
        self.region = o.region.address
        self.capsules, self.loops = [], []
        for uf in (np.log, np.cos, np.sin):
            self.loops.append(self._strided_loop(uf))

    def _strided_loop(self, uf) -> tuple:
        import ctypes

        class CallInfo(ctypes.Structure):  # numpy's ufunc_call_info (NumPy >= 1.24, experimental)
            _fields_ = [("loop", ctypes.c_void_p), ("context", ctypes.c_void_p), ("auxdata", ctypes.c_void_p),
                        ("requires_pyapi", ctypes.c_bool), ("no_floatingpoint_errors", ctypes.c_bool)]

        f32 = np.dtype(np.float32)
        dtypes, cap = uf._resolve_dtypes_and_context((f32, f32))
        if tuple(dtypes) != (f32, f32):
            raise RuntimeError(f"{uf.__name__}: float32 loop resolved to {dtypes}")
        uf._get_strided_loop(cap, fixed_strides=(4, 4))
        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        info = CallInfo.from_address(get(cap, b"numpy_1.24_ufunc_call_info"))
        if not info.loop or info.requires_pyapi:
            raise RuntimeError(f"numpy's float32 {uf.__name__} loop needs the Python API")
        self.capsules.append(cap)
        return info.loop, info.context or 0, info.auxdata or 0


def _omp_runtime():
    """The loaded OpenMP runtime's entry points and the compiled region, or None: no runtime
    loaded (a JAX-only process), ``DPPRIMS_NOISE_OMP=0``, numba or numpy's strided-loop API
    missing, or this process is a fork child of one that ran the region (GNU OpenMP's thread pool
    does not survive a fork: the child falls back to the thread path)."""
    global _omp_rt
    if os.environ.get("DPPRIMS_NOISE_OMP", "1").strip() == "0":
        return None
    rt = _omp_rt
    if rt is None:
        with _omp_lock:
            if _omp_rt is None:
                _omp_rt = _load_omp_runtime()
            rt = _omp_rt
    if rt and rt.pid != os.getpid():
        return None
    return rt or None


def _load_omp_runtime():
    import ctypes

    if _compiled() is None or not hasattr(os, "RTLD_NOLOAD"):  # only a runtime already loaded, never a new one
        return False
    mode = os.RTLD_NOLOAD | os.RTLD_LAZY
    for name in _OMP_LIBS:
        try:
            lib = ctypes.CDLL(name, mode=mode)
            lib.GOMP_parallel, lib.omp_get_thread_num  # noqa: B018 - both must exist
        except (OSError, AttributeError):
            continue
        try:
            return _OmpRuntime(lib, name)
        except Exception as e:  # noqa: BLE001 - numba / numpy APIs missing: the thread path runs
            log.info("dpprims.noise_cpu: OpenMP path unavailable (%s); using threads", e)
            return False
    return False


def _pool_runtime(pool, n: int):
    """The OpenMP runtime when ``pool == "omp"`` and it is available and there is work, else None
    (the thread path)."""
    if pool is None:
        return None
    if pool != "omp":
        raise ValueError(f"pool must be None or 'omp', got {pool!r}")
    return _omp_runtime() if n > 0 else None


def _addr(a) -> int:
    """The data address of a numpy array (0 for None)."""
    return 0 if a is None else a.__array_interface__["data"][0]


def noisy_update_rows(kind: str, rows, *, hyper, adam_scalars, nesterov: bool, k0: int, k1: int, step: int,
                      stream_word: int, threads: int) -> bool:
    """:func:`noisy_update_many` with ``pool="omp"`` for a framework binding that holds its buffers
    itself (the torch binding: ``Tensor.data_ptr()``, no numpy views: ~100 us less Python a step
    for a 4-parameter model). ``rows``: per parameter ``(pair_offset, n, param, grad, state1,
    state2, grad_out)`` with n > 0 and ADDRESSES of contiguous float32 buffers of n elements (0
    where absent: state1 for SGD without momentum, grad_out when no noisy gradient is wanted),
    which the caller has checked and keeps alive, and which no other thread touches during the
    call: nothing here can check an address. The same numbers as noisy_update_many. Returns False
    (nothing done) when the OpenMP runtime is not available; the caller then takes its other path."""
    rt = _omp_runtime()
    if rt is None:
        return False
    if kind not in ("sgd", "adam", "adamw"):
        raise ValueError(f"kind must be 'sgd', 'adam' or 'adamw', got {kind!r}")
    stream_word = int(stream_word)
    hyper12 = [np.float32(x) for x in hyper] + ([0.0] * 3 if kind == "sgd" else [np.float32(x) for x in adam_scalars])
    rows = list(rows)
    for off, n, p, g, s1, s2, _ in rows:
        _check_stream(n, off, stream_word)
        if n <= 0 or not p or not g or (kind != "sgd" and not (s1 and s2)):
            raise ValueError(f"noisy_update_rows: bad row (n = {n}; param, grad and {kind}'s state are needed)")
    _omp_runs(rt, kind, rows, [threads] * len(rows), hyper12, nesterov=bool(nesterov), k0=k0, k1=k1, step=step,
              stream_word=stream_word)
    return True


def _omp_runs(rt, kind: str, rows: list, threads: list, hyper12, *, nesterov: bool, k0: int, k1: int, step: int,
              stream_word: int) -> None:
    """:func:`_omp_run` over each run of rows ``(pair_offset, n, param, grad, state1, state2,
    grad_out)`` (addresses, checked) whose pair ranges follow each other: one region per run, on
    a team of the largest of its rows' ``threads``."""
    i = 0
    while i < len(rows):
        j, pairs = i, 0
        while j < len(rows) and rows[j][0] == rows[i][0] + pairs:
            pairs += (rows[j][1] + 1) // 2
            j += 1
        first = rows[i][0]
        _omp_run(rt, kind, [(2 * (r[0] - first),) + tuple(r[1:]) for r in rows[i:j]], first, pairs, hyper12,
                 nesterov=nesterov, k0=k0, k1=k1, step=step, stream_word=stream_word, threads=max(threads[i:j]))
        i = j


def omp_available() -> bool:
    """True when ``pool="omp"`` runs in this process's OpenMP runtime (see :func:`_omp_runtime`)."""
    return _omp_runtime() is not None


_OMP_KINDS = {"sgd": 0, "adam": 1, "adamw": 2, "z": 3, "scaled": 4}  # _noise_omp.K_*


def _omp_run(rt, kind: str, rows: list, first_pair: int, n_pairs: int, hyper12, *, nesterov: bool, k0: int, k1: int,
             step: int, stream_word: int, threads: int) -> None:
    """One parallel region over the pairs first_pair .. first_pair + n_pairs - 1 of one run of
    segments. ``rows``: per segment (first element in the run (even), length, and the addresses of
    param, grad, state1, state2, grad_out: contiguous float32 buffers of that length, 0 where
    absent), already checked by the caller; ``hyper12``: the 9 hyper values and Adam's 3 scalars
    (float32)."""
    o = rt.o
    tp = OMP_TASK_PAIRS
    n_tasks = -(-n_pairs // tp)
    threads = max(1, min(int(threads), n_tasks))
    sc = getattr(_tls, "omp_scratch", None)
    if sc is None or sc.size < threads * 6 * tp:
        sc = _tls.omp_scratch = np.empty(threads * 6 * tp, np.float32)
    segs = np.array(rows, np.int64).reshape(len(rows), o.N_SEG)
    code = _OMP_KINDS[kind]
    hyper = np.asarray(hyper12, np.float32)
    counter = np.zeros(1, np.int64)
    k0, k1 = _key(k0, k1)
    fmask, fval = _FORCE_EXTENSION or (0, 1)
    a = np.array([counter.ctypes.data, n_tasks, tp, n_pairs, first_pair, int(k0), int(k1), int(step) & _M32,
                  int(stream_word), rt.tid_fn, sc.ctypes.data, 6 * tp, *rt.loops[0], *rt.loops[1], *rt.loops[2],
                  code, int(bool(nesterov)), len(rows), segs.ctypes.data, hyper.ctypes.data,
                  int(_FORCE_EXTENSION is not None), fmask, fval], np.int64)
    assert a.size == o.N_ARGS and hyper.size == o.N_HYPER_BLOCK
    rt.parallel(rt.region, a.ctypes.data, threads, 0)
    if int(counter[0]) < n_tasks:  # every thread stops only when the counter has passed the last task
        raise RuntimeError("dpprims.noise_cpu: the OpenMP region did not run every task")


def _key(k0: int, k1: int):
    return np.uint32(int(k0) & _M32), np.uint32(int(k1) & _M32)


def _check_stream(n: int, pair_offset: int, stream_word: int) -> None:
    _nz.check_pair_range(pair_offset, n)
    if stream_word & _nz.SUB_EXTENSION or not 0 <= stream_word <= _M32:
        raise ValueError(f"stream_word must be a main-block counter word (dpprims.noise.stream_word), "
                         f"got {stream_word:#x}")


_tls = threading.local()  # per-thread scratch of the chunk pipeline (each pool thread has its own)


def _scratch(ch: int) -> tuple:
    """Seven float32 scratch arrays of this thread, at least ``ch`` pairs long: v, theta,
    k 32 ln 2, log v, cos, sin, and z (2 ch). Reused from call to call (allocating them cost
    ~10% of a small draw); every chunk writes what it reads back first."""
    sc = getattr(_tls, "scratch", None)
    if sc is None or sc[0].shape[0] < ch:
        sc = _tls.scratch = tuple(np.empty(ch, np.float32) for _ in range(6)) + (np.empty(2 * ch, np.float32),)
    return sc


def _pair_chunks(n: int, k0: int, k1: int, step: int, stream_word: int, pair_offset: int):
    """Yield (start, m, kl, log_v, cos, sin) per chunk of the pairs of an n-element draw: chunk
    pairs start .. start + m - 1 (of the draw), the inputs of :func:`finish` (this thread's
    scratch: valid until the next chunk or the next draw on this thread)."""
    f = _compiled()
    if f is None:
        raise RuntimeError("dpprims.noise_cpu needs numba (pip install numba)")
    n_pairs = (n + 1) // 2
    if n_pairs == 0:
        return
    k0, k1 = _key(k0, k1)
    c2, c3 = np.uint32(int(step) & _M32), np.uint32(stream_word)
    forcing = _FORCE_EXTENSION is not None
    fmask, fval = (np.uint32(x) for x in (_FORCE_EXTENSION or (0, 1)))
    prep, fix, log, cos, sin = f["prep"], f["fix_extension"], np.log, np.cos, np.sin
    ch = min(CHUNK_PAIRS, n_pairs)
    sc = _scratch(ch)
    start = 0
    while start < n_pairs:
        p0 = pair_offset + start
        m = min(ch, n_pairs - start, (1 << 32) - (p0 & _M32))  # a chunk never carries into c1
        c0, c1 = np.uint32(p0 & _M32), np.uint32(p0 >> 32)
        v, th, kl, lv, ct, st = (a[:m] for a in sc[:6])  # the kernels use [0, m)
        if forcing:
            need = f["prep_forced"](c0, c1, m, k0, k1, c2, c3, v, th, kl, fmask, fval)
        else:
            need = prep(c0, c1, m, k0, k1, c2, c3, v, th, kl)
        if need:
            fix(c0, c1, m, k0, k1, c2, c3, v, th, kl, fmask, fval)
        log(v, out=lv)
        cos(th, out=ct)
        sin(th, out=st)
        yield start, m, kl, lv, ct, st
        start += m


def _z_chunks(n: int, k0: int, k1: int, step: int, stream_word: int, pair_offset: int, out=None):
    """Yield (e0, e1, z) per chunk: z (float32 view) holds elements [e0, e1) of the noise, written
    into ``out`` (a flat float32 array of n elements) if given, else into this thread's scratch
    buffer (valid until the next chunk or the next draw on this thread)."""
    finish = _compiled()["finish"] if n > 0 else None
    for start, m, kl, lv, ct, st in _pair_chunks(n, k0, k1, step, stream_word, pair_offset):
        e0, e1 = 2 * start, min(2 * (start + m), n)
        if out is None:
            zbuf = _scratch(m)[6]
            finish(kl, lv, ct, st, m, zbuf, 0, e1 - e0)
            yield e0, e1, zbuf[:e1 - e0]
        else:
            finish(kl, lv, ct, st, m, out, e0, n)
            yield e0, e1, out[e0:e1]


def _rho_chunks(n: int, k0: int, k1: int, step: int, stream_word: int, pair_offset: int):
    """Yield (e0, e1, rho, cos, sin) per chunk: elements [e0, e1) of the draw, element e0 + i being
    rho[i // 2] cos[i // 2] (i even) or rho[i // 2] sin[i // 2] (i odd), the products finish would
    write; the fused ``*_update_pairs`` kernels form them in registers."""
    rho_inplace = _compiled()["rho_inplace"] if n > 0 else None
    for start, m, kl, lv, ct, st in _pair_chunks(n, k0, k1, step, stream_word, pair_offset):
        rho_inplace(kl, lv, m)
        yield 2 * start, min(2 * (start + m), n), lv, ct, st


def gaussian_noise(n: int, k0: int, k1: int, step: int, stream_word: int, pair_offset: int, out=None, *,
                   threads=None, pool=None) -> np.ndarray:
    """z (float32 [n]) of dpprims' generator: element e is z0 (e even) or z1 (e odd) of pair
    pair_offset + e // 2 under key (k0, k1) (the seed's low / high word, any int bit patterns), with
    Philox counter words c2 = step and c3 = stream_word (``dpprims.noise.stream_word(rank)``) - the
    numbers of ``kernels/noise.py::_gaussian_noise_kernel`` under Triton's interpreter, bit for bit.
    ``out``: optional contiguous float32 array of n elements to write into. ``threads``: see the
    module docstring (the numbers do not depend on it). ``pool``: None (this module's threads) or
    "omp" (a team of ``threads`` threads of the process's OpenMP runtime, see :func:`noisy_update_many`).
    Needs :func:`available`."""
    n, pair_offset, stream_word = int(n), int(pair_offset), int(stream_word)
    _check_stream(n, pair_offset, stream_word)
    if out is None:
        out = np.empty(n, np.float32)
    elif out.dtype != np.float32 or out.size != n or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous float32 array of {n} elements, got {out.dtype}[{out.size}]")
    flat = out.reshape(-1)
    rt = _pool_runtime(pool, n)
    if rt is not None:
        _omp_run(rt, "z", [(0, n, _addr(flat), 0, 0, 0, 0)], pair_offset, (n + 1) // 2, [0.0] * 12,
                 nesterov=False, k0=k0, k1=k1, step=step, stream_word=stream_word, threads=_resolve_threads(threads))
        return out

    def part(lo, hi):
        for _ in _z_chunks(hi - lo, k0, k1, step, stream_word, pair_offset + lo // 2, flat[lo:hi]):
            pass

    _run_parts(n, threads, part)
    return out


def scaled_noise(out, x, *, std: float, normaliser: float, k0: int, k1: int, step: int, stream_word: int,
                 pair_offset: int, threads=None, pool=None) -> None:
    """out = (x + std z) / normaliser (x given) or std z / normaliser, fp32 as
    ``_gaussian_noise_kernel`` computes it (bit for bit), on flat contiguous float32 numpy arrays
    (out may be x), chunk by chunk: z never leaves the cache. ``threads``, ``pool``: see the module
    docstring and :func:`noisy_update_many`."""
    f = _compiled()
    n = out.size
    stream_word, pair_offset = int(stream_word), int(pair_offset)
    _check_stream(n, pair_offset, stream_word)
    for a in (out, x):
        if a is not None and (a.dtype != np.float32 or a.size != n or not a.flags.c_contiguous):
            raise ValueError(f"scaled_noise needs contiguous float32 arrays of {n} elements, got {a.dtype}[{a.size}]")
    o = out.reshape(-1)
    xf = o[:0] if x is None else x.reshape(-1)
    std, norm = np.float32(std), np.float32(normaliser)
    has_x = x is not None
    rt = _pool_runtime(pool, n)
    if rt is not None:
        _omp_run(rt, "scaled", [(0, n, _addr(o), _addr(xf) if has_x else 0, 0, 0, 0)], pair_offset, (n + 1) // 2,
                 [std, norm] + [0.0] * 10, nesterov=False, k0=k0, k1=k1, step=step,
                 stream_word=stream_word, threads=_resolve_threads(threads))
        return

    def part(lo, hi):
        for e0, e1, z in _z_chunks(hi - lo, k0, k1, step, stream_word, pair_offset + lo // 2):
            f["scale_into"](z, xf[lo + e0:lo + e1] if has_x else xf, o[lo + e0:lo + e1], std, norm, has_x)

    _run_parts(n, threads, part)


def noisy_update(kind: str, param, grad, state1, state2, grad_out, *, hyper, adam_scalars, nesterov: bool,
                 k0: int, k1: int, step: int, stream_word: int, pair_offset: int, threads=None, pool=None) -> None:
    """The fused DP step of kernels/update.py::_noisy_update_kernel on flat contiguous float32 numpy
    arrays, in place, chunk by chunk (the noise never leaves the cache):

        g = (grad + std z) / normaliser   (z: :func:`gaussian_noise`'s numbers), then SGD / Adam / AdamW

    the kernel's fp32 operations in its order (IEEE, no FMA), so param, state and g equal the
    interpreter's bit for bit. kind: "sgd" | "adam" | "adamw"; state1: momentum buffer (SGD, or None)
    or exp_avg; state2: exp_avg_sq (Adam) or None; grad_out: where g is written, or None. hyper: the
    9 fp32 hyper values (kernels/update.py layout, as floats); adam_scalars: (lr / bc1, sqrt(bc2),
    1 - lr wd) as float32 (computed by the caller in fp64 as the kernel does), None for SGD.
    ``threads``, ``pool``: see the module docstring and :func:`noisy_update_many` (each thread updates
    its own element range)."""
    noisy_update_many(kind, [(param, grad, state1, state2, grad_out, pair_offset, threads)], hyper=hyper,
                      adam_scalars=adam_scalars, nesterov=nesterov, k0=k0, k1=k1, step=step, stream_word=stream_word,
                      pool=pool)


def noisy_update_many(kind: str, segments, *, hyper, adam_scalars, nesterov: bool, k0: int, k1: int, step: int,
                      stream_word: int, pool=None) -> None:
    """:func:`noisy_update` over several parameters of one step in one call: ``segments`` is a
    list of ``(param, grad, state1, state2, grad_out, pair_offset, threads)``, each as in
    noisy_update, sharing kind, hyper values, key, step and stream (what a parameter list's step
    shares). The same numbers as one noisy_update call per segment (each segment draws from its
    own pair_offset), with the per-call work (argument checks, fp32 hyper values, the thread-local
    scratch) done once: for a small model that work cost as much as the draw.

    ``pool="omp"``: the draw runs in the process's OpenMP runtime (dpprims._noise_omp: one parallel
    region per run of segments with contiguous pair ranges, on a team of as many threads as the
    largest ``threads`` of the run), i.e. on the framework's own intra-op workers, which a torch
    step leaves spinning: 2.1x faster than the calling thread alone for the default MLP's 203k
    parameters after a GEMM, 1.7x faster than this module's threads at 11M (2-core machine). The
    same numbers. Where no OpenMP runtime is loaded (or ``DPPRIMS_NOISE_OMP=0``) it is the
    default path."""
    f = _compiled()
    stream_word = int(stream_word)
    if kind == "sgd":
        upd, upd_nobuf = f["sgd_update_pairs"], f["sgd_update_pairs_nobuf"]
    elif kind in ("adam", "adamw"):
        upd = f["adam_update_pairs"]
        step_size, bc2_sqrt, decay = (np.float32(x) for x in adam_scalars)
        decoupled = kind == "adamw"
    else:
        raise ValueError(f"kind must be 'sgd', 'adam' or 'adamw', got {kind!r}")
    h = [np.float32(x) for x in hyper]
    std, norm, lr, b1, b2, eps, wd, omb1, omb2 = h
    nest = bool(nesterov)
    dummy = np.empty(0, np.float32)
    checked = []
    for param, grad, s1, s2, go, pair_offset, threads in segments:
        n = param.size
        pair_offset = int(pair_offset)
        _check_stream(n, pair_offset, stream_word)
        for a in (param, grad, s1, s2, go):
            if a is not None and (a.dtype != np.float32 or a.size != n or not a.flags.c_contiguous):
                raise ValueError(f"noisy_update needs contiguous float32 arrays of {n} elements, got "
                                 f"{a.dtype}[{a.size}]")
        if kind != "sgd" and (s1 is None or s2 is None):
            raise ValueError(f"{kind} needs exp_avg and exp_avg_sq")
        flat = (None if a is None else a.reshape(-1) for a in (param, grad, s1, s2, go))
        checked.append((n, pair_offset, threads, *flat))
    rt = _pool_runtime(pool, sum(seg[0] for seg in checked))
    if rt is not None:
        hyper12 = list(h) + ([0.0] * 3 if kind == "sgd" else [step_size, bc2_sqrt, decay])
        rows = [(seg[1], seg[0], *(_addr(a) for a in seg[3:])) for seg in checked]
        _omp_runs(rt, kind, rows, [_resolve_threads(seg[2]) for seg in checked], hyper12, nesterov=nest, k0=k0,
                  k1=k1, step=step, stream_word=stream_word)
        return

    def update(chunk, seg, lo, hi):
        # elements [lo, hi) of one segment; chunk = (c, rho, cos, sin): segment element lo is
        # element c of the chunk (c even: segments and chunks start at pairs), i.e. its noise is
        # pair c // 2 of the chunk's arrays
        c, rho, ct, st = chunk
        j0 = c // 2
        n, pair_offset, threads, p, g, s1, s2, go = seg
        sl = slice(lo, hi)
        gout = go[sl] if go is not None else dummy
        if kind == "sgd" and s1 is None:
            upd_nobuf(rho, ct, st, j0, g[sl], p[sl], gout, std, norm, lr, wd, go is not None)
        elif kind == "sgd":
            upd(rho, ct, st, j0, g[sl], p[sl], s1[sl], gout, std, norm, lr, b1, wd, nest, go is not None)
        else:
            upd(rho, ct, st, j0, g[sl], p[sl], s1[sl], s2[sl], gout, std, norm, omb1, b2, omb2, eps, wd, step_size,
                bc2_sqrt, decay, decoupled, go is not None)

    # Segments that run on this thread and whose pair ranges follow each other (a parameter
    # list's offsets from dpprims.noise.pair_offsets do) are drawn as one stream: segment element
    # j is element 2 (pair_offset - run start) + j of the run, so a bias shares the chunk of the
    # weight before it instead of paying a chunk pipeline of its own (the same numbers: each
    # element's noise depends only on its counter). The noise is never written out: each chunk's
    # (rho, cos, sin) feed the fused update kernels directly.
    run, run_pairs = [], 0

    def flush():
        if not run:
            return
        first = run[0][1]
        starts = [2 * (seg[1] - first) for seg in run]
        for e0, e1, rho, ct, st in _rho_chunks(2 * run_pairs, k0, k1, step, stream_word, first):
            for seg, s0 in zip(run, starts):
                lo, hi = max(e0, s0), min(e1, s0 + seg[0])
                if lo < hi:
                    update((lo - e0, rho, ct, st), seg, lo - s0, hi - s0)
        run.clear()

    for seg in checked:
        n, pair_offset, threads = seg[:3]
        serial = _split(n, threads)[0] == 1
        if serial and run and pair_offset == run[0][1] + run_pairs:
            run.append(seg)
            run_pairs += (n + 1) // 2
            continue
        flush()
        if serial:
            run.append(seg)
            run_pairs = (n + 1) // 2
            continue

        def part(lo, hi, seg=seg):
            for e0, e1, rho, ct, st in _rho_chunks(hi - lo, k0, k1, step, stream_word, seg[1] + lo // 2):
                update((0, rho, ct, st), seg, lo + e0, lo + e1)

        _run_parts(n, threads, part)
    flush()


def philox_words(c0, c1, c2, c3, k0: int, k1: int) -> np.ndarray:
    """Raw Philox4x32-10 words (uint32 [4, n]) of uint32 counter arrays c0..c3 (diagnostics)."""
    f = _compiled()
    cs = [np.ascontiguousarray(np.asarray(c, dtype=np.uint32).reshape(-1)) for c in (c0, c1, c2, c3)]
    out = np.empty((4, cs[0].size), np.uint32)
    f["words"](*cs, *_key(k0, k1), out)
    return out


def normal_pairs_from_words(words) -> np.ndarray:
    """Box-Muller of given words (uint32 [5, n]: w0, w1, w2, w3, x0) -> float32 [2, n]: the same
    code as the generator's (diagnostics: reaches the extreme tail on demand)."""
    f = _compiled()
    w = np.ascontiguousarray(np.asarray(words, dtype=np.uint32))
    m = w.shape[1]
    v, th, kl = (np.empty(m, np.float32) for _ in range(3))
    f["select_all"](w, v, th, kl)
    inter = np.empty(2 * m, np.float32)
    f["finish"](kl, np.log(v), np.cos(th), np.sin(th), m, inter, 0, 2 * m)
    return np.ascontiguousarray(inter.reshape(m, 2).T)
