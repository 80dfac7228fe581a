"""JAX op for the clip-factor kernel (dpprims.kernels.clip): per-example clip factors and norms.

The contract (decided once, in kernels/clip.py, for every engine):

    n_i = sqrt(sq_norms_i)
    flat:       c_i = min(1, C / (n_i + 1e-6))
    automatic:  c_i = C / (n_i + gamma)
    c_i = 0 where mask_i == 0 (padding) or n_i is not finite.

``max_grad_norm`` is a runtime value: a one-element float32 array (a Python float is turned
into one), so a changing clip norm never recompiles; ``gamma`` is a static float.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dpprims.kernels import clip as _kclip

from ._call import KernelCall, dispatch, f32, launch, nondifferentiable

CLIPPINGS = ("flat", "automatic")
FLAT_EPS = _kclip.FLAT_EPS


def check_max_grad_norm(max_grad_norm, clipping: str):
    """Validate the clip norm C where it is concrete (privacy-relevant): NaN or negative C is an
    error; C = 0 clips every gradient to 0; C = inf means no clipping and is allowed only for flat
    clipping. A traced C (under jit) cannot be checked here. Returns C as a [1] float32 array."""
    if clipping not in CLIPPINGS:
        raise ValueError(f"clipping must be one of {CLIPPINGS}, got {clipping!r}")
    C = jnp.asarray(max_grad_norm)
    if C.size != 1:
        raise ValueError(f"max_grad_norm must be a scalar or a one-element array, got shape {C.shape}")
    if not isinstance(C, jax.core.Tracer):
        v = float(C.reshape(()))
        if math.isnan(v) or v < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {v!r}")
        if clipping == "automatic" and math.isinf(v):
            raise ValueError("automatic clipping needs a finite max_grad_norm")
    return C.astype(jnp.float32).reshape(1)


def check_gamma(gamma) -> float:
    g = float(gamma)
    if not (g > 0 and math.isfinite(g)):
        raise ValueError(f"gamma must be a positive finite number, got {gamma!r}")
    return g


def clip_factors(sq_norms, mask, max_grad_norm, *, clipping: str = "flat", gamma: float = 0.01):
    """(c [B], n [B]) float32 from per-example squared norms [B]; see the module docstring.

    ``mask``: None or [B] (bool or 0/1); ``max_grad_norm``: float or one-element array."""
    C = check_max_grad_norm(max_grad_norm, clipping)
    gamma = check_gamma(gamma)
    sq = jnp.asarray(sq_norms)
    if sq.ndim != 1:
        raise ValueError(f"sq_norms must be [B], got {sq.shape}")
    B = sq.shape[0]
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != (B,):
            raise ValueError(f"mask must have shape [B] = [{B}], got {mask.shape}")
        mask = (mask != 0).astype(jnp.int8)
    if B == 0:
        return jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.float32)
    sq = sq.astype(jnp.float32)
    automatic = clipping == "automatic"
    if mask is None:
        return nondifferentiable("clip_factors", _clip_factors_nomask, sq, C, automatic=automatic, gamma=gamma)
    return nondifferentiable("clip_factors", _clip_factors, sq, mask, C, automatic=automatic, gamma=gamma)


def _clip_factors_nomask(sq, C, *, automatic, gamma):
    return _clip_factors(sq, None, C, automatic=automatic, gamma=gamma)


def _clip_factors(sq, mask, C, *, automatic, gamma):
    def plain(sq, mask, C):
        n = jnp.sqrt(sq)
        Cs = C[0]
        c = Cs / (n + gamma) if automatic else jnp.minimum(Cs / (n + FLAT_EPS), 1.0)
        keep = jnp.isfinite(n)
        if mask is not None:
            keep = keep & (mask != 0)
        return jnp.where(keep, c, 0.0).astype(jnp.float32), n

    def kernel(path, sq, mask, C):
        outs = launch(clip_factor_call(sq, mask, C, automatic, gamma), path)
        return outs["factor_ptr"], outs["norm_ptr"]

    return dispatch("clip_factors", (sq, mask, C), plain, kernel)


def clip_factor_call(sq, mask, C, automatic: bool, gamma: float) -> KernelCall:
    B = sq.shape[0]
    spec = _kclip.clip_factor_spec(B)
    # HAS_MASK=False reads no mask: a one-element dummy buffer, never a null pointer.
    m = mask if mask is not None else jnp.zeros((1,), jnp.int8)
    return KernelCall(_kclip._clip_factor_kernel, spec.grid,
                      # HAS_SLACK=False (the JAX engine keeps design (a)): a dummy slack buffer
                      inputs=dict(sq_norm_ptr=sq, mask_ptr=m, slack_ptr=jnp.zeros((1,), jnp.float32),
                                  max_norm_ptr=C, B=B,
                                  # np.float32: jax-triton types a Python float as fp64, torch as fp32
                                  gamma=np.float32(gamma)),
                      outputs=dict(factor_ptr=f32((B,)), norm_ptr=f32((B,))),
                      constexprs=dict(spec.constexprs, HAS_MASK=mask is not None, HAS_SLACK=False,
                                      AUTOMATIC=bool(automatic)),
                      num_warps=spec.num_warps, name="clip_factors")
