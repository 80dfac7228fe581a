"""Per-layer-type work of the JAX engine: per-example squared norms, then clipped sums.

A handler gets one DP layer (the bound flax module, for its configuration), the activations it
sowed (one entry per call) and the output gradients of its perturbations (one per call), and

* ``norms(...) -> (sq [B] float32, state)``: the per-example squared norm of the layer's
  parameter gradients, computed by the fused kernels through ``dpprims.bindings.jax``;
* ``clipped(state, c) -> {param name: sum_i c_i g_i}`` in the parameter's shape and dtype.

A layer called several times in one forward has per-example gradient = sum over its calls;
Dense, the norms and Embed combine calls exactly (concatenation along positions); Conv needs
one call (a second call raises).
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from dpprims.bindings.jax import conv as _conv
from dpprims.bindings.jax import embedding as _emb
from dpprims.bindings.jax import linear as _lin
from dpprims.bindings.jax import norm as _norm
from dpprims.kernels.conv import choose_conv_norm_method, conv_norm_flops
from dpprims.kernels.linear import choose_norm_method, norm_flops

from . import cpu_norms as _cpu
from .layers import conv_geometry


def _rows(x, feature_dims: int):
    """[B, ..., features] -> [B, T, prod(features)] with T the product of the middle axes."""
    B = x.shape[0]
    f = math.prod(x.shape[x.ndim - feature_dims:]) if feature_dims else 1
    T = math.prod(x.shape[1:x.ndim - feature_dims])  # explicit: B = 0 cannot infer a -1
    return x.reshape(B, T, f)


def _cat(xs):
    return xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=1)


class DenseHandler:
    kind = "dense"

    def norms(self, name, module, acts, grads, params, method, precision):
        A = _cat([_rows(a, 1) for a in acts])
        G = _cat([_rows(g, 1).astype(A.dtype) for g in grads])
        B, T, D = A.shape
        P = G.shape[2]
        m = choose_norm_method(T, D, P, method)
        sq = jnp.zeros((B,), jnp.float32)
        if "kernel" in params:
            sq = sq + _lin.linear_weight_sq_norms(A, G, m, precision).astype(jnp.float32)
        if "bias" in params:
            sq = sq + _lin.linear_bias_sq_norms(G).astype(jnp.float32)
        plan = dict(layer=name, kind=self.kind, T=T, d=D, p=P, method=m, norm_flops=B * norm_flops(T, D, P)[m],
                    weight_grad_flops=2 * B * T * D * P)
        return sq, (A, G, precision), plan

    def clipped(self, state, c, params):
        A, G, precision = state
        out = {}
        if "kernel" in params:
            out["kernel"] = _lin.linear_clipped_weight_grad(A, G, c, precision).T
        if "bias" in params:
            out["bias"] = _lin.linear_clipped_bias_grad(G, c)
        return out


class ConvHandler:
    kind = "conv"

    def norms(self, name, module, acts, grads, params, method, precision):
        if len(acts) != 1:
            raise NotImplementedError(f"dpprims Conv {name!r} was called {len(acts)} times in one forward; "
                                      "per-example clipping of a conv layer used several times is not supported")
        x, G = acts[0], grads[0].astype(acts[0].dtype)
        k, s, pads, d = conv_geometry(module, x.shape[1:-1])
        groups = module.feature_group_count
        geo = _conv.geometry(x, G, k, s, pads, d, groups)
        # the method the host's path runs: on the jnp path (CPU) the CPU cost model of
        # dpprims.jax.cpu_norms, on the kernel path the kernels' model (each branch of the op
        # resolves "auto" itself, so a GPU lowering keeps the kernels' choice)
        # (_cpu.ENABLED off: the bindings' op, whose jnp path uses im2col and the kernels' model)
        if _cpu.ENABLED:
            m = _cpu.method_for_host(geo.T, geo.D, geo.P, geo.KH * geo.KW, method, groups)
            norm_op, norm_method = _cpu.conv_weight_sq_norms, method
        else:
            m = choose_conv_norm_method(geo.T, geo.D, geo.P, method)
            norm_op, norm_method = _conv.conv_weight_sq_norms, m
        B = x.shape[0]
        sq = jnp.zeros((B,), jnp.float32)
        kw = dict(kernel_size=k, strides=s, padding=pads, dilation=d, groups=groups)
        if "kernel" in params:
            sq = sq + norm_op(x, G, method=norm_method, precision=precision, **kw).astype(jnp.float32)
        Gb = _rows(G, 1)
        if "bias" in params:
            sq = sq + _lin.linear_bias_sq_norms(Gb).astype(jnp.float32)
        plan = dict(layer=name, kind=self.kind, T=geo.T, d=geo.D, p=geo.P, groups=groups, method=m,
                    norm_flops=B * conv_norm_flops(geo.T, geo.D, geo.P, groups)[m],
                    weight_grad_flops=2 * B * geo.T * geo.D * geo.P * groups)
        return sq, (x, G, Gb, kw, precision), plan

    def clipped(self, state, c, params):
        x, G, Gb, kw, precision = state
        out = {}
        if "kernel" in params:
            out["kernel"] = _conv.conv_clipped_weight_grad(x, G, c, precision=precision, **kw)
        if "bias" in params:
            out["bias"] = _lin.linear_clipped_bias_grad(Gb, c)
        return out


class NormHandler:
    """GroupNorm / LayerNorm affine parameters (scale, bias on the last axis)."""

    kind = "norm"

    def norms(self, name, module, acts, grads, params, method, precision):
        X = _cat([_rows(a, 1) for a in acts])
        G = _cat([_rows(g, 1).astype(X.dtype) for g in grads])
        pe, sq2 = _norm.norm_affine_per_example_grads(X, G)
        B, R, C = X.shape
        sq = jnp.zeros((B,), jnp.float32)
        if "scale" in params:
            sq = sq + sq2[:, 0].astype(jnp.float32)
        if "bias" in params:
            sq = sq + sq2[:, 1].astype(jnp.float32)
        plan = dict(layer=name, kind=self.kind, T=R, d=C, p=C, method="instantiate", norm_flops=B * 4 * R * C,
                    weight_grad_flops=B * 3 * R * C)
        return sq, pe, plan

    def clipped(self, pe, c, params):
        B, _, C = pe.shape
        both = _norm.clipped_rows_sum(pe.reshape(B, 2 * C), c)
        out = {}
        if "scale" in params:
            out["scale"] = both[:C]
        if "bias" in params:
            out["bias"] = both[C:]
        return out


class EmbedHandler:
    kind = "embed"

    def norms(self, name, module, acts, grads, params, method, precision):
        V = module.num_embeddings
        ids = _cat([_rows(a, 0)[:, :, 0] for a in acts])
        if V == 1:  # flax broadcasts the single row: every position is id 0
            ids = jnp.zeros_like(ids)
        G = _cat([_rows(g, 1) for g in grads])
        B, T, P = G.shape
        sq = _emb.embedding_sq_norms(ids, G, V, precision).astype(jnp.float32)
        plan = dict(layer=name, kind=self.kind, T=T, d=V, p=P, method="ghost", norm_flops=B * 2 * T * T * P,
                    weight_grad_flops=B * T * P)
        return sq, (ids, G, V, precision), plan

    def clipped(self, state, c, params):
        ids, G, V, precision = state
        return {"embedding": _emb.embedding_clipped_grad(ids, G, c, V, precision)}


HANDLERS = {"dense": DenseHandler(), "conv": ConvHandler(), "norm": NormHandler(), "embed": EmbedHandler()}
