"""dpprims for JAX / Flax: DP layers and the per-example clipping engine (imports jax, flax).

    import dpprims.jax as dpj
    loss_fn = dpj.make_loss_fn(model, per_example_loss)
    grads, norms = dpj.clipped_grad(loss_fn, params, batch, max_grad_norm=1.0, mask=mask)
    tx = optax.chain(dpj.dp_noise(plan, seed=0), optax.sgd(0.1))   # noise + / (q N), once per logical batch
    for logical in dpj.PoissonBatches(plan, (x, y), seed=0): ...     # fixed-shape batches + masks

Layers (flax.linen, drop-in for their flax counterparts): Dense, Conv, GroupNorm, LayerNorm,
RMSNorm, Embed. Kernel paths (jax-triton on GPU, jnp on CPU, the Triton interpreter for CI) are chosen
per op: ``which_path()``, ``use_path(...)``, ``LAST_PATH`` (see dpprims.bindings.jax).
"""
from dpprims.bindings.jax import LAST_PATH, use_path, which_path

from dpprims.batching import LogicalBatch, PoissonBatches

from .dp_optax import DPNoiseState, dp_noise
from .engine import LAST_PLAN, DPLoss, clipped_grad, make_loss_fn
from .layers import ACTIVATIONS, PERTURBATIONS, Conv, Dense, DPLayer, Embed, GroupNorm, LayerNorm, RMSNorm

__all__ = [
    "ACTIVATIONS", "PERTURBATIONS", "Conv", "DPNoiseState", "Dense", "DPLayer", "DPLoss", "Embed", "GroupNorm",
    "LAST_PATH", "LAST_PLAN", "LayerNorm", "LogicalBatch", "PoissonBatches", "clipped_grad", "dp_noise",
    "make_loss_fn", "RMSNorm", "use_path", "which_path",
]
