"""PoissonSampler: distribution (chi-square tests that a shuffling sampler fails), physical
batching with masks, checkpoint/resume, secure mode, truncation, validation.

All statistical tests use fixed seeds (deterministic, no retries) and a 0.001 level."""
import json
import math

import numpy as np
import pytest
from scipy import stats

from dpprims import sampling
from dpprims.sampling import PoissonSampler

ALPHA = 1e-3
# os.urandom cannot be seeded, so the secure-mode tests draw afresh each run; they use a
# smaller level (false-alarm rate 1e-6) and still reject e.g. a 5% error in q by > 10 sigma.
ALPHA_UNSEEDED = 1e-6


# ---------------------------------------------------------------- helpers
def _binomial_gof_pvalue(sizes: np.ndarray, n: int, q: float) -> float:
    """Chi-square goodness of fit of observed batch sizes to Binomial(n, q).

    Bins are single values, tails merged until every bin expects >= 5 counts."""
    draws = sizes.size
    support = np.arange(n + 1)
    pmf = stats.binom.pmf(support, n, q)
    # build bins [lo, hi] with expected >= 5, merging from both tails
    edges, acc, start = [], 0.0, 0
    for k in range(n + 1):
        acc += pmf[k] * draws
        if acc >= 5 and pmf[k + 1:].sum() * draws >= 5:
            edges.append((start, k))
            start, acc = k + 1, 0.0
    edges.append((start, n))
    observed = np.array([np.sum((sizes >= lo) & (sizes <= hi)) for lo, hi in edges], dtype=float)
    expected = np.array([pmf[lo:hi + 1].sum() for lo, hi in edges]) * draws
    expected *= draws / expected.sum()
    return stats.chisquare(observed, expected).pvalue


class _ShufflingSampler:
    """The common non-DP practice: shuffle each epoch and slice fixed batches of N*q."""

    def __init__(self, n, q, seed):
        self.n, self.b, self.rng, self.queue = n, int(round(n * q)), np.random.default_rng(seed), []

    def sample(self):
        if len(self.queue) < self.b:
            self.queue = list(self.rng.permutation(self.n))
        out, self.queue = self.queue[: self.b], self.queue[self.b:]
        return np.sort(np.asarray(out, dtype=np.int64))


# ---------------------------------------------------------------- distribution
def test_batch_sizes_follow_binomial_and_shuffling_fails():
    n, q, draws = 1000, 0.05, 3000
    s = PoissonSampler(n, q, 16, seed=1)
    sizes = np.array([s.sample().size for _ in range(draws)])
    p = _binomial_gof_pvalue(sizes, n, q)
    assert p > ALPHA, f"Poisson batch sizes rejected as Binomial({n}, {q}): p = {p:.3g}"

    shuf = _ShufflingSampler(n, q, seed=1)
    sizes_shuf = np.array([shuf.sample().size for _ in range(draws)])
    p_shuf = _binomial_gof_pvalue(sizes_shuf, n, q)
    assert p_shuf < ALPHA, f"a fixed-size shuffling sampler passed the Binomial test: p = {p_shuf:.3g}"


def test_secure_batch_sizes_follow_binomial():
    n, q, draws = 500, 0.1, 1500
    s = PoissonSampler(n, q, 16, secure=True)
    sizes = np.array([s.sample().size for _ in range(draws)])
    p = _binomial_gof_pvalue(sizes, n, q)
    assert p > ALPHA_UNSEEDED, f"secure batch sizes rejected as Binomial({n}, {q}): p = {p:.3g}"


def _inclusion_dispersion(sample_fn, n, q, steps):
    counts = np.zeros(n, dtype=np.int64)
    for _ in range(steps):
        counts[sample_fn()] += 1
    z = (counts - steps * q) / math.sqrt(steps * q * (1 - q))
    chi2 = float(np.sum(z ** 2))  # independent Binomial(steps, q) counts under Poisson: ~chi2(n)
    p_two_sided = 2 * min(stats.chi2.sf(chi2, n), stats.chi2.cdf(chi2, n))
    return p_two_sided, float(np.abs(z).max())


def test_per_index_inclusion_counts_are_binomial_and_shuffling_fails():
    n, q, steps = 200, 0.1, 2000
    s = PoissonSampler(n, q, 8, seed=2)
    p, zmax = _inclusion_dispersion(s.sample, n, q, steps)
    assert p > ALPHA, f"per-index inclusion counts rejected as Binomial({steps}, {q}): p = {p:.3g}"
    # P(max of 200 |N(0,1)| > 4.8) ~ 3e-4
    assert zmax < 4.8, f"some index is included far too often or too rarely: max |z| = {zmax:.2f}"

    shuf = _ShufflingSampler(n, q, seed=2)
    p_shuf, _ = _inclusion_dispersion(shuf.sample, n, q, steps)
    assert p_shuf < ALPHA, f"epoch shuffling (every index once per epoch) passed: p = {p_shuf:.3g}"


