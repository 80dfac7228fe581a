"""Embedding oracle: per-example gradient rows are scatter-sums of the output gradients.

ids [B, T] integer token ids (or [B], meaning T = 1), G = dL_i/dY_i [B, T, p] (or [B, p]),
num_embeddings V. With padding_idx set, positions holding that id contribute nothing (torch
semantics: the padding row never receives a gradient); a negative padding_idx counts from V.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ._core import clipped_sum
from ._linear import HIGHEST


def _inputs(ids, G, padding_idx, num_embeddings):
    ids, G = jnp.asarray(ids), jnp.asarray(G)
    if ids.ndim == 1 and G.ndim == 2:
        ids, G = ids[:, None], G[:, None, :]
    if ids.ndim != 2 or G.ndim != 3 or G.shape[:2] != ids.shape:
        raise ValueError(f"ids must be [B, T] and G [B, T, p], got {ids.shape} and {G.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"ids must be integers, got {ids.dtype}")
    if num_embeddings is not None and not isinstance(ids, jax.core.Tracer) and ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_embeddings:
            raise ValueError(f"token ids must lie in [0, {num_embeddings}), got [{lo}, {hi}]")
    if padding_idx is None:
        keep = jnp.ones(ids.shape, bool)
    else:
        if padding_idx < 0:
            if num_embeddings is None:
                raise ValueError("a negative padding_idx needs num_embeddings")
            padding_idx += num_embeddings
        if num_embeddings is not None and not 0 <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx out of range for num_embeddings={num_embeddings}")
        keep = ids != padding_idx
    return ids, jnp.where(keep[..., None], G, 0), keep


def embedding_per_example_grads(ids, G, num_embeddings, padding_idx=None):
    """Per-example weight gradients [B, V, p]: row v of example i is sum_{t: id_t = v} G_i[t]."""
    ids, G, _ = _inputs(ids, G, padding_idx, num_embeddings)
    zeros = jnp.zeros((num_embeddings, G.shape[-1]), G.dtype)
    return jax.vmap(lambda ids_i, g_i: zeros.at[ids_i].add(g_i))(ids, G)


def embedding_sq_norms(ids, G, padding_idx=None, num_embeddings=None):
    """||dW_i||_F^2 = sum_{s,t} [id_s == id_t] <g_s, g_t> (ghost identity, indicator Gram): [B].

    Never builds the [B, V, p] gradients; the [B, T, T] Grams are materialised. num_embeddings
    is only needed for a negative padding_idx (and, when given, ids are range-checked).
    """
    ids, G, keep = _inputs(ids, G, padding_idx, num_embeddings)
    same = (ids[:, :, None] == ids[:, None, :]) & keep[:, :, None] & keep[:, None, :]
    gram = jnp.einsum("bsp,btp->bst", G, G, precision=HIGHEST)
    return jnp.sum(jnp.where(same, gram, 0), axis=(1, 2))


def embedding_clipped_grad(ids, G, c, num_embeddings, padding_idx=None):
    """sum_i c_i dW_i: [V, p]. An example with c_i = 0 adds exactly 0 (even if non-finite)."""
    return clipped_sum(embedding_per_example_grads(ids, G, num_embeddings, padding_idx), c)
