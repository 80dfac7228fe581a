"""torch.library ops for the GroupNorm / LayerNorm affine kernels (dpprims.kernels.norm_affine).

Every op is a ``torch.library.custom_op`` with a fake (meta) implementation, so torch.compile
can trace through it. Each call runs one of three backends (see ``_backend``): the compiled
Triton kernel on CUDA, the same kernel through Triton's interpreter on CPU when
TRITON_INTERPRET=1, or the plain-torch implementation of the same math otherwise.

Per-example affine gradients are *instantiated* (they are tiny: 2*C values per example) by the
norm kernel, together with their squared norms; the clipped sums are then a reduction over the
examples of that buffer (``clipped_rows_sum``), not a second pass over the activations.

* ``groupnorm_affine_grads(x, G, mean, rstd, num_groups)``: x, G [B, C, *spatial];
  mean, rstd [B, num_groups] (what ``aten.native_group_norm`` returns).
* ``layernorm_affine_grads(x, G, mean, rstd, normalized_ndim)``: x, G [B, *lead, *norm_shape]
  with ``normalized_ndim = len(norm_shape)``; mean, rstd with B * prod(lead) elements (what
  ``aten.native_layer_norm`` returns, [B, *lead, 1, ...]).

Both return ``(per_example [B, 2, C], sq_norms [B, 2])`` in fp32: ``per_example[:, 0]`` is
dweight_i (flattened over the normalized shape for LayerNorm), ``per_example[:, 1]`` is dbias_i,
``sq_norms[:, 0] = ||dweight_i||^2`` and ``sq_norms[:, 1] = ||dbias_i||^2``. With ``mean`` and
``rstd`` None, ``x`` is read as x_hat itself. x and G may differ in dtype (under CUDA autocast
the norm runs in fp32 while x is kept in its own, lower, precision). Views are strided, no
copies, except where G's (or x's) strides cannot express the [B, R, C] view at all (then
``reshape`` copies, as torch's own norm backward would).

``clipped_rows_sum(X, c)``: sum_i c_i X[i] [N] (fp32) of a [B, N] tensor, rows with c_i == 0
masked (a dropped example's NaN never reaches the sum); ``norm_affine_clipped_grads`` applies
it to the [B, 2, C] buffer above.
"""
from __future__ import annotations

import math

import torch

from dpprims.kernels import norm_affine as _k

from ._backend import arch_for, empty, record
from .linear import _check_factors


def _launch(kernel, spec, *args, **kw):
    kernel[spec.grid](*args, **spec.constexprs, num_warps=spec.num_warps, **kw)


def _check_stats(x: torch.Tensor, mean, rstd, n: int, what: str):
    """mean / rstd as flat contiguous [n] views (they are tiny), or (None, None)."""
    if (mean is None) != (rstd is None):
        raise ValueError("pass both mean and rstd, or neither (x is then read as x_hat)")
    if mean is None:
        return None, None
    for name, s in (("mean", mean), ("rstd", rstd)):
        if s.numel() != n:
            raise ValueError(f"{name} must have {n} elements ({what}), got shape {tuple(s.shape)}")
        if s.device != x.device or not s.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor on {x.device}, got {s.dtype} on {s.device}")
    return mean.reshape(n).contiguous(), rstd.reshape(n).contiguous()


def _check_xg(x: torch.Tensor, G: torch.Tensor) -> None:
    if x.shape != G.shape:
        raise ValueError(f"x {tuple(x.shape)} and G {tuple(G.shape)} must have the same shape")
    if x.device != G.device:
        raise ValueError(f"x and G must be on the same device, got {x.device} and {G.device}")
    if not (x.is_floating_point() and G.is_floating_point()):
        raise ValueError(f"x and G must be floating tensors, got {x.dtype} and {G.dtype}")


