"""dpprims' Gaussian noise: Philox correctness, torch path == kernel, distribution (KS, tails),
reach beyond tl.randn's 5.68, RNG layout (uniqueness, determinism) and the truncation delta bound.

The kernel path runs on ``device`` (CUDA, or CPU through Triton's interpreter); the plain-torch path
runs on CPU with TRITON_INTERPRET switched off for the call (``_torch_backend``).
"""
import contextlib
import math

import numpy as np
import pytest
import torch
from scipy import stats

from dpprims import noise as nz
from dpprims import noise_cpu as ncpu
from dpprims.bindings.torch import noise as N
from _paths import one_torch_thread, plain_torch_path  # noqa: E402,F401 (fixture import registers it)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # single-threaded torch, as before

SEED = 0x5EED_1234_ABCD_0042


def _torch_noise(n, **kw):
    with plain_torch_path():
        return N.gaussian_noise(n, device="cpu", **kw)


# ----------------------------------------------------------------------------- Philox
@pytest.mark.parametrize("ctr,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
], ids=["zeros", "ones", "pi"])
def test_philox_known_answers(ctr, key, expected, device):
    """Random123's Philox4x32-10 known-answer vectors, kernel and torch path."""
    seed = key[0] | (key[1] << 32)
    counters = torch.tensor(ctr, dtype=torch.int64).reshape(4, 1)
    got = N.philox4x32_words(seed, counters.to(device)).cpu().reshape(-1).tolist()
    assert got == list(expected)
    k0, k1 = key
    got_t = [int(w) for w in N._philox4x32_10(*(torch.tensor([c]) for c in ctr), k0, k1)]
    assert got_t == list(expected)


def test_philox_words_torch_equals_kernel(device):
    g = torch.Generator().manual_seed(1)
    ctr = torch.randint(0, 2**32, (4, 777), dtype=torch.int64, generator=g)
    with plain_torch_path():
        ref = N.philox4x32_words(SEED, ctr)
    got = N.philox4x32_words(SEED, ctr.to(device)).cpu()
    assert torch.equal(got, ref)


# ----------------------------------------------------------------------------- torch path == kernel
@pytest.mark.parametrize("n,pair_offset,step,rank", [
    (1, 0, 0, 0), (1237, 5, 1, 0), (4099, 2**33 + 7, 123456, 3), (2**15 + 1, 2**62, 2**31 - 1, 2**20 - 1),
], ids=["n1", "n1237", "n4099-off2^33", "n32769-maxstep-maxrank"])
def test_noise_torch_path_equals_kernel(n, pair_offset, step, rank, device):
    kw = dict(std=1.0, seed=SEED, step=step, pair_offset=pair_offset, rank=rank)
    z_kernel = N.gaussian_noise(n, device=device, **kw).cpu()
    z_torch = _torch_noise(n, **kw)
    assert z_kernel.shape == z_torch.shape == (n,)
    assert torch.isfinite(z_kernel).all()
    if device == "cpu":  # interpreter and torch path share numpy's float32 libm: bit for bit
        assert torch.equal(z_kernel, z_torch), (z_kernel - z_torch).abs().max()
    else:  # GPU transcendentals (possibly the fast approximations) vs numpy
        torch.testing.assert_close(z_kernel, z_torch, rtol=1e-5, atol=1e-5)


def test_noise_writes_every_element(device):
    """Output poisoned with NaN, odd size: every element (incl. the half-used last pair) written."""
    n = 1237
    x = torch.randn(n, device=device)
    out = torch.full((n,), float("nan"), device=device)
    seed, step = N.as_seed_tensor(SEED, device), N.as_step_tensor(9, device)
    scal = torch.tensor([0.5, 4.0], device=device)
    N._launch_noise(x, seed, step, scal, 11, 0, True, out)
    assert not torch.isnan(out).any()
    z = N.gaussian_noise(n, std=1.0, seed=SEED, step=9, pair_offset=11, device=device)
    exact = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-6, atol=1e-6)  # GPU may fuse to FMA
    torch.testing.assert_close(out, (x + 0.5 * z) / 4.0, **exact)


