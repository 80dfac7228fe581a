"""Flax twin of :mod:`dpprims.models.torch_transformer` (images NHWC), built from dpprims.jax layers.

``SelfAttention`` is multi-head self-attention from four ``dpprims.jax.Dense`` projections
(``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``), the same math as torch's
``nn.MultiheadAttention`` / ``dpprims.torch.DPMultiheadAttention`` (scores scaled by
1/sqrt(head_dim), softmax over keys, an optional boolean ``key_padding_mask`` [B, S] with True =
ignore, as in torch); its parameters are clipped per example by the Dense handler.

``SmallTransformer`` has the torch model's module names (``embed``, ``pos``, ``blocks.<i>`` with
``self_attn``, ``linear1``, ``linear2``, ``norm1``, ``norm2``; ``norm``, ``head``), so
``dpprims.models.torch_to_flax(torch_model.state_dict(), template)`` and ``flax_to_torch`` move
one set of weights between them; pre-norm blocks, exact (erf) GELU, LayerNorm eps 1e-5 or
RMSNorm with torch's default eps (float32 machine epsilon), no dropout.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import dpprims.jax as dpj

__all__ = ["SelfAttention", "SmallTransformer", "small_transformer"]

_TORCH_RMS_EPS = float(np.finfo(np.float32).eps)  # torch nn.RMSNorm(eps=None) on float32


class SelfAttention(nn.Module):
    """Multi-head self-attention on [B, L, E] (see the module docstring)."""

    num_heads: int

    @nn.compact
    def __call__(self, x, key_padding_mask=None):
        B, L, E = x.shape
        H = self.num_heads
        if E % H:
            raise ValueError(f"embedding size {E} must be divisible by num_heads={H}")
        hd = E // H
        q, k, v = (dpj.Dense(E, name=n)(x).reshape(B, L, H, hd).transpose(0, 2, 1, 3)
                   for n in ("q_proj", "k_proj", "v_proj"))  # [B, H, L, hd]
        scores = jnp.einsum("bhld,bhsd->bhls", q * math.sqrt(1.0 / hd), k)  # [B, H, L, S]
        if key_padding_mask is not None:
            scores = jnp.where(key_padding_mask[:, None, None, :], -jnp.inf, scores)
        w = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhls,bhsd->bhld", w, v).transpose(0, 2, 1, 3).reshape(B, L, E)
        return dpj.Dense(E, name="out_proj")(out)


def _norm(kind: str, name: str):
    if kind == "layernorm":
        return dpj.LayerNorm(epsilon=1e-5, name=name)
    if kind == "rmsnorm":
        return dpj.RMSNorm(epsilon=_TORCH_RMS_EPS, name=name)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


class SmallTransformer(nn.Module):
    """Images [B, H, W, C] cut into ``patch x patch`` patches (token = C*p*p values, channel-major
    like the torch model's NCHW patches), learned positions, ``depth`` pre-norm blocks, final
    norm, the tokens flattened (``pool="flatten"``, the torch model's image default) or averaged
    (``"mean"``), Dense head."""

    num_classes: int = 10
    patch: int = 7
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    norm: str = "layernorm"
    pool: str = "flatten"

    @nn.compact
    def __call__(self, x):
        B, Hh, Ww, C = x.shape
        p = self.patch
        if Hh % p or Ww % p:
            raise ValueError(f"patch={p} must divide the image size {(Hh, Ww)}")
        gh, gw = Hh // p, Ww // p
        t = x.reshape(B, gh, p, gw, p, C).transpose(0, 1, 3, 5, 2, 4).reshape(B, gh * gw, C * p * p)
        T = gh * gw
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        z = dpj.Dense(self.dim, name="embed")(t) + dpj.Embed(T, self.dim, name="pos")(pos)
        for i in range(self.depth):
            z = z + SelfAttention(self.heads, name=f"blocks.{i}.self_attn")(_norm(self.norm, f"blocks.{i}.norm1")(z))
            h = _norm(self.norm, f"blocks.{i}.norm2")(z)
            h = dpj.Dense(int(self.dim * self.mlp_ratio), name=f"blocks.{i}.linear1")(h)
            z = z + dpj.Dense(self.dim, name=f"blocks.{i}.linear2")(nn.gelu(h, approximate=False))
        z = _norm(self.norm, "norm")(z)
        if self.pool not in ("flatten", "mean"):
            raise ValueError(f"pool must be 'mean' or 'flatten', got {self.pool!r}")
        z = z.reshape(B, T * self.dim) if self.pool == "flatten" else z.mean(axis=1)
        return dpj.Dense(self.num_classes, name="head")(z)


def small_transformer(num_classes: int = 10, input_size: Union[int, Sequence[int], None] = None,
                      patch: Optional[int] = None, **kwargs) -> SmallTransformer:
    """The twin of ``dpprims.models.torch_transformer.small_transformer`` (same default patch
    rule: a 4 x 4 grid where possible)."""
    if patch is None:
        if input_size is None:
            raise ValueError("small_transformer needs patch= or input_size (H, W)")
        hw = (int(input_size),) * 2 if isinstance(input_size, int) else tuple(int(s) for s in input_size)
        g = math.gcd(*hw)  # torch_transformer._default_patch (not imported: it would import torch)
        patch = next((q for q in (g // 4, g // 2, g) if q >= 1 and hw[0] % q == 0 and hw[1] % q == 0), 1)
    return SmallTransformer(num_classes=num_classes, patch=int(patch), **kwargs)
