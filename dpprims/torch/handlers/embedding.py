"""nn.Embedding through the fused kernels.

Input ids [B, *] (any integer dtype; [B] means one token per example) are read as [B, T] with T
the product of the non-batch dims; the output gradient likewise as G [B, T, p]. The first
dimension is always the example dimension.

Forward is F.embedding (a lookup); backward hands dL/dY to the capture and returns no gradient
at all (the ids are integers, and the weight's scatter-add is replaced, not run in addition).
The per-example squared norm is the ghost identity with the indicator Gram (never forming the
[V, p] per-example gradient) and the clipped sum a deterministic sorted-segment scatter, see
dpprims.kernels.embedding. ``padding_idx`` positions contribute nothing (torch semantics).

Rejected when the engine is built (ValueError naming the layer), because the per-example
gradient would not be what the kernels compute or examples would be coupled:

* ``max_norm``: forward renormalises the looked-up weight rows in place, a data-dependent
  change of the weight outside any gradient;
* ``scale_grad_by_freq``: scales gradients by token frequency over the whole batch, which
  couples the examples (no per-example gradient exists);
* ``sparse``: sparse gradients are not produced (the clipped sum is a dense [V, p] tensor).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpprims.bindings.torch import embedding as ops
from dpprims.kernels.embedding import embedding_flops

from .base import Capture, LayerHandler, add_grad


class _DPEmbeddingFn(torch.autograd.Function):
    """Y = W[ids]; backward returns no gradient (ids are integers, W's is done by the engine)
    and hands dL/dY to the capture."""

    @staticmethod
    def forward(ctx, weight, ids, padding_idx, capture: Capture):
        ctx.capture = capture
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        ctx.capture.grad_out = grad_out.detach()
        return None, None, None, None


def _check_options(name: str, m: torch.nn.Embedding) -> None:
    label = name or "<root>"
    if m.max_norm is not None:
        raise ValueError(
            f"DPEngine: Embedding {label!r} has max_norm={m.max_norm}: its forward renormalises the "
            "looked-up weight rows in place, a data-dependent weight change that per-example clipping "
            "cannot account for. Build the Embedding with max_norm=None.")
    if m.scale_grad_by_freq:
        raise ValueError(
            f"DPEngine: Embedding {label!r} has scale_grad_by_freq=True: it scales gradients by token "
            "frequencies over the whole batch, which couples examples (no per-example gradient exists). "
            "Build the Embedding with scale_grad_by_freq=False.")
    if m.sparse:
        raise ValueError(
            f"DPEngine: Embedding {label!r} has sparse=True; dpprims produces dense clipped gradients. "
            "Build the Embedding with sparse=False.")


class EmbeddingHandler(LayerHandler):
    module_types = (torch.nn.Embedding,)
    kind = "embedding"

    def __init__(self, name, module, engine) -> None:
        _check_options(name, module)
        super().__init__(name, module, engine)

    def forward(self, ids):
        m = self.module
        if not self.should_capture():
            return F.embedding(ids, m.weight, m.padding_idx, m.max_norm, m.norm_type,
                               m.scale_grad_by_freq, m.sparse)
        _check_options(self.name, m)  # options changed after the engine was built
        if ids.dim() < 1:
            raise ValueError(f"DPEngine: layer {self.name!r} got ids of shape {tuple(ids.shape)}; "
                             "DP layers need a leading example (batch) dimension")
        capture = self.state.add((ids.detach(),))
        return _DPEmbeddingFn.apply(m.weight, ids, m.padding_idx, capture)

    def _pairs(self):
        """(ids [B, T], G [B, T, p]) combined over the calls of this forward (concatenated along
        T: the per-example gradient is the sum over calls), once per step."""
        return self.state.memo("pairs", self._combine)

    def _combine(self):
        ids, Gs = [], []
        for cap in self.state.completed():
            i, g = cap.saved[0], cap.grad_out
            T = math.prod(i.shape[1:])  # explicit: reshape(B, -1) cannot infer T when B = 0
            ids.append(i.reshape(i.shape[0], T))
            Gs.append(g.reshape(g.shape[0], T, g.shape[-1]))
        if len(ids) == 1:
            return ids[0], Gs[0]
        return torch.cat([i.long() for i in ids], dim=1), torch.cat(Gs, dim=1)

    def sq_norms(self, B: int) -> torch.Tensor:
        ids, G = self._pairs()
        Bc, T, P = G.shape
        m = self.module
        V = m.num_embeddings
        costs = embedding_flops(T, P)
        elt = G.element_size()
        self.last_plan = dict(layer=self.name, kind=self.kind, T=T, d=V, p=P, method="ghost",
                              norm_flops=Bc * costs["ghost"], weight_grad_flops=Bc * costs["scatter"],
                              norm_bytes=Bc * T * (P * elt + ids.element_size()),
                              weight_grad_bytes=Bc * T * (P * elt + ids.element_size()) + 4 * V * P)
        return ops.embedding_sq_norms(ids, G, m.padding_idx, self.engine.precision)

    def accumulate_clipped(self, c: torch.Tensor) -> None:
        ids, G = self._pairs()
        m = self.module
        add_grad(m.weight, ops.embedding_clipped_grad(ids, G, c, m.num_embeddings, m.padding_idx,
                                                      self.engine.precision))