def test_bf16_output_rounds_to_nearest_even(device):
    """bf16 outputs are the fp32 results rounded to nearest even on every backend (the kernels round
    with integer ops: Triton's interpreter would truncate)."""
    x = torch.randn(999, device=device).to(torch.bfloat16)
    got = N.noisy_grads([_with_grad(x)], noise_std=0.7, normaliser=3.0, seed=SEED, step=2)[0]
    assert got.dtype == torch.bfloat16
    z = N.gaussian_noise(999, std=1.0, seed=SEED, step=2, pair_offset=0, device=device)
    ref = ((x.float() + 0.7 * z) / 3.0).to(torch.bfloat16)
    if device != "cpu":  # an FMA on the GPU can flip a bf16 rounding
        torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
        return
    assert torch.equal(got, ref)
    with plain_torch_path():
        assert torch.equal(N.noisy_grads([_with_grad(x)], noise_std=0.7, normaliser=3.0, seed=SEED, step=2)[0], ref)


def _with_grad(x):
    p = torch.nn.Parameter(torch.zeros_like(x))
    p.grad = x.clone()
    return p


def test_in_place_and_functional_agree(device):
    x = torch.randn(3, 5, 7, device=device)
    y = x.clone()
    a = N._gaussian_noise_op(x, N.as_seed_tensor(SEED, device), N.as_step_tensor(2, device),
                             torch.tensor([1.5, 3.0], device=device), 100, 1, True)
    N.add_gaussian_noise_(y, std=1.5, normaliser=3.0, seed=SEED, step=2, pair_offset=100, rank=1)
    assert torch.equal(a, y)
    assert not torch.equal(a, x)


