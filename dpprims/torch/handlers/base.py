"""The contract between DPEngine and the per-layer-type handlers.

A handler owns one module with trainable parameters. It replaces the module's forward by an
autograd function that

* in forward, computes the layer output as usual and keeps what the norm and the clipped
  sum need (for Linear: the input A);
* in backward, returns the *input* gradient only: no weight gradient is computed by autograd
  (the non-private weight-gradient GEMM is replaced, not run in addition), and keeps the
  output gradient G.

After the backward pass the engine asks each handler for the per-example squared norm of its
parameters' gradients (``sq_norms``), turns the global norms into clip factors, and asks each
handler to add its clipped gradient sum into ``.grad`` (``accumulate_clipped``).

A layer called several times in one forward (weight sharing inside a module) keeps one
capture per call; handlers must combine them exactly (for Linear: concatenation along T,
since the per-example gradient is the sum over calls).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dpprims.bindings.torch import _backend


@dataclass
class Capture:
    """What one forward call of a layer left for the engine (tensors are detached)."""

    saved: tuple
    grad_out: torch.Tensor | None = None


@dataclass
class LayerState:
    captures: list = field(default_factory=list)
    capturing: bool = True
    step_cache: dict = field(default_factory=dict)

    def add(self, saved: tuple) -> Capture:
        cap = Capture(saved)
        self.captures.append(cap)
        return cap

    def completed(self) -> list:
        """Captures whose backward ran (a forward whose output did not reach the loss has no
        output gradient: that call contributes nothing and is dropped)."""
        return [c for c in self.captures if c.grad_out is not None]

    def memo(self, key: str, fn):
        """``fn()`` computed once per step: ``sq_norms`` and ``accumulate_clipped`` of one
        backward share what both need (e.g. the calls of a shared layer combined along T).
        Cleared with the captures."""
        if key not in self.step_cache:
            self.step_cache[key] = fn()
        return self.step_cache[key]

    def clear(self) -> None:
        self.captures.clear()
        self.step_cache.clear()


class LayerHandler:
    """Base class; subclasses set ``module_types`` and implement the four methods."""

    module_types: tuple = ()
    kind: str = "layer"

    def __init__(self, name: str, module: torch.nn.Module, engine) -> None:
        self.name = name
        self.module = module
        self.engine = engine
        self.state = LayerState()
        self.last_plan: dict | None = None

    # -- wiring ------------------------------------------------------------------------------
    def install(self) -> None:
        module = self.module
        handler = self

        def forward(*args, **kwargs):
            return handler.forward(*args, **kwargs)

        module.forward = forward  # instance attribute shadows the class's forward

    def uninstall(self) -> None:
        if "forward" in self.module.__dict__:
            del self.module.__dict__["forward"]

    def backend(self, t) -> str:
        """bindings.torch._backend.backend_for(t) of this step's captures, picked once per step
        (it reads TRITON_INTERPRET from the environment: ~3 us a call on the CPU path)."""
        return self.state.memo("backend", lambda: _backend.backend_for(t))

    def trainable(self) -> list:
        # the module's own parameters, read directly (module.parameters() builds a generator
        # chain per call: ~10 us a layer per forward on the CPU path)
        return [p for p in self.module._parameters.values() if p is not None and p.requires_grad]

    def should_capture(self) -> bool:
        return torch.is_grad_enabled() and self.state.capturing and bool(self.trainable())

    # -- per-type work -----------------------------------------------------------------------
    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def batch_size(self) -> int | None:
        caps = self.state.completed()
        return int(caps[0].grad_out.shape[0]) if caps else None

    def sq_norms(self, B: int) -> torch.Tensor:  # pragma: no cover - abstract
        """Per-example squared norm [B] (fp32) of this layer's trainable parameters' gradients,
        computed from the captured (unscaled) output gradients."""
        raise NotImplementedError

    def rounding_slack(self, B: int):
        """(rho [B], alpha [B]) fp32 of this layer's rounded clipped sum (design (c),
        docs/PRIVACY.md): its contribution may exceed c_i times the measured norm by at most
        c_i rho_i + alpha_i. None (the default) when the clipped sum needs no slack."""
        return None

    def accumulate_clipped(self, c: torch.Tensor) -> None:  # pragma: no cover - abstract
        """Add sum_i c_i g_i into each trainable parameter's .grad."""
        raise NotImplementedError

    def plan(self) -> dict | None:
        return self.last_plan


def add_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """Accumulate like autograd: .grad is created on first use, then summed into (so physical
    batches of one logical batch add up); the caller zeroes .grad between logical steps."""
    g = g.to(p.dtype).view_as(p)
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)
