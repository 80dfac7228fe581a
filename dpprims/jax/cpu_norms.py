"""Per-example conv weight-gradient norms for the jnp path (CPU), without im2col.

The jnp path of ``dpprims.bindings.jax.conv.conv_weight_sq_norms`` builds the im2col patches U
([B, T, C_in * KH * KW]) with ``lax.conv_general_dilated_patches`` - a grouped convolution with a
one-hot filter, which XLA's CPU backend runs far slower than the GEMMs that follow (ResNet-18-CIFAR's
32x32x64 3x3 layer, B = 32, 2-core machine at load ~6: the patches alone 244 ms, the same layer's
clipped-sum GEMM 40 ms). Both norms decompose over the kernel offsets k = (kh, kw), with X_k [T, C]
the input shifted to offset k (one strided slice of the padded input):

* direct: w_i = G_i^T U_i is the concatenation over k of w_i,k = G_i^T X_i,k ([P, C] blocks), so
  ||w_i||_F^2 = sum_k ||G_i^T X_i,k||_F^2 - one batched GEMM per offset, no [T, K C] buffer;
* ghost: U_i U_i^T = sum_k X_i,k X_i,k^T, so ||w_i||_F^2 = <sum_k X_i,k X_i,k^T, G_i G_i^T>.

Exactly the same mathematical quantity as the im2col form (a permutation and a blocking of the
same sums; floating-point rounding differs only in the order of additions). Groups, strides,
dilation, asymmetric padding and 1-D convs are handled like the bindings' op. A non-finite value
in example i gives a non-finite entry i (never a finite one), as every dpprims norm does.

The method for ``"auto"`` on this path comes from :func:`choose_cpu_conv_method` (a CPU cost
model, see there); the kernel path (GPU) keeps the kernels' own choice.

Measured (process CPU time, min of 5, load ~5 on 2 cores): the conv norm pass of ResNet-18-CIFAR
(w64, B = 32; each layer alone, weighted by its count) 794 ms with im2col -> 320 ms; the whole
norm step (forward + backward to the perturbations + every layer's norms) 1573 -> 1073 ms.
Privacy: none of this changes what is computed - the per-example norms that set the clip factors
are the same quantity (checked against a per-example autodiff oracle, tests/test_jax_cpu_norms.py).
"""
from __future__ import annotations

import os

import jax.numpy as jnp
from jax import lax

from dpprims.bindings.jax import _call
from dpprims.bindings.jax import conv as _conv
from dpprims.bindings.jax.linear import _JNP_PRECISION, dot_precision

__all__ = ["conv_weight_sq_norms", "jnp_conv_weight_sq_norms", "choose_cpu_conv_method", "cpu_conv_norm_costs"]

_CHUNK_ELEMS = 1 << 24  # at most about this many elements of per-chunk temporaries at once

ENABLED = os.environ.get("DPPRIMS_JAX_CPU_NORMS", "1").strip() != "0"
"""The engine's conv layers use this module (``DPPRIMS_JAX_CPU_NORMS=0``: the bindings' op with its
im2col jnp path and the kernels' cost model). Read at trace time."""


def cpu_conv_norm_costs(T: int, D: int, P: int, K: int, groups: int = 1) -> dict:
    """Modelled CPU cost per example (flop-equivalents) of each norm method on this path, for one
    conv with T output positions, D = C_in_g * K features per group (K = KH * KW offsets) and P
    output channels per group.

    direct: K GEMMs [P, T] x [T, C] (2 T D P flops) plus reading the shifted inputs;
    ghost: K Gram GEMMs [T, C] x [C, T] (2 T^2 D) and the output Gram (2 T^2 P), plus the T x T
    Grams written and read (memory-bound: weighted as 8 flops per element, a measured order of
    magnitude for XLA's CPU GEMM throughput against its elementwise passes)."""
    C = D // max(K, 1)
    direct = 2 * T * D * P + 8 * K * T * C
    ghost = 2 * T * T * D + 2 * T * T * P + 8 * 3 * T * T + 8 * K * T * C
    return {"direct": groups * direct, "ghost": groups * ghost}


def choose_cpu_conv_method(T: int, D: int, P: int, K: int, method: str = "auto", groups: int = 1) -> str:
    """The user's method, or for "auto" the cheaper by :func:`cpu_conv_norm_costs`."""
    if method not in _conv.CONV_NORM_METHODS:
        raise ValueError(f"conv norm method must be one of {_conv.CONV_NORM_METHODS}, got {method!r}")
    if method != "auto":
        return method
    c = cpu_conv_norm_costs(T, D, P, K, groups)
    return "ghost" if c["ghost"] < c["direct"] else "direct"


