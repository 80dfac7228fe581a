"""dpprims.noise_cpu's OpenMP path (``pool="omp"``, dpprims._noise_omp) == the serial generator, bit for bit.

The region runs the serial pipeline's own numba kernels and numpy's own float32 log / cos / sin
loops on tasks of OMP_TASK_PAIRS pairs pulled by the threads of the OpenMP team torch's GEMMs
run on. Every public entry point is compared against ``threads=1`` (no pool) on odd sizes, tasks
crossing the c0 -> c1 counter carry, high pair offsets, several tasks per thread, gaps between
parameters, mixed segments (with and without momentum buffers / noisy-gradient outputs), the
forced extension path, and through the torch binding against the plain int64-torch generator.
"""
import multiprocessing
import os

import numpy as np
import pytest
import torch

from dpprims import noise as nz
from dpprims import noise_cpu as ncpu
from _bitwise import assert_same_bits as _assert_same
from _paths import plain_torch_path

pytestmark = pytest.mark.skipif(not ncpu.available(), reason="numba is not installed: no fast CPU generator")

SEED = 0x0BAD_5EED_0DD5_0001
K0, K1 = SEED & 0xFFFFFFFF, SEED >> 32
TP = ncpu.OMP_TASK_PAIRS
HYPER = [0.7, 9.0, 0.1, 0.9, 0.999, 1e-8, 0.01, 0.1, 0.001]
ADAM = (np.float32(0.5), np.float32(0.03), np.float32(0.999))

# (n elements, first pair, threads)
CASES = [
    pytest.param(2 * 3 * TP + 1, 12345, 2, id="3tasks-odd"),
    pytest.param(2 * 5 * TP + 2 * TP // 3 + 5, 2**32 - 2 * TP - 77, 2, id="carry-inside-a-task"),
    pytest.param(2 * 2 * TP, 2**32 - TP, 3, id="carry-at-a-task-edge-3threads"),
    pytest.param(2 * 9 * TP - 1, 2**62 + 99, 2, id="many-tasks-high-offset"),
    pytest.param(7, 3, 2, id="one-short-task"),
]


def _torch_openmp():
    return torch.backends.openmp.is_available() and "parallel backend: OpenMP" in torch.__config__.parallel_info()


def test_the_path_is_there_under_torch():
    """Where torch runs its intra-op pool on OpenMP (Linux wheels), the OpenMP path must be
    available: a silent fallback would pass every equality test below while losing the speed."""
    if not _torch_openmp():
        pytest.skip("torch's parallel backend is not OpenMP here")
    assert ncpu.omp_available()
    rt = ncpu._omp_runtime()
    assert rt.name in ncpu._OMP_LIBS and len(rt.loops) == 3 and all(loop[0] for loop in rt.loops)


needs_omp = pytest.mark.skipif(not ncpu.omp_available(), reason="no OpenMP runtime loaded in this process")


@needs_omp
@pytest.mark.parametrize("n,off,threads", CASES)
def test_omp_gaussian_noise_equals_serial(n, off, threads):
    kw = dict(k0=K0, k1=K1, step=31, stream_word=nz.stream_word(3), pair_offset=off)
    serial = ncpu.gaussian_noise(n, **kw, threads=1)
    out = np.full(n, np.nan, np.float32)  # poisoned: an element no task wrote fails
    par = ncpu.gaussian_noise(n, **kw, out=out, threads=threads, pool="omp")
    assert par is out
    _assert_same(par, serial, "gaussian_noise")
    assert np.isfinite(par).all()


@needs_omp
@pytest.mark.parametrize("n,off,threads", CASES[:3])
@pytest.mark.parametrize("with_x", [True, False], ids=["x", "no-x"])
def test_omp_scaled_noise_equals_serial(n, off, threads, with_x):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32) if with_x else None
    kw = dict(std=0.7, normaliser=3.0, k0=K0, k1=K1, step=5, stream_word=nz.stream_word(0), pair_offset=off)
    res = []
    for pool in (None, "omp"):
        out = np.full(n, np.nan, np.float32)
        ncpu.scaled_noise(out, x, **kw, threads=1 if pool is None else threads, pool=pool)
        res.append(out)
    _assert_same(res[1], res[0], "scaled_noise")
    if with_x:  # in place (out is x), as add_gaussian_noise_ runs it
        y = x.copy()
        ncpu.scaled_noise(y, y, **kw, threads=threads, pool="omp")
        _assert_same(y, res[0], "scaled_noise in place")


@needs_omp
@pytest.mark.parametrize("kind,nesterov,momentum,write", [
    ("sgd", False, True, True), ("sgd", True, True, False), ("sgd", False, False, True), ("sgd", False, False, False),
    ("adam", False, True, True), ("adamw", False, True, False)])
