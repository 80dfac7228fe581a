"""torch.library ops for the Embedding kernels (dpprims.kernels.embedding).

Every op is a ``torch.library.custom_op`` with a fake (meta) implementation. Each call runs one
of three backends (see ``_backend``): the compiled Triton kernel on CUDA, the same kernel through
Triton's interpreter on CPU when TRITON_INTERPRET=1, or the plain-torch implementation of the
same math otherwise.

Shapes: ``ids`` [B, T] integer token ids (or [B], T = 1), ``G`` [B, T, P] (or [B, P]) the output
gradient; any strides for G (the kernels take strides). ``padding_idx`` is None or a
non-negative id (normalise a negative one with num_embeddings first, as nn.Embedding does):
positions holding it contribute nothing. All outputs are fp32.

* ``embedding_sq_norms(ids, G, padding_idx)``: per-example ||dW_i||_F^2 [B] by the ghost
  identity with the indicator Gram, sum_{s,t} [id_s == id_t] <g_s, g_t>; [V, P] is never formed.
* ``embedding_clipped_grad(ids, G, c, num_embeddings, padding_idx)``: sum_i c_i dW_i [V, P].
  Deterministic without atomics: the B*T row keys (the id, or V for padding positions and
  examples with c_i == 0) are sorted once here with a stable ``torch.sort``, the row range of
  each id tile found with ``torch.searchsorted`` (on the device, no host sync), and each kernel
  program reduces the sorted rows of its [BLOCK_V, BLOCK_P] output tile in order.
"""
from __future__ import annotations

import torch

from dpprims.kernels import embedding as _k
from dpprims.kernels import linear as _kl

from ._backend import empty, record
from .linear import _arch, _check_factors, _dot_precision, interpreter_safe


def _launch(kernel, spec, *args, **kw):
    kernel[spec.grid](*args, **spec.constexprs, num_warps=spec.num_warps, **kw)


def _check(ids: torch.Tensor, G: torch.Tensor, padding_idx) -> tuple[torch.Tensor, torch.Tensor]:
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
    if ids.dim() == 1 and G.dim() == 2:
        ids, G = ids.unsqueeze(1), G.unsqueeze(1)
    if ids.dim() != 2 or G.dim() != 3 or G.shape[:2] != ids.shape:
        raise ValueError(f"ids must be [B, T] and G [B, T, P] (or [B] and [B, P]), got "
                         f"{tuple(ids.shape)} and {tuple(G.shape)}")
    if not G.is_floating_point():
        raise ValueError(f"G must be a floating tensor, got {G.dtype}")
    if ids.device != G.device:
        raise ValueError(f"ids and G must be on the same device, got {ids.device} and {G.device}")
    if padding_idx is not None and padding_idx < 0:
        raise ValueError(f"padding_idx must be None or >= 0 (normalise a negative index with "
                         f"num_embeddings first), got {padding_idx}")
    return ids, G


# --------------------------------------------------------------------------------------------
# per-example squared norms
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("dpprims::embedding_sq_norms", mutates_args=())
def embedding_sq_norms(ids: torch.Tensor, G: torch.Tensor, padding_idx: int | None = None,
                       precision: str = "ieee") -> torch.Tensor:
    """Per-example ||dW_i||_F^2 [B] (fp32) = sum_{s,t} [id_s == id_t != padding_idx] <g_s, g_t>.

    Repeated ids within an example add up (their gradient rows are summed before squaring);
    padding positions contribute nothing (their G rows are not read, so even a NaN there is
    ignored); B = 0 gives an empty result."""
    ids, G = _check(ids, G, padding_idx)
    B, T, P = G.shape
    prec = _dot_precision(G, precision)
    if B == 0 or T == 0 or P == 0:
        return G.new_zeros(B, dtype=torch.float32)
    backend = record("embedding_sq_norms", G)
    pad = -1 if padding_idx is None else int(padding_idx)
    if backend == "torch":
        ok = ids != pad
        g = torch.where(ok[..., None], G.float(), 0.0)
        same = (ids[:, :, None] == ids[:, None, :]) & ok[:, :, None] & ok[:, None, :]
        return torch.where(same, torch.bmm(g, g.transpose(1, 2)), 0.0).sum(dim=(1, 2))
    G = interpreter_safe(G, backend)
    spec = _k.embedding_norm_ghost_spec(B, T, P, arch=_arch(G))
    partials = empty(spec.outputs["partials"], device=G.device, dtype=torch.float32)
    _launch(_k._embedding_norm_ghost_kernel, spec, ids, G, T, P, pad,
            *ids.stride(), *G.stride(), partials, DOT_PRECISION=prec)
    return partials.sum(dim=1)


