"""dpprims.noise_cpu split over threads == the serial generator, bit for bit.

The generator is counter-based (Philox): every pair's numbers depend on its counter only, and the
epilogues (scale, SGD / Adam update) are elementwise, so splitting a draw into per-thread pair ranges
must change no bit. Checked on odd sizes, with part boundaries inside and at noise chunks, across the
c0 -> c1 counter carry, on the forced extension path, for every public entry point; and once against
the independent plain int64-torch generator through the torch binding with 2 torch threads.
"""
import contextlib

import numpy as np
import pytest
import torch

from dpprims import noise as nz
from dpprims import noise_cpu as ncpu
from _bitwise import assert_same_bits as _assert_same
from _paths import plain_torch_path

pytestmark = pytest.mark.skipif(not ncpu.available(), reason="numba is not installed: no fast CPU generator")

SEED = 0x0DD5_EED5_1234_5678
K0, K1 = SEED & 0xFFFFFFFF, SEED >> 32
MP = ncpu.MIN_PAIRS_PER_THREAD
CH = ncpu.CHUNK_PAIRS

# (n elements, first pair, threads): every case really splits (asserted below)
CASES = [
    pytest.param(4 * MP + 1, 12345, 2, id="2parts-odd"),
    pytest.param(2 * CH + 2 * CH // 3 * 2 + 7, 2**32 - CH - 11, 2, id="2parts-carry-mid-chunk"),
    pytest.param(2 * 3 * MP + 3, 2**32 - MP, 3, id="3parts-carry-at-part-edge"),
    pytest.param(4 * CH, 7, 4, id="4parts-even"),
    pytest.param(5 * MP * 2 - 1, 2**62 + 99, 5, id="5parts-odd-high-offset"),
]


@pytest.mark.parametrize("n,off,threads", CASES)
def test_parallel_gaussian_noise_equals_serial(n, off, threads):
    workers, parts = ncpu._split(n, threads)
    assert workers == threads and len(parts) >= workers and parts[0][0] == 0 and parts[-1][1] == n
    assert all(lo % 2 == 0 and lo < hi and hi - lo <= 2 * CH for lo, hi in parts)
    assert all(parts[i][1] == parts[i + 1][0] for i in range(len(parts) - 1))
    kw = dict(k0=K0, k1=K1, step=31, stream_word=nz.stream_word(3), pair_offset=off)
    serial = ncpu.gaussian_noise(n, **kw, threads=1)
    out = np.full(n, np.nan, np.float32)  # poisoned: an element no part wrote fails
    par = ncpu.gaussian_noise(n, **kw, out=out, threads=threads)
    assert par is out
    _assert_same(par, serial, "gaussian_noise")
    assert np.isfinite(par).all()


@pytest.mark.parametrize("n,off,threads", CASES[:3])
@pytest.mark.parametrize("with_x", [True, False], ids=["x", "no-x"])
def test_parallel_scaled_noise_equals_serial(n, off, threads, with_x):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32) if with_x else None
    kw = dict(std=0.7, normaliser=3.0, k0=K0, k1=K1, step=5, stream_word=nz.stream_word(0), pair_offset=off)
    res = []
    for t in (1, threads):
        out = np.full(n, np.nan, np.float32)
        ncpu.scaled_noise(out, x, **kw, threads=t)
        res.append(out)
    _assert_same(res[1], res[0], "scaled_noise")
    if with_x:  # in place (out is x), as add_gaussian_noise_ runs it
        y = x.copy()
        ncpu.scaled_noise(y, y, **kw, threads=threads)
        _assert_same(y, res[0], "scaled_noise in place")


@pytest.mark.parametrize("kind,nesterov,momentum,write", [
    ("sgd", False, True, True), ("sgd", True, True, False), ("sgd", False, False, True),
    ("adam", False, True, True), ("adamw", False, True, False)])