def test_empty_batch_rate_matches_theory():
    n, q, draws = 20, 0.05, 4000
    s = PoissonSampler(n, q, 4, seed=3)
    empties = sum(s.sample().size == 0 for _ in range(draws))
    p0 = (1 - q) ** n  # 0.358
    p = stats.binomtest(empties, draws, p0).pvalue
    assert p > ALPHA, f"empty-batch rate {empties / draws:.4f} vs (1-q)^N = {p0:.4f}: p = {p:.3g}"


def test_sample_output_format():
    s = PoissonSampler(1000, 0.3, 64, seed=4)
    for _ in range(20):
        idx = s.sample()
        assert idx.dtype == np.int64 and idx.ndim == 1
        assert np.all(np.diff(idx) > 0), "indices must be sorted and unique"
        assert idx.size == 0 or (idx.min() >= 0 and idx.max() < 1000)
    assert s.draws == 20


def test_sample_rate_one_takes_everything():
    s = PoissonSampler(37, 1.0, 10, seed=0)
    np.testing.assert_array_equal(s.sample(), np.arange(37))
    np.testing.assert_array_equal(PoissonSampler(37, 1.0, 10, secure=True).sample(), np.arange(37))


# ---------------------------------------------------------------- physical batches
@pytest.mark.parametrize("k,p", [(0, 4), (1, 4), (4, 4), (5, 4), (13, 5), (100, 7)],
                         ids=lambda v: str(v))
def test_physical_batches_fixed_shapes_and_masks(k, p):
    s = PoissonSampler(200, 0.5, p, seed=0)
    rng = np.random.default_rng(k)
    logical = np.sort(rng.choice(200, size=k, replace=False)).astype(np.int64)
    batches = s.physical_batches(logical)
    assert len(batches) == max(1, math.ceil(k / p)) == s.num_physical_batches(k)
    for idx, mask in batches:
        assert idx.shape == (p,) and mask.shape == (p,)
        assert idx.dtype == np.int64 and mask.dtype == np.bool_
        assert np.all((idx >= 0) & (idx < 200)), "padding must use a valid index"
    masks = np.concatenate([m for _, m in batches])
    real = np.concatenate([i[m] for i, m in batches])
    assert masks.sum() == k
    np.testing.assert_array_equal(real, logical)  # every index exactly once, order kept
    if k == 0:
        assert len(batches) == 1 and not batches[0][1].any(), "empty batch -> exactly one all-padding batch"


def test_physical_batches_fixed_count_and_errors():
    s = PoissonSampler(100, 0.2, 4, seed=0, max_batch_size=10)
    assert s.max_physical_batches == 3
    batches = s.physical_batches(np.arange(5), num_batches=s.max_physical_batches)
    assert len(batches) == 3 and sum(int(m.sum()) for _, m in batches) == 5
    assert not batches[2][1].any()
    with pytest.raises(ValueError, match="num_batches"):
        s.physical_batches(np.arange(9), num_batches=2)
    with pytest.raises(ValueError, match="num_examples"):
        s.physical_batches(np.array([0, 100]))
    with pytest.raises(ValueError, match="1-D"):
        s.physical_batches(np.zeros((2, 2), dtype=np.int64))
    # an empty float array (np.array([])) is still an empty logical batch
    assert len(s.physical_batches(np.array([]))) == 1


# ---------------------------------------------------------------- checkpointing
def test_state_dict_resume_continues_identical_sequence():
    a = PoissonSampler(500, 0.07, 16, seed=123)
    for _ in range(7):
        a.sample()
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
    expected = [a.sample() for _ in range(10)]

    b = PoissonSampler(500, 0.07, 16, seed=999)
    b.load_state_dict(state)
    assert b.draws == 7
    for want in expected:
        np.testing.assert_array_equal(b.sample(), want)


def test_load_state_dict_rejects_other_parameters():
    state = PoissonSampler(500, 0.07, 16, seed=1).state_dict()
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonSampler(500, 0.08, 16, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="max_batch_size"):
        PoissonSampler(500, 0.07, 16, seed=1, max_batch_size=50).load_state_dict(state)


def test_same_seed_same_sequence_different_seed_differs():
    a, b, c = (PoissonSampler(300, 0.1, 8, seed=s) for s in (5, 5, 6))
    seq_a = [a.sample() for _ in range(5)]
    seq_b = [b.sample() for _ in range(5)]
    seq_c = [c.sample() for _ in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(seq_a, seq_b))
    assert not all(np.array_equal(x, y) for x, y in zip(seq_a, seq_c))


# ---------------------------------------------------------------- secure mode
def test_secure_mode_refuses_state_and_seed():
    s = PoissonSampler(100, 0.1, 8, secure=True)
    assert s.sample().dtype == np.int64
    with pytest.raises(RuntimeError, match="os.urandom"):
        s.state_dict()
    with pytest.raises(RuntimeError):
        s.load_state_dict({})
    with pytest.raises(ValueError, match="seed"):
        PoissonSampler(100, 0.1, 8, secure=True, seed=0)


