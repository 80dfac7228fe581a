"""``make_private``: DP-SGD in your own PyTorch training loop, with fixed shapes.

    dp = make_private(model, optimizer, (x, y), target_epsilon=3.0, delta=1e-5, epochs=2,
                      max_grad_norm=1.0, expected_batch_size=256, physical_batch_size=64)
    model, optimizer, loader = dp
    for epoch in range(2):
        for x, y, mask in loader:                 # fixed-shape Poisson physical batches
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y, reduction="none")   # per-example losses [P]
            optimizer.backward(loss)              # clipped sums into .grad (padding rows masked)
            optimizer.step()                      # noise + / (q N) + your optimizer, once per logical batch
    print(dp.epsilon())

Opacus-like in spirit (``PrivacyEngine.make_private`` + ``BatchMemoryManager``), but every
physical batch has exactly ``physical_batch_size`` rows, so compiled shapes never change.

What is built, all from ONE :class:`dpprims.plan.DPPlan`, so the sampler, the accountant and the
noise cannot disagree (sampling rate q = expected_batch_size / N, cap, sigma, C, steps):

* the model, with a :class:`dpprims.torch.DPEngine` installed (per-example clipping; the model's
  own weight-gradient GEMMs are replaced by the clipped ones);
* a :class:`DPOptimizer` around your torch optimizer. ``backward(losses)`` adds the clipped sum of
  the current physical batch into ``.grad``; ``step()`` after a physical batch that is not the last
  of its logical batch does nothing (the sums keep accumulating, Opacus' "skipped step"); after
  the last one it adds the Gaussian noise sigma*C*z ONCE, divides by the public q*N (never by the
  sampled batch size), runs your optimizer's step, clears ``.grad`` and advances the accountant;
* a :class:`PoissonLoader`: each logical batch includes every example independently with
  probability q (the accountant's assumption; not a shuffle), split into physical batches of
  exactly P rows with a bool mask (padding rows repeat example 0 and have mask False, so they
  contribute nothing); each yielded :class:`PhysicalBatch` says whether it ends its logical batch
  (``is_last``). An empty logical batch is one all-padding batch and is a real step: it still gets
  its noise and is accounted;
* ``epsilon()`` and ``state_dict()`` / ``load_state_dict()``: model, optimizer, sampler RNG,
  accountant, noise seed and step count - a resumed run continues bit for bit as an uninterrupted
  one would (taken between logical batches).

The noise z is dpprims' generator (dpprims.noise: Philox4x32-10 keyed by (seed, step, parameter
range), 128-bit-uniform Box-Muller; truncation adds < 1e-12 to delta for sigma >= 0.3), with the
same counter layout as the trainer (dpprims.trainer.TorchBackend): logical step t (0-based) uses
noise stream t + 1, parameters in ``model.parameters()`` order. Privacy-relevant edge cases:

* the loader refuses to start a logical batch past the plan's step count (BudgetExhaustedError);
* a logical batch must end with ``optimizer.step()`` before the next is drawn (otherwise its
  clipped sums would leak into the next step's release without their own noise): RuntimeError;
* ``loss.backward()`` instead of ``optimizer.backward(loss)`` computes no clipped sum (the DP
  layers return no weight gradient); ``step()`` then raises instead of stepping on nothing;
* ``zero_grad()`` inside a logical batch keeps the accumulated clipped sums (as Opacus does with
  its BatchMemoryManager); after a real step ``.grad`` is already cleared;
* parameters of the optimizer must be trainable parameters of the model (they are the ones the
  engine clips); a trainable parameter the optimizer does not hold is clipped but never released;
* ``seed=None`` draws the noise seed and the sampler seed from OS entropy; ``secure=True``
  additionally samples from the OS CSPRNG (then there is no replayable state to save);
* the state holds the noise seed: keep it as private as the data (it regenerates the noise).
Model randomness (dropout) uses torch's global RNG, which is not part of the state. Single
process: for data-parallel training use the trainer (dpprims.trainer, ``dpprims train --nproc``),
which shards each logical batch and adds the noise once for all ranks.
"""
from __future__ import annotations

