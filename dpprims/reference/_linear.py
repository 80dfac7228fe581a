"""Closed forms for a Linear layer Y_i = A_i W^T + b (DESIGN.md section 1), materialising.

Shapes: A [B, T, d] (or [B, d], meaning T = 1; more axes [B, ..., d] are all positions),
G = dL_i/dY_i [B, T, p] likewise. The weight uses torch's nn.Linear layout [out = p, in = d].
Each function is jitted (shapes only; no behaviour change).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ._core import clipped_sum
from ._jit import jit

HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 / bf16 passes in the oracle's matmuls


def _positions(X, name: str):
    """[B, ..., f] -> [B, T, f] with T the product of the middle axes (1 for a 2-D input)."""
    X = jnp.asarray(X)
    if X.ndim < 2:
        raise ValueError(f"{name} must have shape [B, d] or [B, T, d], got {X.shape}")
    return X.reshape(X.shape[0], math.prod(X.shape[1:-1]), X.shape[-1])


def _pair(A, G):
    A3, G3 = _positions(A, "A"), _positions(G, "G")
    if jnp.shape(A)[:-1] != jnp.shape(G)[:-1]:
        raise ValueError(f"A {jnp.shape(A)} and G {jnp.shape(G)} must agree on all axes but the last")
    return A3, G3


@jit
def linear_per_example_weight_grads(A, G):
    """Per-example weight gradients G_i^T A_i: [B, p, d] (materialised)."""
    A3, G3 = _pair(A, G)
    return jnp.einsum("btp,btd->bpd", G3, A3, precision=HIGHEST)


@jit
def linear_per_example_bias_grads(G):
    """Per-example bias gradients sum_t G_i[t]: [B, p]."""
    G3 = _positions(G, "G")
    return jnp.sum(G3, axis=1)


@jit
def linear_weight_sq_norms_direct(A, G):
    """||G_i^T A_i||_F^2 by materialising the [B, p, d] per-example gradients: [B]."""
    W = linear_per_example_weight_grads(A, G)
    return jnp.sum(jnp.square(W), axis=(1, 2))


@jit
def linear_weight_sq_norms_ghost(A, G):
    """||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T>_F by materialising both [T, T] Grams: [B]."""
    A3, G3 = _pair(A, G)
    gram_a = jnp.einsum("bsd,btd->bst", A3, A3, precision=HIGHEST)
    gram_g = jnp.einsum("bsp,btp->bst", G3, G3, precision=HIGHEST)
    return jnp.sum(gram_a * gram_g, axis=(1, 2))


@jit
def linear_bias_sq_norms(G):
    """||sum_t G_i[t]||^2: [B]."""
    return jnp.sum(jnp.square(linear_per_example_bias_grads(G)), axis=1)


@jit
def linear_clipped_weight_grad(A, G, c):
    """sum_i c_i G_i^T A_i: [p, d]. An example with c_i = 0 adds exactly 0 (even if non-finite)."""
    return clipped_sum(linear_per_example_weight_grads(A, G), c)


@jit
def linear_clipped_bias_grad(G, c):
    """sum_i c_i sum_t G_i[t]: [p]. An example with c_i = 0 adds exactly 0 (even if non-finite)."""
    return clipped_sum(linear_per_example_bias_grads(G), c)