def _affine_grads(x3, g3, mean, rstd, cpg: int, ng: int, row_stats: bool, op: str):
    """(per_example [B, 2, C], sq [B, 2]) from strided [B, R, C] views of x and G."""
    B, R, C = x3.shape
    if B == 0 or C == 0:
        return (x3.new_zeros(B, 2, C, dtype=torch.float32), x3.new_zeros(B, 2, dtype=torch.float32))
    backend = record(op, x3)
    if backend == "torch":
        return _torch_affine_grads(x3, g3, mean, rstd, cpg, ng, row_stats)
    spec = _k.norm_affine_grads_spec(B, R, C, row_stats, arch=arch_for(x3))
    pe = empty(spec.outputs["per_example"], device=x3.device, dtype=torch.float32)
    partials = empty(spec.outputs["partials"], device=x3.device, dtype=torch.float32)
    m, s = (mean, rstd) if mean is not None else (pe, pe)  # dummy buffers when HAS_STATS is False
    _launch(_k._norm_affine_grads_kernel, spec, x3, g3, m, s,
            R, C, cpg, ng, *x3.stride(), *g3.stride(), pe, partials,
            HAS_STATS=mean is not None, ROW_STATS=row_stats)
    sq = partials[:, :, 0] if partials.shape[2] == 1 else partials.sum(dim=2)
    return pe, sq


def _torch_affine_grads(x3, g3, mean, rstd, cpg: int, ng: int, row_stats: bool):
    """Plain-torch (CPU) version of the norm-affine kernel. Per-group statistics are applied
    by broadcasting over [B, groups, C/groups, positions] (the GroupNorm input's own NCHW
    layout: no gathered [B, positions, C] copies of mean / rstd), and the sums over positions
    are batched dot products. x_hat is formed explicitly, (x - mean) * rstd, never by the
    shortcut rstd * (sum x*g - mean * sum g), whose cancellation would lose precision in the
    norm (and so in the clip factor) for inputs with |mean| >> std."""
    B, R, C = x3.shape
    g = g3.float()
    if mean is not None and not row_stats:
        xc = x3.transpose(1, 2).float().reshape(B, ng, cpg, R)  # [B, groups, C/groups, positions]
        # one temporary: x_hat, then x_hat * G in place, summed over the positions (a bmm of
        # [B*C, 1, R] rows by [B*C, R, 1] columns took 2.4x as long at ResNet-18's layer1 shape)
        xh = (xc - mean.float().view(B, ng, 1, 1)).mul_(rstd.float().view(B, ng, 1, 1)).view(B, C, R)
        gc = g.transpose(1, 2)  # [B, C, positions]
        dw = xh.mul_(gc).sum(2)
        db = gc.sum(2)
    else:
        xh = x3.float()
        if mean is not None:
            xh = (xh - mean.float().view(B, R, 1)) * rstd.float().view(B, R, 1)
        dw, db = (xh * g).sum(1), g.sum(1)
    pe = torch.stack((dw, db), dim=1)
    return pe, pe.pow(2).sum(2)


