"""nn.GroupNorm and nn.LayerNorm (affine parameters) through the fused kernels.

Forward runs torch's own ``aten.native_group_norm`` / ``aten.native_layer_norm`` (what
F.group_norm / F.layer_norm dispatch to), so outputs are bit-identical to the plain modules, and
keeps the layer input x (in its own dtype) with the tiny per-row statistics mean / rstd. Backward
returns the input gradient only, from ``aten.native_*_norm_backward`` with output_mask
(True, False, False): autograd never computes the non-private affine gradients.

The engine then gets, per example, dweight_i = sum_positions x_hat * G and dbias_i =
sum_positions G from one kernel that recomputes x_hat from (x, mean, rstd) and writes those
[B, 2, C] per-example gradients with their squared norms (instantiate-and-reduce, see
dpprims.kernels.norm_affine); the clipped sums are a reduction of that small buffer.

Autocast follows torch's policy: on CUDA (and any non-CPU device) group_norm / layer_norm are
on autocast's float32 list, so half inputs run in fp32 and the output is fp32; CPU autocast
leaves them in the input dtype. The layer keeps the *uncast* x (half the memory of the fp32
copy; x_hat is recomputed from it exactly, since the cast to fp32 is lossless).

Shapes: GroupNorm x [B, C, *spatial] (affine per channel, summed over spatial positions);
LayerNorm x [B, *lead, *normalized_shape] (affine over normalized_shape, summed over the
leading non-batch dims). The first dimension is always the example dimension. A module called
several times in one forward sums its per-example gradients over the calls.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpprims.bindings.torch import norm_affine as ops
from dpprims.kernels.norm_affine import norm_affine_flops

from .base import Capture, LayerHandler, add_grad

_HALF = (torch.float16, torch.bfloat16)


def _autocast_compute_dtype(x: torch.Tensor):
    """The dtype torch's autocast runs group_norm / layer_norm in for ``x``, or None (no cast).

    CUDA autocast (and, by the same list, other GPU backends) casts them to fp32; CPU autocast
    does not cast them (checked against torch 2.13: F.group_norm / F.layer_norm on bf16 input
    under torch.autocast("cpu") return bf16)."""
    dev = x.device.type
    if dev == "cpu" or not torch.is_autocast_enabled(dev):
        return None
    return torch.float32


def _cast(t, dtype):
    """Autocast's fp32 policy: only half-precision floating tensors are cast."""
    if dtype is None or t is None or t.dtype not in _HALF:
        return t
    return t.to(dtype)


def _memory_format(x: torch.Tensor):
    """What F.group_norm does (input.suggest_memory_format() on CPU): CPU keeps a channels-last
    layout, other devices make x contiguous."""
    if x.device.type == "cpu" and not x.is_contiguous():
        for fmt, ndim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
            if x.dim() == ndim and x.is_contiguous(memory_format=fmt):
                return fmt
    return torch.contiguous_format


