"""JAX ops for the Embedding kernels (dpprims.kernels.embedding), each on three paths.

``ids`` [B, T] integer token ids, ``G`` [B, T, P] the output gradient, table [V, P].
Example i's table gradient is the scatter-sum dW_i[v] = sum_{t: ids_i[t] = v} G_i[t].

* norm: ||dW_i||^2 = sum_{s,t} [id_s == id_t] <g_s, g_t> (ghost identity with the indicator
  Gram; [V, P] never formed);
* clipped sum: sum_i c_i dW_i, a scatter of c * G; on the kernel paths the B*T row keys are
  sorted once here (stable) and each kernel program owns one output tile (deterministic).

Ids outside [0, V) contribute nothing to either (``flax.linen.Embed`` returns NaN rows for
them, so such an example's loss is already non-finite and its clip factor 0). Outputs are
float32; not differentiable; B = 0 is an empty batch; rows with c_i == 0 are masked.
"""
from __future__ import annotations

import jax.numpy as jnp

from dpprims.kernels import embedding as _k
from dpprims.kernels import linear as _kl

from ._call import KernelCall, acc_dtype, dispatch, f32, launch, nondifferentiable, strides
from .linear import _JNP_PRECISION, _kernel_dtype, arch, as3d, check_factors, clipped_sum_operand, dot_precision


def _check(ids, G, V: int):
    ids, G = jnp.asarray(ids), as3d(G, "G (output gradient)")
    if ids.ndim == 1:
        ids = ids[:, None]
    if ids.shape != G.shape[:2]:
        raise ValueError(f"ids {ids.shape} and G {G.shape} must agree on [B, T]")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    # -1 marks a position that contributes nothing (the kernels' `pad`).
    ids = jnp.where((ids >= 0) & (ids < V), ids, -1).astype(jnp.int32)
    return ids, G


def embedding_sq_norms(ids, G, num_embeddings: int, precision: str = "ieee"):
    """Per-example ||dW_i||_F^2 [B]."""
    V = int(num_embeddings)
    ids, G = _check(ids, G, V)
    B, T, P = G.shape
    prec = dot_precision(G, precision)
    if B == 0 or T == 0 or P == 0:
        return jnp.zeros((B,), acc_dtype(G))
    return nondifferentiable("embedding_sq_norms", _sq_norms, ids, G, precision=prec)


def _sq_norms(ids, G, *, precision):
    def plain(ids, G):
        dt = acc_dtype(G)
        g = G.astype(dt)
        ok = ids >= 0
        same = (ids[:, :, None] == ids[:, None, :]) & ok[:, :, None] & ok[:, None, :]
        gg = jnp.einsum("bsp,btp->bst", g, g, precision=_JNP_PRECISION[precision])
        return jnp.sum(jnp.where(same, gg, 0), axis=(1, 2))

    def kernel(path, ids, G):
        (partials,) = launch(embedding_norm_call(ids, G, precision), path).values()
        return partials.sum(axis=1)

    return dispatch("embedding_sq_norms", (ids, G), plain, kernel)


def embedding_norm_call(ids, G, precision: str) -> KernelCall:
    G = _kernel_dtype(G)
    B, T, P = G.shape
    spec = _k.embedding_norm_ghost_spec(B, T, P, arch=arch())
    si, sg = strides(ids), strides(G)
    return KernelCall(_k._embedding_norm_ghost_kernel, spec.grid,
                      inputs=dict(ids_ptr=ids, g_ptr=G, T=T, P=P, pad=-1, stride_ib=si[0], stride_it=si[1],
                                  stride_gb=sg[0], stride_gt=sg[1], stride_gp=sg[2]),
                      outputs=dict(out_ptr=f32(spec.outputs["partials"])),
                      constexprs=dict(spec.constexprs, DOT_PRECISION=precision),
                      num_warps=spec.num_warps, name="embedding_norm_ghost")


def embedding_clipped_grad(ids, G, c, num_embeddings: int, precision: str = "ieee"):
    """sum_i c_i dW_i [V, P]; rows of examples with c_i == 0 (and invalid ids) contribute nothing."""
    V = int(num_embeddings)
    ids, G = _check(ids, G, V)
    B, T, P = G.shape
    c = check_factors(c, B)
    prec = dot_precision(G, precision)
    if B == 0 or T == 0 or P == 0 or V == 0:
        return jnp.zeros((V, P), acc_dtype(G))
    return nondifferentiable("embedding_clipped_grad", _clipped_grad, ids, G, c, V=V, precision=prec)


def _clipped_grad(ids, G, c, *, V, precision):
    def plain(ids, G, c):
        P = G.shape[2]
        dt = acc_dtype(G)
        keep = (c != 0)[:, None] & (ids >= 0)  # [B, T]
        rows = jnp.where(keep[:, :, None], G.astype(dt) * c.astype(dt)[:, None, None], 0)
        idx = jnp.where(keep, ids, V).reshape(-1)
        return jnp.zeros((V, P), dt).at[idx].add(rows.reshape(-1, P), mode="drop")

    def kernel(path, ids, G, c):
        return launch(embedding_clipped_grad_call(ids, G, c, V, precision), path)["out_ptr"]

    return dispatch("embedding_clipped_grad", (ids, G, c), plain, kernel)


def embedding_clipped_grad_call(ids, G, c, V: int, precision: str) -> KernelCall:
    """c_i rounded toward zero rides in the one-hot operand (kernels/embedding.py)."""
    kernel = _k._embedding_clipped_grad_kernel
    round_dtype = _kl.clipped_round_dtype(_kernel_dtype(G).dtype.name, precision)
    G = clipped_sum_operand(G, kernel)
    B, T, P = G.shape
    N = B * T
    # Row keys: the id, or V for rows that must not contribute (invalid id, c_i == 0); one
    # stable sort, so the kernel's row order (and its result) is deterministic.
    keys = jnp.where((ids >= 0) & (c != 0)[:, None], ids, V).reshape(-1).astype(jnp.int32)
    perm = jnp.argsort(keys, stable=True).astype(jnp.int32)
    keys_sorted = keys[perm]
    spec = _k.embedding_clipped_grad_spec(N, V, P, arch=arch())
    # bounds[j]: the first sorted row of v-tile j (bounds[-1]: the first row with key >= V).
    starts = jnp.minimum(jnp.arange(spec.outputs["bounds"], dtype=jnp.int32) * spec.constexprs["BLOCK_V"], V)
    bounds = jnp.searchsorted(keys_sorted, starts, side="left").astype(jnp.int32)
    sg = strides(G)
    return KernelCall(kernel, spec.grid,
                      inputs=dict(keys_ptr=keys_sorted, perm_ptr=perm, bounds_ptr=bounds, g_ptr=G,
                                  c_ptr=c.astype(jnp.float32), T=T, V=V, P=P,
                                  stride_gb=sg[0], stride_gt=sg[1], stride_gp=sg[2]),
                      outputs=dict(out_ptr=f32(spec.outputs["out"])),
                      constexprs=dict(spec.constexprs, DOT_PRECISION=precision, ROUND_DTYPE=round_dtype),
                      num_warps=spec.num_warps, name="embedding_clipped_grad")
