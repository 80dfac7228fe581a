"""The framework-neutral DP-SGD training loop.

One logical step (shared/DESIGN.md, sections 2 and 5):

1. the sampler draws a Poisson logical batch (each example independently with prob. q) and
   splits it into fixed-size physical batches with a padding mask (an empty logical batch is
   one all-padding physical batch: the step still happens);
2. the backend accumulates the clipped per-example gradient sums over the physical batches;
3. the backend adds Gaussian noise sigma*C ONCE, divides by the public expected batch size q*N
   (never by the sampled size) and applies the optimizer update;
4. the accountant advances by one step, whatever the batch held.

The sampler, the accountant and the noise all come from one DPPlan, so they cannot disagree.
The loop refuses to take a step past the plan's budget (``plan.check_budget``).

A backend implements: ``accumulate(x, y, mask) -> (loss_sum, n_valid)``,
``noisy_step(step) -> None``, ``evaluate(x, y, batch_size) -> (loss, accuracy)``,
``state_dict()/load_state_dict()`` (numpy / picklable), ``describe() -> dict``.

Checkpoints (``checkpoint_dir``) hold the model, the optimizer, the accountant's step count,
the sampler's exact RNG state and the noise seed, so a resumed run continues the same sequence
as an uninterrupted one. They contain the noise seed: a checkpoint must be kept as private as
the training data (whoever holds it can regenerate the noise). Secure mode (OS-entropy
sampling) cannot be checkpointed, because OS entropy cannot be replayed.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpprims.plan import DPPlan

CHECKPOINT_VERSION = 1


@dataclass
class TrainResult:
    steps: int
    epsilon: float
    delta: float
    test_accuracy: float | None
    test_loss: float | None
    history: list = field(default_factory=list)
    seconds: float = 0.0


class Trainer:
    """Runs a DPPlan with a framework backend (see module docstring).

    Args:
        backend: a TorchBackend or JaxBackend (dpprims.trainer).
        plan: the DPPlan (sampler, accountant and noise are built from it).
        data: a dpprims.data.Dataset.
        seed: seeds the sampler and the noise; None draws both from OS entropy.
        secure: sample from OS entropy (a CSPRNG); disables checkpointing.
        log_path: JSON-lines log (one record per step and per evaluation).
        checkpoint_dir: write a checkpoint there at the end of each epoch and at the end.
        resume: continue from the checkpoint in ``checkpoint_dir`` if one exists.
        eval_batch_size: batch size for evaluation.
        progress: show a tqdm progress bar.
    """

    def __init__(self, backend, plan: DPPlan, data, *, seed: int | None = 0, secure: bool = False,
                 log_path: str | os.PathLike | None = None, checkpoint_dir: str | os.PathLike | None = None,
                 resume: bool = False, eval_batch_size: int = 512, progress: bool = True) -> None:
        if plan.num_examples != len(data.x_train):
            raise ValueError(f"plan.num_examples={plan.num_examples} but the dataset has {len(data.x_train)} "
                             "training examples: the sampling rate would be wrong")
        if secure and checkpoint_dir is not None:
            raise ValueError("secure sampling draws from OS entropy, which cannot be checkpointed or resumed; "
                             "drop --checkpoint or --secure")
        self.backend, self.plan, self.data = backend, plan, data
        self.noise_seed = int(seed) if seed is not None else secrets.randbits(63)
        sampler_seed = None if seed is None else int(seed)
        self.sampler = plan.make_sampler(seed=sampler_seed, secure=secure)
        self.accountant = plan.make_accountant()
        self.step_count = 0
        self.log_path = Path(log_path) if log_path else None
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.eval_batch_size = int(eval_batch_size)
        self.progress = progress
        self.history: list = []
        backend.set_noise_seed(self.noise_seed)
        if resume:
            if self.checkpoint_dir is None:
                raise ValueError("resume needs a checkpoint directory")
            if (self.checkpoint_dir / "state.json").exists():
                self.load_checkpoint()

    # -- logging -------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- one logical step ----------------------------------------------------------------------
    def step(self) -> dict:
        self.plan.check_budget(self.step_count)
        t0 = time.perf_counter()
        indices = self.sampler.sample()
        loss_sum, n_valid = 0.0, 0
        batches = self.sampler.physical_batches(indices)
        for idx, mask in batches:
            ls, nv = self.backend.accumulate(self.data.x_train[idx], self.data.y_train[idx], mask)
            loss_sum += ls
            n_valid += nv
        self.backend.noisy_step(self.step_count)
        self.accountant.step()
        self.step_count += 1
        dt = time.perf_counter() - t0
        return dict(step=self.step_count, batch_size=int(indices.size), physical_batches=len(batches),
                    loss=loss_sum / max(n_valid, 1), seconds=dt, **self.backend.step_stats())

    def evaluate(self) -> tuple[float, float]:
        return self.backend.evaluate(self.data.x_test, self.data.y_test, self.eval_batch_size)

    def fit(self) -> TrainResult:
        plan = self.plan
        steps_per_epoch = plan.steps_per_epoch
        start = time.perf_counter()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=plan.steps, initial=self.step_count, unit="step", dynamic_ncols=True)
        test_loss = test_acc = None
        window = []
        try:
            while self.step_count < plan.steps:
                rec = self.step()
                window = (window + [rec])[-20:]
                eps = self.accountant.epsilon()
                rec["epsilon"] = eps
                self._log(dict(kind="step", **rec))
                if bar is not None:
                    secs = sum(r["seconds"] for r in window)
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", eps=f"{eps:.2f}",
                                    batches_s=f"{sum(r['physical_batches'] for r in window) / secs:.1f}",
                                    ex_s=f"{sum(r['batch_size'] for r in window) / secs:.0f}")
                end_of_epoch = self.step_count % steps_per_epoch == 0 or self.step_count == plan.steps
                if end_of_epoch:
                    test_loss, test_acc = self.evaluate()
                    self._log(dict(kind="eval", step=self.step_count, epoch=self.step_count / steps_per_epoch,
                                   test_loss=test_loss, test_accuracy=test_acc, epsilon=eps))
                    if bar is not None:
                        bar.write(f"epoch {self.step_count / steps_per_epoch:.2f}: test accuracy {test_acc:.4f}, "
                                  f"test loss {test_loss:.4f}, epsilon {eps:.3f}")
                    if self.checkpoint_dir is not None:
                        self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        if test_acc is None:
            test_loss, test_acc = self.evaluate()
        return TrainResult(steps=self.step_count, epsilon=self.accountant.epsilon(), delta=plan.delta,
                           test_accuracy=test_acc, test_loss=test_loss, history=self.history,
                           seconds=time.perf_counter() - start)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Atomically replace the checkpoint directory's contents (write, then rename)."""
        d = self.checkpoint_dir
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=d.parent))
        state = dict(version=CHECKPOINT_VERSION, step=self.step_count, plan=self.plan.summary(),
                     noise_seed=self.noise_seed, sampler=self.sampler.state_dict(),
                     accountant=self.accountant.state_dict(), backend=self.backend.describe())
        (tmp / "state.json").write_text(json.dumps(state, default=_jsonable))
        with open(tmp / "backend.pkl", "wb") as f:
            pickle.dump(self.backend.state_dict(), f)
        old = d.with_name(d.name + ".old")
        if d.exists():
            if old.exists():
                shutil.rmtree(old)
            d.rename(old)
        tmp.rename(d)
        if old.exists():
            shutil.rmtree(old)

    def load_checkpoint(self) -> None:
        d = self.checkpoint_dir
        state = json.loads((d / "state.json").read_text())
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint {d} has version {state.get('version')}, expected {CHECKPOINT_VERSION}")
        mine = json.loads(json.dumps(self.plan.summary(), default=_jsonable))
        if state["plan"] != mine:
            diff = {k: (state["plan"].get(k), v) for k, v in mine.items() if state["plan"].get(k) != v}
            raise ValueError(f"checkpoint {d} was written for a different DP plan (checkpoint, now): {diff}. "
                             "Resuming with other privacy parameters would break the accounting.")
        self.sampler.load_state_dict(state["sampler"])
        self.accountant.load_state_dict(state["accountant"])
        self.step_count = int(state["step"])
        self.noise_seed = int(state["noise_seed"])
        self.backend.set_noise_seed(self.noise_seed)
        with open(d / "backend.pkl", "rb") as f:
            self.backend.load_state_dict(pickle.load(f))


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        v = float(x)
        return v if math.isfinite(v) else str(v)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")