@embedding_sq_norms.register_fake
def _(ids, G, padding_idx=None, precision="ieee"):
    return G.new_empty(G.shape[0], dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# clipped sum
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("dpprims::embedding_clipped_grad", mutates_args=())
def embedding_clipped_grad(ids: torch.Tensor, G: torch.Tensor, c: torch.Tensor, num_embeddings: int,
                           padding_idx: int | None = None, precision: str = "ieee") -> torch.Tensor:
    """sum_i c_i dW_i [V, P] (fp32), dW_i[v] = sum_{t: ids_i[t] = v} G_i[t].

    Padding positions and examples with c_i == 0 are excluded (by sort key, and masked again in
    the kernel): a dropped example's NaN / inf never reaches the sum. Ids outside [0, V) are
    ignored (nn.Embedding's forward has rejected them already). Every one of the V rows is
    written (0 for ids nobody used). Deterministic: a stable sort of the B*T row keys and a
    fixed reduction order per output tile; no atomics."""
    ids, G = _check(ids, G, padding_idx)
    B, T, P = G.shape
    V = int(num_embeddings)
    if V < 0:
        raise ValueError(f"num_embeddings must be >= 0, got {num_embeddings}")
    if padding_idx is not None and padding_idx >= V:
        raise ValueError(f"padding_idx={padding_idx} out of range for num_embeddings={V}")
    _check_factors(c, B, G)
    prec = _dot_precision(G, precision)
    if B == 0 or T == 0 or V == 0 or P == 0:
        return G.new_zeros(V, P, dtype=torch.float32)
    backend = record("embedding_clipped_grad", G)
    keep = (c != 0)[:, None].expand(B, T)
    if padding_idx is not None:
        keep = keep & (ids != padding_idx)
    if backend == "torch":
        keep = keep & (ids >= 0) & (ids < V)
        rows = torch.where(keep[..., None], G.float() * c.view(B, 1, 1), 0.0)
        return torch.zeros(V, P, device=G.device, dtype=torch.float32).index_add_(
            0, torch.where(keep, ids, 0).reshape(-1).long(), rows.reshape(B * T, P))
    keys = torch.where(keep, ids, V).reshape(-1)
    sorted_keys, perm = torch.sort(keys, stable=True)
    spec = _k.embedding_clipped_grad_spec(B * T, V, P, arch=_arch(G))
    starts = torch.arange(spec.outputs["bounds"], device=G.device, dtype=keys.dtype) * spec.constexprs["BLOCK_V"]
    bounds = torch.searchsorted(sorted_keys, starts.clamp_(max=V))  # [n_v + 1] int64 row ranges
    out = empty(spec.outputs["out"], device=G.device, dtype=torch.float32)
    G_k = interpreter_safe(G, backend)
    _launch(_k._embedding_clipped_grad_kernel, spec, sorted_keys, perm, bounds, G_k, c,
            T, V, P, *G_k.stride(), out, DOT_PRECISION=prec,
            ROUND_DTYPE=_kl.clipped_round_dtype(G.dtype, precision))
    return out


@embedding_clipped_grad.register_fake
def _(ids, G, c, num_embeddings, padding_idx=None, precision="ieee"):
    return G.new_empty(num_embeddings, G.shape[-1], dtype=torch.float32)