def _shifted(xp, geo, n: int):
    """The K shifted inputs X_k ([b, H_out, W_out, C] strided slices of the padded input), in
    (kh, kw) order. xp: the input padded by (lo, hi) per spatial axis."""
    b, C = xp.shape[0], xp.shape[-1]
    out = []
    khs = range(geo.KH) if n == 2 else (0,)
    for kh in khs:
        for kw in range(geo.KW):
            if n == 2:
                start = (0, kh * geo.DH, kw * geo.DW, 0)
                limit = (b, start[1] + (geo.H_out - 1) * geo.SH + 1, start[2] + (geo.W_out - 1) * geo.SW + 1, C)
                strides = (1, geo.SH, geo.SW, 1)
            else:
                start = (0, kw * geo.DW, 0)
                limit = (b, start[1] + (geo.W_out - 1) * geo.SW + 1, C)
                strides = (1, geo.SW, 1)
            out.append(lax.slice(xp, start, limit, strides))
    return out


def jnp_conv_weight_sq_norms(x, G, geo, pads, method: str, precision: str = "ieee"):
    """[B] squared per-example weight-gradient norms of a conv by the offset decomposition
    (module docstring); ``method`` "direct" or "ghost" (already resolved)."""
    if method not in ("direct", "ghost"):
        raise ValueError(f"method must be 'direct' or 'ghost' here, got {method!r}")
    dt = _call.acc_dtype(x)
    prec = _JNP_PRECISION[precision]
    n = x.ndim - 2
    B, g, T, P = geo.B, geo.groups, geo.T, geo.P
    Cg = geo.C_in_g
    K = geo.KH * geo.KW
    per_example = (geo.C_in * (geo.H * geo.W) + K * T * geo.C_in + T * geo.C_out
                   + (g * P * Cg if method == "direct" else 2 * g * T * T))
    chunk = max(1, min(B, _CHUNK_ELEMS // max(1, per_example)))
    chunk = -(-B // -(-B // chunk))  # equal chunks: the padded tail wastes < one example per chunk

    def norms(xg):
        xc, gc = xg
        b = xc.shape[0]
        xp = lax.pad(xc.astype(dt), jnp.zeros((), dt), ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads)
                     + ((0, 0, 0),))
        Gg = gc.astype(dt).reshape(b, T, g, P)
        xs = [xk.reshape(b, T, g, Cg) for xk in _shifted(xp, geo, n)]
        if method == "direct":
            total = jnp.zeros((b,), dt)
            for xk in xs:
                w = jnp.einsum("btgp,btgc->bgpc", Gg, xk, precision=prec)
                total = total + jnp.sum(w * w, axis=(1, 2, 3))
            return total
        uu = None
        for xk in xs:
            term = jnp.einsum("bsgc,btgc->bgst", xk, xk, precision=prec)
            uu = term if uu is None else uu + term
        gg = jnp.einsum("bsgp,btgp->bgst", Gg, Gg, precision=prec)
        return jnp.sum(uu * gg, axis=(1, 2, 3))

    return _conv.map_batch_chunks(norms, x, G, chunk)


def conv_weight_sq_norms(x, G, *, kernel_size, strides, padding, dilation=1, groups: int = 1,
                         method: str = "auto", precision: str = "ieee"):
    """``dpprims.bindings.jax.conv.conv_weight_sq_norms`` (same arguments, same result, same op
    name in LAST_PATH) with this module's jnp path: the kernel path (jax-triton / interpreter) is
    the bindings' kernel launch with the kernels' method choice; the jnp path computes the norms
    by the offset decomposition with the CPU cost model's choice for "auto"."""
    x, G, k, s, pads, d = _conv._check(x, G, kernel_size, strides, padding, dilation, groups)
    geo = _conv.geometry(x, G, k, s, pads, d, groups)
    m_kernel = _conv.choose_method(geo, method)
    m_cpu = choose_cpu_conv_method(geo.T, geo.D, geo.P, geo.KH * geo.KW, method, geo.groups)
    prec = dot_precision(x, precision)
    if geo.B == 0 or geo.T == 0:
        return jnp.zeros((geo.B,), _call.acc_dtype(x))
    op = f"conv_weight_sq_norms[{m_cpu if _call.which_path() == 'jnp' else m_kernel}]"

    def run(x, G):
        def kernel(path, x, G):
            (partials,) = _call.launch(_conv.conv_norm_call(x, G, geo, m_kernel, prec), path).values()
            return partials.sum(axis=1)

        return _call.dispatch(op, (x, G), lambda x, G: jnp_conv_weight_sq_norms(x, G, geo, pads, m_cpu, prec),
                              kernel)

    return _call.nondifferentiable(op, run, x, G)


def method_for_host(T: int, D: int, P: int, K: int, method: str, groups: int = 1) -> str:
    """The method the host's path runs for a conv layer (what ``plan()`` shows): the CPU model's on
    the jnp path, the kernels' otherwise."""
    if _call.which_path() == "jnp":
        return choose_cpu_conv_method(T, D, P, K, method, groups)
    return _conv._k.choose_conv_norm_method(T, D, P, method)