def test_ops_pass_opcheck():
    x = torch.randn(37)
    args = (x, N.as_seed_tensor(SEED, "cpu"), N.as_step_tensor(3, "cpu"), torch.tensor([1.0, 2.0]), 4, 0)
    torch.library.opcheck(torch.ops.dpprims.gaussian_noise.default, args + (True,),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.dpprims.add_gaussian_noise_.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- CPU generator (numba)
needs_numba = pytest.mark.skipif(not ncpu.available(), reason="numba is not installed: no fast CPU generator")


@contextlib.contextmanager
def _eager_torch(monkeypatch):
    """The plain int64-torch generator (what runs without numba)."""
    with plain_torch_path(), monkeypatch.context() as m:
        m.setenv("DPPRIMS_NOISE_CPU", "0")
        yield


@needs_numba
@pytest.mark.parametrize("n,pair_offset,step,rank", [
    (41, 2**32 - 7, 3, 2),  # the pair index carries into counter word c1 inside the draw
    (2 * ncpu.CHUNK_PAIRS + 3, 2**32 - ncpu.CHUNK_PAIRS - 5, 77, 0),  # chunk ends, carry mid-chunk
    (4 * ncpu.CHUNK_PAIRS + 1, 2**62 + 12345, 2**31 - 1, 2**20 - 1),
], ids=["n41-carry", "2chunks-carry", "4chunks-maxstep"])
def test_cpu_generator_equals_plain_torch_and_kernel(n, pair_offset, step, rank, device, monkeypatch):
    """dpprims.noise_cpu (numba Philox + numpy libm) == the plain-torch generator, bit for bit, at
    chunk boundaries and across the c0 -> c1 carry; == the kernel on the small case (interpreter:
    bit for bit)."""
    kw = dict(std=1.0, seed=SEED, step=step, pair_offset=pair_offset, rank=rank)
    z = _torch_noise(n, **kw)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    scaled = dict(kw, std=0.7, normaliser=3.0)
    with plain_torch_path():
        y = N.add_gaussian_noise_(x.clone(), **scaled)  # the fused epilogue (x + std z) / normaliser
    with _eager_torch(monkeypatch):
        ref = N.gaussian_noise(n, device="cpu", **kw)
        y_ref = N.add_gaussian_noise_(x.clone(), **scaled)
    assert torch.equal(z, ref), (z - ref).abs().max()
    assert torch.equal(y, y_ref), (y - y_ref).abs().max()
    if n < 100:
        z_kernel = N.gaussian_noise(n, device=device, **kw).cpu()
        if device == "cpu":
            assert torch.equal(z_kernel, z)
        else:
            torch.testing.assert_close(z_kernel, z, rtol=1e-5, atol=1e-5)


@needs_numba
def test_cpu_generator_extension_path(monkeypatch):
    """The extension word (w0 == w1 == 0: probability 2^-64, never seen naturally) forced for every
    4th pair in both CPU generators (numba's test hook; the plain-torch Philox patched): equal bit for
    bit, and the forced pairs reach beyond the 64-bit-uniform radius only through x0."""
    def philox(c0, c1, c2, c3, k0, k1):
        w0, w1, w2, w3 = orig(c0, c1, c2, c3, k0, k1)
        force = ((c0 & 3) == 0) & ((c3 & 1) == 0)
        return torch.where(force, 0, w0), torch.where(force, 0, w1), w2, w3

    orig = N._philox4x32_10
    n, off = 2 * ncpu.CHUNK_PAIRS + 301, 2**32 - 50
    kw = dict(std=1.0, seed=SEED, step=9, pair_offset=off, rank=3)
    monkeypatch.setattr(ncpu, "_FORCE_EXTENSION", (3, 0))
    z = _torch_noise(n, **kw)
    monkeypatch.setattr(N, "_philox4x32_10", philox)
    with _eager_torch(monkeypatch):
        ref = N.gaussian_noise(n, device="cpu", **kw)
    assert torch.equal(z, ref)
    pairs = np.arange(n // 2) + off
    rho = np.hypot(z[0:n - 1:2].numpy(), z[1:n:2].numpy())
    forced = (pairs & 3) == 0
    assert (rho[forced] >= nz.Z_MAX_U64 * (1 - 1e-6)).all() and (rho[~forced] < nz.Z_MAX_U64).all()


@needs_numba
def test_cpu_generator_diagnostics_equal_plain_torch(monkeypatch):
    """philox4x32_words / normal_pair_from_words on the torch path (numba) == the plain-torch
    versions, on random words and on words at every leading-zero position (the extreme tail)."""
    g = torch.Generator().manual_seed(5)
    ctr = torch.randint(0, 2**32, (4, 1001), dtype=torch.int64, generator=g)
    words = torch.randint(0, 2**32, (5, 1001), dtype=torch.int64, generator=g)
    for k in range(1, 4):  # k leading zero words in columns k, k+4, k+8, ...
        words[:k, k::4] = 0
    words[:, 0] = torch.tensor([0, 0, 0, 2**31, 0])  # u = 2^-128: z0 = Z_MAX
    with plain_torch_path():
        got_w, got_z = N.philox4x32_words(SEED, ctr), N.normal_pair_from_words(words)
    with _eager_torch(monkeypatch):
        ref_w, ref_z = N.philox4x32_words(SEED, ctr), N.normal_pair_from_words(words)
    assert torch.equal(got_w, ref_w)
    assert torch.equal(got_z, ref_z)
    assert got_z[0, 0] == pytest.approx(nz.Z_MAX, rel=2e-6)


def test_cpu_generator_rejects_bad_arguments():
    if not ncpu.available():
        pytest.skip("numba is not installed")
    with pytest.raises(ValueError, match="stream_word"):
        ncpu.gaussian_noise(4, 1, 2, 3, nz.stream_word(0) | 1, 0)
    with pytest.raises(ValueError, match="2\\^63"):
        ncpu.gaussian_noise(4, 1, 2, 3, nz.stream_word(0), 2**63 - 1)
    with pytest.raises(ValueError, match="float32"):
        ncpu.gaussian_noise(4, 1, 2, 3, nz.stream_word(0), 0, out=np.empty(4, np.float64))


# ----------------------------------------------------------------------------- extreme tail
def _words(*cols):
    return torch.tensor(cols, dtype=torch.int64).T.contiguous()  # [5, n]


def test_smallest_uniform_gives_z_max(device):
    """u = 2^-128 (all words zero) -> rho = sqrt(256 ln 2) = 13.3209 > tl.randn's 5.68."""
    half = 2**31  # theta = 0
    words = _words(
        (0, 0, 0, half, 0),  # u = 2^-128: z0 = Z_MAX
        (0, 0, 0, 0, 0),  # theta = -pi: z0 = -Z_MAX
        (0, 0, 0, half + 2**30, 0),  # theta = pi/2: z1 = Z_MAX
        (0, 0, 0, half, 2**32 - 1),  # u = 2^-96
        (0, 0, 1, half, 0),  # u ~ 2^-96
        (0, 1, 0, half, 0),  # u ~ 2^-64: sqrt(128 ln 2) = 9.42
        (1, 0, 0, half, 0),  # u ~ 2^-32: sqrt(64 ln 2) = 6.66 > 5.68
        (2**32 - 1, 2**32 - 1, 2**32 - 1, half, 2**32 - 1),  # u = 1: z = 0
    )
    z = N.normal_pair_from_words(words.to(device)).cpu().double()
    assert torch.isfinite(z).all()
    rtol = 2e-6
    assert z[0, 0] == pytest.approx(nz.Z_MAX, rel=rtol) and abs(z[1, 0]) < 1e-5 * nz.Z_MAX
    assert z[0, 1] == pytest.approx(-nz.Z_MAX, rel=rtol)
    assert z[1, 2] == pytest.approx(nz.Z_MAX, rel=rtol)
    assert z[0, 3] == pytest.approx(math.sqrt(192 * math.log(2)), rel=rtol)
    assert z[0, 4] == pytest.approx(math.sqrt(-2 * math.log(2**32 + 1.0) + 256 * math.log(2)), rel=rtol)
    assert z[0, 5] == pytest.approx(nz.Z_MAX_U64, rel=1e-5)
    assert z[0, 6] == pytest.approx(math.sqrt(64 * math.log(2)), rel=1e-5) and z[0, 6] > nz.Z_MAX_TL_RANDN
    assert z[0, 7] == 0.0 and z[1, 7] == 0.0
    assert z.abs().max() <= nz.Z_MAX * (1 + 2**-21)


def test_radius_relative_precision_across_all_word_positions(device):
    """-ln u keeps fp32 relative precision for u from 1 down to 2^-128 (the claimed
    |L~ - L| <= 2^-21 L + 2^-21, dpprims/noise.py): rho^2 / 2 against Python's double-precision
    log of the 128-bit integer (rho^2 / 2 adds one more fp32 rounding: 2^-23 L)."""
    g = np.random.default_rng(3)
    rows = []
    for k in range(4):  # number of leading zero words
        for _ in range(64):
            w = [int(x) for x in g.integers(0, 2**32, size=5)]
            w[:k] = [0] * k
            if k < 3:
                w[k] = max(w[k], 1) >> int(g.integers(0, 32))  # also tiny leading words
                w[k] = max(w[k], 1)
            w[3] = 2**31  # theta = 0: z0 = rho
            rows.append(w)
    words = _words(*rows)
    rho = N.normal_pair_from_words(words.to(device)).cpu().double()[0]
    for (w0, w1, w2, _, x0), r in zip(rows, rho.tolist()):
        J = (w0 << 96) | (w1 << 64) | (w2 << 32) | x0
        L = 128 * math.log(2) - math.log(J + 1)  # -ln u
        assert abs(r * r / 2 - L) <= 2**-21 * L + 2**-21 + 2**-23 * L, (w0, w1, w2, x0, r, L)


# ----------------------------------------------------------------------------- distribution
def test_ks_accepts_sigma_and_rejects_wrong_scales(device):
    """n = 20000: at 2/3 or 3/2 sigma the KS distance is ~0.09, 12x the p = 1e-6 critical value
    0.0076 (rejection is certain); at sigma the test is a valid alpha = 1e-3 test."""
    sigma = 1.7
    z = N.gaussian_noise(20000, std=sigma, seed=SEED, step=5, device=device).cpu().double().numpy()
    assert stats.kstest(z, stats.norm(scale=sigma).cdf).pvalue > 1e-3
    assert stats.kstest(z, stats.norm(scale=sigma * 2 / 3).cdf).pvalue < 1e-6
    assert stats.kstest(z, stats.norm(scale=sigma * 3 / 2).cdf).pvalue < 1e-6
    assert stats.kstest(z, stats.norm(loc=0.1 * sigma, scale=sigma).cdf).pvalue < 1e-6  # a biased mean too


def test_pairs_are_independent_normals(device):
    """z0 and z1 of a pair (elements 2j, 2j+1) are uncorrelated, and so is the radius with the
    angle: rho^2 = z0^2 + z1^2 ~ Exp(1/2) (chi-square with 2 dof), KS-tested."""
    z = N.gaussian_noise(40000, std=1.0, seed=SEED, step=6, device=device).cpu().double().numpy()
    z0, z1 = z[0::2], z[1::2]
    assert abs(np.corrcoef(z0, z1)[0, 1]) < 5 / math.sqrt(z0.size)
    assert stats.kstest(z0 ** 2 + z1 ** 2, stats.chi2(df=2).cdf).pvalue > 1e-3
    assert abs(np.corrcoef(z0 ** 2, z1 ** 2)[0, 1]) < 5 / math.sqrt(z0.size)


def test_tail_frequencies_match_normal(device):
    """4e6 draws: counts beyond 3, 4 and 5 against the exact normal tail (two-sided binomial
    tests at alpha = 1e-3); upper and lower tails separately at 3."""
    n = 4_000_000
    z = N.gaussian_noise(n, std=1.0, seed=SEED, step=7, pair_offset=10**9, device=device).cpu()
    for t in (3.0, 4.0, 5.0):
        k = int((z.abs() > t).sum())
        p = 2 * nz.normal_tail(t)
        assert stats.binomtest(k, n, p).pvalue > 1e-3, (t, k, n * p)
    for k in (int((z > 3).sum()), int((z < -3).sum())):
        assert stats.binomtest(k, n, nz.normal_tail(3.0)).pvalue > 1e-3


@pytest.mark.gpu
def test_tail_frequencies_gpu_1e8():
    """1e8 draws on the GPU: counts beyond 4.5, 5, 5.5, 6 against the exact tail; tl.randn's
    generator could never produce a value beyond 5.68, ours does at the normal rate."""
    n, chunk = 100_000_000, 10_000_000
    counts = {t: 0 for t in (4.5, 5.0, 5.5, 6.0)}
    zmax = 0.0
    for i in range(n // chunk):
        z = N.gaussian_noise(chunk, std=1.0, seed=SEED, step=11, pair_offset=i * chunk // 2, device="cuda")
        a = z.abs()
        zmax = max(zmax, float(a.max()))
        for t in counts:
            counts[t] += int((a > t).sum())
    for t, k in counts.items():
        assert stats.binomtest(k, n, 2 * nz.normal_tail(t)).pvalue > 1e-3, (t, k, n * 2 * nz.normal_tail(t))
    assert zmax < nz.Z_MAX


# ----------------------------------------------------------------------------- RNG layout
def test_pair_offsets_are_disjoint_and_cover():
    numels = [7, 0, 1, 1237, 2, 2**20 + 3, 1]
    offsets, total = nz.pair_offsets(numels)
    ranges = [(o, o + (n + 1) // 2) for o, n in zip(offsets, numels)]
    for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
        assert a1 == b0  # disjoint, in order, no gap
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    # counters: distinct across (pair, step, rank, extension)
    seen = {nz.counter_words(p, s, r, e) for p in (0, 1, 2**32, 2**62) for s in (0, 1, 2**31 - 1)
            for r in (0, 1, nz.MAX_RANK) for e in (False, True)}
    assert len(seen) == 4 * 3 * 3 * 2


def test_layout_limits_raise():
    with pytest.raises(ValueError, match="step"):
        nz.check_step(2**31)
    with pytest.raises(ValueError, match="step"):
        nz.check_step(-1)
    with pytest.raises(ValueError, match="rank"):
        nz.stream_word(2**20)
    with pytest.raises(ValueError, match="2\\^63"):
        nz.pair_offsets([2**63, 2**63])
    with pytest.raises(ValueError, match="seed"):
        nz.seed_words(2**64)
    with pytest.raises(ValueError, match="2\\^63"):
        N.gaussian_noise(10, seed=1, step=1, pair_offset=2**63 - 2)
    assert 0 <= nz.secure_seed() < 2**64


def test_parameter_noise_is_a_slice_of_one_stream(device):
    """Block-size independence and the layout: parameter i's noise is pairs
    [offset_i, offset_i + ceil(n_i/2)) of one stream, whatever the launch grid."""
    numels = [5, 1237, 64, 3]
    offsets, total = nz.pair_offsets(numels)
    stream = N.gaussian_noise(2 * total, std=1.0, seed=SEED, step=4, device=device).cpu()
    for n, off in zip(numels, offsets):
        z = N.gaussian_noise(n, std=1.0, seed=SEED, step=4, pair_offset=off, device=device).cpu()
        assert torch.equal(z, stream[2 * off: 2 * off + n])


def test_noise_unique_across_params_steps_seeds_ranks(device):
    """Different (parameter range, step, seed, rank) give unrelated noise: no equal values, sample
    correlation within 5 standard errors of 0; the same arguments give the same noise."""
    n = 20000
    base = dict(std=1.0, seed=SEED, step=3, pair_offset=0, rank=0)
    ref = N.gaussian_noise(n, device=device, **base).cpu()
    assert torch.equal(ref, N.gaussian_noise(n, device=device, **base).cpu())  # deterministic
    variants = {
        "param": dict(base, pair_offset=n // 2),
        "step": dict(base, step=4),
        "seed": dict(base, seed=SEED + 1),
        "seed-high-word": dict(base, seed=SEED ^ (1 << 40)),
        "rank": dict(base, rank=1),
    }
    for name, kw in variants.items():
        z = N.gaussian_noise(n, device=device, **kw).cpu()
        assert not torch.isclose(z, ref, rtol=0, atol=0).any(), name
        r = np.corrcoef(z.double().numpy(), ref.double().numpy())[0, 1]
        assert abs(r) < 5 / math.sqrt(n), (name, r)


def test_noisy_grads_over_parameter_list(device):
    """Non-fused noise over a parameter list: (grad + std z) / normaliser with z the noise of the
    parameter's own pair range; None grads (empty batch) are noised too; in_place agrees."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in ((3, 5), (1237,), (0,), (2, 2, 3))]
    for p in params[:2]:
        p.grad = torch.randn_like(p)
    out = N.noisy_grads(params, noise_std=2.0, normaliser=8.0, seed=SEED, step=12)
    offsets, _ = nz.pair_offsets([p.numel() for p in params])
    for p, off, g in zip(params, offsets, out):
        assert g.shape == p.shape
        base = p.grad if p.grad is not None else torch.zeros_like(p)
        z = N.gaussian_noise(p.numel(), std=1.0, seed=SEED, step=12, pair_offset=off, device=device)
        # same fp32 operations as the kernel: (x + std z) / normaliser (GPU may fuse to an FMA)
        exact = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g.reshape(-1), (base.reshape(-1) + 2.0 * z) / 8.0, **exact)
    assert params[3].grad is None
    inplace = N.noisy_grads(params, noise_std=2.0, normaliser=8.0, seed=SEED, step=12, in_place=True)
    for a, b in zip(inplace, out):
        assert torch.equal(a, b)
    assert params[3].grad is not None and torch.equal(params[3].grad, out[3])


# ----------------------------------------------------------------------------- delta bound
@pytest.mark.parametrize("sigma", [0.3, 0.5, 0.8, 1.0, 2.0, 10.0])
@pytest.mark.parametrize("q", [1e-4, 1e-2, 0.3, 1.0])
def test_truncation_delta_below_1e12(sigma, q):
    b = nz.truncation_delta_bound(sigma, q, 10**6)
    assert 0 < b < 1e-12


def test_truncation_delta_numbers():
    # the anchor of DESIGN.md: tl.randn's clamp at |z| = 5.68, sigma = 1, q = 0.01, 1000 steps,
    # the shift in one coordinate: T q Phibar(5.68 - 1) = 1.44e-5
    anchor = nz.truncation_delta_bound(1.0, 0.01, 1000, nz.Z_MAX_TL_RANDN, geometry="interval", dim=1, delta=1e-5)
    assert anchor == pytest.approx(1000 * 0.01 * nz.normal_tail(nz.Z_MAX_TL_RANDN - 1), rel=0.01)
    assert 1.3e-5 < anchor < 1.6e-5
    assert nz.Z_MAX_TL_RANDN == pytest.approx(5.6777, abs=1e-4)
    # why 128 bits: a 64-bit or 96-bit uniform does not reach 1e-12 at sigma = 0.3, q = 1, 1e6 steps
    assert nz.truncation_delta_bound(0.3, 1.0, 10**6, nz.Z_MAX_U64) > 1e-3
    assert nz.truncation_delta_bound(0.3, 1.0, 10**6, nz.Z_MAX_U96) > 1e-12
    assert nz.Z_MAX == pytest.approx(13.3209, abs=1e-4)
    # monotone in sigma, q and steps; edge cases
    assert nz.truncation_delta_bound(0.3, 1.0, 10**6) > nz.truncation_delta_bound(0.4, 1.0, 10**6)
    assert nz.truncation_delta_bound(1.0, 0.01, 1000, 5.68, geometry="interval", dim=1, delta=1e-5) < anchor
    assert nz.truncation_delta_bound(0.0, 0.1, 10) == 1.0
    assert nz.truncation_delta_bound(1.0, 0.0, 10) == 0.0
    # spreading the shift over many coordinates is worse for a tl.randn-like truncation
    spread = nz.truncation_delta_bound(1.0, 0.01, 1000, nz.Z_MAX_TL_RANDN, geometry="interval", dim=10**5, delta=0)
    assert spread > 100 * anchor


@pytest.mark.parametrize("geometry,R,B,dim", [
    ("disk", 2.5, 1.0, 2), ("disk", 3.0, 0.7, 40), ("interval", 2.0, 0.8, 1), ("interval", 2.5, 0.5, 30)])
def test_mismatch_bound_dominates_monte_carlo(geometry, R, B, dim):
    """The mismatch probability m used in the bound is >= the simulated probability that the
    truncated noise plus a worst-looking shift (concentrated, or spread evenly) leaves the set."""
    g = np.random.default_rng(0)
    n = 200_000
    bound = nz.mismatch_probability(1.0 / B, R, geometry=geometry, dim=dim)
    for spread in (False, True):
        a = np.zeros(dim)
        if spread:
            a[:] = B / math.sqrt(dim)
        else:
            a[0] = B
        x = g.standard_normal((n, dim))
        if geometry == "disk":
            pairs = lambda v: np.sqrt(v[:, 0::2] ** 2 + v[:, 1::2] ** 2)  # noqa: E731
            inside = (pairs(x) <= R).all(1)
            out = inside & ~(pairs(x + a) <= R).all(1)
        else:
            inside = (np.abs(x) <= R).all(1)
            out = inside & ~(np.abs(x + a) <= R).all(1)
        p_hat = out.sum() / inside.sum()
        assert p_hat <= bound + 4 * math.sqrt(bound / n) + 1e-6, (spread, p_hat, bound)