class _DPGroupNormFn(torch.autograd.Function):
    """y = GroupNorm(x) * weight + bias; backward returns dL/dx only and hands dL/dy to the capture."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, compute_dtype, capture: Capture):
        X = x.contiguous(memory_format=_memory_format(x))
        Xc, w, b = _cast(X, compute_dtype), _cast(weight, compute_dtype), _cast(bias, compute_dtype)
        N, C = X.shape[0], X.shape[1]
        HxW = math.prod(X.shape[2:])
        y, mean, rstd = torch.ops.aten.native_group_norm(Xc, w, b, N, C, HxW, num_groups, eps)
        capture.saved = (X.detach(), mean.detach(), rstd.detach())
        ctx.save_for_backward(X, w, mean, rstd)
        ctx.meta = (N, C, HxW, num_groups, compute_dtype, x.dtype)
        ctx.capture = capture
        return y

    @staticmethod
    def backward(ctx, grad_out):
        X, w, mean, rstd = ctx.saved_tensors
        N, C, HxW, num_groups, compute_dtype, x_dtype = ctx.meta
        ctx.capture.grad_out = grad_out.detach()
        grad_x = None
        if ctx.needs_input_grad[0]:
            Xc = _cast(X, compute_dtype)
            go = grad_out.contiguous(memory_format=_memory_format(Xc))
            grad_x = torch.ops.aten.native_group_norm_backward(
                go, Xc, mean, rstd, w, N, C, HxW, num_groups, [True, False, False])[0].to(x_dtype)
        return grad_x, None, None, None, None, None, None


class _DPLayerNormFn(torch.autograd.Function):
    """y = LayerNorm(x) * weight + bias; backward returns dL/dx only and hands dL/dy to the capture."""

    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape, eps, compute_dtype, capture: Capture):
        X = x.contiguous()
        Xc, w, b = _cast(X, compute_dtype), _cast(weight, compute_dtype), _cast(bias, compute_dtype)
        y, mean, rstd = torch.ops.aten.native_layer_norm(Xc, normalized_shape, w, b, eps)
        capture.saved = (X.detach(), mean.detach(), rstd.detach())
        ctx.save_for_backward(X, w, b, mean, rstd)
        ctx.meta = (normalized_shape, compute_dtype, x.dtype)
        ctx.capture = capture
        return y

    @staticmethod
    def backward(ctx, grad_out):
        X, w, b, mean, rstd = ctx.saved_tensors
        normalized_shape, compute_dtype, x_dtype = ctx.meta
        ctx.capture.grad_out = grad_out.detach()
        grad_x = None
        if ctx.needs_input_grad[0]:
            Xc = _cast(X, compute_dtype)
            grad_x = torch.ops.aten.native_layer_norm_backward(
                grad_out.contiguous(), Xc, normalized_shape, mean, rstd, w, b,
                [True, False, False])[0].to(x_dtype)
        return grad_x, None, None, None, None, None, None


class _NormHandler(LayerHandler):
    """Shared engine side of GroupNorm / LayerNorm: per-example gradients, norms, clipped sums."""

    def _affine_grads(self, cap: Capture):  # pragma: no cover - abstract
        raise NotImplementedError

    def _per_example(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 2, C] fp32 per-example (dweight, dbias), summed over this forward's calls, and
        the squared norms [B, 2]; computed once per step (sq_norms and accumulate_clipped)."""
        return self.state.memo("per_example", self._compute_per_example)

    def _compute_per_example(self) -> tuple[torch.Tensor, torch.Tensor]:
        caps = self.state.completed()
        pe, sq = self._affine_grads(caps[0])
        positions = self._positions(caps[0])
        if len(caps) > 1:  # several calls: per-example gradients add over calls
            for cap in caps[1:]:
                pe = pe + self._affine_grads(cap)[0]
                positions += self._positions(cap)
            sq = pe.pow(2).sum(dim=2)
        B, _, C = pe.shape
        costs = norm_affine_flops(positions, C)
        elt = caps[0].saved[0].element_size()
        self.last_plan = dict(layer=self.name, kind=self.kind, T=positions, d=C, p=C, method="instantiate",
                              norm_flops=B * costs["instantiate"], weight_grad_flops=B * costs["nonprivate"],
                              norm_bytes=B * positions * C * (elt + caps[0].grad_out.element_size()) + B * 2 * C * 4,
                              weight_grad_bytes=B * 2 * C * 4 + 2 * C * 4)
        return pe, sq

    def _positions(self, cap: Capture) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def sq_norms(self, B: int) -> torch.Tensor:
        _, sq = self._per_example()
        m = self.module
        total = torch.zeros(B, device=sq.device, dtype=torch.float32)
        if m.weight is not None and m.weight.requires_grad:
            total = total + sq[:, 0]
        if m.bias is not None and m.bias.requires_grad:
            total = total + sq[:, 1]
        return total

    def accumulate_clipped(self, c: torch.Tensor) -> None:
        pe, _ = self._per_example()
        dw, db = ops.norm_affine_clipped_grads(pe, c)
        m = self.module
        if m.weight is not None and m.weight.requires_grad:
            add_grad(m.weight, dw)
        if m.bias is not None and m.bias.requires_grad:
            add_grad(m.bias, db)


class GroupNormHandler(_NormHandler):
    module_types = (torch.nn.GroupNorm,)
    kind = "groupnorm"

    def forward(self, x):
        m = self.module
        if not self.should_capture():
            return F.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)
        if x.dim() < 2:
            raise ValueError(f"DPEngine: layer {self.name!r} got input of shape {tuple(x.shape)}; "
                             "GroupNorm needs [B, C, *] with a leading example (batch) dimension")
        capture = self.state.add(())
        with torch.autocast(x.device.type, enabled=False):
            return _DPGroupNormFn.apply(x, m.weight, m.bias, m.num_groups, m.eps,
                                        _autocast_compute_dtype(x), capture)

    def _affine_grads(self, cap: Capture):
        X, mean, rstd = cap.saved
        return ops.groupnorm_affine_grads(X, cap.grad_out, mean, rstd, self.module.num_groups)

    def _positions(self, cap: Capture) -> int:
        return math.prod(cap.saved[0].shape[2:])


class LayerNormHandler(_NormHandler):
    module_types = (torch.nn.LayerNorm,)
    kind = "layernorm"

    def forward(self, x):
        m = self.module
        shape = tuple(m.normalized_shape)
        if not self.should_capture():
            return F.layer_norm(x, shape, m.weight, m.bias, m.eps)
        if x.dim() <= len(shape):
            raise ValueError(f"DPEngine: layer {self.name!r} got input of shape {tuple(x.shape)}; "
                             f"LayerNorm{list(shape)} needs a leading example (batch) dimension before "
                             "the normalized dimensions")
        capture = self.state.add(())
        with torch.autocast(x.device.type, enabled=False):
            return _DPLayerNormFn.apply(x, m.weight, m.bias, list(shape), m.eps,
                                        _autocast_compute_dtype(x), capture)

    def _affine_grads(self, cap: Capture):
        X, mean, rstd = cap.saved
        return ops.layernorm_affine_grads(X, cap.grad_out, mean, rstd, len(self.module.normalized_shape))

    def _positions(self, cap: Capture) -> int:
        X = cap.saved[0]
        return math.prod(X.shape[1:X.dim() - len(self.module.normalized_shape)])
