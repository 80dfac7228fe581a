"""torch.library ops for the Linear and clip-factor kernels.

Every op is a ``torch.library.custom_op`` with a fake (meta) implementation, so torch.compile
can trace through it. Each call runs one of three backends (see ``_backend``): the compiled
Triton kernel on CUDA, the same kernel through Triton's interpreter on CPU when
TRITON_INTERPRET=1, or the plain-torch implementation of the same math otherwise. The backend
each op ran last is in ``dpprims.bindings.torch._backend.LAST_BACKEND``.

Shapes: ``A`` [B, T, D] (or [B, D] for T = 1), ``G`` [B, T, P] (or [B, P]); any strides (no
hidden ``.contiguous()`` copies: the kernels take strides). All outputs are fp32.
"""
from __future__ import annotations

import math

import torch

from dpprims.kernels import clip as _kclip
from dpprims.kernels import linear as _k

from ._backend import arch_for, empty, record

_DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")


def _as3d(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, T, features] or [B, features], got shape {tuple(x.shape)}")
    return x


def _sum_precision(precision: str) -> str:
    """tl.dot precision for fp32 operands, shared by the norm and the clipped-sum kernels.

    "ieee" and "tf32x3" are fp32-accurate. Plain "tf32" is allowed because every clipped sum
    feeds the tensor core the SAME operands the norm kernels measured (docs/PRIVACY.md): design
    (a) applies c_i outside the MMA (the TF32 rounding of A and G is the one the norm pass saw);
    design (b) (T = 1) and the embedding sum round toward zero onto TF32 values themselves, so
    the hardware rounding is the identity. It is safe only when the norms and the sums of one
    step use the same setting (DPEngine passes one setting to both); the plain-torch CPU path
    computes both in fp32 whatever the setting."""
    if precision not in _DOT_PRECISIONS:
        raise ValueError(f"dot precision must be one of {_DOT_PRECISIONS}, got {precision!r}")
    return precision


def _dot_precision(x: torch.Tensor, precision: str) -> str:
    """tl.dot precision of a kernel on operands like ``x``: the user's choice for fp32 operands;
    half operands multiply exactly in fp32 on tensor cores whatever the setting (Triton's
    default is passed)."""
    precision = _sum_precision(precision)
    return precision if x.dtype == torch.float32 else "tf32"


def interpreter_safe(t: torch.Tensor, backend: str) -> torch.Tensor:
    """Triton's interpreter multiplies raw bf16 bit patterns in tl.dot (wrong results); under
    the interpreter bf16 operands are upcast to fp32 first (exact). Compiled kernels keep bf16."""
    return t.float() if backend == "triton-interpreter" and t.dtype == torch.bfloat16 else t


