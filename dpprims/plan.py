"""DPPlan: the one frozen set of parameters a DP-SGD run is built from.

The sampler, the accountant and the noise scale are all derived from a `DPPlan`, so they
cannot disagree (the habit of jax_privacy's execution plan): the sampler's q and cap are the
accountant's q and cap, the noise std is noise_multiplier * max_grad_norm, the gradient
normaliser is the public expected batch size q * N, and the step count the accountant was
calibrated for is the step count the trainer is allowed to run.

Numpy only (plus dp_accounting through `dpprims.accounting`): no torch or jax imports.
"""
from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any

import numpy as np

from dpprims.accounting import METHODS, PrivacyAccountant, _epsilon, calibrate_noise_multiplier
from dpprims.sampling import PoissonSampler

__all__ = ["DPPlan", "BudgetExhaustedError"]


class BudgetExhaustedError(RuntimeError):
    """Raised when a step would go past the plan's step count (and so its privacy budget)."""


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _steps_for_epochs(epochs: float, num_examples: int, expected_batch_size: float) -> int:
    """ceil(epochs / q) = ceil(epochs * N / B), computed on exact rationals of the given
    numbers so that e.g. epochs=1, N=1000, B=100 gives 10 and not 11 from float fuzz."""
    return math.ceil(Fraction(epochs) * num_examples / Fraction(expected_batch_size))