@pytest.mark.parametrize("n,off,threads", [CASES[1], CASES[2]])
def test_parallel_noisy_update_equals_serial(kind, nesterov, momentum, write, n, off, threads):
    rng = np.random.default_rng(7 + n)
    base = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    base[3] = np.abs(base[3])  # exp_avg_sq >= 0
    hyper = [0.7, 9.0, 0.1, 0.9, 0.999, 1e-8, 0.01, 0.1, 0.001]
    adam = None if kind == "sgd" else (np.float32(0.5), np.float32(0.03), np.float32(0.999))
    res = []
    for t in (1, threads):
        p, g, s1, s2 = (a.copy() for a in base)
        go = np.full(n, np.nan, np.float32) if write else None
        s1 = s1 if (kind != "sgd" or momentum) else None
        s2 = s2 if kind != "sgd" else None
        for step in (1, 2):
            ncpu.noisy_update(kind, p, g, s1, s2, go, hyper=hyper, adam_scalars=adam, nesterov=nesterov, k0=K0,
                              k1=K1, step=step, stream_word=nz.stream_word(1), pair_offset=off, threads=t)
        res.append([a for a in (p, s1, s2, go) if a is not None])
    for a, b in zip(*res):
        _assert_same(b, a, f"noisy_update[{kind}]")


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_noisy_update_many_equals_one_call_per_segment(kind):
    """noisy_update_many over a parameter list (odd sizes, serial segments drawn as one stream of
    contiguous pair ranges, a threaded segment between them, a gap in the pair offsets, a chunk
    boundary inside a run) == each segment's own gaussian_noise draw fed to the update kernel,
    bit for bit (noisy_update itself is noisy_update_many of one segment)."""
    sizes = [7, 2 * CH + 5, 4 * MP + 3, 1, 2 * CH - 3, 11]
    offsets, _ = nz.pair_offsets(sizes)
    offsets = [o + (1000 if i >= 4 else 0) for i, o in enumerate(offsets)]  # a gap before segment 4
    threads = [1, 1, 2, 1, 1, 1]
    rng = np.random.default_rng(11)
    base = [[rng.standard_normal(n).astype(np.float32) for _ in range(4)] for n in sizes]
    for b in base:
        b[3] = np.abs(b[3])
    hyper = [0.7, 9.0, 0.1, 0.9, 0.999, 1e-8, 0.01, 0.1, 0.001]
    adam = None if kind == "sgd" else (np.float32(0.5), np.float32(0.03), np.float32(0.999))
    kw = dict(hyper=hyper, adam_scalars=adam, nesterov=False, k0=K0, k1=K1, step=5, stream_word=nz.stream_word(2))
    res = []
    for many in (False, True):
        segs = []
        for b, off, t in zip(base, offsets, threads):
            p, g, s1, s2 = (a.copy() for a in b)
            segs.append((p, g, s1, s2 if kind != "sgd" else None, np.full(p.size, np.nan, np.float32), off, t))
        if many:
            ncpu.noisy_update_many(kind, segs, **kw)
        else:  # the reference: each segment's own draw (gaussian_noise), then the update kernel on it
            f = ncpu._compiled()
            h = [np.float32(x) for x in hyper]
            std, norm, lr, b1, b2, eps, wd, omb1, omb2 = h
            for p, g, s1, s2, go, off, _ in segs:
                z = ncpu.gaussian_noise(p.size, K0, K1, 5, nz.stream_word(2), off, threads=1)
                if kind == "sgd":
                    f["sgd_update"](z, g, p, s1, go, std, norm, lr, b1, wd, True, False, True)
                else:
                    f["adam_update"](z, g, p, s1, s2, go, std, norm, omb1, b2, omb2, eps, wd, *adam, False, True)
        res.append([a for seg in segs for a in seg[:5] if a is not None])
    for a, b in zip(*res):
        _assert_same(b, a, f"noisy_update_many[{kind}]")
        assert np.isfinite(b).all()