@pytest.mark.parametrize("n,off,threads", [CASES[1], CASES[3]])
def test_omp_noisy_update_equals_serial(kind, nesterov, momentum, write, n, off, threads):
    rng = np.random.default_rng(7 + n)
    base = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    base[3] = np.abs(base[3])  # exp_avg_sq >= 0
    adam = None if kind == "sgd" else ADAM
    res = []
    for pool in (None, "omp"):
        p, g, s1, s2 = (a.copy() for a in base)
        go = np.full(n, np.nan, np.float32) if write else None
        s1 = s1 if (kind != "sgd" or momentum) else None
        s2 = s2 if kind != "sgd" else None
        for step in (1, 2):
            ncpu.noisy_update(kind, p, g, s1, s2, go, hyper=HYPER, adam_scalars=adam, nesterov=nesterov, k0=K0,
                              k1=K1, step=step, stream_word=nz.stream_word(1), pair_offset=off,
                              threads=1 if pool is None else threads, pool=pool)
        res.append([a for a in (p, s1, s2, go) if a is not None])
    for a, b in zip(*res):
        _assert_same(b, a, f"noisy_update[{kind}]")
    assert not np.array_equal(res[1][0], base[0])  # the update did run


@needs_omp
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_omp_noisy_update_many_equals_serial(kind):
    """A parameter list with odd sizes, a gap in the pair offsets (two regions), parameters smaller
    than a task and larger than several, a noisy-gradient output on some segments only and (SGD)
    a momentum buffer on some only: each segment's numbers as the serial path's."""
    sizes = [7, 2 * TP + 5, 4 * TP + 3, 1, 2 * TP - 3, 11, 3 * TP]
    offsets, _ = nz.pair_offsets(sizes)
    offsets = [o + (1000 if i >= 4 else 0) for i, o in enumerate(offsets)]
    rng = np.random.default_rng(11)
    base = [[rng.standard_normal(n).astype(np.float32) for _ in range(4)] for n in sizes]
    for b in base:
        b[3] = np.abs(b[3])
    adam = None if kind == "sgd" else ADAM
    kw = dict(hyper=HYPER, adam_scalars=adam, nesterov=False, k0=K0, k1=K1, step=5, stream_word=nz.stream_word(2))
    res = []
    for pool in (None, "omp"):
        segs = []
        for i, (b, off) in enumerate(zip(base, offsets)):
            p, g, s1, s2 = (a.copy() for a in b)
            s1 = None if kind == "sgd" and i % 3 == 1 else s1
            go = np.full(p.size, np.nan, np.float32) if i % 2 == 0 else None
            segs.append((p, g, s1, s2 if kind != "sgd" else None, go, off, 1 if pool is None else 2))
        ncpu.noisy_update_many(kind, segs, **kw, pool=pool)
        res.append([a for seg in segs for a in seg[:5] if a is not None])
    for a, b in zip(*res):
        _assert_same(b, a, f"noisy_update_many[{kind}]")
        assert np.isfinite(b).all()


