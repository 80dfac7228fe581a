"""Multi-head attention from supported layers, and the converter for torch models.

``nn.MultiheadAttention`` keeps its query/key/value projections in one ``in_proj_weight`` that
``F.multi_head_attention_forward`` uses functionally, so the DP engine cannot see the layer
inputs and output gradients of those projections, and refuses the module. ``DPMultiheadAttention``
computes the same function from ``nn.Linear`` modules the engine clips per example:

* ``q_proj``, ``k_proj``, ``v_proj`` (Linear embed_dim <- embed_dim / kdim / vdim) and
  ``out_proj`` (Linear embed_dim <- embed_dim), with or without bias;
* ``add_bias_kv``: the learned extra key / value position is ``bias_k`` / ``bias_v``, each a
  ``Linear(1, embed_dim, bias=False)`` applied to a constant 1 per example (its weight is
  torch's ``bias_k`` [1, 1, E] as a column [E, 1]), so its per-example gradient (the output
  gradient at that position) is clipped like any Linear weight;
* everything between the projections (head split, scaling, masks, softmax, attention dropout,
  ``add_zero_attn``) has no parameters and never mixes examples.

Same math as torch (``F.multi_head_attention_forward``): ``batch_first``, unbatched inputs,
``kdim``/``vdim``, ``bias``, ``add_bias_kv``, ``add_zero_attn``, ``dropout`` on the attention
weights (training mode only), bool / float ``attn_mask`` (2-D [L, S] or 3-D [B*H, L, S]) and
``key_padding_mask`` ([B, S]), ``is_causal`` as a hint with ``attn_mask`` (torch's rules), and
``need_weights`` / ``average_attn_weights``. With ``need_weights=False`` attention runs through
``F.scaled_dot_product_attention`` as torch does; outputs equal torch's to fp32 rounding.

Per-example semantics (privacy-relevant): inside, the projections always see batch-first
[B, L, E] inputs (a ``batch_first=False`` module transposes before projecting), because the
engine reads dimension 0 of every layer input as the example dimension. A 3-D attn_mask is per
(example, head) and may differ between examples; it is data, not a parameter.

``convert_multihead_attention(model)`` swaps every ``nn.MultiheadAttention`` for a
``DPMultiheadAttention`` holding the same weights (``DPMultiheadAttention.from_torch``) and turns
off ``nn.TransformerEncoder``'s nested-tensor fast path, so ``nn.TransformerEncoderLayer`` /
``nn.TransformerDecoderLayer`` / ``nn.Transformer`` run their ordinary forward through supported
layers only (their fused fast path needs ``in_proj_weight``, which the DP module does not have).
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DPMultiheadAttention", "convert_multihead_attention"]


class DPMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` built from ``nn.Linear`` layers (see the module docstring).

    Constructor arguments and ``forward`` are those of ``nn.MultiheadAttention``. Parameters:
    ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (Linear) and, with ``add_bias_kv``,
    ``bias_k``, ``bias_v`` (Linear(1, embed_dim, bias=False)). Initialisation follows torch
    (xavier-uniform projections, packed [3E, E] fan when kdim = vdim = embed_dim; zero biases;
    xavier-normal bias_k / bias_v). ``from_torch`` / ``to_torch`` convert with the weights.
    """

    # Read by nn.TransformerEncoderLayer / nn.TransformerEncoder before they choose a fused fast
    # path: with no packed in_proj they take the ordinary path through this module's forward.
    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be > 0, got {embed_dim} and {num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        fk = dict(device=device, dtype=dtype)
        self.embed_dim = int(embed_dim)
        self.kdim = int(kdim) if kdim is not None else self.embed_dim
        self.vdim = int(vdim) if vdim is not None else self.embed_dim
        self.num_heads = int(num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.add_zero_attn = bool(add_zero_attn)
        self.add_bias_kv = bool(add_bias_kv)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(self.kdim, self.embed_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(self.vdim, self.embed_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=bias, **fk)
        if self.add_bias_kv:
            self.bias_k = nn.Linear(1, self.embed_dim, bias=False, **fk)
            self.bias_v = nn.Linear(1, self.embed_dim, bias=False, **fk)
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        E = self.embed_dim
        with torch.no_grad():
            if self.kdim == E and self.vdim == E:  # torch inits the packed [3E, E] in_proj_weight
                w = torch.empty(3 * E, E, device=self.q_proj.weight.device, dtype=self.q_proj.weight.dtype)
                nn.init.xavier_uniform_(w)
                for proj, part in zip((self.q_proj, self.k_proj, self.v_proj), w.chunk(3)):
                    proj.weight.copy_(part)
            else:
                for proj in (self.q_proj, self.k_proj, self.v_proj):
                    nn.init.xavier_uniform_(proj.weight)
            if self.q_proj.bias is not None:
                for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
                    proj.bias.zero_()
            for lin in (self.bias_k, self.bias_v):
                if lin is not None:
                    b = torch.empty(1, 1, E, device=lin.weight.device, dtype=lin.weight.dtype)
                    nn.init.xavier_normal_(b)
                    lin.weight.copy_(b.view(E, 1))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"kdim={self.kdim}, vdim={self.vdim}, batch_first={self.batch_first}, "
                f"add_bias_kv={self.add_bias_kv}, add_zero_attn={self.add_zero_attn}")

    # -- conversion ----------------------------------------------------------------------------
    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "DPMultiheadAttention":
        """A DPMultiheadAttention with ``mha``'s configuration, weights (copied), their
        ``requires_grad``, device, dtype and train/eval mode."""
        ref = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                  add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim,
                  vdim=mha.vdim, batch_first=mha.batch_first, device=ref.device, dtype=ref.dtype)
        projs = (new.q_proj, new.k_proj, new.v_proj)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                src_w = [(w, mha.in_proj_weight.requires_grad) for w in mha.in_proj_weight.chunk(3)]
            else:
                src_w = [(w, w.requires_grad) for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)]
            for proj, (w, rg) in zip(projs, src_w):
                proj.weight.copy_(w)
                proj.weight.requires_grad_(rg)
            if mha.in_proj_bias is not None:
                for proj, b in zip(projs, mha.in_proj_bias.chunk(3)):
                    proj.bias.copy_(b)
                    proj.bias.requires_grad_(mha.in_proj_bias.requires_grad)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            new.out_proj.weight.requires_grad_(mha.out_proj.weight.requires_grad)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
                new.out_proj.bias.requires_grad_(mha.out_proj.bias.requires_grad)
            for lin, src in ((new.bias_k, mha.bias_k), (new.bias_v, mha.bias_v)):
                if lin is not None:
                    lin.weight.copy_(src.reshape(-1, 1))
                    lin.weight.requires_grad_(src.requires_grad)
        new.train(mha.training)
        return new

    def to_torch(self) -> nn.MultiheadAttention:
        """The equivalent ``nn.MultiheadAttention`` (weights copied; e.g. to export a model)."""
        ref = self.out_proj.weight
        bias = self.q_proj.bias is not None
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout, bias=bias,
                                    add_bias_kv=self.add_bias_kv, add_zero_attn=self.add_zero_attn,
                                    kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first,
                                    device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            ws = [p.weight for p in (self.q_proj, self.k_proj, self.v_proj)]
            if mha._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat(ws))
            else:
                for dst, w in zip((mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight), ws):
                    dst.copy_(w)
            if bias:
                mha.in_proj_bias.copy_(torch.cat([p.bias for p in (self.q_proj, self.k_proj, self.v_proj)]))
                mha.out_proj.bias.copy_(self.out_proj.bias)
            mha.out_proj.weight.copy_(self.out_proj.weight)
            if self.add_bias_kv:
                mha.bias_k.copy_(self.bias_k.weight.view(1, 1, -1))
                mha.bias_v.copy_(self.bias_v.weight.view(1, 1, -1))
        mha.train(self.training)
        return mha

    # -- forward -------------------------------------------------------------------------------
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        """Same arguments, shapes and results as ``nn.MultiheadAttention.forward``."""
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"DPMultiheadAttention: query, key and value must all be 3-D (batched) or 2-D "
                             f"(unbatched), got shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("DPMultiheadAttention: is_causal=True needs attn_mask (the causal mask itself; "
                               "is_causal is only a hint, as in torch), e.g. "
                               "nn.Transformer.generate_square_subsequent_mask(L)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # torch: SDPA's own causal masking
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        if not is_batched:  # one example: a batch of 1
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # [L, B, E] -> [B, L, E]: dim 0 is the example dim for the engine
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, E = query.shape
        S = key.shape[1]
        if E != self.embed_dim:
            raise ValueError(f"DPMultiheadAttention: query has embedding size {E}, the module {self.embed_dim}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != B:
            raise ValueError(f"DPMultiheadAttention: key {tuple(key.shape)} and value {tuple(value.shape)} must "
                             f"share batch and sequence dims, with the query's batch size {B}")
        H, hd = self.num_heads, self.head_dim
        q = self.q_proj(query)  # [B, L, E]
        k = self.k_proj(key)    # [B, S, E]
        v = self.v_proj(value)  # [B, S, E]

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (L, S):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, "
                                       f"but should be {(L, S)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (B * H, L, S):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, but should be "
                                       f"{(B * H, L, S)}.")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

        if self.add_bias_kv:  # the learned extra key/value position: Linear(1 -> E) of a constant 1
            one = torch.ones(B, 1, 1, device=k.device, dtype=k.dtype)
            k = torch.cat([k, self.bias_k(one)], dim=1)
            v = torch.cat([v, self.bias_v(one)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))

        q = q.reshape(B, L, H, hd).transpose(1, 2)  # [B, H, L, hd]
        k = k.reshape(B, k.shape[1], H, hd).transpose(1, 2)  # [B, H, S', hd]
        v = v.reshape(B, v.shape[1], H, hd).transpose(1, 2)  # [B, H, S', hd]
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, H, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(B, H, 1, hd)], dim=2)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        S = k.shape[2]
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (B, S):
                raise ValueError(f"DPMultiheadAttention: key_padding_mask must be [B, S] = {[B, S]} "
                                 f"(after add_bias_kv / add_zero_attn), got {tuple(key_padding_mask.shape)}")
            kpm = key_padding_mask.view(B, 1, 1, S)
        mask = None  # [1 or B, 1 or H, L, S], added to the scores
        if attn_mask is not None:
            mask = attn_mask.view(1, 1, L, S) if attn_mask.shape[0] == 1 else attn_mask.view(B, H, L, S)
        if key_padding_mask is not None:
            mask = kpm if mask is None else mask + kpm
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            scores = torch.matmul(q * math.sqrt(1.0 / hd), k.transpose(-2, -1))  # [B, H, L, S]
            if mask is not None:
                scores = scores + mask
            w = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                w = F.dropout(w, p=dropout_p)
            out = torch.matmul(w, v)  # [B, H, L, hd]
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)
            w = None
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, E))  # [B, L, E]
        if w is not None and average_attn_weights:
            w = w.mean(dim=1)
        if not is_batched:
            return out.squeeze(0), (w.squeeze(0) if w is not None else None)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, w


