"""nn.RMSNorm (elementwise affine weight) through the norm-affine kernel.

RMSNorm computes y = x_hat * weight with x_hat = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps)
over the trailing ``normalized_shape`` axes (torch's default eps=None is the machine epsilon of
the statistics' dtype: float64 for float64 input, else float32). There is no bias. With
G = dL_i/dy the per-example weight gradient is a sum over the leading (non-normalised) positions:

    dweight_i[c] = sum_r x_hat_i[r, c] * G_i[r, c].

That is the LayerNorm affine gradient with mean = 0, so the engine reuses the LayerNorm kernel
(``dpprims.bindings.torch.norm_affine.layernorm_affine_grads``, ROW stats) with a zero mean and
torch's own rstd; the kernel recomputes x_hat = (x - 0) * rstd from the kept input, and the
clipped sum is the same instantiate-and-reduce over the [B, 2, C] buffer (the "bias" row of that
buffer, sum_r G, is computed by the kernel and ignored: RMSNorm has no bias, so it never enters
the norm or a gradient).

Forward runs ``aten._fused_rms_norm`` (what F.rms_norm dispatches to when the weight has the
input's dtype; output bit-identical to the plain module, checked in the tests) or, for a weight
of another dtype, ``torch.rms_norm`` itself, plus ``_fused_rms_norm`` without weight for the
statistics. Backward returns the input gradient only, from the closed form
dx = rstd * (w*G - x_hat * mean(x_hat * w*G)) in fp32: autograd never computes the non-private
weight gradient. Autocast: the layer runs in its input's dtype with autocast off, as torch's CPU
autocast does for rms_norm (statistics in fp32 for half inputs).

The first dimension is always the example dimension: x [B, *lead, *normalized_shape].
"""
from __future__ import annotations

import math

import torch

from dpprims.bindings.torch import norm_affine as ops

from .base import Capture, add_grad
from .norm import _NormHandler


class _DPRMSNormFn(torch.autograd.Function):
    """y = RMSNorm(x) * weight; backward returns dL/dx only and hands dL/dy to the capture."""

    @staticmethod
    def forward(ctx, x, weight, normalized_shape, eps, capture: Capture):
        X = x.contiguous()
        if weight is None or weight.dtype == X.dtype:
            y, rstd = torch.ops.aten._fused_rms_norm(X, normalized_shape, weight, eps)
        else:
            y = torch.rms_norm(X, normalized_shape, weight, eps)
            rstd = torch.ops.aten._fused_rms_norm(X, normalized_shape, None, eps)[1]
        capture.saved = (X.detach(), rstd.detach())
        ctx.save_for_backward(X, weight, rstd)
        ctx.ndim = len(normalized_shape)
        ctx.capture = capture
        return y

    @staticmethod
    def backward(ctx, grad_out):
        X, w, rstd = ctx.saved_tensors
        ctx.capture.grad_out = grad_out.detach()
        grad_x = None
        if ctx.needs_input_grad[0]:
            axes = tuple(range(X.dim() - ctx.ndim, X.dim()))
            r = rstd.float()
            xh = X.float() * r
            gw = grad_out.float() * w.float() if w is not None else grad_out.float()
            grad_x = (r * (gw - xh * (xh * gw).mean(dim=axes, keepdim=True))).to(X.dtype)
        return grad_x, None, None, None, None


class RMSNormHandler(_NormHandler):
    module_types = (torch.nn.RMSNorm,)
    kind = "rmsnorm"

    def forward(self, x):
        m = self.module
        shape = list(m.normalized_shape)
        if not self.should_capture():
            return torch.rms_norm(x, shape, m.weight, m.eps)
        if x.dim() <= len(shape) or tuple(x.shape[x.dim() - len(shape):]) != tuple(shape):
            raise ValueError(f"DPEngine: layer {self.name!r} got input of shape {tuple(x.shape)}; "
                             f"RMSNorm{shape} needs [B, *, {', '.join(map(str, shape))}] with a leading "
                             "example (batch) dimension before the normalized dimensions")
        capture = self.state.add(())
        with torch.autocast(x.device.type, enabled=False):
            return _DPRMSNormFn.apply(x, m.weight, shape, m.eps, capture)

    def _affine_grads(self, cap: Capture):
        X, rstd = cap.saved
        return ops.layernorm_affine_grads(X, cap.grad_out, torch.zeros_like(rstd), rstd,
                                          len(self.module.normalized_shape))

    def _positions(self, cap: Capture) -> int:
        X = cap.saved[0]
        return math.prod(X.shape[1:X.dim() - len(self.module.normalized_shape)])

    def sq_norms(self, B: int) -> torch.Tensor:
        _, sq = self._per_example()
        return sq[:, 0].float()  # the weight row only (no bias)

    def accumulate_clipped(self, c: torch.Tensor) -> None:
        pe, _ = self._per_example()
        add_grad(self.module.weight, ops.clipped_rows_sum(pe[:, 0].contiguous(), c))
