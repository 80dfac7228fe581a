"""JAX ops for the Linear kernels (dpprims.kernels.linear), each on three paths (see ``_call``).

Shapes: ``A`` [B, T, D] (or [B, D] for T = 1) the layer input, ``G`` [B, T, P] (or [B, P]) the
output gradient of the per-example losses; weight gradients in torch's [P, D] layout (a flax
Dense kernel is its transpose). Outputs are float32 (float64 inputs stay float64 on the jnp
path). Every op works under ``jax.jit`` (static shapes), is not differentiable (see
``_call.nondifferentiable``), and treats B = 0 as a valid empty batch.

Non-finite inputs: in the clipped sums an example with c_i == 0 is *selected away* (never
multiplied by 0), so inf/NaN in a dropped example's A or G contributes exactly nothing.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dpprims.kernels import _launch
from dpprims.kernels import linear as _k

from ._call import KernelCall, acc_dtype, compute_capability, dispatch, f32, launch, nondifferentiable, strides
from ._call import _is_interpreted as is_interpreted

DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")
NORM_METHODS = ("direct", "ghost", "outer")

# "tf32" is safe on the kernel paths only, where the clipped sums multiply the same operands the
# norm kernels measured (docs/PRIVACY.md). The jnp paths scale c * G before their einsum, which
# XLA would round to TF32 on a GPU, so there "tf32" means HIGHEST (fp32) in norms and sums alike.
_JNP_PRECISION = {"ieee": lax.Precision.HIGHEST, "tf32x3": lax.Precision.HIGH, "tf32": lax.Precision.HIGHEST}

# At most this many elements of per-example gradients exist at once on the jnp "direct" path.
_DIRECT_CHUNK_ELEMS = 1 << 24


def as3d(x, name: str):
    x = jnp.asarray(x)
    if x.ndim == 2:
        return x[:, None, :]
    if x.ndim != 3:
        raise ValueError(f"{name} must be [B, T, features] or [B, features], got shape {x.shape}")
    return x


def check_pair(A, G):
    A, G = as3d(A, "A (layer input)"), as3d(G, "G (output gradient)")
    if A.shape[:2] != G.shape[:2]:
        raise ValueError(f"A {A.shape} and G {G.shape} must agree on [B, T]")
    if A.dtype != G.dtype:
        dt = jnp.result_type(A.dtype, G.dtype)
        A, G = A.astype(dt), G.astype(dt)
    return A, G


def dot_precision(x, precision: str) -> str:
    if precision not in DOT_PRECISIONS:
        raise ValueError(f"dot precision must be one of {DOT_PRECISIONS}, got {precision!r}")
    # Only fp32 operands use the setting; half operands always run on tensor cores.
    return precision if x.dtype == jnp.float32 else "tf32"


def check_factors(c, B: int):
    c = jnp.asarray(c)
    if c.shape != (B,):
        raise ValueError(f"clip factors must have shape [B] = [{B}], got {c.shape}")
    return c.astype(jnp.float32) if c.dtype != jnp.float64 else c


def _kernel_dtype(x):
    """Triton loads fp32/fp16/bf16 operands; anything else (float64 under x64) goes in as fp32."""
    return x if x.dtype in (jnp.float32, jnp.float16, jnp.bfloat16) else x.astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# per-example squared weight-gradient norms
# --------------------------------------------------------------------------------------------
def linear_weight_sq_norms(A, G, method: str, precision: str = "ieee"):
    """Per-example ||G_i^T A_i||_F^2 [B] by ``method`` in {"direct", "ghost", "outer"};
    "outer" needs T = 1 and computes ||a_i||^2 ||g_i||^2."""
    A, G = check_pair(A, G)
    B, T, D = A.shape
    P = G.shape[2]
    if method not in NORM_METHODS:
        raise ValueError(f"method must be one of {NORM_METHODS}, got {method!r}")
    if method == "outer" and T != 1:
        raise ValueError(f"method 'outer' needs T = 1, got T = {T}")
    prec = dot_precision(A, precision)
    if B == 0 or T == 0 or D == 0 or P == 0:
        return jnp.zeros((B,), acc_dtype(A))
    op = f"linear_weight_sq_norms[{method}]"
    return nondifferentiable(op, _weight_sq_norms, A, G, op=op, method=method, precision=prec)


def _weight_sq_norms(A, G, *, op, method, precision):
    def kernel(path, A, G):
        if method == "outer":
            return rows_sq_norm(A[:, 0, :]) * rows_sq_norm(G[:, 0, :])
        (partials,) = launch(linear_norm_call(A, G, method, precision), path).values()
        return partials.sum(axis=1)

    return dispatch(op, (A, G), lambda A, G: jnp_weight_sq_norms(A, G, method, precision), kernel)


def linear_norm_call(A, G, method: str, precision: str) -> KernelCall:
    """The launch of the direct or ghost norm kernel (partials [B, tiles], summed by the op)."""
    A, G = _kernel_dtype(A), _kernel_dtype(G)
    B, T, D = A.shape
    P = G.shape[2]
    if method == "direct":
        spec, kernel = _k.linear_norm_direct_spec(B, T, D, P, arch=arch()), _k._linear_norm_direct_kernel
    else:
        spec, kernel = _k.linear_norm_ghost_spec(B, T, D, P, arch=arch()), _k._linear_norm_ghost_kernel
    sa, sg = strides(A), strides(G)
    return KernelCall(
        kernel, spec.grid,
        inputs=dict(a_ptr=A, g_ptr=G, T=T, D=D, P=P,
                    stride_ab=sa[0], stride_at=sa[1], stride_ad=sa[2],
                    stride_gb=sg[0], stride_gt=sg[1], stride_gp=sg[2]),
        outputs=dict(out_ptr=f32(spec.outputs["partials"])),
        constexprs=dict(spec.constexprs, DOT_PRECISION=precision),
        num_warps=spec.num_warps, name=f"linear_norm_{method}")


def jnp_weight_sq_norms(A, G, method: str, precision: str = "ieee"):
    dt = acc_dtype(A)
    A, G = A.astype(dt), G.astype(dt)
    prec = _JNP_PRECISION[precision]
    if method == "outer":
        return jnp.sum(A[:, 0] ** 2, axis=1) * jnp.sum(G[:, 0] ** 2, axis=1)
    if method == "ghost":
        aa = jnp.einsum("bsd,btd->bst", A, A, precision=prec)
        gg = jnp.einsum("bsp,btp->bst", G, G, precision=prec)
        return jnp.sum(aa * gg, axis=(1, 2))
    # direct: per-example gradients, a bounded number of examples at a time
    B, _, D = A.shape
    P = G.shape[2]

    def one(ag):
        a, g = ag
        w = jnp.einsum("tp,td->pd", g, a, precision=prec)
        return jnp.sum(w * w)

    chunk = max(1, min(B, _DIRECT_CHUNK_ELEMS // max(1, D * P)))
    return lax.map(one, (A, G), batch_size=chunk)


def rows_sq_norm(x):
    """sum of squares of each row of a [B, N] array (fp32), through the row-norm kernel on the
    kernel paths."""
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"rows_sq_norm needs [B, N], got {x.shape}")
    B, N = x.shape
    if B == 0 or N == 0:
        return jnp.zeros((B,), acc_dtype(x))
    return nondifferentiable("rows_sq_norm", _rows_sq_norm, x)


def _rows_sq_norm(x):
    def plain(x):
        xf = x.astype(acc_dtype(x))
        return jnp.sum(xf * xf, axis=1)

    return dispatch("rows_sq_norm", (x,), plain, lambda path, x: launch(rows_sq_norm_call(x), path)["out_ptr"])


def rows_sq_norm_call(x) -> KernelCall:
    x = _kernel_dtype(x)
    B, N = x.shape
    spec = _k.rows_sq_norm_spec(B, N, arch=arch())
    sx = strides(x)
    return KernelCall(_k._rows_sq_norm_kernel, spec.grid,
                      inputs=dict(x_ptr=x, N=N, stride_xb=sx[0], stride_xn=sx[1]),
                      outputs=dict(out_ptr=f32(spec.outputs["out"])),
                      constexprs=dict(spec.constexprs), num_warps=spec.num_warps, name="rows_sq_norm")


def linear_bias_sq_norms(G):
    """Per-example ||sum_t G_i[t]||^2 [B]."""
    G = as3d(G, "G (output gradient)")
    B, T, P = G.shape
    if B == 0 or T == 0 or P == 0:
        return jnp.zeros((B,), acc_dtype(G))
    return nondifferentiable("linear_bias_sq_norms", _bias_sq_norms, G)


def _bias_sq_norms(G):
    def plain(G):
        s = jnp.sum(G.astype(acc_dtype(G)), axis=1)
        return jnp.sum(s * s, axis=1)

    def kernel(path, G):
        if G.shape[1] == 1:
            return rows_sq_norm(G[:, 0, :])
        (partials,) = launch(linear_bias_norm_call(G), path).values()
        return partials.sum(axis=1)

    return dispatch("linear_bias_sq_norms", (G,), plain, kernel)


def linear_bias_norm_call(G) -> KernelCall:
    G = _kernel_dtype(G)
    B, T, P = G.shape
    spec = _k.linear_bias_norm_spec(B, T, P, arch=arch())
    sg = strides(G)
    return KernelCall(_k._linear_bias_norm_kernel, spec.grid,
                      inputs=dict(g_ptr=G, T=T, P=P, stride_gb=sg[0], stride_gt=sg[1], stride_gp=sg[2]),
                      outputs=dict(out_ptr=f32(spec.outputs["partials"])),
                      constexprs=dict(spec.constexprs), num_warps=spec.num_warps, name="linear_bias_norm")


# --------------------------------------------------------------------------------------------
# clipped sums (Book-Keeping)
# --------------------------------------------------------------------------------------------
def linear_clipped_weight_grad(A, G, c, precision: str = "ieee"):
    """sum_i c_i G_i^T A_i [P, D]: one weight-gradient GEMM over the B*T rows with c_i fused
    into the load of G. Rows of examples with c_i == 0 are masked, not multiplied."""
    A, G = check_pair(A, G)
    B, T, D = A.shape
    P = G.shape[2]
    c = check_factors(c, B)
    prec = dot_precision(A, precision)
    if B == 0 or T == 0 or D == 0 or P == 0:
        return jnp.zeros((P, D), acc_dtype(A))
    return nondifferentiable("linear_clipped_weight_grad", _clipped_weight_grad, A, G, c, precision=prec)


def _clipped_weight_grad(A, G, c, *, precision):
    def kernel(path, A, G, c):
        return launch(linear_clipped_weight_grad_call(A, G, c, precision), path)["out_ptr"]

    return dispatch("linear_clipped_weight_grad", (A, G, c),
                    lambda A, G, c: jnp_clipped_weight_grad(A, G, c, precision), kernel)


def arch() -> int:
    """Compute capability (e.g. 90) for the launch specs: ``use_compute_capability`` /
    DPPRIMS_JAX_COMPUTE_CAPABILITY where set (the target jax-triton compiles for, e.g. when
    exporting for cuda without a GPU), else JAX's first GPU's, else kernels._launch.DEFAULT_ARCH."""
    cc = compute_capability()
    if cc is not None:
        return int(cc)
    try:
        cc = getattr(jax.devices()[0], "compute_capability", None)
        return int(round(float(cc) * 10)) if cc else _launch.DEFAULT_ARCH
    except Exception:  # no backend, or a device kind without the attribute
        return _launch.DEFAULT_ARCH


def clipped_sum_operand(x, kernel):
    """Operands of the clipped-sum kernels: ``_kernel_dtype``, and bf16 upcast to fp32 (exact)
    under Triton's interpreter, whose bf16 tl.dot is wrong; the kernels' ROUND_DTYPE still comes
    from the original dtype, so the rounding a GPU does is the one tested on CPU."""
    x = _kernel_dtype(x)
    return x.astype(jnp.float32) if x.dtype == jnp.bfloat16 and is_interpreted(kernel) else x


def linear_clipped_weight_grad_call(A, G, c, precision: str) -> KernelCall:
    """Design (b) (rank one) for T = 1, design (a) (scale outside the MMA) for T > 1; see
    kernels/linear.py and docs/PRIVACY.md."""
    B, T, D = A.shape
    P = G.shape[2]
    spec = _k.linear_clipped_weight_grad_spec(B, T, D, P, arch=arch(), itemsize=_kernel_dtype(A).dtype.itemsize)
    kernel = getattr(_k, spec.outputs["kernel"])
    round_dtype = _k.clipped_round_dtype(_kernel_dtype(A).dtype.name, precision)
    A, G = clipped_sum_operand(A, kernel), clipped_sum_operand(G, kernel)
    sa, sg = strides(A), strides(G)
    common = dict(a_ptr=A, g_ptr=G, c_ptr=c.astype(jnp.float32), B=B, D=D, P=P,
                  stride_ab=sa[0], stride_ad=sa[2], stride_gb=sg[0], stride_gp=sg[2])
    if T == 1:
        inputs = dict(common, ROWS_PER_SPLIT=spec.outputs["rows_per_split"])
        flags = dict(DOT_PRECISION=precision, ROUND_DTYPE=round_dtype)
    else:
        inputs = dict(common, T=T, EXAMPLES_PER_SPLIT=spec.outputs["examples_per_split"],
                      stride_at=sa[1], stride_gt=sg[1])
        flags = dict(DOT_PRECISION=precision)
    return KernelCall(kernel, spec.grid, inputs=inputs, outputs=split_outputs(spec),
                      constexprs=dict(spec.constexprs, **flags),
                      num_warps=spec.num_warps, name="linear_clipped_weight_grad", zeroed=("cnt_ptr",))


def split_outputs(spec) -> dict:
    """Outputs of a clipped weight-gradient launch (kernels/linear.py ``_store_split_tile``):
    ``out_ptr`` the fp32 result ``spec.outputs["partials"][1:]``, ``ws_ptr`` the fp32
    workspace of the n split-K slices (grid axis 2; n x tiles x BLOCK_P x BLOCK_D; every slot
    written before it is read; one element when n = 1, unused), ``cnt_ptr`` one int32 ticket
    counter per output tile, which the call must zero (``KernelCall.zeroed``)."""
    shape = spec.outputs["partials"]
    n = shape[0]
    return dict(out_ptr=f32(shape[1:]), ws_ptr=f32((_k.split_workspace_numel(spec),) if n > 1 else (1,)),
                cnt_ptr=jax.ShapeDtypeStruct((spec.grid[0] * spec.grid[1] if n > 1 else 1,), jnp.int32))


def jnp_clipped_weight_grad(A, G, c, precision: str = "ieee"):
    dt = acc_dtype(A)
    keep = (c != 0)[:, None, None]
    Gs = jnp.where(keep, G.astype(dt) * c.astype(dt)[:, None, None], 0)
    As = jnp.where(keep, A.astype(dt), 0)
    return jnp.einsum("btp,btd->pd", Gs, As, precision=_JNP_PRECISION[precision])


def linear_clipped_bias_grad(G, c):
    """sum_i c_i sum_t G_i[t] [P]; rows of examples with c_i == 0 are masked."""
    G = as3d(G, "G (output gradient)")
    B, T, P = G.shape
    c = check_factors(c, B)
    if B == 0 or T == 0 or P == 0:
        return jnp.zeros((P,), acc_dtype(G))
    return nondifferentiable("linear_clipped_bias_grad", _clipped_bias_grad, G, c)


def _clipped_bias_grad(G, c):
    def plain(G, c):
        dt = acc_dtype(G)
        keep = (c != 0)[:, None, None]
        return jnp.sum(jnp.where(keep, G.astype(dt) * c.astype(dt)[:, None, None], 0), axis=(0, 1))

    return dispatch("linear_clipped_bias_grad", (G, c), plain,
                    lambda path, G, c: launch(linear_clipped_bias_grad_call(G, c), path)["out_ptr"])


def linear_clipped_bias_grad_call(G, c) -> KernelCall:
    G = _kernel_dtype(G)
    B, T, P = G.shape
    spec = _k.linear_clipped_bias_grad_spec(B, T, P)
    sg = strides(G)
    return KernelCall(_k._linear_clipped_bias_grad_kernel, spec.grid,
                      inputs=dict(g_ptr=G, c_ptr=c.astype(jnp.float32), B=B, T=T, P=P,
                                  stride_gb=sg[0], stride_gt=sg[1], stride_gp=sg[2]),
                      outputs=dict(out_ptr=f32(spec.outputs["out"])),
                      constexprs=dict(spec.constexprs), num_warps=spec.num_warps,
                      name="linear_clipped_bias_grad")
