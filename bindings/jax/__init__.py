"""JAX bindings of the dpprims Triton kernels.

Every op runs on one of three paths, recorded in ``LAST_PATH`` (see ``_call``): ``"jax-triton"``
(GPU, ``jax_triton.triton_call``), ``"jnp"`` (the op's own pure-jnp implementation), ``"interpreter"``
(the same kernel and launch through Triton's CPU interpreter in a ``jax.pure_callback``;
``DPPRIMS_JAX_BACKEND=interpreter`` or ``with use_path("interpreter")``, with TRITON_INTERPRET=1 set
before import). By default the platform a function is lowered for chooses between the first two
(``lax.platform_dependent``); ``use_compute_capability(90)`` compiles for sm_90 without a GPU.

Importing this package imports jax and triton, never jax_triton or torch, and queries no GPU.
"""
from ._call import (ENV_VAR, LAST_PATH, PATHS, KernelCall, arrange, compute_capability, launch,
                    use_compute_capability, use_path, which_path)
from .clip import check_max_grad_norm, clip_factors
from .conv import conv_clipped_weight_grad, conv_padding, conv_weight_sq_norms
from .embedding import embedding_clipped_grad, embedding_sq_norms
from .linear import (linear_bias_sq_norms, linear_clipped_bias_grad, linear_clipped_weight_grad,
                     linear_weight_sq_norms, rows_sq_norm)
from .noise import gaussian_noise
from .norm import (clipped_rows_sum, norm_affine_clipped_grads, norm_affine_per_example_grads,
                   norm_affine_sq_norms)
from .update import init_opt_state, make_hyper, noisy_update

__all__ = [
    "ENV_VAR", "LAST_PATH", "PATHS", "KernelCall", "arrange", "compute_capability", "launch",
    "use_compute_capability", "use_path", "which_path",
    "check_max_grad_norm", "clip_factors",
    "conv_clipped_weight_grad", "conv_padding", "conv_weight_sq_norms",
    "embedding_clipped_grad", "embedding_sq_norms",
    "linear_bias_sq_norms", "linear_clipped_bias_grad", "linear_clipped_weight_grad",
    "linear_weight_sq_norms", "rows_sq_norm",
    "clipped_rows_sum", "norm_affine_clipped_grads", "norm_affine_per_example_grads", "norm_affine_sq_norms",
    "gaussian_noise", "init_opt_state", "make_hyper", "noisy_update",
]