# --------------------------------------------------------------------------------------------
# per-example affine gradients and squared norms
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("dpprims::groupnorm_affine_grads", mutates_args=())
def groupnorm_affine_grads(x: torch.Tensor, G: torch.Tensor, mean: torch.Tensor | None,
                           rstd: torch.Tensor | None, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm affine per-example gradients and squared norms (see module docstring).

    x, G [B, C, *spatial] (x_hat = (x - mean[b, c // (C / num_groups)]) * rstd[...]);
    returns (per_example [B, 2, C], sq_norms [B, 2]), fp32. B = 0 gives empty outputs."""
    _check_xg(x, G)
    if x.dim() < 2:
        raise ValueError(f"GroupNorm input must be [B, C, *], got shape {tuple(x.shape)}")
    B, C = x.shape[0], x.shape[1]
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the {C} channels")
    S = math.prod(x.shape[2:])
    mean, rstd = _check_stats(x, mean, rstd, B * num_groups, "[B, num_groups]")
    x3 = x.reshape(B, C, S).transpose(1, 2)  # [B, S, C]: R = S positions, stride 1 when contiguous
    g3 = G.reshape(B, C, S).transpose(1, 2)
    return _affine_grads(x3, g3, mean, rstd, C // num_groups, num_groups, False, "groupnorm_affine_grads")


@groupnorm_affine_grads.register_fake
def _(x, G, mean, rstd, num_groups):
    B, C = x.shape[0], x.shape[1]
    return x.new_empty(B, 2, C, dtype=torch.float32), x.new_empty(B, 2, dtype=torch.float32)


@torch.library.custom_op("dpprims::layernorm_affine_grads", mutates_args=())
def layernorm_affine_grads(x: torch.Tensor, G: torch.Tensor, mean: torch.Tensor | None,
                           rstd: torch.Tensor | None, normalized_ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm affine per-example gradients and squared norms (see module docstring).

    x, G [B, *lead, *normalized_shape] with len(normalized_shape) = normalized_ndim; the
    leading non-batch positions are summed over. Returns (per_example [B, 2, C], sq [B, 2]),
    fp32, with C = prod(normalized_shape) (dweight_i flattened in the weight's layout)."""
    _check_xg(x, G)
    if not 1 <= normalized_ndim <= x.dim() - 1:
        raise ValueError(f"normalized_ndim={normalized_ndim} must be in [1, {x.dim() - 1}] for x of "
                         f"shape {tuple(x.shape)} (the first dimension is the example dimension)")
    B = x.shape[0]
    C = math.prod(x.shape[x.dim() - normalized_ndim:])
    L = math.prod(x.shape[1:x.dim() - normalized_ndim])
    mean, rstd = _check_stats(x, mean, rstd, B * L, "[B, *leading dims]")
    x3 = x.reshape(B, L, C)  # [B, L, C]: R = L leading positions, C contiguous
    g3 = G.reshape(B, L, C)
    return _affine_grads(x3, g3, mean, rstd, C, 1, True, "layernorm_affine_grads")


@layernorm_affine_grads.register_fake
def _(x, G, mean, rstd, normalized_ndim):
    B = x.shape[0]
    C = math.prod(x.shape[x.dim() - normalized_ndim:])
    return x.new_empty(B, 2, C, dtype=torch.float32), x.new_empty(B, 2, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# clipped sums
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("dpprims::clipped_rows_sum", mutates_args=())
def clipped_rows_sum(X: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_i c_i X[i] [N] (fp32) of X [B, N]; rows with c_i == 0 are masked, not multiplied,
    so an example dropped for a non-finite norm (or a padding row) contributes exactly 0.
    B = 0 gives zeros. The reduction runs over the rows in order: deterministic."""
    if X.dim() != 2:
        raise ValueError(f"X must be [B, N], got shape {tuple(X.shape)}")
    B, N = X.shape
    _check_factors(c, B, X)
    if B == 0 or N == 0:
        return X.new_zeros(N, dtype=torch.float32)
    backend = record("clipped_rows_sum", X)
    if backend == "torch":
        keep = (c != 0).view(B, 1)
        return torch.where(keep, X.float() * c.view(B, 1), 0.0).sum(dim=0)
    spec = _k.clipped_rows_sum_spec(B, N)
    out = empty(spec.outputs["out"], device=X.device, dtype=torch.float32)
    _launch(_k._clipped_rows_sum_kernel, spec, X, c, B, N, *X.stride(), out)
    return out


@clipped_rows_sum.register_fake
def _(X, c):
    return X.new_empty(X.shape[1], dtype=torch.float32)


def norm_affine_clipped_grads(per_example: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i c_i dweight_i, sum_i c_i dbias_i), each [C] fp32, from the [B, 2, C] buffer of
    ``groupnorm_affine_grads`` / ``layernorm_affine_grads`` (one launch for both)."""
    B, two, C = per_example.shape
    if two != 2:
        raise ValueError(f"per_example must be [B, 2, C], got {tuple(per_example.shape)}")
    out = clipped_rows_sum(per_example.reshape(B, 2 * C), c)
    return out[:C], out[C:]