def _check_pair(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    A, G = _as3d(A, "A (layer input)"), _as3d(G, "G (output gradient)")
    if A.shape[:2] != G.shape[:2]:
        raise ValueError(f"A {tuple(A.shape)} and G {tuple(G.shape)} must agree on [B, T]")
    if A.dtype != G.dtype:
        raise ValueError(f"A and G must have the same dtype, got {A.dtype} and {G.dtype}")
    if A.device != G.device:
        raise ValueError(f"A and G must be on the same device, got {A.device} and {G.device}")
    return A, G


def _launch(kernel, spec, *args, **kw):
    kernel[spec.grid](*args, **spec.constexprs, num_warps=spec.num_warps, **kw)


def _arch(x: torch.Tensor) -> int:
    """Compute capability (e.g. 90) of x's CUDA device for the launch specs, read at launch time;
    kernels._launch.DEFAULT_ARCH (90) elsewhere (see _backend.arch_for)."""
    return arch_for(x)


# --------------------------------------------------------------------------------------------
# per-example squared weight-gradient norms
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("dpprims::linear_weight_sq_norms", mutates_args=())
def linear_weight_sq_norms(A: torch.Tensor, G: torch.Tensor, method: str, precision: str = "ieee") -> torch.Tensor:
    """Per-example ||G_i^T A_i||_F^2 [B] (fp32) by ``method`` in {"direct", "ghost", "outer"};
    "outer" needs T = 1 and computes ||a_i||^2 ||g_i||^2."""
    A, G = _check_pair(A, G)
    B, T, D = A.shape
    P = G.shape[2]
    if method not in ("direct", "ghost", "outer"):
        raise ValueError(f"method must be 'direct', 'ghost' or 'outer', got {method!r}")
    if method == "outer" and T != 1:
        raise ValueError(f"method 'outer' needs T = 1, got T = {T}")
    prec = _dot_precision(A, precision)
    if B == 0 or T == 0 or D == 0 or P == 0:
        return A.new_zeros(B, dtype=torch.float32)
    backend = record(f"linear_weight_sq_norms[{method}]", A)
    if backend == "torch":
        return _torch_weight_sq_norms(A, G, method)
    A, G = interpreter_safe(A, backend), interpreter_safe(G, backend)
    if method == "outer":
        return rows_sq_norm(A[:, 0, :]) * rows_sq_norm(G[:, 0, :])
    if method == "direct":
        spec = _k.linear_norm_direct_spec(B, T, D, P, arch=_arch(A))
        kernel = _k._linear_norm_direct_kernel
    else:
        spec = _k.linear_norm_ghost_spec(B, T, D, P, arch=_arch(A))
        kernel = _k._linear_norm_ghost_kernel
    partials = empty(spec.outputs["partials"], device=A.device, dtype=torch.float32)
    _launch(kernel, spec, A, G, T, D, P, *A.stride(), *G.stride(), partials, DOT_PRECISION=prec)
    return partials.sum(dim=1)


@linear_weight_sq_norms.register_fake
def _(A, G, method, precision="ieee"):
    return A.new_empty(A.shape[0], dtype=torch.float32)


def _torch_weight_sq_norms(A: torch.Tensor, G: torch.Tensor, method: str) -> torch.Tensor:
    A32, G32 = A.float(), G.float()
    if A32.shape[0] == 0:  # an empty batch (B = 0) is a real step: no norms, nothing to chunk
        return A32.new_zeros(0)
    if method == "outer":
        return A32[:, 0].pow(2).sum(1) * G32[:, 0].pow(2).sum(1)
    B, T, D = A32.shape
    P = G32.shape[2]
    if method == "ghost":
        # <A A^T, G G^T>_F per example, chunked so that at most ~2^24 Gram values exist
        chunk = max(1, (1 << 24) // max(1, 2 * T * T))
        out = []
        for s in range(0, B, chunk):
            a, g = A32[s:s + chunk], G32[s:s + chunk]
            aa, gg = torch.bmm(a, a.transpose(1, 2)), torch.bmm(g, g.transpose(1, 2))
            out.append(torch.linalg.vecdot(aa.flatten(1), gg.flatten(1)))
        return torch.cat(out)
    # direct, chunked over the batch so that at most ~64 MiB of per-example gradients exist;
    # the square-sum is torch's vectorised L2-norm reduction, squared (no squared temporary)
    chunk = max(1, (1 << 24) // max(1, D * P))
    out = []
    for s in range(0, B, chunk):
        w = torch.bmm(G32[s:s + chunk].transpose(1, 2), A32[s:s + chunk]).reshape(-1, D * P)
        out.append(torch.linalg.vector_norm(w, dim=1).square())
    return torch.cat(out)


def rows_sq_norm(x: torch.Tensor) -> torch.Tensor:
    """sum of squares of each row of a [B, N] tensor, fp32, through the row-norm kernel."""
    B, N = x.shape
    spec = _k.rows_sq_norm_spec(B, N, arch=_arch(x))
    out = empty(B, device=x.device, dtype=torch.float32)
    _launch(_k._rows_sq_norm_kernel, spec, x, N, *x.stride(), out)
    return out


@torch.library.custom_op("dpprims::linear_bias_sq_norms", mutates_args=())
def linear_bias_sq_norms(G: torch.Tensor) -> torch.Tensor:
    """Per-example ||sum_t G_i[t]||^2 [B] (fp32)."""
    G = _as3d(G, "G (output gradient)")
    B, T, P = G.shape
    if B == 0 or T == 0 or P == 0:
        return G.new_zeros(B, dtype=torch.float32)
    backend = record("linear_bias_sq_norms", G)
    if backend == "torch":
        return G.float().sum(1).pow(2).sum(1)
    if T == 1:
        return rows_sq_norm(G[:, 0, :])
    spec = _k.linear_bias_norm_spec(B, T, P, arch=_arch(G))
    partials = empty(spec.outputs["partials"], device=G.device, dtype=torch.float32)
    _launch(_k._linear_bias_norm_kernel, spec, G, T, P, *G.stride(), partials)
    return partials.sum(dim=1)


@linear_bias_sq_norms.register_fake
def _(G):
    return G.new_empty(G.shape[0], dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# clipped sums
# --------------------------------------------------------------------------------------------
def _check_factors(c: torch.Tensor, B: int, like: torch.Tensor) -> None:
    if c.shape != (B,):
        raise ValueError(f"clip factors must have shape [B] = [{B}], got {tuple(c.shape)}")
    if c.dtype != torch.float32 or c.device != like.device:
        raise ValueError(f"clip factors must be float32 on {like.device}, got {c.dtype} on {c.device}")


@torch.library.custom_op("dpprims::linear_clipped_weight_grad", mutates_args=())
def linear_clipped_weight_grad(A: torch.Tensor, G: torch.Tensor, c: torch.Tensor, precision: str = "ieee",
                               design: str = "auto") -> torch.Tensor:
    """sum_i c_i G_i^T A_i [P, D] (fp32), on tensor cores in the input dtype, with every
    example's contribution of norm <= c_i ||G_i^T A_i|| as the norm pass measured it
    (docs/PRIVACY.md): T > 1 multiplies each example's unscaled tiles into an fp32 tile and
    then scales it by c_i (design (a)); T = 1 rounds c_i g_i toward zero onto the input dtype
    (design (b), rank one). Examples with c_i == 0 are skipped / masked, never multiplied.

    ``design="rounded"`` (T > 1, design (c)): one GEMM over the B*T rows with c_i g_t rounded
    toward zero onto the input dtype. Its contribution exceeds c_i ||G_i^T A_i|| by up to
    c_i u S_i + tau sqrt(P) sum_t ||a_t|| (``rounded_rows_slack``): only for factors from
    ``clip_factors(..., slack=...)`` that charge it. The plain-torch path computes it in fp32
    (no rounding: the bound holds with room)."""
    A, G = _check_pair(A, G)
    B, T, D = A.shape
    P = G.shape[2]
    _check_factors(c, B, A)
    if design not in ("auto", "rounded"):
        raise ValueError(f"design must be 'auto' (designs (a)/(b)) or 'rounded' (design (c)), got {design!r}")
    prec = _dot_precision(A, precision)
    if B == 0 or T == 0:
        return A.new_zeros(P, D, dtype=torch.float32)
    backend = record("linear_clipped_weight_grad", A)
    if backend == "torch":
        # examples with c_i == 0 are selected away from both operands (never multiplied: their
        # values may be non-finite); reading c on the host is free on the CPU path
        keep = c != 0
        if not bool(keep.all()):
            idx = keep.nonzero().squeeze(1)
            A, G, c = A.index_select(0, idx), G.index_select(0, idx), c.index_select(0, idx)
        Gs = G.float() * c.view(-1, 1, 1)
        return Gs.reshape(-1, P).t() @ A.float().reshape(-1, D)
    spec = _k.linear_clipped_weight_grad_spec(B, T, D, P, arch=_arch(A), itemsize=A.element_size())
    A_k, G_k = interpreter_safe(A, backend), interpreter_safe(G, backend)
    if design == "rounded" and T > 1:  # design (c): one GEMM over the B*T rows, c_i g_t rounded toward zero
        spec = _k.linear_clipped_weight_grad_rounded_spec(B, T, D, P, arch=_arch(A), itemsize=A.element_size())
        out = split_outputs(spec, A.device)
        _launch(_k._linear_clipped_weight_grad_rounded_kernel, spec, A_k, G_k, c,
                B, T, D, P, spec.outputs["rows_per_split"], *A_k.stride(), *G_k.stride(),
                *out, DOT_PRECISION=prec, ROUND_DTYPE=_k.clipped_round_dtype(A.dtype, precision))
    elif T == 1:  # design (b): c_i g_i rounded toward zero onto the INPUT dtype (bf16 kept under the interpreter)
        out = split_outputs(spec, A.device)
        _launch(_k._linear_clipped_weight_grad_rank1_kernel, spec, A_k, G_k, c,
                B, D, P, spec.outputs["rows_per_split"], A_k.stride(0), A_k.stride(2),
                G_k.stride(0), G_k.stride(2), *out, DOT_PRECISION=prec,
                ROUND_DTYPE=_k.clipped_round_dtype(A.dtype, precision))
    else:  # design (a): unscaled input-dtype tiles per example, c_i applied to the fp32 tile
        out = split_outputs(spec, A.device)
        _launch(_k._linear_clipped_weight_grad_kernel, spec, A_k, G_k, c,
                B, T, D, P, spec.outputs["examples_per_split"], *A_k.stride(), *G_k.stride(),
                *out, DOT_PRECISION=prec)
    return out[0]


def split_outputs(spec, device) -> tuple:
    """(out, workspace, counters) of a clipped weight-gradient launch (kernels/linear.py
    ``_store_split_tile``): the fp32 result ``spec.outputs["partials"][1:]``; with n > 1
    split-K slices (grid axis 2) an fp32 workspace of n x tiles x BLOCK_P x BLOCK_D (every slot
    written before it is read) and one ZEROED int32 ticket counter per output tile; with one
    slice neither is used (``out`` and a 1-element int32 stand in)."""
    shape = spec.outputs["partials"]
    out = empty(shape[1:], device=device, dtype=torch.float32)
    if shape[0] == 1:
        return out, out, torch.zeros(1, device=device, dtype=torch.int32)
    ws = empty((_k.split_workspace_numel(spec),), device=device, dtype=torch.float32)
    return out, ws, torch.zeros(spec.grid[0] * spec.grid[1], device=device, dtype=torch.int32)


@linear_clipped_weight_grad.register_fake
def _(A, G, c, precision="ieee", design="auto"):
    return A.new_empty(G.shape[-1], A.shape[-1], dtype=torch.float32)


@torch.library.custom_op("dpprims::linear_clipped_bias_grad", mutates_args=())
def linear_clipped_bias_grad(G: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_i c_i sum_t G_i[t] [P] (fp32); rows of examples with c_i == 0 are masked."""
    G = _as3d(G, "G (output gradient)")
    B, T, P = G.shape
    _check_factors(c, B, G)
    if B == 0 or T == 0:
        return G.new_zeros(P, dtype=torch.float32)
    backend = record("linear_clipped_bias_grad", G)
    if backend == "torch":
        # sum over positions first ([B, P]), then the factors: rows with c_i == 0 are selected
        # away before the product (a dropped example's NaN never meets its 0)
        keep = c != 0
        g = G.float().sum(dim=1)
        if not bool(keep.all()):
            g, c = g[keep], c[keep]
        return c.to(torch.float32) @ g
    spec = _k.linear_clipped_bias_grad_spec(B, T, P)
    out = empty(P, device=G.device, dtype=torch.float32)
    _launch(_k._linear_clipped_bias_grad_kernel, spec, G, c, B, T, P, *G.stride(), out)
    return out


@linear_clipped_bias_grad.register_fake
def _(G, c):
    return G.new_empty(G.shape[-1], dtype=torch.float32)


def rounded_rows_slack(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (u S_i, alpha_i) [B] fp32 of a design-(c) clipped sum of A [B, T, D],
    G [B, T, P] (input dtype): S_i = sum_t ||g_t|| ||a_t|| and alpha_i = tau sqrt(P) sum_t ||a_t||
    with (u, tau) = kernels.linear.ROUNDED_ROWS_BOUNDS of the operand format, so that
    ||sum_t RZ(c g_t) a_t^T - c G_i^T A_i||_F <= c u S_i + alpha_i (docs/PRIVACY.md). Both are
    raised by the factor (1 + 2^-8), which covers the fp32 rounding of computing them (relative
    <= (T + max(D, P)) 2^-24 <= 2^-8 for T + max(D, P) <= 2^16). Framework ops over the rows
    (two row norms and a dot per example, O(B T (D + P)), no GEMM); a non-finite row gives a
    non-finite term (then c_i = 0)."""
    A, G = _check_pair(A, G)
    u, tau = _k.ROUNDED_ROWS_BOUNDS[_k.clipped_round_dtype(A.dtype, "ieee")]
    na = torch.linalg.vector_norm(A.float(), dim=2)  # [B, T]
    ng = torch.linalg.vector_norm(G.float(), dim=2)  # [B, T]
    S = torch.linalg.vecdot(na, ng)  # [B]
    margin = 1.0 + 2.0 ** -8
    rel = S * (u * margin) if u > 0 else torch.zeros_like(S)
    alpha = na.sum(1) * (tau * math.sqrt(G.shape[2]) * margin) if tau > 0 else torch.zeros_like(S)
    return rel, alpha


# --------------------------------------------------------------------------------------------
# clip factors
# --------------------------------------------------------------------------------------------
def check_max_grad_norm(max_grad_norm: float, clipping: str) -> float:
    """Validate the clip norm C (privacy-relevant): NaN or negative C is an error; C = 0 clips
    every gradient to 0; C = inf means no clipping and is allowed only for flat clipping (it
    voids the DP guarantee, which the trainer refuses separately)."""
    C = float(max_grad_norm)
    if math.isnan(C) or C < 0:
        raise ValueError(f"max_grad_norm must be >= 0, got {max_grad_norm!r}")
    if clipping not in ("flat", "automatic"):
        raise ValueError(f"clipping must be 'flat' or 'automatic', got {clipping!r}")
    if clipping == "automatic" and math.isinf(C):
        raise ValueError("automatic clipping needs a finite max_grad_norm")
    return C


def clip_factors_torch(sq_norms: torch.Tensor, mask: torch.Tensor | None, max_grad_norm: torch.Tensor,
                       automatic: bool, gamma: float, slack: torch.Tensor | None = None):
    """The plain-torch implementation of :func:`clip_factors` (same arguments, shapes checked by
    the caller; B > 0): what the op runs on a CPU without the interpreter, and what
    DPEngine.backward calls directly there (the custom-op dispatch costs ~100 us a step, more
    than the arithmetic). fp32; c_i = 0 where the mask is 0 or n_i (or the slack) is not finite.
    Privacy-relevant: the finiteness test of n is ``n < inf``, one comparison instead of
    isfinite's four ops: n = sqrt(sq) is never -inf, and the comparison is False exactly for
    +inf and NaN (a negative or NaN sq gives NaN), so it keeps exactly the finite norms."""
    n = sq_norms.float().sqrt()
    C = max_grad_norm.float().reshape(())
    keep = n < math.inf
    if slack is None:
        c = C / (n + gamma) if automatic else torch.clamp(C / (n + _kclip.FLAT_EPS), max=1.0)
    else:
        rho, alpha = slack.float()[0], slack.float()[1]
        keep = keep & torch.isfinite(rho) & torch.isfinite(alpha)
        c = (torch.clamp(C - alpha, min=0.0) / (n + rho + gamma) if automatic
             else torch.clamp((C - alpha) / (n + rho + _kclip.FLAT_EPS), min=0.0, max=1.0))
    if mask is not None:
        keep = keep & (mask != 0)
    return torch.where(keep, c, 0.0), n


@torch.library.custom_op("dpprims::clip_factors", mutates_args=())
def clip_factors(sq_norms: torch.Tensor, mask: torch.Tensor | None, max_grad_norm: torch.Tensor,
                 automatic: bool, gamma: float, slack: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(c [B], n [B]) from per-example squared norms; see dpprims.kernels.clip for the contract
    (mask 0 -> 0, non-finite -> 0). ``max_grad_norm`` is a one-element fp32 tensor.
    ``slack``: optional [2, B] fp32 (rho, alpha) of the rounding-aware factor (design (c),
    docs/PRIVACY.md): c_i (n_i + rho_i) + alpha_i <= C."""
    B = sq_norms.shape[0]
    if sq_norms.dim() != 1:
        raise ValueError(f"sq_norms must be [B], got {tuple(sq_norms.shape)}")
    if mask is not None and mask.shape != (B,):
        raise ValueError(f"mask must have shape [B] = [{B}], got {tuple(mask.shape)}")
    if slack is not None and slack.shape != (2, B):
        raise ValueError(f"slack must have shape [2, B] = [2, {B}] (rho, alpha), got {tuple(slack.shape)}")
    if B == 0:
        return sq_norms.new_zeros(0, dtype=torch.float32), sq_norms.new_zeros(0, dtype=torch.float32)
    backend = record("clip_factors", sq_norms)
    if backend == "torch":
        return clip_factors_torch(sq_norms, mask, max_grad_norm, automatic, gamma, slack)
    spec = _kclip.clip_factor_spec(B)
    c = empty(B, device=sq_norms.device, dtype=torch.float32)
    n = empty(B, device=sq_norms.device, dtype=torch.float32)
    m = mask if mask is not None else sq_norms  # dummy buffer when HAS_MASK is False
    if m.dtype == torch.bool:
        m = m.to(torch.uint8)
    sl = slack.float().contiguous() if slack is not None else sq_norms  # dummy when HAS_SLACK is False
    _launch(_kclip._clip_factor_kernel, spec, sq_norms.float().contiguous(), m.contiguous(), sl,
            max_grad_norm.float().reshape(1), B, float(gamma), c, n,
            HAS_MASK=mask is not None, HAS_SLACK=slack is not None, AUTOMATIC=bool(automatic))
    return c, n


@clip_factors.register_fake
def _(sq_norms, mask, max_grad_norm, automatic, gamma, slack=None):
    return sq_norms.new_empty(sq_norms.shape, dtype=torch.float32), sq_norms.new_empty(sq_norms.shape, dtype=torch.float32)
