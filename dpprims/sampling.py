"""Poisson subsampling with fixed physical shapes (DESIGN.md section 2).

A DP-SGD step with Poisson subsampling includes every one of the N training examples
independently with probability q. That is the sampling the privacy accountant analyses
(`dp_accounting.PoissonSampledDpEvent`); shuffling and slicing fixed-size batches is a
different mechanism with a weaker (or no) amplification guarantee, so the trainer must use
this sampler, not a shuffling data loader.

Fixed shapes: the logical batch has a random size K, so it is split into ceil(K / P)
physical batches of exactly P rows; the last one is padded and every physical batch carries
a boolean mask (padding rows have mask False and must get clip factor 0). Compiled code
(JAX jit, CUDA graphs, torch.compile) therefore only ever sees shape [P].

Numpy only: this module must not import torch or jax.
"""
from __future__ import annotations

import math
import os
import secrets
from fractions import Fraction
from typing import Any

import numpy as np

__all__ = ["PoissonSampler"]

_STATE_VERSION = 1
_TWO_64 = 1 << 64


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_sample_rate(sample_rate: Any) -> float:
    try:
        q = float(sample_rate)
    except (TypeError, ValueError):
        raise TypeError(f"sample_rate must be a real number in (0, 1], got {sample_rate!r}") from None
    if not (0.0 < q <= 1.0):  # also rejects NaN
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return q


def _secure_bernoulli(n: int, q: float) -> np.ndarray:
    """n independent Bernoulli(q) draws from the OS CSPRNG (os.urandom), exact for float q.

    Each draw is a uniform U in [0, 1) revealed 64 bits at a time and compared with the
    binary expansion of q (q is a float, so its expansion is finite): include iff U < q.
    The first 64-bit word decides unless it equals the first 64 bits of q (probability
    2^-64 per draw); ties are resolved exactly by drawing further words. There is no
    rounding of q * 2^64, so P(include) is exactly q.
    """
    if q >= 1.0:
        return np.ones(n, dtype=bool)
    frac = Fraction(q)  # exact binary rational
    scaled = frac * _TWO_64
    t0 = int(scaled)  # floor; < 2^64 since q < 1
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) if n else np.zeros(0, np.uint64)
    include = words < np.uint64(t0)
    for i in np.flatnonzero(words == np.uint64(t0)):  # practically never runs
        rest = scaled - t0
        while True:
            if rest == 0:  # U >= q once every remaining bit of q is zero
                include[i] = False
                break
            rest *= _TWO_64
            t = int(rest)
            rest -= t
            w = int.from_bytes(os.urandom(8), "little")
            if w != t:
                include[i] = w < t
                break
    return include


