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

Data-parallel training (``dist=``, a communicator such as dpprims.distributed.TorchComm, or
the backend's own ``dist``): the logical batch is sampled globally (every rank runs the same
seeded sampler; in secure mode rank 0 samples and broadcasts), split into disjoint per-rank
chunks of the same number of physical batches (dpprims.distributed.shard_logical_batch), the
backend sums the clipped sums over ranks and adds the noise once; epsilon, logs, the progress
bar and checkpoints are rank 0's; evaluation is sharded over the ranks. Every ``check_every``
steps the ranks compare a fingerprint of the sampled batch and of their parameters and stop
with an error if they ever differ. See docs/DISTRIBUTED.md.

Checkpoints (``checkpoint_dir``) hold the model, the optimizer, the accountant's step count,
the sampler's exact RNG state and the noise seed, so a resumed run continues the same sequence
as an uninterrupted one. They contain the noise seed: a checkpoint must be kept as private as
the training data (whoever holds it can regenerate the noise). Secure mode (OS-entropy
sampling) cannot be checkpointed, because OS entropy cannot be replayed.
"""
from __future__ import annotations

import dataclasses
import hashlib
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

from dpprims.distributed import shard_logical_batch
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
        progress: show a tqdm progress bar (rank 0 only).
        dist: communicator for data-parallel training (default: ``backend.dist`` if the backend
            has one, else single-process). All ranks must build the Trainer with the same plan,
            data and seed (checked at start-up).
        check_every: in data-parallel training, compare the ranks' sampled batches and parameter
            fingerprints after step 1 and every this many steps (0: never).
    """

    def __init__(self, backend, plan: DPPlan, data, *, seed: int | None = 0, secure: bool = False,
                 log_path: str | os.PathLike | None = None, checkpoint_dir: str | os.PathLike | None = None,
                 resume: bool = False, eval_batch_size: int = 512, progress: bool = True, dist=None,
                 check_every: int = 100) -> None:
        if plan.num_examples != len(data.x_train):
            raise ValueError(f"plan.num_examples={plan.num_examples} but the dataset has {len(data.x_train)} "
                             "training examples: the sampling rate would be wrong")
        if secure and checkpoint_dir is not None:
            raise ValueError("secure sampling draws from OS entropy, which cannot be checkpointed or resumed; "
                             "drop --checkpoint or --secure")
        self.backend, self.plan, self.data = backend, plan, data
        self.dist = dist if dist is not None else getattr(backend, "dist", None)
        self.rank = self.dist.rank if self.dist is not None else 0
        self.world_size = self.dist.world_size if self.dist is not None else 1
        self.is_main = self.rank == 0
        if self.dist is not None and self.world_size > 1 and getattr(backend, "dist", None) is not self.dist:
            raise ValueError("data-parallel Trainer: the backend must sum the clipped gradients over the same "
                             "communicator (build it with dist=...); otherwise every rank would step on its own "
                             "shard of the batch")
        self.secure = bool(secure)
        self.check_every = int(check_every)
        if secure and seed is not None:
            raise ValueError("secure mode draws the batches and the noise seed from OS entropy; pass seed=None "
                             "(a fixed seed would make the noise predictable)")
        if self.dist is None:
            self.noise_seed = int(seed) if seed is not None else secrets.randbits(63)
            sampler_seed = None if seed is None else int(seed)
        elif secure or seed is None:
            # OS entropy differs per rank: rank 0 draws, everyone uses rank 0's values (the secure
            # sampler itself only ever runs on rank 0, see _sample).
            drawn = self.dist.broadcast_ints([secrets.randbits(63), secrets.randbits(63)])
            self.noise_seed = drawn[0]
            sampler_seed = None if secure else drawn[1]
        else:
            self.noise_seed = sampler_seed = int(seed)
        self.sampler = plan.make_sampler(seed=sampler_seed, secure=secure)
        self.accountant = plan.make_accountant()
        self.last_local_indices = np.zeros(0, dtype=np.int64)
        if self.dist is not None:
            self._check_ranks_agree()
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

    # -- data parallelism ----------------------------------------------------------------------
    def _check_ranks_agree(self) -> None:
        """All ranks must run the same plan on the same data with the same seeds: compare."""
        plan_json = json.dumps(dataclasses.asdict(self.plan), default=_jsonable, sort_keys=True).encode()
        mine = dict(plan=_hash64(plan_json), examples=len(self.data.x_train),
                    labels=_hash64(np.ascontiguousarray(self.data.y_train).tobytes()),
                    noise_seed=self.noise_seed, secure=int(self.secure),
                    sampler=_hash64(json.dumps(self.sampler.state_dict()).encode()) if not self.secure else 0)
        everyone = self.dist.all_gather_ints(list(mine.values()))
        bad = [k for i, k in enumerate(mine) if len({r[i] for r in everyone}) != 1]
        if bad:
            raise RuntimeError(f"data-parallel ranks disagree on {bad}: every rank must build the Trainer with "
                               "the same DP plan, training data and seed (a rank with its own sampler or noise "
                               "seed would break the single-noise-draw guarantee)")

    def _check_replicas(self, indices: np.ndarray) -> None:
        fp = getattr(self.backend, "fingerprint", None)
        mine = [_hash64(np.ascontiguousarray(indices, dtype=np.int64).tobytes()), int(fp()) if fp else 0]
        everyone = self.dist.all_gather_ints(mine)
        if len({r[0] for r in everyone}) != 1:
            raise RuntimeError(f"step {self.step_count}: the ranks sampled different logical batches")
        if len({r[1] for r in everyone}) != 1:
            raise RuntimeError(f"step {self.step_count}: the ranks' parameters (or optimizer states) are no longer "
                               "bit-identical (different noise seeds, or an all-reduce that returned different sums)")

    def _sample(self) -> np.ndarray:
        if self.dist is not None and self.secure:
            return self.dist.broadcast_indices(self.sampler.sample() if self.is_main else None)
        return self.sampler.sample()

    def _reduce_stats(self, loss_sum: float, n_valid: int, stats: dict):
        if self.dist is None:
            return loss_sum, n_valid, stats
        keys = sorted(k for k, v in stats.items() if isinstance(v, (int, float, np.integer, np.floating)))
        tot = self.dist.all_reduce_sum([loss_sum, n_valid] + [stats[k] for k in keys])
        stats = dict(stats)
        for k, v in zip(keys, tot[2:]):
            stats[k] = int(round(v)) if isinstance(stats[k], (int, np.integer)) else float(v)
        return float(tot[0]), int(round(tot[1])), stats

    # -- logging -------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.log_path is not None and self.is_main:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- one logical step ----------------------------------------------------------------------
    def step(self) -> dict:
        self.plan.check_budget(self.step_count)
        t0 = time.perf_counter()
        indices = self._sample()
        loss_sum, n_valid = 0.0, 0
        if self.dist is None:
            local, batches = indices, self.sampler.physical_batches(indices)
        else:
            local, batches = shard_logical_batch(self.sampler, indices, self.rank, self.world_size)
        self.last_local_indices = local
        start_step = getattr(self.backend, "start_step", None)
        if start_step is not None:
            start_step(len(batches))
        for idx, mask in batches:
            ls, nv = self.backend.accumulate(self.data.x_train[idx], self.data.y_train[idx], mask)
            loss_sum += ls
            n_valid += nv
        self.backend.noisy_step(self.step_count)
        self.accountant.step()
        self.step_count += 1
        loss_sum, n_valid, stats = self._reduce_stats(loss_sum, n_valid, self.backend.step_stats())
        if self.dist is not None and self.check_every > 0 and (
                self.step_count == 1 or self.step_count % self.check_every == 0):
            self._check_replicas(indices)
        dt = time.perf_counter() - t0
        return dict(step=self.step_count, batch_size=int(indices.size), physical_batches=len(batches),
                    loss=loss_sum / max(n_valid, 1), seconds=dt, **stats)

    def evaluate(self) -> tuple[float, float]:
        """(test loss, test accuracy); data-parallel: each rank evaluates a contiguous shard."""
        x, y = self.data.x_test, self.data.y_test
        if self.dist is None:
            return self.backend.evaluate(x, y, self.eval_batch_size)
        bounds = np.linspace(0, len(x), self.world_size + 1).astype(np.int64)
        lo, hi = int(bounds[self.rank]), int(bounds[self.rank + 1])
        m = hi - lo
        loss, acc = self.backend.evaluate(x[lo:hi], y[lo:hi], self.eval_batch_size) if m else (0.0, 0.0)
        tot = self.dist.all_reduce_sum([loss * m, round(acc * m), m])
        n = max(tot[2], 1.0)
        return float(tot[0] / n), float(tot[1] / n)

    def fit(self) -> TrainResult:
        plan = self.plan
        steps_per_epoch = plan.steps_per_epoch
        start = time.perf_counter()
        bar = None
        if self.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=plan.steps, initial=self.step_count, unit="step", dynamic_ncols=True)
        test_loss = test_acc = None
        window = []
        try:
            while self.step_count < plan.steps:
                rec = self.step()
                window = (window + [rec])[-20:]
                eps = self.accountant.epsilon() if self.is_main else None  # rank 0 accounts and logs
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
        if self.dist is None:
            epsilon = self.accountant.epsilon()
        else:  # rank 0's epsilon, on every rank (a sum with zeros is exact)
            epsilon = float(self.dist.all_reduce_sum([self.accountant.epsilon() if self.is_main else 0.0])[0])
        return TrainResult(steps=self.step_count, epsilon=epsilon, delta=plan.delta,
                           test_accuracy=test_acc, test_loss=test_loss, history=self.history,
                           seconds=time.perf_counter() - start)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Atomically replace the checkpoint directory's contents (write, then rename).
        Data-parallel: rank 0 writes (the replicas are identical), the others wait for it."""
        if self.is_main:
            self._write_checkpoint()
        if self.dist is not None:
            self.dist.barrier()

    def _write_checkpoint(self) -> None:
        d = self.checkpoint_dir
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=d.parent))
        state = dict(version=CHECKPOINT_VERSION, step=self.step_count, plan=self.plan.summary(),
                     noise_seed=self.noise_seed, sampler=self.sampler.state_dict(),
                     accountant=self.accountant.state_dict(), backend=self.backend.describe(),
                     world_size=self.world_size)
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


def _hash64(data: bytes) -> int:
    """A signed 64-bit digest (fits an int64 collective)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        v = float(x)
        return v if math.isfinite(v) else str(v)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")