import math
import secrets
from typing import Iterator

import numpy as np
import torch

from dpprims.plan import DPPlan

from .engine import DPEngine

__all__ = ["make_private", "PrivateTraining", "DPOptimizer", "PoissonLoader", "PhysicalBatch"]

_STATE_VERSION = 1


class PhysicalBatch(tuple):
    """One fixed-shape physical batch: unpacks as ``(*tensors, mask)``.

    Attributes: ``tensors`` (the data tensors, each [P, ...]), ``mask`` (bool [P]; False =
    padding row), ``step`` (0-based logical step it belongs to), ``index`` / ``count`` (its
    position among the physical batches of that logical batch), ``is_last`` (it ends the
    logical batch: the ``optimizer.step()`` after it releases the noisy update), ``batch_size``
    (K, the number of real examples in the whole logical batch; not private - do not log it in
    a release)."""

    def __new__(cls, tensors, mask, *, step: int, index: int, count: int, batch_size: int):
        self = super().__new__(cls, (*tensors, mask))
        self.tensors, self.mask = tuple(tensors), mask
        self.step, self.index, self.count, self.batch_size = int(step), int(index), int(count), int(batch_size)
        return self

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1


class _Core:
    """State shared by the loader and the optimizer (one per make_private call)."""

    def __init__(self, plan: DPPlan, sampler, accountant, noise_seed: int, secure: bool):
        self.plan, self.sampler, self.accountant = plan, sampler, accountant
        self.noise_seed, self.secure = int(noise_seed), bool(secure)
        self.steps_taken = 0
        self.current: PhysicalBatch | None = None  # the batch the loader yielded last
        self.backward_done = False  # optimizer.backward ran for `current`
        self.accumulated = 0  # physical batches accumulated in the open logical batch
        self.open_step: int | None = None  # logical step drawn but not yet released

    def require_closed(self, what: str) -> None:
        if self.open_step is not None:
            c = self.current
            raise RuntimeError(
                f"{what}: logical step {self.open_step} is still open (physical batch {c.index + 1} of {c.count} "
                "was the last yielded): finish its physical batches with optimizer.backward(loss) and "
                "optimizer.step() first; its clipped sums have not received their noise yet")