@needs_omp
def test_omp_extension_path_equals_serial(monkeypatch):
    """The w0 == w1 == 0 fix-up (forced for every 4th pair by the test hook) inside the tasks."""
    monkeypatch.setattr(ncpu, "_FORCE_EXTENSION", (3, 0))
    n, off = 2 * 3 * TP + 301, 2**32 - TP - 50
    kw = dict(k0=K0, k1=K1, step=9, stream_word=nz.stream_word(3), pair_offset=off)
    serial = ncpu.gaussian_noise(n, **kw, threads=1)
    par = ncpu.gaussian_noise(n, **kw, threads=2, pool="omp")
    _assert_same(par, serial, "extension path")
    rho = np.hypot(par[0:n - 1:2], par[1:n:2])
    forced = ((np.arange(n // 2) + off) & 3) == 0
    assert (rho[forced] >= nz.Z_MAX_U64 * (1 - 1e-6)).all()


@needs_omp
def test_omp_team_runs_on_several_threads(monkeypatch):
    """The tasks really are shared out: with 2 threads both run some (the tid read in the task
    picks the scratch, so a team of one would still give the right numbers, and the equality tests
    could not tell)."""
    n = 2 * 64 * TP
    seen = set()
    for _ in range(20):  # the worker may be asleep the first time; 64 tasks give it time to join
        ncpu.gaussian_noise(16, K0, K1, 1, 0, 0, threads=2, pool="omp")  # the scratch exists
        sc = ncpu._tls.omp_scratch[:2 * 6 * TP].reshape(2, 6, TP)
        sc[:] = np.nan  # a thread's row that no task used stays NaN
        ncpu.gaussian_noise(n, K0, K1, 1, 0, 0, threads=2, pool="omp")
        # each thread's last task left its v (in (0, 1]) in its own scratch row
        seen |= {t for t in range(2) if ((sc[t, 0] > 0) & (sc[t, 0] <= 1)).all()}
        if seen == {0, 1}:
            break
    assert seen == {0, 1}


def test_pool_argument_checked():
    with pytest.raises(ValueError, match="pool"):
        ncpu.gaussian_noise(10, 1, 2, 3, 0, 0, pool="threads")


def test_env_switch_and_fallback(monkeypatch):
    """DPPRIMS_NOISE_OMP=0 turns the path off; pool="omp" then runs the thread path (same numbers)."""
    ref = ncpu.gaussian_noise(1001, K0, K1, 3, 0, 5, threads=1)
    monkeypatch.setenv("DPPRIMS_NOISE_OMP", "0")
    assert not ncpu.omp_available()
    _assert_same(ncpu.gaussian_noise(1001, K0, K1, 3, 0, 5, threads=2, pool="omp"), ref, "fallback")


def _child_available(q):
    q.put(ncpu.omp_available())


@needs_omp
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_fork_child_does_not_use_the_parents_team():
    """GNU OpenMP's thread pool does not survive a fork: a child of a process that ran the region
    takes the thread path."""
    ncpu.gaussian_noise(2 * 4 * TP, K0, K1, 1, 0, 0, threads=2, pool="omp")
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_child_available, args=(q,))
    proc.start()
    try:
        assert q.get(timeout=60) is False
    finally:
        proc.join(60)
    assert proc.exitcode == 0


@needs_omp
def test_torch_binding_omp_equals_plain_int64_torch(monkeypatch):
    """Through the torch binding with 2 torch threads (so the OpenMP team): gaussian_noise, the
    in-place noise op and the fused update over a parameter list == the plain int64-torch
    generator and update (what runs without numba), bit for bit."""
    from dpprims.bindings.torch import noise as N
    from dpprims.bindings.torch import update as U

    if not _torch_openmp():
        pytest.skip("torch's parallel backend is not OpenMP here")
    sizes = [2 * 3 * TP + 5, 257, 10, 2 * TP - 1]
    monkeypatch.setattr(ncpu, "get_num_threads", lambda: 2)
    old = torch.get_num_threads()
    results = []
    try:
        torch.set_num_threads(2)
        for plain in (False, True):
            with plain_torch_path(), monkeypatch.context() as m:
                if plain:
                    m.setenv("DPPRIMS_NOISE_CPU", "0")
                else:
                    assert N._cpu_pool(10) == (2, "omp")
                z = N.gaussian_noise(sizes[0], std=1.0, seed=SEED, step=4, pair_offset=2**32 - TP, rank=1,
                                     device="cpu")
                x = torch.linspace(-1, 1, sizes[0])
                N.add_gaussian_noise_(x, std=0.3, normaliser=2.0, seed=SEED, step=4, pair_offset=77, rank=0)
                ps = [torch.nn.Parameter(torch.linspace(-1, 1, n)) for n in sizes]
                for i, p in enumerate(ps):
                    p.grad = torch.linspace(2, -3, p.numel()) * (i + 1)
                state = {}
                gs = []
                for step in (1, 2):
                    gs += U.add_noise_and_step(ps, state=state, noise_std=0.5, normaliser=7.0, seed=SEED, step=step,
                                               optimizer="sgd", lr=0.1, momentum=0.9, return_noisy_grads=True)
                ps[1].grad = None  # no clipped sum reached it: zero, still noised and stepped
                assert U.add_noise_and_step(ps, state=state, noise_std=0.5, normaliser=7.0, seed=SEED, step=3,
                                            optimizer="sgd", lr=0.1, momentum=0.9) is None
                # a non-contiguous grad is not taken by the fused path: the op path refuses it (no
                # silent copies), with nothing updated
                before = ps[0].detach().clone()
                ps[0].grad = torch.linspace(1, 2, 2 * ps[0].numel())[::2]
                with pytest.raises(ValueError, match="contiguous"):
                    U.add_noise_and_step(ps, state=state, noise_std=0.5, normaliser=7.0, seed=SEED, step=4,
                                         optimizer="sgd", lr=0.1, momentum=0.9)
                assert torch.equal(ps[0].detach(), before)
                adam_p = [torch.nn.Parameter(torch.linspace(-1, 1, n)) for n in sizes]
                for p in adam_p:
                    p.grad = torch.linspace(0.5, -1, p.numel())
                adam_state = {}
                for step in (1, 2):
                    U.add_noise_and_step(adam_p, state=adam_state, noise_std=0.5, normaliser=7.0, seed=SEED,
                                         step=step, optimizer="adamw", lr=0.01, weight_decay=0.1)
                results.append([z, x] + [p.detach().clone() for p in ps + adam_p] + state["momentum_buffer"] + gs
                               + adam_state["exp_avg"] + adam_state["exp_avg_sq"])
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b), (a - b).abs().max()