def _fake_urandom(words):
    stream = b"".join(int(w).to_bytes(8, "little") for w in words)
    pos = [0]

    def urandom(k):
        out = stream[pos[0]:pos[0] + k]
        assert len(out) == k, "test stream exhausted"
        pos[0] += k
        return out

    return urandom


def test_secure_bernoulli_is_exact_at_ties(monkeypatch):
    # q = 1e-6 (~2^-20, 53-bit mantissa) has binary digits beyond 2^-64: a word equal to the
    # first 64 bits of q must be resolved by further words against the further bits of q,
    # not by rounding q * 2^64.
    from fractions import Fraction

    q = 1e-6
    scaled = Fraction(q) * 2 ** 64
    t0 = int(scaled)
    t1 = int((scaled - t0) * 2 ** 64)
    assert 0 < t1 and (scaled - t0) * 2 ** 64 == t1, "q's expansion should end within 128 bits"
    words = [t0 - 1, t0 + 1, t0, t0, t0]  # include, exclude, then three ties
    follow = [t1 - 1, t1 + 1, t1]  # tie 1 -> include, tie 2 -> exclude, tie 3: U == q -> exclude
    monkeypatch.setattr(sampling.os, "urandom", _fake_urandom(words + follow))
    np.testing.assert_array_equal(sampling._secure_bernoulli(5, q), [True, False, True, False, False])

    # q = 0.5 = exactly 2^63 / 2^64: U equal to q on every bit is not < q -> excluded
    monkeypatch.setattr(sampling.os, "urandom", _fake_urandom([2 ** 63, 2 ** 63 - 1]))
    np.testing.assert_array_equal(sampling._secure_bernoulli(2, 0.5), [False, True])


# ---------------------------------------------------------------- truncation
@pytest.mark.parametrize("secure", [False, True], ids=["pcg64", "secure"])
def test_truncated_cap_respected_and_distribution(secure):
    n, q, cap, draws = 100, 0.3, 32, 800
    s = PoissonSampler(n, q, 8, seed=None if secure else 7, secure=secure, max_batch_size=cap)
    assert s.truncated and s.max_batch_size == cap
    counts = np.zeros(n)
    sizes = []
    for _ in range(draws):
        idx = s.sample()
        assert idx.size <= cap and np.all(np.diff(idx) > 0)
        counts[idx] += 1
        sizes.append(idx.size)
    sizes = np.array(sizes)
    # min(Binomial(n, q), cap): compare P(K = cap) = P(Binomial >= cap) and the rest
    alpha = ALPHA_UNSEEDED if secure else ALPHA
    p_cap = stats.binom.sf(cap - 1, n, q)
    p = stats.binomtest(int(np.sum(sizes == cap)), draws, p_cap).pvalue
    assert p > alpha, f"P(K = cap) = {np.mean(sizes == cap):.3f}, expected {p_cap:.3f}: p = {p:.3g}"
    # every index equally likely (the kept subset is uniform): chi-square on inclusion counts
    p_uniform = stats.chisquare(counts).pvalue
    assert p_uniform > alpha, f"truncation favours some indices: p = {p_uniform:.3g}"


def test_cap_at_or_above_n_is_not_truncated():
    assert not PoissonSampler(10, 0.5, 4, max_batch_size=10).truncated
    assert not PoissonSampler(10, 0.5, 4).truncated
    assert PoissonSampler(10, 0.5, 4).max_physical_batches is None


# ---------------------------------------------------------------- validation / properties
@pytest.mark.parametrize(
    "args,kwargs,name",
    [
        ((0, 0.1, 4), {}, "num_examples"),
        ((10, 0.0, 4), {}, "sample_rate"),
        ((10, 1.5, 4), {}, "sample_rate"),
        ((10, float("nan"), 4), {}, "sample_rate"),
        ((10, 0.1, 0), {}, "physical_batch_size"),
        ((10, 0.1, 4), {"max_batch_size": 0}, "max_batch_size"),
    ],
    ids=["N0", "q0", "q>1", "qnan", "P0", "cap0"],
)
def test_validation_names_the_parameter(args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        PoissonSampler(*args, **kwargs)


def test_type_errors():
    with pytest.raises(TypeError, match="num_examples"):
        PoissonSampler(10.0, 0.1, 4)
    with pytest.raises(TypeError, match="sample_rate"):
        PoissonSampler(10, "x", 4)


def test_properties():
    s = PoissonSampler(60000, 256 / 60000, 128, seed=0)
    assert s.steps_per_epoch == round(60000 / 256) == 234
    assert s.expected_batch_size == pytest.approx(256)
    assert PoissonSampler(10, 1.0, 4).steps_per_epoch == 1
    assert "PoissonSampler(" in repr(s)
