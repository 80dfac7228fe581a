"""nn.Linear through the fused kernels.

An input of shape [B, *, d] is read as A [B, T, d] with T the product of the middle dims
(T = 1 for [B, d]); the output gradient likewise as G [B, T, p]. The first dimension is
always the example dimension.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpprims.bindings.torch import _backend
from dpprims.bindings.torch import linear as ops
from dpprims.bindings.torch.conv import clipped_sum_of_rows, sq_rows
from dpprims.kernels.linear import choose_clipped_sum_design, choose_norm_method, norm_flops

from .base import Capture, LayerHandler, add_grad
from .cpu_cost import choose_cpu_method, layer_costs


class _DPLinearFn(torch.autograd.Function):
    """y = x W^T + b; backward returns dL/dx only and hands dL/dy to the capture."""

    @staticmethod
    def forward(ctx, x, weight, bias, capture: Capture):
        ctx.save_for_backward(weight)
        ctx.capture = capture
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        ctx.capture.grad_out = grad_out.detach()
        grad_x = grad_out.matmul(weight.to(grad_out.dtype)) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class LinearHandler(LayerHandler):
    module_types = (torch.nn.Linear,)
    kind = "linear"

    def forward(self, x):
        m = self.module
        if not self.should_capture():
            return F.linear(x, m.weight, m.bias)
        if x.dim() < 2:
            raise ValueError(f"DPEngine: layer {self.name!r} got input of shape {tuple(x.shape)}; "
                             "DP layers need a leading example (batch) dimension")
        weight, bias = m.weight, m.bias
        # Autocast: run F.linear on the autocast dtype and keep the activation in that dtype.
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dt), weight.to(dt)
            bias = bias.to(dt) if bias is not None else None
        capture = self.state.add((x.detach(),))
        with torch.autocast(x.device.type, enabled=False):
            return _DPLinearFn.apply(x, weight, bias, capture)

    def _pairs(self):
        """(A [B, T, d], G [B, T, p]) combined over the calls of this forward (once per step)."""
        return self.state.memo("pairs", self._combine)

    def _combine(self):
        As, Gs = [], []
        for cap in self.state.completed():
            a, g = cap.saved[0], cap.grad_out
            T = math.prod(a.shape[1:-1])  # explicit: reshape(B, -1, d) cannot infer T when B = 0
            As.append(a.reshape(a.shape[0], T, a.shape[-1]))
            Gs.append(g.reshape(g.shape[0], T, g.shape[-1]).to(a.dtype))
        if len(As) == 1:
            return As[0], Gs[0]
        # Several calls: the per-example gradient is the sum over calls, i.e. one layer call
        # over the concatenated positions.
        return torch.cat(As, dim=1), torch.cat(Gs, dim=1)

    def sq_norms(self, B: int) -> torch.Tensor:
        A, G = self._pairs()
        Bc, T, D = A.shape
        P = G.shape[2]
        m = self.module
        requested = self.engine.norm_method_for(self.name)
        plain = _backend.backend_for(A) == "torch"
        if plain:  # plain-torch path: its own time model (cpu_cost.py)
            method = choose_cpu_method(Bc, T, D, P, conv=False, method=requested)
        else:  # Triton kernels: the flop model; "instantiate" runs the direct kernel there
            method = choose_norm_method(T, D, P, "direct" if requested == "instantiate" else requested)
        total = torch.zeros(B, device=A.device, dtype=torch.float32)
        if m.weight.requires_grad and method == "instantiate":
            total = total + sq_rows(self._per_example().flatten(1))
        elif m.weight.requires_grad:
            total = total + ops.linear_weight_sq_norms(A, G, method, self.engine.precision)
        if m.bias is not None and m.bias.requires_grad:
            total = total + ops.linear_bias_sq_norms(G)
        # clipped-sum design (docs/PRIVACY.md): (c) "rounded" only on the Triton backends (the
        # plain-torch path sums in fp32: nothing to gain, only the slack's utility cost)
        design = "rank1" if T == 1 else "segments"
        if m.weight.requires_grad and not plain and method != "instantiate":
            design = choose_clipped_sum_design(T, str(A.dtype), self.engine.clipped_sum,
                                               self.engine.clipping == "automatic")
        self.state.step_cache["design"] = design
        costs = norm_flops(T, D, P)
        self.last_plan = dict(layer=self.name, kind=self.kind, T=T, d=D, p=P, method=method,
                              clipped_sum=design,
                              norm_flops=Bc * costs["direct" if method == "instantiate" else method],
                              weight_grad_flops=2 * Bc * T * D * P,
                              norm_bytes=Bc * T * (D + P) * A.element_size(),
                              weight_grad_bytes=Bc * T * (D + P) * A.element_size() + 4 * D * P)
        if plain:
            self.last_plan["cpu_ms"] = {k: v * 1e3 for k, v in layer_costs(Bc, T, D, P, conv=False).items()}
        return total

    def rounding_slack(self, B: int):
        """(u S_i, alpha_i) [B] of this layer's design-(c) clipped sum, or None (designs (a)/(b)
        need no slack); valid after ``sq_norms``."""
        if self.state.step_cache.get("design") != "rounded":
            return None
        A, G = self._pairs()
        return ops.rounded_rows_slack(A, G)

    def _per_example(self) -> torch.Tensor:
        """Per-example weight gradients G_i^T A_i [B, p, d] (fp32; plain-torch "instantiate"),
        one batched GEMM, built once per step and kept until the clipped sum."""
        def compute():
            A, G = self._pairs()
            return torch.bmm(G.float().transpose(1, 2), A.float())

        return self.state.memo("per_example", compute)

    def accumulate_clipped(self, c: torch.Tensor) -> None:
        A, G = self._pairs()
        m = self.module
        if m.weight.requires_grad and "per_example" in self.state.step_cache:
            add_grad(m.weight, clipped_sum_of_rows(self._per_example(), c))
        elif m.weight.requires_grad:
            prec, route = self.engine.precision, self.engine.exact_route
            if self.state.step_cache.get("design") != "rounded":
                add_grad(m.weight, ops.linear_clipped_weight_grad(A, G, c, prec))
            elif route is None:
                add_grad(m.weight, ops.linear_clipped_weight_grad(A, G, c, prec, "rounded"))
            else:  # examples routed to design (a) (engine: slack too large) and the rest by (c)
                add_grad(m.weight, ops.linear_clipped_weight_grad(A, G, torch.where(route, 0.0, c), prec, "rounded")
                         + ops.linear_clipped_weight_grad(A, G, torch.where(route, c, 0.0), prec))
        if m.bias is not None and m.bias.requires_grad:
            add_grad(m.bias, ops.linear_clipped_bias_grad(G, c))
