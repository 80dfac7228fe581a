"""Poisson logical batches as fixed-shape physical batches with masks, for your own loop.

    batches = PoissonBatches(plan, (x, y), seed=0)        # x, y: arrays indexed by example
    for logical in batches:                                # plan.steps logical batches
        for xb, yb, mask in logical:                       # each [P, ...]; mask [P] bool
            ...accumulate the clipped sums of (xb, yb) with mask...
        ...add the noise once, divide by plan.normaliser, step...

Framework-neutral (numpy only): the arrays are indexed as given (numpy arrays, or anything
supporting integer-array indexing), so the batches are numpy for numpy data; JAX jit takes them
directly. The sampler comes from the plan (``plan.make_sampler``), so its rate q and cap are the
accountant's. Guarantees and edge cases (dpprims.sampling.PoissonSampler):

* every example is included independently with probability q (Binomial size, then a uniform
  subset: the same law), truncated to ``plan.max_batch_size`` if the plan has a cap;
* a logical batch of K examples is ceil(K / P) physical batches of exactly P rows; padding rows
  repeat example 0 and have mask False - they must contribute nothing (give the mask to
  ``clipped_grad``);
* an empty logical batch (K = 0) is ONE all-padding batch: a real step that still gets noise;
* ``num_batches="max"`` pads every logical batch to ``plan.max_physical_batches`` (capped plans
  only), for a loop with a fixed trip count (``lax.scan`` over the physical batches);
* iteration stops after ``plan.steps`` logical batches (the plan's privacy budget);
* ``state_dict()`` / ``load_state_dict()`` hold the sampler's exact RNG state, so a resumed run
  draws the same batches; ``secure=True`` samples from the OS CSPRNG (not resumable).
"""
from __future__ import annotations

from typing import Iterator

from dpprims.plan import DPPlan

__all__ = ["PoissonBatches", "LogicalBatch"]


class LogicalBatch(list):
    """The physical batches of one logical step: a list of tuples ``(*arrays, mask)``.
    Attributes: ``step`` (0-based), ``batch_size`` (K: the number of real examples - it depends on
    the data set, so it is not a private value; do not release it)."""

    def __init__(self, batches, *, step: int, batch_size: int):
        super().__init__(batches)
        self.step, self.batch_size = int(step), int(batch_size)


class PoissonBatches:
    """Iterate the plan's logical batches (see the module docstring).

    Args:
        plan: the DPPlan (rate, cap, physical batch size, steps).
        data: a tuple of arrays with the same first dimension N = plan.num_examples (or one array).
        seed: sampler seed (None: fresh OS entropy, still replayable through state_dict).
        secure: sample from the OS CSPRNG (os.urandom) instead of PCG64.
        num_batches: None (ceil(K / P), at least 1) or "max" (always plan.max_physical_batches).
    """

    def __init__(self, plan: DPPlan, data, *, seed: int | None = None, secure: bool = False, num_batches=None):
        self.plan = plan
        arrays = tuple(data) if isinstance(data, (tuple, list)) else (data,)
        if not arrays:
            raise ValueError("PoissonBatches: data must hold at least one array")
        lens = [len(a) for a in arrays]
        if len(set(lens)) != 1:
            raise ValueError(f"PoissonBatches: the data arrays have different lengths {lens}")
        if lens[0] != plan.num_examples:
            raise ValueError(f"PoissonBatches: the data has {lens[0]} examples but plan.num_examples = "
                             f"{plan.num_examples}: the sampling rate q would be wrong")
        if num_batches not in (None, "max"):
            raise ValueError(f"num_batches must be None or 'max', got {num_batches!r}")
        if num_batches == "max" and plan.max_physical_batches is None:
            raise ValueError("num_batches='max' needs a plan with max_batch_size (an uncapped Poisson batch has no "
                             "largest number of physical batches)")
        self._arrays = arrays
        self._fixed = plan.max_physical_batches if num_batches == "max" else None
        self.sampler = plan.make_sampler(seed=seed, secure=secure)

    @property
    def steps_taken(self) -> int:
        """Logical batches drawn so far."""
        return self.sampler.draws

    def __len__(self) -> int:
        """Logical batches still to come."""
        return self.plan.remaining_steps(self.sampler.draws)

    def __iter__(self) -> Iterator[LogicalBatch]:
        while self.sampler.draws < self.plan.steps:
            yield self.next()

    def next(self) -> LogicalBatch:
        """Draw one logical batch (raises BudgetExhaustedError past plan.steps)."""
        t = self.sampler.draws
        self.plan.check_budget(t)
        idx = self.sampler.sample()
        phys = self.sampler.physical_batches(idx, num_batches=self._fixed)
        return LogicalBatch([tuple(a[i] for a in self._arrays) + (m,) for i, m in phys], step=t,
                            batch_size=int(idx.size))

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        if self.sampler.draws > self.plan.steps:
            raise ValueError(f"the state has {self.sampler.draws} draws, more than the plan's {self.plan.steps} steps")
