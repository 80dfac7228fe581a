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

    def _rank1_rows(self):
        """(a [B, d], g [B, p], the captured input's dtype): the fp32 rows of the plain-torch
        T = 1 path, or None where it does not apply (Triton backends, T > 1, no weight or bias
        to clip). With T = 1 the per-example
        weight gradient is the outer product g_i a_i^T: its squared norm is ||g_i||^2 ||a_i||^2
        (bias: ||g_i||^2) and the clipped sum is the one weight-gradient GEMM (c * g)^T a."""
        return self.state.memo("rank1_rows", self._rank1_rows_now)

    def _rank1_rows_now(self):
        caps = self.state.completed()
        if len(caps) == 1 and caps[0].saved[0].dim() == 2:
            # one call on [B, d] rows (an MLP's layers): the rows themselves, without the
            # [B, 1, d] views of _pairs and the selects back (~20 us of dispatch a layer)
            a, g = caps[0].saved[0], caps[0].grad_out
            if self.backend(a) != "torch":
                return None
            return a.float(), g.to(a.dtype).float(), a.dtype
        A, G = self._pairs()
        if A.shape[1] != 1 or self.backend(A) != "torch":
            return None
        return A[:, 0].float(), G[:, 0].float(), A.dtype

    def _plan_rank1(self, Bc: int, D: int, P: int, dtype, itemsize: int) -> dict:
        """The plan row of a plain-torch T = 1 layer: a pure function of the shapes, built once
        per shape (it costs as much Python as the layer's norm pass)."""
        key = (Bc, D, P, dtype)
        cached = self.__dict__.setdefault("_plan_rank1_cache", {})
        if key not in cached:
            costs = norm_flops(1, D, P)
            cached[key] = dict(layer=self.name, kind=self.kind, T=1, d=D, p=P, method="outer", clipped_sum="rank1",
                               norm_flops=Bc * costs["outer"], weight_grad_flops=2 * Bc * D * P,
                               norm_bytes=Bc * (D + P) * itemsize,
                               weight_grad_bytes=Bc * (D + P) * itemsize + 4 * D * P,
                               cpu_ms={k: v * 1e3 for k, v in layer_costs(Bc, 1, D, P, conv=False).items()})
        return cached[key]

    def _sq_norms_rank1(self, B: int, a: torch.Tensor, g: torch.Tensor, dtype) -> torch.Tensor:
        m = self.module
        w = m.weight.requires_grad
        b = m.bias is not None and m.bias.requires_grad
        g2 = sq_rows(g)  # ||g_i||^2; a NaN / inf row gives a non-finite norm (then c_i = 0)
        if w:
            _backend.record("linear_weight_sq_norms[outer]", a, self.backend(a))
            # weight ||g_i||^2 ||a_i||^2 plus bias ||g_i||^2 in one product
            total = g2 * (sq_rows(a) + 1.0) if b else g2 * sq_rows(a)
        else:
            total = g2
        if b:
            _backend.record("linear_bias_sq_norms", a, self.backend(a))
        if total.shape[0] != B:
            raise RuntimeError(f"layer {self.name!r}: {total.shape[0]} examples, expected {B}")
        self.state.step_cache["design"] = "rank1"
        self.last_plan = self._plan_rank1(a.shape[0], a.shape[1], g.shape[1], dtype, dtype.itemsize)
        return total

    def sq_norms(self, B: int) -> torch.Tensor:
        rows = self._rank1_rows()
        if rows is not None:
            return self._sq_norms_rank1(B, *rows)
        A, G = self._pairs()
        Bc, T, D = A.shape
        P = G.shape[2]
        m = self.module
        requested = self.engine.norm_method_for(self.name)
        plain = self.backend(A) == "torch"
        if plain:  # plain-torch path: its own time model (cpu_cost.py)
            method = choose_cpu_method(Bc, T, D, P, conv=False, method=requested)
        else:  # Triton kernels: the flop model; "instantiate" runs the direct kernel there
            method = choose_norm_method(T, D, P, "direct" if requested == "instantiate" else requested)
        total = torch.zeros(B, device=A.device, dtype=torch.float32)
        if m.weight.requires_grad and method == "instantiate":
            total = total + sq_rows(self._per_example().flatten(1))
        elif m.weight.requires_grad and plain:
            # the ops' own plain-torch code, called directly (no custom-op dispatch per call)
            _backend.record(f"linear_weight_sq_norms[{method}]", A, self.backend(A))
            total = total + ops._torch_weight_sq_norms(A, G, method)
        elif m.weight.requires_grad:
            total = total + ops.linear_weight_sq_norms(A, G, method, self.engine.precision)
        if m.bias is not None and m.bias.requires_grad and plain:
            _backend.record("linear_bias_sq_norms", A, self.backend(A))
            total = total + sq_rows(G.float().sum(1))
        elif m.bias is not None and m.bias.requires_grad:
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

    def _accumulate_plain(self, c: torch.Tensor, A: torch.Tensor, G: torch.Tensor) -> None:
        """Plain-torch path (T = 1 rank-one rows included): sum_i c_i G_i^T A_i as ONE weight-gradient GEMM of the row-scaled
        output gradients (addmm_ into .grad when it exists) and the bias sum_i c_i sum_t G_i[t]
        from the same scaled rows; fp32, no rounding (what ops.linear_clipped_weight_grad /
        linear_clipped_bias_grad compute, without their dispatch and masking temporaries).
        Examples with c_i == 0 (padding, non-finite norms) are indexed away from both operands
        first, never multiplied (0 * NaN would be NaN); reading c on the host is free on this
        CPU path."""
        m = self.module
        idx = self.engine.kept_rows(c)
        if idx is not None:
            A, G, c = A.index_select(0, idx), G.index_select(0, idx), c.index_select(0, idx)
        rows = G.dim() == 2  # T = 1 rows [B', p] / [B', d] as they are (no [B', 1, *] views)
        P, D = G.shape[-1], A.shape[-1]
        gs3 = G.float() * (c.unsqueeze(1) if rows else c.view(-1, 1, 1))  # scaled output-gradient rows
        gs = gs3 if rows else gs3.reshape(-1, P)
        if m.weight.requires_grad:
            _backend.record("linear_clipped_weight_grad", A, self.backend(A))
            p = m.weight
            a = A.float() if rows else A.float().reshape(-1, D)
            if p.grad is None or p.grad.dtype != torch.float32 or not p.grad.is_contiguous():
                add_grad(p, torch.mm(gs.t(), a))
            else:
                p.grad.addmm_(gs.t(), a)
        if m.bias is not None and m.bias.requires_grad:
            _backend.record("linear_clipped_bias_grad", A, self.backend(A))
            # per example over its positions, then over the examples (the summation order of
            # the per-example definition: a bias whose exact gradient cancels, like attention's
            # key bias, keeps its small error); with one position the first sum is the identity
            # (and a size-1 reduction costs 6x the [B', p] one here)
            add_grad(m.bias, gs.sum(0) if rows or gs3.shape[1] == 1 else gs3.sum(1).sum(0))

    def accumulate_clipped(self, c: torch.Tensor) -> None:
        if self.state.step_cache.get("design") == "rank1" and "per_example" not in self.state.step_cache:
            rows = self._rank1_rows()
            if rows is not None:
                a, g, _ = rows  # T = 1: the same one-GEMM sum over the [B, d] / [B, p] rows
                return self._accumulate_plain(c, a, g)
        A, G = self._pairs()
        m = self.module
        if ("per_example" not in self.state.step_cache and self.state.step_cache.get("design") == "segments"
                and self.backend(A) == "torch"):
            return self._accumulate_plain(c, A, G)
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
