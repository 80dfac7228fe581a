"""The fused noise + optimizer step of dpprims.noise_cpu run inside the framework's own OpenMP
thread pool (a separate module: importing dpprims never imports numba; module-level functions so
that numba's on-disk cache hits).

Why: on a CPU the torch step's GEMMs run on torch's OpenMP workers, which keep spinning for a few
milliseconds after every parallel region (GNU OpenMP's default wait policy). A noise thread of
dpprims' own then shares a core with a spinning worker and the step gets slower, so the draw used
to run on the calling thread alone (noise_cpu.THREADED_MIN). Here the draw is handed to those very
workers: ``GOMP_parallel`` (the GCC OpenMP ABI that libgomp, and LLVM's libomp / Intel's libiomp
for compatibility, export) runs :func:`region` on every thread of the caller's team, the spinning
workers pick it up at once, and each thread pulls tasks of ``task_pairs`` pairs from a shared
atomic counter (dynamic: a thread without a core leaves its tasks to the others).

A task runs the whole chunk pipeline of noise_cpu on its pairs, in its thread's scratch (L1/L2):

1. ``prep`` (or ``prep_forced``, tests) and, for the rare pairs that need it, ``fix_extension``;
2. log v, cos theta, sin theta by numpy's OWN float32 inner loops (the ``PyArrayMethod`` strided
   loops that ``np.log(v, out=lv)`` runs, from ``ufunc._get_strided_loop``: the same C functions,
   so the same bits as the ufunc calls and as Triton's interpreter; they need no GIL);
3. ``rho_inplace`` and the fused update kernels (``sgd_update_pairs`` / ``_nobuf`` /
   ``adam_update_pairs``) on the segments the task's pairs cover.

These are the very numba functions noise_cpu's serial pipeline calls, on the same pairs, so every
parameter, buffer and noisy gradient is bit-identical to the serial path (tests/test_noise_omp.py);
a task's pairs depend only on their counters (Philox is counter-based) and the update is
elementwise, so neither the thread count nor the task order changes a bit.

Nothing here raises: the cfunc has no way to report an error, so noise_cpu checks every array,
range and pointer before it calls :func:`run` (the numba kernels' own bounds checks stay in).
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from . import _noise_numba as k

# layout of the int64 argument block (noise_cpu._omp_args fills it)
(A_COUNTER, A_NTASKS, A_TASK_PAIRS, A_RUN_PAIRS, A_P0, A_K0, A_K1, A_C2, A_C3, A_TID_FN, A_SCRATCH, A_SCRATCH_STRIDE,
 A_LOG, A_LOG_CTX, A_LOG_AUX, A_COS, A_COS_CTX, A_COS_AUX, A_SIN, A_SIN_CTX, A_SIN_AUX, A_KIND, A_NESTEROV,
 A_NSEG, A_SEGS, A_HYPER, A_FORCING, A_FMASK, A_FVAL) = range(29)
N_ARGS = 29
# one segment's row in the int64 segment table: its first element in the run (even), its length,
# and the addresses of param, grad, state1, state2, grad_out (0: absent; SGD without state1 has no
# momentum buffer, and a segment without grad_out writes no noisy gradient)
S_START, S_N, S_PARAM, S_GRAD, S_S1, S_S2, S_GOUT = range(7)
N_SEG = 7
# kinds: SGD, Adam, AdamW (param, grad, states, grad_out), and the noise alone: z into ``param``
# (gaussian_noise's out), or (x + std z) / norm with x in ``grad`` (0: std z / norm) into ``param``
# (scaled_noise)
K_SGD, K_ADAM, K_ADAMW, K_Z, K_SCALED = range(5)
# hyper float32 block: the 9 kernels/update.py values, then Adam's step_size, bc2_sqrt, decay
N_HYPER_BLOCK = 12


def _pointer_intrinsic(ty):
    @intrinsic
    def as_pointer(typingctx, addr):
        sig = types.CPointer(ty)(types.int64)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
        return sig, codegen
    return as_pointer


f32_ptr = _pointer_intrinsic(types.float32)
i64_ptr = _pointer_intrinsic(types.int64)


@intrinsic
def atomic_next(typingctx, addr):
    """fetch-and-add 1 on the int64 at address ``addr``: the old value (the task to run)."""
    sig = types.int64(types.int64)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "monotonic")
    return sig, codegen


@intrinsic
def call_int_fn(typingctx, addr):
    """Call the C function ``int f(void)`` at ``addr`` (omp_get_thread_num)."""
    sig = types.int64(types.int64)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        return builder.sext(builder.call(fn, []), ir.IntType(64))
    return sig, codegen


@intrinsic
def call_unary_loop(typingctx, fn_addr, ctx_addr, aux_addr, src_addr, dst_addr, n):
    """numpy's strided loop ``int loop(PyArrayMethod_Context *, char *const *data,
    const npy_intp *dimensions, const npy_intp *strides, NpyAuxData *)`` of a float32 -> float32
    unary ufunc at ``fn_addr`` on n contiguous elements: data = {src, dst}, strides = {4, 4}."""
    sig = types.int64(types.int64, types.int64, types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        fa, ca, aa, sa, da, nn = args
        i8p = ir.IntType(8).as_pointer()
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(ir.IntType(32), [i8p, i8p.as_pointer(), i64.as_pointer(), i64.as_pointer(), i8p])
        fn = builder.inttoptr(fa, fnty.as_pointer())
        data = builder.alloca(i8p, size=ir.Constant(i64, 2))
        builder.store(builder.inttoptr(sa, i8p), data)
        builder.store(builder.inttoptr(da, i8p), builder.gep(data, [ir.Constant(i64, 1)]))
        dims = builder.alloca(i64, size=ir.Constant(i64, 1))
        builder.store(nn, dims)
        strides = builder.alloca(i64, size=ir.Constant(i64, 2))
        builder.store(ir.Constant(i64, 4), strides)
        builder.store(ir.Constant(i64, 4), builder.gep(strides, [ir.Constant(i64, 1)]))
        r = builder.call(fn, [builder.inttoptr(ca, i8p), data, dims, strides, builder.inttoptr(aa, i8p)])
        return builder.sext(r, i64)
    return sig, codegen


@numba.njit(inline="always", error_model="numpy")
def _z_one(z, x, std, norm, kind, has_x):
    if kind == K_Z:
        return z
    g = std * z  # scale_into's operations, in its order
    if has_x:
        g = x + g
    return g / norm


@numba.njit(inline="always", error_model="numpy")
def _noise_pairs(rho, cos_t, sin_t, j0, x, out, std, norm, kind, has_x):
    """out[i] = z_i (K_Z: finish's products rho cos / rho sin) or scale_into's (x_i + std z_i) / norm
    (K_SCALED), z_i of chunk pair j0 + i // 2. Loop and odd tail as in _noise_numba._sgd_pairs;
    inlined, so kind and has_x are constants at each call and the pair loop vectorises."""
    m = out.shape[0]
    rr, cc, ss = rho[j0:], cos_t[j0:], sin_t[j0:]
    for q in range(m // 2):
        r = rr[q]
        for h in range(2):
            i = 2 * q + h
            z = r * cc[q] if h == 0 else r * ss[q]
            out[i] = _z_one(z, x[i] if has_x else np.float32(0.0), std, norm, kind, has_x)
    if m % 2:
        i = m - 1
        q = i // 2
        out[i] = _z_one(rr[q] * cc[q], x[i] if has_x else np.float32(0.0), std, norm, kind, has_x)


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _update_segments(a, t0, m, rho, ct, st):
    """The fused update of every segment element whose noise is one of the task's pairs
    t0 .. t0 + m - 1 (of the run): run element e is segment element e - start."""
    segs = numba.carray(i64_ptr(a[A_SEGS]), (a[A_NSEG], N_SEG))
    h = numba.carray(f32_ptr(a[A_HYPER]), N_HYPER_BLOCK)
    std, norm, lr, b1, b2, eps, wd, omb1, omb2 = h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8]
    kind, nest = a[A_KIND], a[A_NESTEROV] != 0
    e0, e1 = 2 * t0, 2 * (t0 + m)
    for s in range(segs.shape[0]):
        start, n = segs[s, S_START], segs[s, S_N]
        lo, hi = max(e0, start), min(e1, start + n)
        if lo >= hi:
            continue
        cnt = hi - lo
        off = lo - start
        j0 = (lo - e0) // 2
        p = numba.carray(f32_ptr(segs[s, S_PARAM] + 4 * off), cnt)
        g = numba.carray(f32_ptr(segs[s, S_GRAD] + 4 * off), cnt if kind < K_Z else 0)
        wg = segs[s, S_GOUT] != 0
        go = numba.carray(f32_ptr(segs[s, S_GOUT] + 4 * off), cnt if wg else 0)
        if kind == K_Z or kind == K_SCALED:
            has_x = segs[s, S_GRAD] != 0
            x = numba.carray(f32_ptr(segs[s, S_GRAD] + 4 * off), cnt if has_x else 0)
            if kind == K_Z:
                _noise_pairs(rho, ct, st, j0, x, p, std, norm, K_Z, False)
            elif has_x:
                _noise_pairs(rho, ct, st, j0, x, p, std, norm, K_SCALED, True)
            else:
                _noise_pairs(rho, ct, st, j0, x, p, std, norm, K_SCALED, False)
        elif kind == K_SGD and segs[s, S_S1] == 0:
            k.sgd_update_pairs_nobuf(rho, ct, st, j0, g, p, go, std, norm, lr, wd, wg)
        elif kind == K_SGD:
            b = numba.carray(f32_ptr(segs[s, S_S1] + 4 * off), cnt)
            k.sgd_update_pairs(rho, ct, st, j0, g, p, b, go, std, norm, lr, b1, wd, nest, wg)
        else:
            m1 = numba.carray(f32_ptr(segs[s, S_S1] + 4 * off), cnt)
            m2 = numba.carray(f32_ptr(segs[s, S_S2] + 4 * off), cnt)
            k.adam_update_pairs(rho, ct, st, j0, g, p, m1, m2, go, std, norm, omb1, b2, omb2, eps, wd, h[9], h[10],
                                h[11], kind == K_ADAMW, wg)


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _task(a, t):
    """Task t of the run: pairs t0 .. t0 + m - 1 through the whole pipeline."""
    tp = a[A_TASK_PAIRS]
    t0 = t * tp
    m = min(tp, a[A_RUN_PAIRS] - t0)
    tid = call_int_fn(a[A_TID_FN])
    base = a[A_SCRATCH] + 4 * a[A_SCRATCH_STRIDE] * tid
    v = numba.carray(f32_ptr(base), m)
    th = numba.carray(f32_ptr(base + 4 * tp), m)
    kl = numba.carray(f32_ptr(base + 8 * tp), m)
    lv = numba.carray(f32_ptr(base + 12 * tp), m)
    ct = numba.carray(f32_ptr(base + 16 * tp), m)
    st = numba.carray(f32_ptr(base + 20 * tp), m)
    k0, k1 = np.uint32(a[A_K0]), np.uint32(a[A_K1])
    c2, c3 = np.uint32(a[A_C2]), np.uint32(a[A_C3])
    fmask, fval = np.uint32(a[A_FMASK]), np.uint32(a[A_FVAL])
    # a chunk never carries into counter word c1: split where the pair index crosses 2^32
    done = 0
    while done < m:
        p = a[A_P0] + t0 + done
        mm = min(m - done, (1 << 32) - (p & 0xFFFFFFFF))
        c0, c1 = np.uint32(p & 0xFFFFFFFF), np.uint32(p >> 32)
        vv, tt, kk = v[done:done + mm], th[done:done + mm], kl[done:done + mm]
        if a[A_FORCING] != 0:
            need = k.prep_forced(c0, c1, mm, k0, k1, c2, c3, vv, tt, kk, fmask, fval)
        else:
            need = k.prep(c0, c1, mm, k0, k1, c2, c3, vv, tt, kk)
        if need:
            k.fix_extension(c0, c1, mm, k0, k1, c2, c3, vv, tt, kk, fmask, fval)
        done += mm
    call_unary_loop(a[A_LOG], a[A_LOG_CTX], a[A_LOG_AUX], base, base + 12 * tp, m)
    call_unary_loop(a[A_COS], a[A_COS_CTX], a[A_COS_AUX], base + 4 * tp, base + 16 * tp, m)
    call_unary_loop(a[A_SIN], a[A_SIN_CTX], a[A_SIN_AUX], base + 4 * tp, base + 20 * tp, m)
    k.rho_inplace(kl, lv, m)
    _update_segments(a, t0, m, lv, ct, st)


@numba.cfunc(types.void(types.CPointer(types.int64)), nopython=True, cache=True, error_model="numpy")
def region(a_ptr):
    """The body of the parallel region: every thread of the team pulls tasks until none is left."""
    a = numba.carray(a_ptr, N_ARGS)
    n = a[A_NTASKS]
    while True:
        t = atomic_next(a[A_COUNTER])
        if t >= n:
            return
        _task(a, t)
