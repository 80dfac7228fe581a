"""Embedding oracle: per-example gradient rows are scatter-sums of the output gradients.

ids [B, T] integer token ids (or [B], meaning T = 1), G = dL_i/dY_i [B, T, p] (or [B, p]),
num_embeddings V. With padding_idx set, positions holding that id contribute nothing (torch
semantics: the padding row never receives a gradient); a negative padding_idx counts from V.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from ._core import clipped_sum
from ._jit import host_arrays, jit
from ._linear import HIGHEST


def _check(ids, G, padding_idx, num_embeddings):
    """Validate; returns (ids [B, T], G [B, T, p], padding_idx as a non-negative int or None)."""
    ids, G = host_arrays((ids, G))
    if np.ndim(ids) == 1 and np.ndim(G) == 2:
        ids, G = ids[:, None], G[:, None, :]
    if np.ndim(ids) != 2 or np.ndim(G) != 3 or np.shape(G)[:2] != np.shape(ids):
        raise ValueError(f"ids must be [B, T] and G [B, T, p], got {np.shape(ids)} and {np.shape(G)}")
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise TypeError(f"ids must be integers, got {jnp.result_type(ids)}")
    if num_embeddings is not None and not isinstance(ids, jax.core.Tracer) and np.size(ids):
        host = np.asarray(ids)
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= num_embeddings:
            raise ValueError(f"token ids must lie in [0, {num_embeddings}), got [{lo}, {hi}]")
    if padding_idx is not None:
        padding_idx = int(padding_idx)
        if padding_idx < 0:
            if num_embeddings is None:
                raise ValueError("a negative padding_idx needs num_embeddings")
            padding_idx += num_embeddings
        if num_embeddings is not None and not 0 <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx out of range for num_embeddings={num_embeddings}")
    return ids, G, padding_idx


def _masked(ids, G, padding_idx):
    """(G with padding positions zeroed, keep mask [B, T])."""
    keep = jnp.ones(ids.shape, bool) if padding_idx is None else ids != padding_idx
    return jnp.where(keep[..., None], G, 0), keep


def embedding_per_example_grads(ids, G, num_embeddings, padding_idx=None):
    """Per-example weight gradients [B, V, p]: row v of example i is sum_{t: id_t = v} G_i[t]."""
    ids, G, padding_idx = _check(ids, G, padding_idx, num_embeddings)
    return _per_example_grads(ids, G, int(num_embeddings), padding_idx)


@jit(static_argnames=("num_embeddings", "padding_idx"))
def _per_example_grads(ids, G, num_embeddings, padding_idx):
    G, _ = _masked(ids, G, padding_idx)
    zeros = jnp.zeros((num_embeddings, G.shape[-1]), G.dtype)
    return jax.vmap(lambda ids_i, g_i: zeros.at[ids_i].add(g_i))(ids, G)  # scatter-add


def embedding_sq_norms(ids, G, padding_idx=None, num_embeddings=None):
    """||dW_i||_F^2 = sum_{s,t} [id_s == id_t] <g_s, g_t> (ghost identity, indicator Gram): [B].

    Never builds the [B, V, p] gradients; the [B, T, T] Grams are materialised. num_embeddings
    is only needed for a negative padding_idx (and, when given, ids are range-checked).
    """
    ids, G, padding_idx = _check(ids, G, padding_idx, num_embeddings)
    return _sq_norms(ids, G, padding_idx)


@jit(static_argnames="padding_idx")
def _sq_norms(ids, G, padding_idx):
    G, keep = _masked(ids, G, padding_idx)
    same = (ids[:, :, None] == ids[:, None, :]) & keep[:, :, None] & keep[:, None, :]
    gram = jnp.einsum("bsp,btp->bst", G, G, precision=HIGHEST)
    return jnp.sum(jnp.where(same, gram, 0), axis=(1, 2))


def embedding_clipped_grad(ids, G, c, num_embeddings, padding_idx=None):
    """sum_i c_i dW_i: [V, p]. An example with c_i = 0 adds exactly 0 (even if non-finite)."""
    return clipped_sum(embedding_per_example_grads(ids, G, num_embeddings, padding_idx), c)
