"""dpprims.reference: the pure-JAX oracle of dpprims.

Every correctness test of the project (the Triton kernels, the torch engine, the JAX engine)
compares against this module. It is therefore deliberately naive: plain jax.numpy / jax.lax,
per-example gradients materialised (jax.vmap of jax.grad, or explicit [B, p, d] / [B, T, T]
tensors), no tiling, no fusion, no tricks, so that each function can be checked by reading it.
It is never used on the fast path; at realistic sizes it is slow and memory-hungry by design.

Conventions:
  * Every function preserves the input dtype (tests pass float64 with jax_enable_x64); matmuls
    and convs run at Precision.HIGHEST, so float32 results carry no TF32 / bf16 rounding.
  * Layer formulas (DESIGN.md section 1) return SQUARED per-example norms [B]; the global norm
    is sqrt of their sum over layers. Layouts follow torch: Linear weight [out, in], conv NCHW
    with weight [C_out, C_in/groups, kh, kw].
  * An example whose clip factor is 0 contributes exactly 0 to every clipped sum, even when its
    gradient (or activation) is NaN / inf: it is selected away with jnp.where.
  * Inputs may be JAX or numpy arrays (or CPU torch tensors, via np.asarray). The computations
    are wrapped in jax.jit (configuration arguments static, validated first in plain Python)
    only so that test suites compile once per shape instead of once per primitive; jit changes
    nothing in what is computed.
    Argument checks on values (a negative clip norm, out-of-range token ids) are skipped when
    the value is traced.

General (any JAX model):
  per_example_grads, per_example_sq_norms, per_example_norms, clip_factors, clipped_sum,
  clipped_grad.
Closed forms per layer:
  Linear     linear_per_example_{weight,bias}_grads, linear_weight_sq_norms_{direct,ghost},
             linear_bias_sq_norms, linear_clipped_{weight,bias}_grad
  Conv2d/1d  conv{2,1}d_unfold, conv{2,1}d_forward, conv{2,1}d_per_example_{weight,bias}_grads,
             conv{2,1}d_weight_sq_norms (method "autodiff" | "direct" | "ghost"),
             conv{2,1}d_bias_sq_norms, conv{2,1}d_clipped_{weight,bias}_grad
  Norms      groupnorm_xhat, layernorm_xhat, rmsnorm_xhat, norm_affine_per_example_grads,
             norm_affine_sq_norms, norm_affine_clipped_grads
  Embedding  embedding_per_example_grads, embedding_sq_norms, embedding_clipped_grad
"""
from ._conv import (
    CONV_NORM_METHODS,
    conv1d_bias_sq_norms,
    conv1d_clipped_bias_grad,
    conv1d_clipped_weight_grad,
    conv1d_forward,
    conv1d_per_example_bias_grads,
    conv1d_per_example_weight_grads,
    conv1d_unfold,
    conv1d_weight_sq_norms,
    conv2d_bias_sq_norms,
    conv2d_clipped_bias_grad,
    conv2d_clipped_weight_grad,
    conv2d_forward,
    conv2d_per_example_bias_grads,
    conv2d_per_example_weight_grads,
    conv2d_unfold,
    conv2d_weight_sq_norms,
)
from ._core import (
    CLIPPINGS,
    FLAT_EPS,
    clip_factors,
    clipped_grad,
    clipped_sum,
    per_example_grads,
    per_example_norms,
    per_example_sq_norms,
)
from ._embedding import embedding_clipped_grad, embedding_per_example_grads, embedding_sq_norms
from ._linear import (
    linear_bias_sq_norms,
    linear_clipped_bias_grad,
    linear_clipped_weight_grad,
    linear_per_example_bias_grads,
    linear_per_example_weight_grads,
    linear_weight_sq_norms_direct,
    linear_weight_sq_norms_ghost,
)
from ._norm import (
    groupnorm_xhat,
    layernorm_xhat,
    norm_affine_clipped_grads,
    norm_affine_per_example_grads,
    norm_affine_sq_norms,
    rmsnorm_xhat,
)

__all__ = [
    "CLIPPINGS",
    "CONV_NORM_METHODS",
    "FLAT_EPS",
    "clip_factors",
    "clipped_grad",
    "clipped_sum",
    "conv1d_bias_sq_norms",
    "conv1d_clipped_bias_grad",
    "conv1d_clipped_weight_grad",
    "conv1d_forward",
    "conv1d_per_example_bias_grads",
    "conv1d_per_example_weight_grads",
    "conv1d_unfold",
    "conv1d_weight_sq_norms",
    "conv2d_bias_sq_norms",
    "conv2d_clipped_bias_grad",
    "conv2d_clipped_weight_grad",
    "conv2d_forward",
    "conv2d_per_example_bias_grads",
    "conv2d_per_example_weight_grads",
    "conv2d_unfold",
    "conv2d_weight_sq_norms",
    "embedding_clipped_grad",
    "embedding_per_example_grads",
    "embedding_sq_norms",
    "groupnorm_xhat",
    "layernorm_xhat",
    "linear_bias_sq_norms",
    "linear_clipped_bias_grad",
    "linear_clipped_weight_grad",
    "linear_per_example_bias_grads",
    "linear_per_example_weight_grads",
    "linear_weight_sq_norms_direct",
    "linear_weight_sq_norms_ghost",
    "norm_affine_clipped_grads",
    "norm_affine_per_example_grads",
    "norm_affine_sq_norms",
    "per_example_grads",
    "per_example_norms",
    "per_example_sq_norms",
    "rmsnorm_xhat",
]
