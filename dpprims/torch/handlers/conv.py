"""nn.Conv2d and nn.Conv1d through the fused conv kernels.

Every configuration nn.Conv1d / nn.Conv2d accepts is handled:

* stride, dilation, non-square kernels, groups (incl. depthwise, groups == C_in), bias or not;
* padding as an int, a tuple, "valid" or "same" (incl. the asymmetric "same" of an even
  effective kernel: the kernels read the low padding only, the forward and the input gradient
  use torch's own convolution, so no padded copy is made);
* padding_mode "reflect", "replicate", "circular": the input is padded explicitly with
  ``F.pad`` before a padding-0 conv (exactly what nn.Conv2d does internally); the padded input
  is what the kernels read, and autograd takes the input gradient through F.pad;
* any input strides (channels-last included): nothing is copied.

The input must have a leading example dimension ([B, C, H, W] / [B, C, L]); an unbatched input
(which nn.Conv accepts) is rejected with an error naming the layer.

The autograd function's backward computes ONLY the input gradient
(``aten.convolution_backward`` with ``output_mask=[True, False, False]``): the non-private
weight-gradient conv never runs. The output gradient is kept for the norm pass and the
clipped sum (kernels/conv.py: implicit im2col, per-group norms summed over groups).

A conv called several times in one forward (weight sharing) is handled exactly: the
per-example gradient is the sum over calls, i.e. one "layer call" over the concatenated
positions of all calls. The fused kernels read one input tensor, so this (rare) case unfolds
each call explicitly (B*T*d values per call) and runs the Linear kernels per group on the
concatenation; the plan says so (``calls`` > 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dpprims.bindings.torch import _backend
from dpprims.bindings.torch import conv as ops
from dpprims.bindings.torch import linear as lin_ops
from dpprims.kernels.conv import choose_conv_norm_method, conv_norm_flops, conv_pads
from dpprims.kernels.linear import choose_clipped_sum_design

from .base import Capture, LayerHandler, add_grad
from .cpu_cost import choose_cpu_method, layer_costs

_CONV_FN = {1: F.conv1d, 2: F.conv2d}


class _DPConvFn(torch.autograd.Function):
    """y = conv(x, W) + b; backward returns dL/dx only and hands dL/dy to the capture.

    ``padding`` is what the forward passes to F.conv (an int tuple or "same"/"valid"); ``lo``
    and ``hi`` are the explicit (low, high) paddings, used for the input gradient: an
    asymmetric padding (hi = lo + 1 for "same") is the symmetric padding lo on an input
    extended by hi - lo zero rows at the end, whose gradient is then cropped.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, capture: Capture, stride, padding, lo, hi, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.capture = capture
        ctx.conf = (tuple(x.shape), stride, lo, hi, dilation, groups)
        return _CONV_FN[len(stride)](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        ctx.capture.grad_out = grad_out.detach()
        if not ctx.needs_input_grad[0]:
            return (None,) * 10
        x_shape, stride, lo, hi, dilation, groups = ctx.conf
        ext = list(x_shape[:2]) + [n + h - l for n, l, h in zip(x_shape[2:], lo, hi)]
        # Like torch.nn.grad.conv2d_input: only the input's shape matters for dL/dx.
        dummy = grad_out.new_empty(1).expand(ext)
        grad_x, _, _ = torch.ops.aten.convolution_backward(
            grad_out, dummy, weight.to(grad_out.dtype), None, list(stride), list(lo), list(dilation),
            False, [0] * len(stride), groups, [True, False, False])
        if list(grad_x.shape) != list(x_shape):
            grad_x = grad_x[(slice(None), slice(None)) + tuple(slice(0, n) for n in x_shape[2:])]
        return grad_x, None, None, None, None, None, None, None, None, None


class ConvHandler(LayerHandler):
    module_types = (torch.nn.Conv1d, torch.nn.Conv2d)
    kind = "conv2d"

    def __init__(self, name, module, engine) -> None:
        super().__init__(name, module, engine)
        self.ndim = 1 if isinstance(module, torch.nn.Conv1d) else 2
        self.kind = "conv1d" if self.ndim == 1 else "conv2d"
        m = module
        label = name or "<root>"
        if m.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"DPEngine: layer {label!r}: unsupported padding_mode {m.padding_mode!r}")
        if getattr(m, "transposed", False):  # pragma: no cover - ConvTranspose is not a Conv2d
            raise ValueError(f"DPEngine: layer {label!r}: transposed convolutions are not supported")
        # Validates padding / stride / dilation now, with the layer's name in the message.
        conv_pads(m.padding, m.kernel_size, m.stride, m.dilation, layer=label)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x):
        m = self.module
        if not self.should_capture():
            return m._conv_forward(x, m.weight, m.bias)
        n = self.ndim
        if x.dim() != n + 2:
            raise ValueError(f"DPEngine: layer {self.name!r} ({type(m).__name__}) got input of shape "
                             f"{tuple(x.shape)}; DP layers need a leading example (batch) dimension "
                             f"([B, C{', H, W' if n == 2 else ', L'}])")
        weight, bias = m.weight, m.bias
        # Autocast: run the conv on the autocast dtype and keep the activation in that dtype.
        # Everything below runs with autocast off, so that F.pad cannot upcast behind our back.
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        with torch.autocast(x.device.type, enabled=False):
            if dt is not None:
                x, weight = x.to(dt), weight.to(dt)
                bias = bias.to(dt) if bias is not None else None
            stride, dilation = tuple(m.stride), tuple(m.dilation)
            if m.padding_mode != "zeros":
                # nn.Conv's own recipe: explicit pad (autograd through F.pad), then a padding-0 conv.
                x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
                padding, pads = (0,) * n, ((0, 0),) * n
            else:
                padding = m.padding
                pads = conv_pads(padding, m.kernel_size, stride, dilation, layer=self.name)
            lo = tuple(p[0] for p in pads)
            hi = tuple(p[1] for p in pads)
            capture = self.state.add((x.detach(), lo))
            return _DPConvFn.apply(x, weight, bias, capture, stride, padding, lo, hi, dilation, m.groups)

    # -- norms and clipped sums -------------------------------------------------------------------
    def _conv_args(self, lo) -> tuple:
        m = self.module
        return list(m.kernel_size), list(m.stride), list(lo), list(m.dilation), m.groups

    def _calls(self) -> list:
        """[(x, G, low pads)] of the calls whose backward ran; G in x's dtype."""
        out = []
        for cap in self.state.completed():
            x, lo = cap.saved
            out.append((x, cap.grad_out.to(x.dtype), lo))
        return out

    def _unfolded_pairs(self, calls) -> tuple[torch.Tensor, torch.Tensor]:
        """Several calls: (U [B, sum T, C_in*k], G [B, sum T, C_out]) over all calls' positions
        (materialised: the fused kernels read one input tensor), once per step."""
        return self.state.memo("unfolded", lambda: self._unfold_calls(calls))

    def _bias_grads(self, calls) -> torch.Tensor:
        """Per-example bias gradients [B, C_out], summed over the calls, once per step."""
        def compute():
            bg = ops.conv2d_bias_grads(calls[0][1])
            for _, G, _ in calls[1:]:
                bg = bg + ops.conv2d_bias_grads(G)
            return bg

        return self.state.memo("bias_grads", compute)

    def _unfold_calls(self, calls) -> tuple[torch.Tensor, torch.Tensor]:
        Us, Gs = [], []
        for x, G, lo in calls:
            geo, x4, G4 = ops.conv_geometry(x, G, *self._conv_args(lo))
            Us.append(ops.unfold(x4, geo).to(x.dtype).transpose(1, 2))
            Gs.append(G4.reshape(geo.B, geo.C_out, geo.T).transpose(1, 2))
        return torch.cat(Us, dim=1), torch.cat(Gs, dim=1)

    def sq_norms(self, B: int) -> torch.Tensor:
        m = self.module
        calls = self._calls()
        geos = [ops.conv_geometry(x, G, *self._conv_args(lo))[0] for x, G, lo in calls]
        T = sum(g.T for g in geos)
        geo = geos[0]
        D, P, groups = geo.D, geo.P, geo.groups
        requested = self.engine.norm_method_for(self.name)
        plain = _backend.backend_for(calls[0][0]) == "torch"
        if plain:
            # plain-torch path: its own time model (cpu_cost.py); "instantiate" keeps the
            # per-example gradients of a single-call layer for the clipped sum
            # (a single-call conv's ghost may form U^T U from the padded input: its geometry)
            shifted = (dict(taps=geo.KH * geo.KW, padded_positions=ops.padded_positions(geo))
                       if len(calls) == 1 else {})
            method = choose_cpu_method(B, T, D, P, groups, conv=True, method=requested, **shifted)
            if method == "instantiate" and len(calls) > 1:
                method = "direct"
        else:
            # the Triton kernels: the kernels' flop model; "instantiate" has no kernel of its
            # own there and runs the direct kernel (same norms)
            method = choose_conv_norm_method(T, D, P, "direct" if requested == "instantiate" else requested)
        prec = self.engine.precision
        device = calls[0][0].device
        total = torch.zeros(B, device=device, dtype=torch.float32)
        if m.weight.requires_grad:
            if len(calls) == 1 and method == "instantiate":
                total = total + ops.sq_rows(self._per_example(calls[0]).flatten(1))
            elif len(calls) == 1:
                # (plain-torch ghost: the im2col is dropped after the Gram matrices; the clipped
                # sum is the framework's conv weight gradient, oneDNN's implicit GEMM. Keeping
                # the im2col for an einsum clipped sum was 1.5-2x slower than that weight
                # gradient on ResNet-18's layer3/4 shapes: the einsum transposes U in memory)
                x, G, lo = calls[0]
                total = total + ops.conv2d_weight_sq_norms(x, G, *self._conv_args(lo), method, prec)
            else:
                U, Gc = self._unfolded_pairs(calls)
                lmethod = "outer" if T == 1 else method
                for g in range(groups):
                    total = total + lin_ops.linear_weight_sq_norms(
                        U[:, :, g * D:(g + 1) * D], Gc[:, :, g * P:(g + 1) * P], lmethod, prec)
        if m.bias is not None and m.bias.requires_grad:
            total = total + self._bias_grads(calls).square().sum(dim=1)
        # clipped-sum design (docs/PRIVACY.md): (c) "rounded" for a single-call layer on the
        # Triton backends when the engine's clipped_sum allows it, else (a)
        design = "segments"
        if m.weight.requires_grad and not plain and len(calls) == 1 and method != "instantiate":
            design = choose_clipped_sum_design(T, str(calls[0][0].dtype), self.engine.clipped_sum,
                                               self.engine.clipping == "automatic")
            design = "segments" if design == "rank1" else design
        self.state.step_cache["design"] = design
        costs = conv_norm_flops(T, D, P, groups)
        esize = calls[0][0].element_size()
        io = sum(x.numel() + G.numel() for x, G, _ in calls) * esize
        self.last_plan = dict(layer=self.name, kind=self.kind, T=T, d=D, p=P, groups=groups, method=method,
                              clipped_sum=design,
                              calls=len(calls), norm_flops=B * costs["direct" if method == "instantiate" else method],
                              weight_grad_flops=2 * B * T * D * P * groups,
                              norm_bytes=io, weight_grad_bytes=io + 4 * groups * D * P)
        if plain:
            cpu_costs = layer_costs(B, T, D, P, groups, conv=True, **shifted)
            self.last_plan["cpu_ms"] = {k: v * 1e3 for k, v in cpu_costs.items()}
        return total

    def rounding_slack(self, B: int):
        """(rho_i, alpha_i) [B] of this layer's design-(c) clipped sum (per group, combined in
        quadrature: ops.conv2d_rounded_rows_slack), or None; valid after ``sq_norms``."""
        if self.state.step_cache.get("design") != "rounded":
            return None
        x, G, lo = self._calls()[0]
        return ops.conv2d_rounded_rows_slack(x, G, *self._conv_args(lo))

    def _per_example(self, call) -> torch.Tensor:
        """The per-example weight gradients [B, C_out, D] of a single-call layer (plain-torch
        "instantiate"), built once per step and kept until the clipped sum."""
        def compute():
            x, G, lo = call
            geo, x4, G4 = ops.conv_geometry(x, G, *self._conv_args(lo))
            return ops.per_example_weight_grads(x4, G4, geo)

        return self.state.memo("per_example", compute)

    def accumulate_clipped(self, c: torch.Tensor) -> None:
        m = self.module
        calls = self._calls()
        prec = self.engine.precision
        if m.weight.requires_grad:
            if len(calls) == 1 and "per_example" in self.state.step_cache:
                add_grad(m.weight, ops.clipped_sum_of_rows(self._per_example(calls[0]), c))
            elif len(calls) == 1:
                x, G, lo = calls[0]
                route, args = self.engine.exact_route, self._conv_args(lo)
                if self.state.step_cache.get("design") != "rounded":
                    add_grad(m.weight, ops.conv2d_clipped_weight_grad(x, G, c, *args, prec))
                elif route is None:
                    add_grad(m.weight, ops.conv2d_clipped_weight_grad(x, G, c, *args, prec, "rounded"))
                else:  # examples routed to design (a) (engine: slack too large) and the rest by (c)
                    add_grad(m.weight,
                             ops.conv2d_clipped_weight_grad(x, G, torch.where(route, 0.0, c), *args, prec, "rounded")
                             + ops.conv2d_clipped_weight_grad(x, G, torch.where(route, c, 0.0), *args, prec))
            else:
                U, Gc = self._unfolded_pairs(calls)
                geo = ops.conv_geometry(calls[0][0], calls[0][1], *self._conv_args(calls[0][2]))[0]
                D, P = geo.D, geo.P
                parts = [lin_ops.linear_clipped_weight_grad(U[:, :, g * D:(g + 1) * D],
                                                            Gc[:, :, g * P:(g + 1) * P], c, prec)
                         for g in range(geo.groups)]
                add_grad(m.weight, torch.cat(parts, dim=0))
        if m.bias is not None and m.bias.requires_grad:
            add_grad(m.bias, ops.clipped_rows_sum(self._bias_grads(calls), c))