class PoissonLoader:
    """Fixed-shape Poisson physical batches (see the module docstring).

    Iterating yields :class:`PhysicalBatch` es. One pass covers ``steps_per_pass`` logical
    batches, counted from the global step (a resumed run first finishes the interrupted pass),
    and stops at the plan's step count: with ``epochs=E`` given to make_private,
    ``for epoch in range(ceil(E)): for batch in loader`` runs exactly ``plan.steps`` steps.
    """

    def __init__(self, core: _Core, data, device, steps_per_pass: int):
        self._core = core
        self._device = device
        self.steps_per_pass = int(steps_per_pass)
        if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.TensorDataset):
            self._tensors, self._dataset = None, data
        else:
            tensors = tuple(data.tensors) if isinstance(data, torch.utils.data.TensorDataset) else tuple(data)
            self._tensors, self._dataset = tuple(torch.as_tensor(t) for t in tensors), None

    @property
    def plan(self) -> DPPlan:
        return self._core.plan

    @property
    def steps_taken(self) -> int:
        return self._core.steps_taken

    def _gather(self, idx: np.ndarray):
        if self._tensors is not None:
            i = torch.as_tensor(idx)
            return tuple(t[i].to(self._device) for t in self._tensors)
        from torch.utils.data import default_collate

        items = default_collate([self._dataset[int(j)] for j in idx])
        items = tuple(items) if isinstance(items, (list, tuple)) else (items,)
        return tuple(torch.as_tensor(t).to(self._device) for t in items)

    def __iter__(self) -> Iterator[PhysicalBatch]:
        core, plan = self._core, self._core.plan
        core.require_closed("PoissonLoader")
        end = min(plan.steps, (core.steps_taken // self.steps_per_pass + 1) * self.steps_per_pass)
        while core.steps_taken < end:
            core.require_closed("PoissonLoader")
            t = core.steps_taken
            plan.check_budget(t)
            indices = core.sampler.sample()
            batches = core.sampler.physical_batches(indices)
            core.open_step, core.accumulated = t, 0
            for j, (idx, mask) in enumerate(batches):
                pb = PhysicalBatch(self._gather(idx), torch.as_tensor(mask, device=self._device), step=t, index=j,
                                   count=len(batches), batch_size=int(indices.size))
                core.current, core.backward_done = pb, False
                yield pb
                if core.open_step == t and not core.backward_done:
                    raise RuntimeError(f"logical step {t}, physical batch {j + 1} of {len(batches)}: no "
                                       "optimizer.backward(loss) was called for it (a loop that skips a "
                                       "physical batch would change the sampling the accountant assumes)")
            if core.open_step == t:
                core.require_closed("PoissonLoader")


class DPOptimizer:
    """Wraps a torch optimizer: clipped sums per physical batch, noise once per logical batch.

    ``backward(losses)``: per-example losses [P] of the current physical batch (or their sum, a
    scalar); the loader's mask is applied. ``step()``: see the module docstring; returns True when
    it released a noisy update (end of a logical batch), False for a skipped step.
    ``original_optimizer`` is your optimizer (give LR schedulers that one).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, engine: DPEngine, params: list, core: _Core):
        self.original_optimizer = optimizer
        self.engine = engine
        self.params = params
        self._core = core
        self.last_norms: torch.Tensor | None = None

    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @property
    def state(self):
        return self.original_optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``.grad`` unless a logical batch is being accumulated (then keep its sums)."""
        if self._core.accumulated:
            return
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Clipped per-example gradients of the current physical batch, summed into ``.grad``.
        Returns the per-example gradient norms [P] (before clipping; padding rows included)."""
        core = self._core
        if core.current is None or core.open_step is None:
            raise RuntimeError("DPOptimizer.backward: no open physical batch; take batches from the PoissonLoader "
                               "that make_private returned")
        if core.backward_done:
            raise RuntimeError(f"DPOptimizer.backward called twice for physical batch {core.current.index + 1} of "
                               f"logical step {core.open_step}: each example would be counted twice")
        if isinstance(loss, torch.Tensor) and loss.dim() == 1 and loss.shape[0] != core.current.mask.shape[0]:
            raise ValueError(f"loss has {loss.shape[0]} entries but the physical batch has "
                             f"{core.current.mask.shape[0]} rows (physical_batch_size)")
        norms = self.engine.backward(loss, mask=core.current.mask)
        core.backward_done = True
        core.accumulated += 1
        self.last_norms = norms
        return norms

    @torch.no_grad()
    def step(self, closure=None) -> bool:
        if closure is not None:
            raise ValueError("DPOptimizer.step does not take a closure (the clipped sums come from backward)")
        core = self._core
        if core.open_step is None or core.current is None:
            raise RuntimeError("DPOptimizer.step: no open logical batch (take batches from the PoissonLoader)")
        if not core.backward_done:
            for h in self.engine.handlers:  # drop what a plain loss.backward() left in the DP layers
                h.state.clear()
            raise RuntimeError(
                "DPOptimizer.step: no clipped gradient for this physical batch. Call optimizer.backward(loss) with "
                "per-example losses (reduction='none') instead of loss.backward(): the DP layers compute no "
                "ordinary weight gradient")
        if not core.current.is_last:
            return False
        from dpprims.bindings.torch.noise import noisy_grads

        plan, t = core.plan, core.open_step
        plan.check_budget(core.steps_taken)
        noisy_grads(self.params, noise_std=plan.noise_std, normaliser=plan.normaliser, seed=core.noise_seed,
                    step=t + 1, in_place=True)
        self.original_optimizer.step()
        for p in self.params:
            p.grad = None
        core.accountant.step()
        core.steps_taken += 1
        core.open_step, core.accumulated = None, 0
        return True

    def epsilon(self) -> float:
        return self._core.accountant.epsilon()


class PrivateTraining:
    """What :func:`make_private` returns. Unpacks as ``model, optimizer, loader``.

    Attributes: model, optimizer (:class:`DPOptimizer`), loader (:class:`PoissonLoader`), engine,
    plan (the :class:`DPPlan`), accountant, sampler, noise_seed, steps_taken."""

    def __init__(self, model, optimizer: DPOptimizer, loader: PoissonLoader, engine: DPEngine, core: _Core):
        self.model, self.optimizer, self.loader, self.engine = model, optimizer, loader, engine
        self._core = core

    def __iter__(self):
        return iter((self.model, self.optimizer, self.loader))

    plan = property(lambda self: self._core.plan)
    accountant = property(lambda self: self._core.accountant)
    sampler = property(lambda self: self._core.sampler)
    noise_seed = property(lambda self: self._core.noise_seed)
    steps_taken = property(lambda self: self._core.steps_taken)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far, at the plan's delta (another delta: a different guarantee, same run)."""
        if delta is None or delta == self.plan.delta:
            return self._core.accountant.epsilon()
        return DPPlan.create(**{**_plan_args(self.plan), "delta": delta}).epsilon_at(self.steps_taken)

    def state_dict(self) -> dict:
        """Everything a resume needs (between logical batches): model, optimizer, sampler RNG,
        accountant, noise seed, step count and the plan it belongs to. Contains the noise seed:
        keep it as private as the training data."""
        core = self._core
        core.require_closed("state_dict")
        if core.secure:
            raise RuntimeError("secure=True samples from OS entropy, which cannot be saved or replayed; "
                               "build with secure=False and a seed to checkpoint")
        return dict(version=_STATE_VERSION, plan=self.plan.summary(), steps_taken=core.steps_taken,
                    noise_seed=core.noise_seed, sampler=core.sampler.state_dict(),
                    accountant=core.accountant.state_dict(),
                    model={k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                    optimizer=self.optimizer.original_optimizer.state_dict())

    def load_state_dict(self, state: dict) -> None:
        core = self._core
        core.require_closed("load_state_dict")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported make_private state version {state.get('version')!r}")
        mine = self.plan.summary()
        if state["plan"] != mine:
            diff = {k: (state["plan"].get(k), v) for k, v in mine.items() if state["plan"].get(k) != v}
            raise ValueError(f"the state was saved for a different DP plan (saved, now): {diff}; resuming with other "
                             "privacy parameters would break the accounting")
        core.sampler.load_state_dict(state["sampler"])
        core.accountant.load_state_dict(state["accountant"])
        core.noise_seed = int(state["noise_seed"])
        core.steps_taken = int(state["steps_taken"])
        self.model.load_state_dict(state["model"])
        self.optimizer.original_optimizer.load_state_dict(state["optimizer"])


def _plan_args(plan: DPPlan) -> dict:
    return dict(num_examples=plan.num_examples, expected_batch_size=plan.expected_batch_size,
                physical_batch_size=plan.physical_batch_size, max_grad_norm=plan.max_grad_norm, delta=plan.delta,
                steps=plan.steps, noise_multiplier=plan.noise_multiplier, accountant=plan.accountant,
                max_batch_size=plan.max_batch_size)


def _num_examples(data) -> int:
    if isinstance(data, torch.utils.data.TensorDataset):
        data = data.tensors
    if isinstance(data, torch.utils.data.Dataset):
        try:
            return len(data)
        except TypeError:
            raise TypeError("make_private: the dataset has no len(); an iterable dataset cannot be Poisson-sampled "
                            "(each example must be addressable by index)") from None
    if isinstance(data, torch.Tensor):
        data = (data,)
    if not isinstance(data, (tuple, list)) or not data:
        raise TypeError("make_private: data must be a map-style Dataset or a tuple of tensors, got "
                        f"{type(data).__name__}")
    lens = [len(t) for t in data]
    if len(set(lens)) != 1:
        raise ValueError(f"make_private: the data tensors have different lengths {lens}")
    return lens[0]


def make_private(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data, *, max_grad_norm: float,
                 delta: float, expected_batch_size: float, physical_batch_size: int,
                 target_epsilon: float | None = None, noise_multiplier: float | None = None,
                 epochs: float | None = None, steps: int | None = None, accountant: str = "rdp",
                 max_batch_size: int | None = None, seed: int | None = None, secure: bool = False,
                 clipping: str = "flat", norm_method="auto", device=None) -> PrivateTraining:
    """Make ``model`` + ``optimizer`` + ``data`` a DP-SGD run (see the module docstring).

    Args:
        model: an nn.Module whose trainable layers DPEngine supports (others raise, naming them).
        optimizer: any torch optimizer over (some of) the model's trainable parameters; it is run
            on the noisy normalised gradient once per logical batch.
        data: a tuple of tensors with the same first dimension (e.g. ``(x, y)``), a TensorDataset,
            or a map-style Dataset (items collated with torch's default_collate).
        max_grad_norm: C. delta: the delta of the guarantee.
        expected_batch_size: q * N (the Poisson rate is q = expected_batch_size / N; also the public
            normaliser). physical_batch_size: P, rows per forward/backward.
        target_epsilon or noise_multiplier: exactly one (sigma is calibrated for the plan's steps).
        epochs or steps: exactly one (steps = ceil(epochs * N / expected_batch_size)).
        accountant: "rdp" or "pld". max_batch_size: cap on the logical batch (truncated Poisson,
            accounted as such).
        seed: seeds the sampler and the noise (None: OS entropy). secure: sample from the OS CSPRNG.
        clipping, norm_method: passed to DPEngine. device: where batches go (default: the model's).
    """
    n = _num_examples(data)
    plan = DPPlan.create(num_examples=n, expected_batch_size=expected_batch_size,
                         physical_batch_size=physical_batch_size, max_grad_norm=max_grad_norm, delta=delta,
                         epochs=epochs, steps=steps, noise_multiplier=noise_multiplier,
                         target_epsilon=target_epsilon, accountant=accountant, max_batch_size=max_batch_size)
    if secure and seed is not None:
        raise ValueError("make_private: secure=True draws the batches and the noise seed from OS entropy; pass "
                         "seed=None (a fixed seed would make the noise predictable)")
    noise_seed = int(seed) if seed is not None else secrets.randbits(63)
    sampler = plan.make_sampler(seed=None if seed is None else int(seed), secure=secure)
    core = _Core(plan, sampler, plan.make_accountant(), noise_seed, secure)

    trainable = [p for p in model.parameters() if p.requires_grad]
    in_model = {id(p) for p in trainable}
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    stray = [tuple(p.shape) for p in opt_params if id(p) not in in_model]
    if stray:
        raise ValueError(f"make_private: the optimizer holds {len(stray)} parameter(s) (shapes {stray[:4]}) that are "
                         "not trainable parameters of the model; their gradients would not be clipped")
    in_opt = {id(p) for p in opt_params}
    params = [p for p in trainable if id(p) in in_opt]  # model order: the noise's pair ranges
    engine = DPEngine(model, plan.max_grad_norm, clipping=clipping, norm_method=norm_method)
    model.dp_engine = engine
    if device is None:
        device = trainable[0].device if trainable else torch.device("cpu")
    if epochs is not None:
        passes = max(1, math.ceil(epochs))
        per_pass = math.ceil(plan.steps / passes)
    else:
        per_pass = plan.steps_per_epoch
    loader = PoissonLoader(core, data, torch.device(device), per_pass)
    dp_opt = DPOptimizer(optimizer, engine, params, core)
    return PrivateTraining(model, dp_opt, loader, engine, core)