_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def convert_multihead_attention(model: nn.Module) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` by a ``DPMultiheadAttention`` with the
    same weights, in place, and return the model (use the return value: a bare
    ``nn.MultiheadAttention`` cannot be replaced in place, the new module is returned).

    Also sets ``use_nested_tensor = False`` on every ``nn.TransformerEncoder`` (its nested-tensor
    fast path reads ``in_proj_weight``); outputs are unchanged. A module shared at several places
    stays shared. Outputs equal the original's to fp32 rounding, in train and eval mode, with or
    without grad (the original's fused eval fast path computes the same function).

    ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` built with
    ``batch_first=False`` are refused: their feed-forward Linear and LayerNorm layers would see
    [L, B, E] inputs, and DPEngine reads dim 0 of every layer input as the example dimension
    (per-example clipping would be over positions, not examples). Rebuild them with
    ``batch_first=True`` (the parameters are the same; load the state dict) and feed [B, L, E].
    """
    if isinstance(model, nn.MultiheadAttention):
        return DPMultiheadAttention.from_torch(model)
    for name, m in model.named_modules():
        if isinstance(m, _TRANSFORMER_LAYERS) and isinstance(getattr(m, "self_attn", None), nn.MultiheadAttention) \
                and not m.self_attn.batch_first:
            raise ValueError(
                f"convert_multihead_attention: {type(m).__name__} {name or '<root>'!r} has batch_first=False: its "
                "Linear and LayerNorm layers would see [L, B, E] inputs and DPEngine reads dim 0 as the example "
                "dimension. Rebuild it with batch_first=True (same parameters: load_state_dict) and feed [B, L, E].")
    replaced: Dict[int, nn.Module] = {}
    visited = set()

    def visit(module: nn.Module) -> None:
        if id(module) in visited:
            return
        visited.add(id(module))
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            if isinstance(child, nn.MultiheadAttention):
                new = replaced.get(id(child))
                if new is None:
                    new = replaced[id(child)] = DPMultiheadAttention.from_torch(child)
                setattr(module, child_name, new)
            else:
                visit(child)

    visit(model)
    return model