def test_parallel_extension_path_equals_serial(monkeypatch):
    """The w0 == w1 == 0 fix-up (forced for every 4th pair by the test hook) inside each part."""
    monkeypatch.setattr(ncpu, "_FORCE_EXTENSION", (3, 0))
    n, off = 4 * MP + 301, 2**32 - 2 * MP - 50
    kw = dict(k0=K0, k1=K1, step=9, stream_word=nz.stream_word(3), pair_offset=off)
    serial = ncpu.gaussian_noise(n, **kw, threads=1)
    par = ncpu.gaussian_noise(n, **kw, threads=3)
    _assert_same(par, serial, "extension path")
    rho = np.hypot(par[0:n - 1:2], par[1:n:2])
    forced = ((np.arange(n // 2) + off) & 3) == 0
    assert (rho[forced] >= nz.Z_MAX_U64 * (1 - 1e-6)).all()


def test_small_draws_stay_serial():
    assert ncpu._split(2 * (2 * MP) - 3, 8) == (1, [(0, 2 * (2 * MP) - 3)])  # < 2 tasks of MP pairs
    assert ncpu._split(0, 4) == (1, [(0, 0)])
    assert ncpu._split(4 * MP, 8) == (2, [(0, 2 * MP), (2 * MP, 4 * MP)])
    workers, tasks = ncpu._split(2 * 10 * CH + 1, 2)  # a large draw: chunk-sized tasks, pulled dynamically
    assert workers == 2 and len(tasks) == 11 and tasks[-1] == (2 * 10 * CH, 2 * 10 * CH + 1)


def test_many_tasks_per_thread_equal_serial():
    n, off = 2 * 7 * CH + 2 * MP + 3, 2**32 - 3 * CH - 1  # 8 tasks for 2 threads, the carry inside one
    kw = dict(k0=K0, k1=K1, step=2, stream_word=nz.stream_word(0), pair_offset=off)
    assert len(ncpu._split(n, 2)[1]) == 8
    _assert_same(ncpu.gaussian_noise(n, **kw, threads=2), ncpu.gaussian_noise(n, **kw, threads=1), "many tasks")


@contextlib.contextmanager
def _torch_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def test_torch_binding_threads_equal_plain_int64_torch(monkeypatch):
    """Through the torch binding with 2 torch threads (so 2 noise threads on a >= 2-CPU box):
    gaussian_noise and the fused update == the plain int64-torch generator and update (what runs
    without numba), bit for bit."""
    from dpprims.bindings.torch import noise as N
    from dpprims.bindings.torch import update as U

    n, off = 4 * MP + 5, 2**32 - MP
    monkeypatch.setattr(ncpu, "get_num_threads", lambda: 2)
    results = []
    for eager in (False, True):
        with plain_torch_path(), monkeypatch.context() as m, _torch_threads(2):
            if eager:
                m.setenv("DPPRIMS_NOISE_CPU", "0")
            else:
                assert N._cpu_threads() == 2
            z = N.gaussian_noise(n, std=1.0, seed=SEED, step=4, pair_offset=off, rank=1, device="cpu")
            p = torch.nn.Parameter(torch.linspace(-1, 1, n))
            p.grad = torch.linspace(2, -3, n)
            state = {}
            g = U.add_noise_and_step([p], state=state, noise_std=0.5, normaliser=7.0, seed=SEED, step=3,
                                     optimizer="sgd", lr=0.1, momentum=0.9, return_noisy_grads=True)[0]
            results.append([z, p.detach().clone(), state["momentum_buffer"][0], g])
    for a, b in zip(*results):
        assert torch.equal(a, b), (a - b).abs().max()


def test_thread_settings(monkeypatch):
    from dpprims.bindings.torch import noise as N

    monkeypatch.setattr(ncpu, "_threads_override", None)
    monkeypatch.setenv("DPPRIMS_NOISE_THREADS", "3")
    assert ncpu.get_num_threads() == 3
    with _torch_threads(1):
        assert N._cpu_threads() == 1  # torch.set_num_threads(1) is respected
    monkeypatch.setenv("DPPRIMS_NOISE_THREADS", "1")
    with _torch_threads(2):
        assert N._cpu_threads() == 1  # and so is DPPRIMS_NOISE_THREADS
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv("DPPRIMS_NOISE_THREADS", bad)
        with pytest.raises(ValueError, match="DPPRIMS_NOISE_THREADS"):
            ncpu.get_num_threads()
    monkeypatch.delenv("DPPRIMS_NOISE_THREADS")
    ncpu.set_num_threads(2)
    try:
        assert ncpu.get_num_threads() == 2
    finally:
        ncpu.set_num_threads(None)
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="threads"):
            ncpu.set_num_threads(bad)
        with pytest.raises(ValueError, match="threads"):
            ncpu.gaussian_noise(10, 1, 2, 3, 0, 0, threads=bad)


def test_error_in_a_worker_part_is_raised(monkeypatch):
    """A failure in a pool thread's part reaches the caller (no silently unwritten range)."""
    real = dict(ncpu._compiled())

    def scale_into(z, x, out, std, norm, has_x):
        if out.size and out.ctypes.data != first[0]:
            raise RuntimeError("boom in a worker part")
        return real["scale_into"](z, x, out, std, norm, has_x)

    n = 4 * MP + 1
    out = np.zeros(n, np.float32)
    first = [out.ctypes.data]
    monkeypatch.setattr(ncpu, "_jit", dict(real, scale_into=scale_into))
    with pytest.raises(RuntimeError, match="boom in a worker part"):
        ncpu.scaled_noise(out, None, std=1.0, normaliser=1.0, k0=1, k1=2, step=3, stream_word=0, pair_offset=0,
                          threads=2)