@dataclasses.dataclass(frozen=True)
class DPPlan:
    """Frozen DP-SGD parameters. Build with `DPPlan.create(...)`; the constructor takes the
    resolved values (steps, noise_multiplier) and validates them.

    Fields:
      num_examples: N, training-set size.
      expected_batch_size: B = q * N (> 0, <= N); may be fractional.
      physical_batch_size: P, rows per physical batch (fixed compiled shape).
      steps: number of DP-SGD steps the plan (and its privacy budget) covers.
      max_grad_norm: clip norm C (> 0, finite).
      noise_multiplier: sigma (>= 0; 0 is non-private and gives epsilon = inf).
      delta: delta of the (epsilon, delta) guarantee, in (0, 1).
      accountant: "rdp" or "pld".
      max_batch_size: optional cap on the logical batch (truncated Poisson), >= 1.
      target_epsilon: the epsilon sigma was calibrated for (None if sigma was given).
    """

    num_examples: int
    expected_batch_size: float
    physical_batch_size: int
    steps: int
    max_grad_norm: float
    noise_multiplier: float
    delta: float
    accountant: str = "rdp"
    max_batch_size: int | None = None
    target_epsilon: float | None = None

    def __post_init__(self):
        if not _is_int(self.num_examples) or self.num_examples < 1:
            raise ValueError(f"num_examples must be a positive int, got {self.num_examples!r}")
        b = self.expected_batch_size
        if isinstance(b, bool) or not isinstance(b, (int, float, np.integer, np.floating)) or not (0 < b <= self.num_examples):
            raise ValueError(f"expected_batch_size must be in (0, num_examples={self.num_examples}], got {b!r}")
        if not _is_int(self.physical_batch_size) or self.physical_batch_size < 1:
            raise ValueError(f"physical_batch_size must be a positive int, got {self.physical_batch_size!r}")
        if not _is_int(self.steps) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        c = self.max_grad_norm
        if isinstance(c, bool) or not isinstance(c, (int, float, np.integer, np.floating)) or not (0 < c < math.inf):
            raise ValueError(f"max_grad_norm must be finite and > 0, got {c!r}")
        s = self.noise_multiplier
        if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)) or not (0 <= s < math.inf):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {s!r}")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float, np.floating)) or not (0 < self.delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in METHODS:
            raise ValueError(f"accountant must be one of {METHODS}, got {self.accountant!r}")
        if self.max_batch_size is not None and (not _is_int(self.max_batch_size) or self.max_batch_size < 1):
            raise ValueError(f"max_batch_size must be a positive int or None, got {self.max_batch_size!r}")
        if self.target_epsilon is not None and not (0 < self.target_epsilon < math.inf):
            raise ValueError(f"target_epsilon must be finite and > 0, got {self.target_epsilon!r}")

    # ---------------------------------------------------------------- construction
    @classmethod
    def create(
        cls,
        *,
        num_examples: int,
        expected_batch_size: float,
        physical_batch_size: int,
        max_grad_norm: float,
        delta: float,
        epochs: float | None = None,
        steps: int | None = None,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        accountant: str = "rdp",
        max_batch_size: int | None = None,
        calibration_rtol: float = 1e-4,
    ) -> "DPPlan":
        """Resolve a plan. Give exactly one of `epochs` / `steps` and exactly one of
        `noise_multiplier` / `target_epsilon`.

        steps = ceil(epochs / q) = ceil(epochs * N / B) (rounded UP, so the run covers at least
        `epochs` expected passes; the accountant is charged for every one of those steps).
        With `target_epsilon`, sigma is calibrated for exactly those steps, the sampler's q and
        cap, and the chosen accountant; epsilon_at(steps) <= target_epsilon is guaranteed.
        """
        if (epochs is None) == (steps is None):
            raise ValueError("give exactly one of epochs= or steps=")
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier= or target_epsilon=")
        if not _is_int(num_examples) or num_examples < 1:
            raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
        if isinstance(expected_batch_size, bool) or not isinstance(
            expected_batch_size, (int, float, np.integer, np.floating)
        ) or not (0 < expected_batch_size <= num_examples):
            raise ValueError(f"expected_batch_size must be in (0, num_examples={num_examples}], got {expected_batch_size!r}")
        if epochs is not None:
            if isinstance(epochs, bool) or not isinstance(epochs, (int, float, np.integer, np.floating)) or not (
                0 < epochs < math.inf
            ):
                raise ValueError(f"epochs must be finite and > 0, got {epochs!r}")
            steps = _steps_for_epochs(epochs, num_examples, expected_batch_size)
        if not _is_int(steps) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        steps = int(steps)
        if target_epsilon is not None:
            noise_multiplier = calibrate_noise_multiplier(
                target_epsilon, delta, expected_batch_size / num_examples, steps, accountant,
                max_batch_size=max_batch_size, num_examples=num_examples, rtol=calibration_rtol,
            )
        return cls(
            num_examples=int(num_examples),
            expected_batch_size=expected_batch_size,
            physical_batch_size=physical_batch_size,
            steps=steps,
            max_grad_norm=float(max_grad_norm) if not isinstance(max_grad_norm, bool) else max_grad_norm,
            noise_multiplier=float(noise_multiplier) if not isinstance(noise_multiplier, bool) else noise_multiplier,
            delta=delta,
            accountant=accountant,
            max_batch_size=max_batch_size,
            target_epsilon=None if target_epsilon is None else float(target_epsilon),
        )

    # ---------------------------------------------------------------- derived values
    @property
    def sample_rate(self) -> float:
        """q = expected_batch_size / num_examples."""
        return self.expected_batch_size / self.num_examples

    @property
    def epochs(self) -> float:
        """steps * q: expected passes over the data actually planned (>= the requested epochs)."""
        return self.steps * self.sample_rate

    @property
    def steps_per_epoch(self) -> int:
        return max(1, round(1.0 / self.sample_rate))

    @property
    def noise_std(self) -> float:
        """sigma * C: std of the Gaussian added to the clipped gradient SUM (once per logical batch)."""
        return self.noise_multiplier * self.max_grad_norm

    @property
    def normaliser(self) -> float:
        """q * N = expected_batch_size: the PUBLIC divisor of the noisy sum. Never divide by
        the sampled batch size K: K depends on the data set and would leak membership."""
        return float(self.expected_batch_size)

    @property
    def truncated(self) -> bool:
        return self.max_batch_size is not None and self.max_batch_size < self.num_examples

    @property
    def max_physical_batches(self) -> int | None:
        """ceil(max_batch_size / P) when capped, else None (the count per step is unbounded)."""
        if self.max_batch_size is None:
            return None
        return max(1, math.ceil(self.max_batch_size / self.physical_batch_size))

    # ---------------------------------------------------------------- builders
    def make_sampler(self, seed: int | None = None, secure: bool = False) -> PoissonSampler:
        """The Poisson sampler of this plan (same q and cap as the accountant)."""
        return PoissonSampler(
            self.num_examples, self.sample_rate, self.physical_batch_size,
            seed=seed, secure=secure, max_batch_size=self.max_batch_size,
        )

    def make_accountant(self) -> PrivacyAccountant:
        """A fresh accountant (0 steps) of this plan."""
        return PrivacyAccountant(
            self.noise_multiplier, self.sample_rate, self.delta, method=self.accountant,
            max_batch_size=self.max_batch_size,
            num_examples=self.num_examples,
        )

    def epsilon_at(self, steps: int) -> float:
        """Epsilon at `delta` after `steps` steps (0 -> 0.0; sigma 0 -> inf)."""
        if not _is_int(steps) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        return _epsilon(
            self.noise_multiplier, self.sample_rate, self.delta, int(steps), self.accountant,
            self.max_batch_size, self.num_examples,
        )

    @property
    def epsilon(self) -> float:
        """Epsilon of the whole plan (after `steps` steps)."""
        return self.epsilon_at(self.steps)

    def remaining_steps(self, steps_taken: int) -> int:
        return max(0, self.steps - int(steps_taken))

    def check_budget(self, steps_taken: int) -> None:
        """Call BEFORE a step with the number of steps already taken. Raises
        BudgetExhaustedError if that step would be step `steps + 1` or later, i.e. if
        steps_taken >= steps: the privacy guarantee of the plan covers `steps` steps only."""
        if not _is_int(steps_taken) or steps_taken < 0:
            raise ValueError(f"steps_taken must be a non-negative int, got {steps_taken!r}")
        if steps_taken >= self.steps:
            budget = f"epsilon = {self.epsilon_at(self.steps):.4g} at delta = {self.delta:g}"
            raise BudgetExhaustedError(
                f"privacy budget exhausted: {steps_taken} steps taken, the plan covers {self.steps} "
                f"({budget}); another step would exceed it. Make a new plan with more steps "
                "(and a larger epsilon or more noise) to train further."
            )

    def summary(self) -> dict:
        """Plain-Python dict of every field and derived value (JSON-able; epsilon computed)."""
        d = dataclasses.asdict(self)
        d.update(
            sample_rate=self.sample_rate,
            epochs=self.epochs,
            steps_per_epoch=self.steps_per_epoch,
            noise_std=self.noise_std,
            normaliser=self.normaliser,
            truncated=self.truncated,
            epsilon=self.epsilon,
        )
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in d.items()}
