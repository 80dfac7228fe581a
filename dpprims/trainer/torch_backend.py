"""The PyTorch backend of the trainer: DPEngine for the clipped sums, then noise + update.

Noise and update are one fused kernel pass per parameter (bindings/torch/update.py):
g = (clipped sum + sigma*C*z) / (q*N), with q*N the public expected batch size and z from
dpprims' counter-based Philox generator keyed by (noise seed, step, parameter range, rank), so a
resumed run draws exactly the noise an uninterrupted run would; then SGD (momentum, Nesterov),
Adam or AdamW with torch.optim's semantics. The noise tails are good to an extra delta below
dpprims.noise.truncation_delta_bound (< 1e-12 for sigma >= 0.3).

Data-parallel (``dist=`` a dpprims.distributed.TorchComm): rank 0's parameters are broadcast
once at construction; the clipped sums accumulate in flat buckets behind ``.grad`` and are
all-reduced (SUM) during the last physical batch of the step, overlapping the engine's clipped
weight-gradient GEMMs (dpprims.distributed.GradBucketReducer); then every rank adds the SAME
noise (noise stream 0, as a single process would), so the noise is drawn once for the logical
batch, its variance is sigma^2 C^2 whatever the world size, and the replicas stay identical.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dpprims.plan import DPPlan
from dpprims.torch import DPEngine

OPTIMIZERS = ("sgd", "adam", "adamw")


class TorchBackend:
    """Trainer backend for a torch model (see dpprims.trainer.loop for the protocol).

    Args:
        model: the nn.Module (every trainable layer must be supported by DPEngine).
        plan: the DPPlan (clip norm, noise multiplier, normaliser).
        optimizer: "sgd" | "adam" | "adamw"; lr, momentum, weight_decay as in torch.optim.
        device: "cpu", "cuda", ...
        precision: "fp32" or "bf16" (autocast for forward/backward; the clipped sums, the noise
            and the parameters stay fp32).
        clipping: "flat" | "automatic".
        rank: the noise stream (dpprims.noise); single-process only, leave it 0.
        dist: a dpprims.distributed.TorchComm for data-parallel training (see module docstring);
            with NCCL pass the communicator's device (``device=comm.device``).
        bucket_cap_mb: size of the all-reduce buckets (data-parallel only).
    """

    framework = "torch"

    def __init__(self, model: torch.nn.Module, plan: DPPlan, *, optimizer: str = "sgd", lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 0.0, device: str = "cpu",
                 precision: str = "fp32", clipping: str = "flat", norm_method="auto", betas=(0.9, 0.999),
                 eps: float = 1e-8, rank: int = 0, dist=None, bucket_cap_mb: float = 25.0) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.plan = plan
        self.precision = precision
        self.engine = DPEngine(self.model, plan.max_grad_norm, clipping=clipping, norm_method=norm_method)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.optimizer_name = optimizer
        self.hyper = dict(lr=float(lr), momentum=float(momentum) if optimizer == "sgd" else 0.0,
                          weight_decay=float(weight_decay), betas=tuple(betas), eps=float(eps))
        self.opt_state: dict = {}  # optimizer buffers of the fused update (see add_noise_and_step)
        self.rank = int(rank)
        self.noise_seed = 0
        self._stats = {}
        self.dist = dist
        self.reducer = None
        self._batches_left = None
        if dist is not None:
            from dpprims.distributed import GradBucketReducer, broadcast_module_

            if self.rank != 0:
                raise ValueError("with dist=, every rank adds the noise of stream 0 after the all-reduce (noise "
                                 f"drawn once); rank= is the noise stream and must stay 0, got {rank}")
            broadcast_module_(dist, self.model)
            self.reducer = GradBucketReducer(dist, self.params, self.engine, bucket_cap_mb=bucket_cap_mb)

    def set_noise_seed(self, seed: int) -> None:
        self.noise_seed = int(seed)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def start_step(self, num_physical_batches: int) -> None:
        """Announce the number of physical batches of this step (data-parallel: the all-reduce
        is launched during the last one; without it, it runs in noisy_step)."""
        self._batches_left = int(num_physical_batches)

    def accumulate(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray):
        """Add the clipped per-example gradient sum of one physical batch into .grad."""
        if self._batches_left is not None:
            if self.reducer is not None and self._batches_left == 1:
                self.reducer.arm()
            self._batches_left -= 1
        self.model.train()
        xb = torch.as_tensor(x, device=self.device)
        yb = torch.as_tensor(y, device=self.device)
        mb = torch.as_tensor(mask, device=self.device)
        with self._autocast():
            losses = F.cross_entropy(self.model(xb), yb, reduction="none")
        self.engine.backward(losses, mask=mb)
        valid = losses.detach().float()[mb]
        self._stats["nonfinite"] = self._stats.get("nonfinite", 0) + int(self.engine.last_stats["nonfinite"])
        return float(valid.sum()), int(mb.sum())

    @torch.no_grad()
    def noisy_step(self, step: int) -> None:
        """One fused pass per parameter: g = (sum_i c_i g_i + sigma*C*z) / (q*N), then the
        optimizer update; the clipped sums are then cleared. ``step`` is the 0-based logical step
        (the noise stream is step + 1, never reused). A parameter whose .grad is None (no
        physical batch reached it) is a zero clipped sum and still gets noise, as the mechanism
        requires."""
        from dpprims.bindings.torch.update import add_noise_and_step

        if self.reducer is not None:
            self.reducer.finish()  # .grad = sum over ranks of the clipped sums
        h = self.hyper
        add_noise_and_step(self.params, state=self.opt_state, noise_std=self.plan.noise_std,
                           normaliser=self.plan.normaliser, seed=self.noise_seed, step=step + 1, rank=self.rank,
                           optimizer=self.optimizer_name, lr=h["lr"], momentum=h["momentum"],
                           weight_decay=h["weight_decay"], betas=h["betas"], eps=h["eps"])
        self._batches_left = None
        if self.reducer is not None:
            self.reducer.zero_()
        else:
            for p in self.params:
                p.grad = None

    def step_stats(self) -> dict:
        s, self._stats = self._stats, {}
        return s

    @torch.no_grad()
    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 512):
        self.model.eval()
        total_loss, correct = 0.0, 0
        for s in range(0, len(x), batch_size):
            xb = torch.as_tensor(x[s:s + batch_size], device=self.device)
            yb = torch.as_tensor(y[s:s + batch_size], device=self.device)
            with self._autocast():
                logits = self.model(xb)
            total_loss += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
        n = max(len(x), 1)
        return total_loss / n, correct / n

    def state_dict(self) -> dict:
        return dict(model={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                    optimizer=_to_device(self.opt_state, "cpu"))

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt_state = _to_device(state["optimizer"], self.device)

    def kernel_paths(self) -> dict:
        """Which implementation each clipping op last ran on (triton / triton-interpreter / torch)."""
        from dpprims.bindings.torch._backend import LAST_BACKEND

        return dict(LAST_BACKEND)

    def fingerprint(self) -> int:
        """Exact checksum of the parameters' and optimizer buffers' bits (replica checks)."""
        from dpprims.distributed import tensor_fingerprint

        bufs = [t for k in ("momentum_buffer", "exp_avg", "exp_avg_sq") for t in self.opt_state.get(k, [])]
        return tensor_fingerprint(self.params + bufs)

    def describe(self) -> dict:
        return dict(framework="torch", device=str(self.device), precision=self.precision,
                    optimizer=self.optimizer_name, torch=torch.__version__,
                    parameters=int(sum(p.numel() for p in self.params)),
                    world_size=1 if self.dist is None else self.dist.world_size)



def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device).clone()
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj
