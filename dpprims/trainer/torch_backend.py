"""The PyTorch backend of the trainer: DPEngine for the clipped sums, then noise + update.

Noise: z ~ N(0, I) drawn once per logical step from a counter-based generator keyed by
(noise seed, step), so a resumed run draws exactly the noise an uninterrupted run would;
g = (clipped sum + sigma*C*z) / (q*N) with q*N the public expected batch size; then the
optimizer (SGD with momentum, Adam, AdamW) steps on g. See ``noisy_step``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dpprims.plan import DPPlan
from dpprims.torch import DPEngine

OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(name: str, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                   betas=(0.9, 0.999), eps: float = 1e-8):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


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
    """

    framework = "torch"

    def __init__(self, model: torch.nn.Module, plan: DPPlan, *, optimizer: str = "sgd", lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 0.0, device: str = "cpu",
                 precision: str = "fp32", clipping: str = "flat", norm_method="auto") -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.plan = plan
        self.precision = precision
        self.engine = DPEngine(self.model, plan.max_grad_norm, clipping=clipping, norm_method=norm_method)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer_name = optimizer
        self.optimizer = make_optimizer(optimizer, self.params, lr, momentum, weight_decay)
        self.noise_seed = 0
        self._stats = {}

    def set_noise_seed(self, seed: int) -> None:
        self.noise_seed = int(seed)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def accumulate(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray):
        """Add the clipped per-example gradient sum of one physical batch into .grad."""
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

    def _noise_generator(self, step: int) -> torch.Generator:
        """A generator keyed by (seed, step) alone: no hidden state to checkpoint."""
        g = torch.Generator(device=self.device)
        g.manual_seed((self.noise_seed * 1_000_003 + step) % (2**63 - 1))
        return g

    @torch.no_grad()
    def noisy_step(self, step: int) -> None:
        """g = (sum_i c_i g_i + sigma*C*z) / (q*N); optimizer step on g; zero the sums.

        A parameter whose .grad is None (no physical batch reached it) is treated as a zero
        clipped sum: it still gets noise, as the mechanism requires.
        """
        std = self.plan.noise_std
        norm = self.plan.normaliser
        gen = self._noise_generator(step)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if std > 0:
                z = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
                p.grad.add_(z.to(p.grad.dtype), alpha=std)
            p.grad.div_(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

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
                    optimizer=self.optimizer.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def kernel_paths(self) -> dict:
        """Which implementation each clipping op last ran on (triton / triton-interpreter / torch)."""
        from dpprims.bindings.torch._backend import LAST_BACKEND

        return dict(LAST_BACKEND)

    def describe(self) -> dict:
        return dict(framework="torch", device=str(self.device), precision=self.precision,
                    optimizer=self.optimizer_name, torch=torch.__version__,
                    parameters=int(sum(p.numel() for p in self.params)))

