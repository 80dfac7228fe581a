"""Privacy accounting for Poisson-subsampled DP-SGD, on top of Google's `dp_accounting`.

No privacy math is written here: every epsilon comes from `dp_accounting`'s RDP or PLD
accountant applied to the DpEvent of the run. What this module adds is bookkeeping (a step
counter that checkpoints and refuses to load into a differently-configured run) and noise
calibration.

Mechanism and neighbouring relation: each step is the sampled Gaussian mechanism with
sensitivity 1 (the clip norm; noise std = noise_multiplier * clip norm) under Poisson
subsampling with rate q, i.e. `PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`, composed
over the steps, for ADD_OR_REMOVE_ONE neighbours (dp_accounting's default, and the relation
under which Poisson subsampling amplifies).

Truncated Poisson sampling (a cap `max_batch_size` on the logical batch, see
`dpprims.sampling.PoissonSampler`):
  * method="pld": dp_accounting's `TruncatedSubsampledGaussianDpEvent` (arXiv 2508.15089),
    the exact mechanism the sampler implements (Poisson, then a uniformly random subset of
    size cap). Its `dataset_size` is passed as num_examples + 1: the truncation probability
    grows with the number of other examples, so the add-one neighbour is the worst case.
  * method="rdp": dp_accounting's RDP accountant does not support that event, so a sound
    total-variation bound is used instead. With tau = P[Binomial(N + 1, q) > cap], the
    truncated run and the untruncated run coincide except with probability <= T * tau
    (couple the two with the same randomness), on either neighbour, hence the truncated run
    is (eps, delta_rdp + T * tau * (1 + e^eps))-DP whenever the untruncated one is
    (eps, delta_rdp)-DP. `epsilon()` returns the smallest eps (fixed-point iteration) with
    eps >= eps_rdp(delta - T * tau * (1 + e^eps)), or inf if none exists. For a cap a few
    standard deviations above q*N, tau is astronomically small and this equals plain RDP;
    for a cap within ~5 standard deviations of q*N, T * tau exceeds delta and epsilon is inf
    (e.g. N=60000, q=256/60000, cap=330, 14062 steps): use method="pld" for tight caps.

Numpy / scipy / dp_accounting only: no torch or jax imports.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Any

import numpy as np

__all__ = ["PrivacyAccountant", "calibrate_noise_multiplier", "METHODS"]

METHODS = ("rdp", "pld")
_PLD_DISCRETIZATION = 1e-4  # dp_accounting's default value_discretization_interval
_STATE_VERSION = 1


def _dpa():
    import dp_accounting  # imported lazily: ~0.5 s, and only the accountant needs it

    return dp_accounting


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None


def _validate(noise_multiplier, sample_rate, delta, method, max_batch_size, num_examples):
    sigma = _check_number("noise_multiplier", noise_multiplier)
    if not (sigma >= 0.0) or math.isinf(sigma):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    q = _check_number("sample_rate", sample_rate)
    if not (0.0 < q <= 1.0):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    d = _check_number("delta", delta)
    if not (0.0 < d < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if num_examples is not None:
        if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
            raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
        num_examples = int(num_examples)
    if max_batch_size is not None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, (int, np.integer)) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        max_batch_size = int(max_batch_size)
        if num_examples is None:
            raise ValueError(
                "max_batch_size (truncated Poisson sampling) needs num_examples: the privacy "
                "of truncation depends on the dataset size"
            )
    return sigma, q, d, method, max_batch_size, num_examples


def _truncation_tail(num_examples: int, sample_rate: float, cap: int) -> float:
    """tau = P[Binomial(N + 1, q) > cap]: a step is truncated on either neighbour w.p. <= tau."""
    from scipy import stats

    return float(stats.binom.sf(cap, num_examples + 1, sample_rate))


@contextlib.contextmanager
def _quiet_absl():
    """dp_accounting's RDP code logs a warning for each Renyi order whose series does not
    converge (e.g. alpha = 1.1 at q = 0.06) and then excludes that order: epsilon is the minimum
    over the remaining orders, still a valid upper bound. Silence that per-call noise."""
    lg = logging.getLogger("absl")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)


def _epsilon(sigma, q, delta, steps, method, cap, n) -> float:
    with _quiet_absl():
        return _epsilon_impl(sigma, q, delta, steps, method, cap, n)


@functools.lru_cache(maxsize=512)
def _epsilon_impl(sigma, q, delta, steps, method, cap, n) -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps (see the module docstring).

    Memoised (PLD evaluations take up to seconds; plans and checkpoints ask repeatedly)."""
    if steps == 0:
        return 0.0
    if sigma == 0.0:
        return math.inf
    dpa = _dpa()
    ev = dpa.dp_event
    truncated = cap is not None and cap < n
    if method == "pld":
        acc = dpa.pld.PLDAccountant(value_discretization_interval=_PLD_DISCRETIZATION)
        if truncated:
            event = ev.TruncatedSubsampledGaussianDpEvent(
                dataset_size=n + 1, sampling_probability=q, truncated_batch_size=cap, noise_multiplier=sigma
            )
        else:
            event = ev.PoissonSampledDpEvent(q, ev.GaussianDpEvent(sigma))
        acc.compose(event, steps)
        return float(acc.get_epsilon(delta))

    orders, rdp_one = _rdp_one_step(sigma, q)
    rdp = steps * rdp_one

    def eps_at(d: float) -> float:
        return float(dpa.rdp.compute_epsilon(orders, rdp, d)[0])

    if not truncated:
        return eps_at(delta)
    # Truncated + RDP: total-variation bound, smallest eps with eps >= f(eps) where
    # f(eps) = eps_rdp(delta - T tau (1 + e^eps)) is increasing; iterate from below.
    slack = steps * _truncation_tail(n, q, cap)
    if slack == 0.0:
        return eps_at(delta)

    def f(eps: float) -> float:
        remaining = delta - slack * (1.0 + math.exp(min(eps, 700.0)))
        return math.inf if remaining <= 0.0 else eps_at(remaining)

    eps = 0.0
    for _ in range(200):
        nxt = f(eps)
        if not math.isfinite(nxt):
            return math.inf
        if nxt - eps <= 1e-12 * max(1.0, nxt):
            break
        eps = nxt
    candidate = nxt * (1.0 + 1e-9) + 1e-12
    return candidate if f(candidate) <= candidate else math.inf


@functools.lru_cache(maxsize=256)
def _rdp_one_step(sigma: float, q: float) -> tuple:
    """(orders, RDP vector) of ONE Poisson-subsampled Gaussian step: dp_accounting's
    RdpAccountant (default orders) after compose(event, 1), read through its public ``orders``
    and ``rdp``. RDP composes additively and RdpAccountant.compose(event, count) adds exactly
    count * (this vector) to zeros, so ``steps * rdp`` is the accountant's own vector after
    compose(event, steps), bit for bit (tests/test_accounting.py compares them), and epsilon
    follows from dp_accounting.rdp.compute_epsilon as RdpAccountant.get_epsilon computes it.
    Privacy-relevant only as a cache: the one-step vector is the expensive part (~30 ms for
    the ~150 default orders), which the trainer's per-step epsilon paid every step."""
    dpa = _dpa()
    acc = dpa.rdp.RdpAccountant()
    acc.compose(dpa.dp_event.PoissonSampledDpEvent(q, dpa.dp_event.GaussianDpEvent(sigma)), 1)
    return acc.orders, acc.rdp


class PrivacyAccountant:
    """Step counter + (epsilon, delta) of a Poisson-subsampled Gaussian DP-SGD run.

    Args:
      noise_multiplier: sigma (>= 0); the noise std is sigma * clip norm. sigma = 0 gives
        epsilon = inf after any step.
      sample_rate: q in (0, 1].
      delta: target delta in (0, 1).
      method: "rdp" (dp_accounting RdpAccountant, default orders, improved RDP -> DP
        conversion) or "pld" (dp_accounting PLDAccountant, discretisation 1e-4: tighter).
      max_batch_size: cap on the logical batch (truncated Poisson); needs num_examples.
      num_examples: N (only needed with max_batch_size).

    `epsilon()` is recomputed by dp_accounting for the requested step count (RDP: from the
    one-step RDP vector, computed once per (sigma, q), times the step count; ~0.1-2 s for PLD),
    memoised per step count.
    """

    def __init__(
        self,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        *,
        method: str = "rdp",
        max_batch_size: int | None = None,
        num_examples: int | None = None,
    ):
        (self.noise_multiplier, self.sample_rate, self.delta, self.method, self.max_batch_size,
         self.num_examples) = _validate(noise_multiplier, sample_rate, delta, method, max_batch_size, num_examples)
        self.steps = 0
        self._cache: dict[int, float] = {}

    @property
    def truncated(self) -> bool:
        """True when the cap can bind (max_batch_size < num_examples) and is accounted for."""
        return self.max_batch_size is not None and self.max_batch_size < self.num_examples

    def step(self, n: int = 1) -> None:
        """Record n more steps (n >= 0). Empty logical batches count: they are real steps."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        self.steps += int(n)

    def epsilon(self, steps: int | None = None) -> float:
        """Epsilon at `self.delta` after `steps` steps (default: the steps taken so far).

        0 steps -> 0.0; noise_multiplier 0 -> inf (after >= 1 step).
        """
        t = self.steps if steps is None else steps
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
            raise ValueError(f"steps must be a non-negative int, got {t!r}")
        t = int(t)
        if t not in self._cache:
            self._cache[t] = _epsilon(
                self.noise_multiplier, self.sample_rate, self.delta, t, self.method,
                self.max_batch_size, self.num_examples,
            )
        return self._cache[t]

    def dp_event(self, steps: int | None = None):
        """The dp_accounting DpEvent of `steps` steps (default: steps taken), for composing
        with other mechanisms in an external accountant. Truncated runs give the
        `TruncatedSubsampledGaussianDpEvent` (dataset_size = num_examples + 1)."""
        ev = _dpa().dp_event
        t = self.steps if steps is None else int(steps)
        if self.truncated:
            one = ev.TruncatedSubsampledGaussianDpEvent(
                dataset_size=self.num_examples + 1, sampling_probability=self.sample_rate,
                truncated_batch_size=self.max_batch_size, noise_multiplier=self.noise_multiplier,
            )
        else:
            one = ev.PoissonSampledDpEvent(self.sample_rate, ev.GaussianDpEvent(self.noise_multiplier))
        return ev.SelfComposedDpEvent(one, t)

    # ---------------------------------------------------------------- checkpointing
    def _params(self) -> dict:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "method": self.method,
            "max_batch_size": self.max_batch_size,
            "num_examples": self.num_examples,
        }

    def state_dict(self) -> dict:
        return {"version": _STATE_VERSION, "steps": self.steps, **self._params()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step count. Raises ValueError if any saved parameter differs from this
        accountant's (floats compared to 1e-12 relative): resuming a run under different
        privacy parameters would make the reported epsilon meaningless."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported accountant state version {state.get('version')!r} (expected {_STATE_VERSION})")
        bad = []
        for key, mine in self._params().items():
            saved = state.get(key)
            if isinstance(mine, float) and isinstance(saved, (int, float)) and not isinstance(saved, bool):
                ok = math.isclose(mine, float(saved), rel_tol=1e-12, abs_tol=0.0)
            else:
                ok = saved == mine
            if not ok:
                bad.append(f"{key}: saved {saved!r} != current {mine!r}")
        if bad:
            raise ValueError("accountant state does not match this accountant's parameters (" + ", ".join(bad) + ")")
        steps = state.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ValueError(f"accountant state has an invalid step count {steps!r}")
        self.steps = int(steps)

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant(noise_multiplier={self.noise_multiplier}, sample_rate={self.sample_rate}, "
            f"delta={self.delta}, method={self.method!r}, max_batch_size={self.max_batch_size}, "
            f"num_examples={self.num_examples}, steps={self.steps})"
        )


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    method: str = "rdp",
    *,
    max_batch_size: int | None = None,
    num_examples: int | None = None,
    rtol: float = 1e-4,
) -> float:
    """Smallest noise multiplier (to `rtol` relative) whose epsilon after `steps` is <= target.

    Never overshoots: the returned sigma is the upper end of a bisection bracket, and its
    epsilon has been computed and checked to be <= target_epsilon. Tightness: the true
    optimum sigma* satisfies sigma* >= sigma * (1 - rtol). Uses the same `_epsilon` as
    `PrivacyAccountant`, so a plan's accountant reproduces the calibrated budget exactly.
    """
    eps_t = _check_number("target_epsilon", target_epsilon)
    if not (eps_t > 0.0) or math.isinf(eps_t):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not (0.0 < rtol < 1.0):
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    _, q, d, method, cap, n = _validate(1.0, sample_rate, delta, method, max_batch_size, num_examples)
    steps = int(steps)

    cache: dict[float, float] = {}

    def eps(sigma: float) -> float:
        if sigma not in cache:
            cache[sigma] = _epsilon(sigma, q, d, steps, method, cap, n)
        return cache[sigma]

    # 1. bracket: eps(lo) > target >= eps(hi), by doubling / halving from sigma = 1
    lo, hi = 0.0, 1.0
    if eps(hi) > eps_t:
        while eps(hi) > eps_t:
            lo, hi = hi, hi * 2.0
            if hi > 2.0 ** 30:
                raise ValueError(
                    f"no noise multiplier <= 2^30 reaches epsilon {eps_t} at delta {d} "
                    f"(sample_rate={q}, steps={steps}, method={method!r}, max_batch_size={cap}): "
                    "with truncation under RDP the delta slack may exceed delta (try method='pld')"
                )
    else:
        lo = 0.5
        while eps(lo) <= eps_t:
            hi, lo = lo, lo * 0.5
            if lo < 1e-6:
                return hi  # any sigma this small already meets the target
    # 2. Brent on log(eps / target) for a fast estimate (each PLD evaluation is costly) ...
    from scipy import optimize

    def gap(sigma: float) -> float:
        return math.log(min(max(eps(sigma), 1e-300), 1e300) / eps_t)

    xtol = 0.25 * rtol * lo
    try:
        root = optimize.brentq(gap, lo, hi, xtol=xtol)
        for probe in (root + xtol, root - xtol):
            if lo < probe < hi:
                if eps(probe) <= eps_t:
                    hi = probe
                else:
                    lo = probe
    except (ValueError, RuntimeError):  # fall through to plain bisection
        pass
    # 3. ... and bisection on the verified bracket, so the answer is always a checked upper end.
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        if eps(mid) <= eps_t:
            hi = mid
        else:
            lo = mid
    return hi