class PoissonSampler:
    """Poisson subsampler: each call to `sample()` is one logical batch of a DP-SGD step.

    Args:
      num_examples: N, the size of the training set (> 0).
      sample_rate: q in (0, 1]; every example is included independently with probability q.
      physical_batch_size: P (> 0), the fixed number of rows of every physical batch.
      seed: seed for numpy's PCG64 generator (int, SeedSequence or None = fresh OS entropy,
        still replayable through `state_dict`). Must be None when `secure=True`.
      secure: draw from the OS CSPRNG (`os.urandom`) instead of PCG64. PCG64 is predictable
        from its output, which a formal DP guarantee does not allow; `secure=True` is the
        mode for a real deployment. A secure sampler cannot be replayed, so `state_dict()`
        raises.
      max_batch_size: optional cap on the logical batch size (truncated Poisson sampling).
        When the Poisson draw K exceeds the cap, a uniformly random subset of `cap` of the
        sampled examples is kept. This is exactly the mechanism of
        `dp_accounting.TruncatedSubsampledGaussianDpEvent`, and the accountant must be built
        with the same cap (see `dpprims.plan.DPPlan`, which guarantees it).

    Guarantees:
      * `sample()` has exactly the distribution of N independent Bernoulli(q) inclusions
        (then truncated to a uniformly random subset of size `max_batch_size` if capped).
        Non-secure: K ~ Binomial(N, q), K <- min(K, cap), then a uniformly random K-subset
        (`Generator.choice(replace=False)`). Secure: per-example exact Bernoulli(q) from
        `os.urandom`, then a CSPRNG (`secrets.SystemRandom`) subset if over the cap.
      * Indices are returned SORTED ascending (int64). Order inside a logical batch does not
        change the clipped sum; sorted indices give memory-friendly gathers.
      * An empty logical batch (K = 0, probability (1-q)^N) is returned as an empty array and
        is a real step: noise is still added and the accountant still advances.
    """

    def __init__(
        self,
        num_examples: int,
        sample_rate: float,
        physical_batch_size: int,
        *,
        seed: int | np.random.SeedSequence | None = None,
        secure: bool = False,
        max_batch_size: int | None = None,
    ):
        self._n = _check_int("num_examples", num_examples, minimum=1)
        self._q = _check_sample_rate(sample_rate)
        self._p = _check_int("physical_batch_size", physical_batch_size, minimum=1)
        self._cap = None if max_batch_size is None else _check_int("max_batch_size", max_batch_size, minimum=1)
        self._secure = bool(secure)
        if self._secure and seed is not None:
            raise ValueError("seed must be None when secure=True: the secure sampler draws from os.urandom")
        self._rng = None if self._secure else np.random.Generator(np.random.PCG64(seed))
        self._draws = 0

    # ---------------------------------------------------------------- properties
    @property
    def num_examples(self) -> int:
        return self._n

    @property
    def sample_rate(self) -> float:
        return self._q

    @property
    def physical_batch_size(self) -> int:
        return self._p

    @property
    def max_batch_size(self) -> int | None:
        return self._cap

    @property
    def secure(self) -> bool:
        return self._secure

    @property
    def truncated(self) -> bool:
        """True when a cap is set that can actually bind (max_batch_size < num_examples)."""
        return self._cap is not None and self._cap < self._n

    @property
    def expected_batch_size(self) -> float:
        """q * N: the public normaliser of the noisy gradient (never the sampled size)."""
        return self._q * self._n

    @property
    def steps_per_epoch(self) -> int:
        """round(1 / q) (at least 1): the number of steps in one expected pass over the data."""
        return max(1, round(1.0 / self._q))

    @property
    def draws(self) -> int:
        """Number of logical batches drawn so far (saved in `state_dict`)."""
        return self._draws

    @property
    def max_physical_batches(self) -> int | None:
        """ceil(max_batch_size / P) when capped (an upper bound on physical batches per step), else None."""
        return None if self._cap is None else max(1, math.ceil(self._cap / self._p))

    # ---------------------------------------------------------------- sampling
    def sample(self) -> np.ndarray:
        """Draw one logical batch: sorted int64 indices into [0, N), possibly empty."""
        if self._secure:
            idx = np.flatnonzero(_secure_bernoulli(self._n, self._q)).astype(np.int64)
            if self._cap is not None and idx.size > self._cap:
                keep = secrets.SystemRandom().sample(range(idx.size), self._cap)
                idx = idx[np.sort(np.asarray(keep, dtype=np.int64))]
        else:
            k = int(self._rng.binomial(self._n, self._q))
            if self._cap is not None:
                k = min(k, self._cap)
            idx = np.sort(self._rng.choice(self._n, size=k, replace=False)).astype(np.int64)
        self._draws += 1
        return idx

    def num_physical_batches(self, batch_size: int) -> int:
        """ceil(K / P), and 1 for K = 0 (an empty logical batch is one all-padding batch)."""
        return max(1, math.ceil(batch_size / self._p))

    def physical_batches(
        self, indices: np.ndarray, num_batches: int | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Split a logical batch into physical batches of exactly P rows.

        Returns a list of (idx [P] int64, mask [P] bool). Real rows come first and keep the
        order of `indices`; padding rows hold index 0 (always a valid index) with mask False.
        Every index of `indices` appears exactly once with mask True, and the masks sum to K.

        Edge cases:
          * K = 0 (empty logical batch): exactly ONE all-padding batch (mask all False), so the
            step still runs with fixed shapes, adds noise and advances the accountant.
          * `num_batches`: pad with further all-padding batches up to this many (e.g.
            `max_physical_batches` for a fixed-trip-count loop under jit). Raises ValueError
            if the logical batch needs more.
        """
        idx = np.asarray(indices)
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        k = idx.size
        if k and (idx.min() < 0 or idx.max() >= self._n):
            raise ValueError(f"indices must lie in [0, num_examples={self._n}), got range [{idx.min()}, {idx.max()}]")
        n = self.num_physical_batches(k)
        if num_batches is not None:
            num_batches = _check_int("num_batches", num_batches, minimum=1)
            if num_batches < n:
                raise ValueError(
                    f"num_batches={num_batches} is too small for a logical batch of {k} examples "
                    f"at physical_batch_size={self._p} (needs {n})"
                )
            n = num_batches
        flat_idx = np.zeros(n * self._p, dtype=np.int64)
        flat_mask = np.zeros(n * self._p, dtype=bool)
        flat_idx[:k] = idx
        flat_mask[:k] = True
        flat_idx = flat_idx.reshape(n, self._p)
        flat_mask = flat_mask.reshape(n, self._p)
        return [(flat_idx[j], flat_mask[j]) for j in range(n)]

    def sample_physical(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """`physical_batches(sample())`: one logical batch, already split and padded."""
        return self.physical_batches(self.sample())

    # ---------------------------------------------------------------- checkpointing
    def _params(self) -> dict:
        return {
            "num_examples": self._n,
            "sample_rate": self._q,
            "physical_batch_size": self._p,
            "max_batch_size": self._cap,
        }

    def state_dict(self) -> dict:
        """Parameters, draw count and the exact PCG64 state (plain Python types, JSON-able).

        Raises RuntimeError for `secure=True`: OS entropy cannot be replayed.
        """
        if self._secure:
            raise RuntimeError(
                "PoissonSampler(secure=True) has no state to save: it draws from os.urandom, "
                "which cannot be replayed. A resumed secure run simply continues with fresh "
                "randomness (the privacy analysis does not need the sequence to repeat)."
            )
        return {
            "version": _STATE_VERSION,
            **self._params(),
            "draws": self._draws,
            "rng_state": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; the sampler then continues the identical sequence.

        Raises ValueError if the saved parameters differ from this sampler's, RuntimeError
        for a secure sampler.
        """
        if self._secure:
            raise RuntimeError("PoissonSampler(secure=True) cannot load a replayable RNG state")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported sampler state version {state.get('version')!r} (expected {_STATE_VERSION})")
        mismatched = {k: (state.get(k), v) for k, v in self._params().items() if state.get(k) != v}
        if mismatched:
            details = ", ".join(f"{k}: saved {s!r} != current {c!r}" for k, (s, c) in mismatched.items())
            raise ValueError(f"sampler state does not match this sampler's parameters ({details})")
        rng_state = state["rng_state"]
        if rng_state.get("bit_generator") != "PCG64":
            raise ValueError(f"sampler state holds a {rng_state.get('bit_generator')!r} state, expected 'PCG64'")
        self._rng.bit_generator.state = rng_state
        self._draws = int(state["draws"])

    def __repr__(self) -> str:
        return (
            f"PoissonSampler(num_examples={self._n}, sample_rate={self._q}, "
            f"physical_batch_size={self._p}, secure={self._secure}, max_batch_size={self._cap})"
        )
