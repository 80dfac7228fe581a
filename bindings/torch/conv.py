"""torch.library ops for the Conv2d / Conv1d kernels (kernels/conv.py).

Every op is a ``torch.library.custom_op`` with a fake implementation, so torch.compile traces
through it. Backends as in ``linear.py`` (see ``_backend``): the Triton kernels on CUDA, the
same kernels through Triton's interpreter on CPU when TRITON_INTERPRET=1, and otherwise a
plain-torch implementation that follows the same plan (the CPU path): ghost norms from the
Gram matrices of G and of the unfolded input (batched GEMMs; U^T U from an explicit im2col or,
at small spatial sizes, from the padded input's own Gram matrix), direct norms from per-example
weight gradients built by chunked batched GEMMs over an explicit im2col, by oneDNN's
weight-gradient conv once per example (large convs) or by one grouped weight-gradient conv
(depthwise), with at most ~2^24 values of intermediates at once, and the clipped sum as one
framework weight gradient of (c * G) and x. ``per_example_weight_grads`` and ``clipped_sum_of_rows`` are the
pieces the engine's "instantiate" plan uses (dpprims/torch/handlers/cpu_cost.py).

Shapes (torch layouts, any strides: the kernels take strides, nothing is copied):

* ``x`` [B, C_in, H, W] and ``G`` (output gradient) [B, C_out, H_out, W_out] for a 2-D conv,
  or [B, C_in, L] and [B, C_out, L_out] for a 1-D conv (then every geometry list has one entry);
* ``kernel_size``, ``stride``, ``dilation``: one int per spatial dim;
* ``padding``: the LOW (top / left) padding per spatial dim. The high padding is whatever makes
  the conv of ``x`` have G's spatial shape (so torch's asymmetric padding="same" is
  ``padding = [d*(k-1)//2]`` per dim); ``dpprims.kernels.conv.conv_pads`` turns torch's
  padding argument into (low, high) pairs. Zero padding only: pad non-zero modes explicitly.

Outputs are fp32. Per-example norms are the sum over groups of per-group norms (no
cross-group terms). Rows of an example with c_i == 0 are masked in every clipped sum, so an
example with inf/NaN values contributes exactly nothing.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpprims.kernels import conv as _k
from dpprims.kernels import linear as _kl
from dpprims.kernels.conv import Conv2dGeometry

from ._backend import empty, record
from .linear import _arch, _check_factors, _dot_precision, _launch, interpreter_safe, split_outputs

_METHODS = ("direct", "ghost")


def _ints(v, n: int, name: str) -> tuple:
    v = tuple(int(e) for e in v)
    if len(v) != n:
        raise ValueError(f"{name} must have {n} entries (one per spatial dim), got {list(v)}")
    return v


def conv_geometry(x: torch.Tensor, G: torch.Tensor, kernel_size, stride, padding, dilation,
                  groups: int) -> tuple[Conv2dGeometry, torch.Tensor, torch.Tensor]:
    """Validate one conv call and return (geometry, x, G) in 2-D form ([B, C, 1, L] views for a
    1-D conv; no copies)."""
    n = len(kernel_size)
    if n not in (1, 2):
        raise ValueError(f"kernel_size must have 1 (Conv1d) or 2 (Conv2d) entries, got {list(kernel_size)}")
    if x.dim() != n + 2 or G.dim() != n + 2:
        raise ValueError(f"a {n}-D conv needs x and G of rank {n + 2} ([B, C, *spatial]), got "
                         f"x {tuple(x.shape)} and G {tuple(G.shape)}")
    if x.shape[0] != G.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and G {tuple(G.shape)} must agree on the batch size")
    if x.dtype != G.dtype:
        raise ValueError(f"x and G must have the same dtype, got {x.dtype} and {G.dtype}")
    if x.device != G.device:
        raise ValueError(f"x and G must be on the same device, got {x.device} and {G.device}")
    k = _ints(kernel_size, n, "kernel_size")
    s = _ints(stride, n, "stride")
    p = _ints(padding, n, "padding")
    d = _ints(dilation, n, "dilation")
    if min(k) < 1 or min(s) < 1 or min(d) < 1 or min(p) < 0:
        raise ValueError(f"kernel_size, stride, dilation must be >= 1 and padding >= 0, got "
                         f"kernel_size={k}, stride={s}, padding={p}, dilation={d}")
    C_in, C_out = x.shape[1], G.shape[1]
    if groups < 1 or C_in % groups or C_out % groups:
        raise ValueError(f"groups={groups} must divide C_in={C_in} and C_out={C_out}")
    if min(G.shape[2:], default=1) < 1 and G.shape[0] > 0:
        raise ValueError(f"G has an empty spatial shape {tuple(G.shape)}")
    if n == 1:
        x, G = x.unsqueeze(2), G.unsqueeze(2)
        k, s, p, d = (1,) + k, (1,) + s, (0,) + p, (1,) + d
    geo = Conv2dGeometry(B=x.shape[0], C_in=C_in, H=x.shape[2], W=x.shape[3], C_out=C_out,
                         H_out=G.shape[2], W_out=G.shape[3], KH=k[0], KW=k[1], SH=s[0], SW=s[1],
                         PH=p[0], PW=p[1], DH=d[0], DW=d[1], groups=int(groups))
    return geo, x, G


# --------------------------------------------------------------------------------------------
# per-example squared weight-gradient norms
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("dpprims::conv2d_weight_sq_norms", mutates_args=())
def conv2d_weight_sq_norms(x: torch.Tensor, G: torch.Tensor, kernel_size: list[int], stride: list[int],
                           padding: list[int], dilation: list[int], groups: int, method: str,
                           precision: str = "ieee") -> torch.Tensor:
    """Per-example squared weight-gradient norms [B] (fp32) of a conv, by ``method`` in
    {"direct", "ghost"}: sum over groups g of ||G_i,g^T U_i,g||_F^2 with U the implicit im2col
    of x_i. An empty batch gives []; a non-finite value in example i gives a non-finite entry i."""
    geo, x4, G4 = conv_geometry(x, G, kernel_size, stride, padding, dilation, groups)
    if method not in _METHODS:
        raise ValueError(f"method must be 'direct' or 'ghost', got {method!r}")
    prec = _dot_precision(x, precision)
    if geo.B == 0 or geo.T == 0:
        return x.new_zeros(geo.B, dtype=torch.float32)
    backend = record(f"conv2d_weight_sq_norms[{method}]", x)
    if backend == "torch":
        return _torch_weight_sq_norms(x4, G4, geo, method)
    x4, G4 = interpreter_safe(x4, backend), interpreter_safe(G4, backend)
    if method == "direct":
        spec, kernel = _k.conv2d_norm_direct_spec(geo, arch=_arch(x4)), _k._conv2d_norm_direct_kernel
    else:
        spec, kernel = _k.conv2d_norm_ghost_spec(geo, arch=_arch(x4)), _k._conv2d_norm_ghost_kernel
    partials = empty(spec.outputs["partials"], device=x.device, dtype=torch.float32)
    _launch(kernel, spec, x4, G4, *geo.scalars(), *geo.conv_scalars(),
            *x4.stride(), *G4.stride(), partials, DOT_PRECISION=prec)
    return partials.sum(dim=1)


@conv2d_weight_sq_norms.register_fake
def _(x, G, kernel_size, stride, padding, dilation, groups, method, precision="ieee"):
    return x.new_empty(x.shape[0], dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# clipped weight-gradient sum
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("dpprims::conv2d_clipped_weight_grad", mutates_args=())
def conv2d_clipped_weight_grad(x: torch.Tensor, G: torch.Tensor, c: torch.Tensor, kernel_size: list[int],
                               stride: list[int], padding: list[int], dilation: list[int], groups: int,
                               precision: str = "ieee", design: str = "auto") -> torch.Tensor:
    """sum_i c_i dW_i in the weight layout [C_out, C_in/groups, *kernel_size] (fp32): an
    implicit-GEMM weight-gradient conv on tensor cores in the input dtype, one example at a
    time, each example's unscaled fp32 tile G_i^T U_i scaled by c_i afterwards (design (a),
    docs/PRIVACY.md), so its contribution has exactly the norm the norm pass measured.
    Examples with c_i == 0 are skipped, never multiplied; B = 0 gives zeros.

    ``design="rounded"`` (design (c)): one implicit-GEMM over the B*T output positions with
    c_i g_t rounded toward zero onto the input dtype; its contribution exceeds c_i ||dW_i|| by
    up to the ``conv2d_rounded_rows_slack`` terms, so only for factors that charge them
    (``clip_factors(..., slack=...)``). The plain-torch path computes it in fp32."""
    geo, x4, G4 = conv_geometry(x, G, kernel_size, stride, padding, dilation, groups)
    _check_factors(c, geo.B, x)
    if design not in ("auto", "rounded"):
        raise ValueError(f"design must be 'auto' (design (a)) or 'rounded' (design (c)), got {design!r}")
    prec = _dot_precision(x, precision)
    wshape = (geo.C_out, geo.C_in_g, *kernel_size)
    if geo.B == 0 or geo.T == 0:
        return x.new_zeros(wshape, dtype=torch.float32)
    backend = record("conv2d_clipped_weight_grad", x)
    if backend == "torch":
        return _torch_clipped_weight_grad(x4, G4, c, geo).view(wshape)
    if design == "rounded":
        spec = _k.conv2d_clipped_weight_grad_rounded_spec(geo, arch=_arch(x), itemsize=x.element_size())
        out = split_outputs(spec, x.device)
        xk, Gk = interpreter_safe(x4, backend), interpreter_safe(G4, backend)
        _launch(_k._conv2d_clipped_weight_grad_rounded_kernel, spec, xk, Gk, c,
                geo.B, *geo.scalars(), spec.outputs["rows_per_split"], *geo.conv_scalars(),
                *xk.stride(), *Gk.stride(), *out, DOT_PRECISION=prec,
                ROUND_DTYPE=_kl.clipped_round_dtype(x.dtype, precision))
        return out[0].view(wshape)
    spec = _k.conv2d_clipped_weight_grad_spec(geo, arch=_arch(x), itemsize=x.element_size())
    out = split_outputs(spec, x.device)
    x4, G4 = interpreter_safe(x4, backend), interpreter_safe(G4, backend)
    _launch(_k._conv2d_clipped_weight_grad_kernel, spec, x4, G4, c,
            geo.B, *geo.scalars(), spec.outputs["examples_per_split"], *geo.conv_scalars(),
            *x4.stride(), *G4.stride(), *out, DOT_PRECISION=prec)
    return out[0].view(wshape)


@conv2d_clipped_weight_grad.register_fake
def _(x, G, c, kernel_size, stride, padding, dilation, groups, precision="ieee", design="auto"):
    return x.new_empty((G.shape[1], x.shape[1] // groups, *kernel_size), dtype=torch.float32)


def conv2d_rounded_rows_slack(x: torch.Tensor, G: torch.Tensor, kernel_size, stride, padding, dilation,
                              groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (rho_i, alpha_i) [B] fp32 of a design-(c) conv clipped sum (docs/PRIVACY.md):
    per group g, S_i,g = sum_t ||g_t,g|| ||u_t,g|| (u_t,g the im2col patch of output position
    t, g_t,g the group's P output channels there) and alpha_i,g = tau sqrt(P) sum_t ||u_t,g||;
    the groups' errors are orthogonal blocks of the weight, so they combine in quadrature:
    rho_i = u sqrt(sum_g S_i,g^2), alpha_i = sqrt(sum_g alpha_i,g^2). ||u_t,g||^2 is a conv of
    x^2 with a ones kernel of the layer's (KH, KW), stride, padding and dilation, summed over the
    group's channels (one grouped conv, no im2col); both terms carry the (1 + 2^-8) margin of
    ``linear.rounded_rows_slack`` (fp32 rounding, and TF32 if cuDNN runs that conv in TF32)."""
    geo, x4, G4 = conv_geometry(x, G, kernel_size, stride, padding, dilation, groups)
    u, tau = _kl.ROUNDED_ROWS_BOUNDS[_kl.clipped_round_dtype(x.dtype, "ieee")]
    B, grp, P = geo.B, geo.groups, geo.P
    x2 = x4.float().square()
    # zero-pad low by (PH, PW) and high generously, then a padding-0 conv cropped to H_out x W_out
    x2 = F.pad(x2, (geo.PW, geo.PW + geo.KW * geo.DW, geo.PH, geo.PH + geo.KH * geo.DH))
    ones = x2.new_ones(grp, geo.C_in_g, geo.KH, geo.KW)
    usq = F.conv2d(x2, ones, stride=(geo.SH, geo.SW), dilation=(geo.DH, geo.DW), groups=grp)
    un = usq[:, :, :geo.H_out, :geo.W_out].clamp(min=0).sqrt().reshape(B, grp, geo.T)  # [B, groups, T]
    gn = torch.linalg.vector_norm(G4.float().reshape(B, grp, P, geo.T), dim=2)  # [B, groups, T]
    margin = 1.0 + 2.0 ** -8
    S = (un * gn).sum(2)  # [B, groups]
    rho = torch.linalg.vector_norm(S, dim=1) * (u * margin)
    alpha = torch.linalg.vector_norm(un.sum(2), dim=1) * (tau * math.sqrt(P) * margin)
    return rho, alpha


# --------------------------------------------------------------------------------------------
# bias
# --------------------------------------------------------------------------------------------
def _as_bias_view(G: torch.Tensor) -> torch.Tensor:
    if G.dim() not in (3, 4):
        raise ValueError(f"G must be [B, C_out, L] or [B, C_out, H, W], got {tuple(G.shape)}")
    return G.unsqueeze(2) if G.dim() == 3 else G


@torch.library.custom_op("dpprims::conv2d_bias_grads", mutates_args=())
def conv2d_bias_grads(G: torch.Tensor) -> torch.Tensor:
    """Per-example bias gradients sum over positions of G_i: [B, C_out] (fp32)."""
    G4 = _as_bias_view(G)
    B, C, H_out, W_out = G4.shape
    if B == 0 or H_out * W_out == 0:
        return G.new_zeros(B, C, dtype=torch.float32)
    backend = record("conv2d_bias_grads", G)
    if backend == "torch":
        return G4.float().sum(dim=(2, 3))
    spec = _k.conv2d_bias_grads_spec(B, C, H_out * W_out, arch=_arch(G4))
    out = empty(spec.outputs["out"], device=G.device, dtype=torch.float32)
    _launch(_k._conv2d_bias_grads_kernel, spec, G4, C, H_out * W_out, W_out, *G4.stride(), out)
    return out


@conv2d_bias_grads.register_fake
def _(G):
    return G.new_empty(G.shape[0], G.shape[1], dtype=torch.float32)


def conv2d_bias_sq_norms(G: torch.Tensor) -> torch.Tensor:
    """Per-example ||sum over positions of G_i||^2 [B] (fp32)."""
    return conv2d_bias_grads(G).square().sum(dim=1)


def clipped_rows_sum(per_example: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_i c_i v_i over the rows of per-example values [B, n] (fp32); rows with c_i == 0 are
    selected away (not multiplied), so a NaN row of a dropped example contributes 0."""
    _check_factors(c, per_example.shape[0], per_example)
    keep = (c != 0).unsqueeze(1)
    return torch.where(keep, per_example * c.unsqueeze(1), 0.0).sum(dim=0)


def conv2d_clipped_bias_grad(G: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_i c_i db_i [C_out] (fp32), from the per-example bias gradients; rows with c_i == 0
    are masked. B = 0 gives zeros."""
    return clipped_rows_sum(conv2d_bias_grads(G), c)


# --------------------------------------------------------------------------------------------
# plain-torch implementation (CPU without the interpreter; also the oracle of the fallback)
# --------------------------------------------------------------------------------------------
def unfold(x4: torch.Tensor, geo: Conv2dGeometry) -> torch.Tensor:
    """Explicit im2col U [B, C_in*KH*KW, T] (fp32, materialised) of a 2-D-form conv: the low
    padding of ``geo``, and a high padding (or crop) that yields exactly H_out x W_out."""
    return F.unfold(_padded(x4, geo), (geo.KH, geo.KW), dilation=(geo.DH, geo.DW), stride=(geo.SH, geo.SW))


def _padded_hw(geo: Conv2dGeometry) -> tuple[int, int]:
    """(H_p, W_p): the input extent that a padding-0 conv needs for exactly H_out x W_out."""
    return ((geo.H_out - 1) * geo.SH + geo.DH * (geo.KH - 1) + 1,
            (geo.W_out - 1) * geo.SW + geo.DW * (geo.KW - 1) + 1)


def _padded(x4: torch.Tensor, geo: Conv2dGeometry) -> torch.Tensor:
    """x with the conv's low padding and the high padding (or crop) that yields exactly
    H_out x W_out, so the plain-torch path can call a padding-0 convolution."""
    hp, wp = _padded_hw(geo)
    # (negative high pads crop rows / columns no window reads)
    return F.pad(x4.float(), (geo.PW, wp - geo.W - geo.PW, geo.PH, hp - geo.H - geo.PH))


def _weight_grad(xp: torch.Tensor, G4: torch.Tensor, geo: Conv2dGeometry, groups: int, c_out: int,
                 padding=(0, 0)) -> torch.Tensor:
    """The framework's own conv weight gradient of xp with ``padding`` on both sides (the
    default 0: padding already applied to xp, see :func:`_conv_input`)."""
    w_shape = (c_out, xp.shape[1] // groups, geo.KH, geo.KW)
    return torch.ops.aten.convolution_backward(
        G4, xp, xp.new_empty(w_shape), None, [geo.SH, geo.SW], list(padding), [geo.DH, geo.DW], False, [0, 0],
        groups, [False, True, False])[1]


def _conv_input(x4: torch.Tensor, geo: Conv2dGeometry) -> tuple:
    """(x, padding) for :func:`_weight_grad`: x itself (fp32) with the conv's padding where
    torch's symmetric padding gives exactly H_out x W_out (no padded copy), else the padded
    copy with padding 0."""
    if _symmetric_padding_fits(geo):
        return x4.float(), (geo.PH, geo.PW)
    return _padded(x4, geo), (0, 0)


# per_example_weight_grads at T >= 256: from this many multiply-adds per example on, one
# framework weight-gradient conv per example (oneDNN's implicit GEMM, ~0.1 ms of call overhead
# each). Measured inside the ResNet-18 DP step (B = 32, 2-core machine; medians of 6 steps):
# layer1 3x3 12.8 ms per layer, layer2 3x3 17.0 ms against 18.3 ms for the chunked im2col
# below (which is faster on its own, 10.3 against 13.1 ms, with its inputs still in cache).
_LOOP_MIN_MACS = 1 << 23

# Below that (and at T < 256), chunks of the explicit im2col of about this many fp32 values
# (4 MiB, so a chunk's U is still in cache when the batched GEMM reads it) and one batched
# GEMM per chunk: inside the ResNet-18 step its stem 1.3 ms and its 1x1 stride-2 downsample
# 2.0 ms, against 2.2 / 4.4 ms for the grouped conv with the batch as groups used before, and
# 15.4 against 25.4 ms for the 2^24-value chunks on its stride-2 layer3 3x3 (isolated).
# Depthwise convs with T >= 256 keep the grouped conv (oneDNN there is 2x faster than the many
# tiny GEMMs at 16x16, 2x slower at 32x32).
_IM2COL_CHUNK = 1 << 20


# Forces per_example_weight_grads' build ("loop", "grouped", "im2col"; tests force each).
_BUILD = "auto"


def per_example_build(geo: Conv2dGeometry) -> str:
    """How :func:`per_example_weight_grads` builds this conv's per-example gradients: "loop",
    "grouped" or "im2col" (:func:`per_example_build_for` is the rule the time model,
    dpprims.torch.handlers.cpu_cost, shares)."""
    if _BUILD != "auto":
        return _BUILD
    return per_example_build_for(geo.T, geo.D, geo.P, geo.groups, geo.C_in)


def per_example_build_for(T: int, D: int, P: int, groups: int, c_in: int) -> str:
    if T >= 256 and T * D * P * groups >= _LOOP_MIN_MACS:
        return "loop"
    if T >= 256 and groups > 1 and groups == c_in:
        return "grouped"
    return "im2col"


# Plain-torch chunks hold at most this many fp32 values of their largest intermediate (the
# im2col, the Gram matrices or the per-example gradients): 2^24 values = 64 MiB.
_CHUNK_ELEMS = 1 << 24


def sq_rows(v: torch.Tensor) -> torch.Tensor:
    """sum of squares of each row of a [b, n] fp32 tensor: torch's vectorised L2-norm reduction,
    squared (no squared temporary of the per-example tensor is written; 10-20x faster on CPU
    than a batched dot product, within ~2 ulp of the plain sum; NaN/inf propagate to the row)."""
    return torch.linalg.vector_norm(v, dim=1).square()


def im2col(x4: torch.Tensor, geo: Conv2dGeometry) -> torch.Tensor:
    """U [b, groups, D, T] (fp32, materialised) of a 2-D-form conv chunk: the padded input read
    through one strided view [b, C_in, KH, KW, H_out, W_out] and copied once; feature order
    d = (c, kh, kw) within a group, as in the weight layout [C_out, C_in/groups, KH, KW]."""
    xp = _padded(x4, geo).contiguous()
    sb, sc, sh, sw = xp.stride()
    b = xp.shape[0]
    v = xp.as_strided((b, geo.C_in, geo.KH, geo.KW, geo.H_out, geo.W_out),
                      (sb, sc, sh * geo.DH, sw * geo.DW, sh * geo.SH, sw * geo.SW))
    return v.reshape(b, geo.groups, geo.D, geo.T)


def _chunk(geo: Conv2dGeometry, per_example: int) -> int:
    return max(1, min(geo.B, _CHUNK_ELEMS // max(1, per_example)))


def per_example_weight_grads(x4: torch.Tensor, G4: torch.Tensor, geo: Conv2dGeometry) -> torch.Tensor:
    """Every example's weight gradient [B, C_out, D] (fp32, materialised: B*C_out*D values),
    D = C_in/groups*KH*KW in the weight layout. Three implementations of the same product
    G_i^T U_i, picked by shape (:func:`per_example_build`; all exact up to fp32 summation
    order), none holding more than a few MiB of intermediates besides the output:

    * "loop" (T >= 256, at least ``_LOOP_MIN_MACS`` per example): the framework's weight-
      gradient conv once per example, written into its row of the output;
    * "grouped" (depthwise, T >= 256): the batch-as-groups trick, one grouped convolution
      backward over [1, b*C_in, H, W] (oneDNN's implicit GEMM);
    * "im2col": the explicit im2col and one batched GEMM per chunk of ~``_IM2COL_CHUNK``
      values of U, written straight into the output."""
    B = x4.shape[0]
    out = x4.new_empty((B, geo.C_out, geo.D), dtype=torch.float32)
    build = per_example_build(geo)
    if build == "loop":
        xs, pad = _conv_input(x4, geo)
        g = G4.float()
        for i in range(B):
            out[i] = _weight_grad(xs[i:i + 1], g[i:i + 1], geo, geo.groups, geo.C_out, pad).view(geo.C_out, geo.D)
        return out
    if build == "grouped":
        step = _chunk(geo, geo.C_out * geo.D)
        for s in range(0, B, step):
            xp = _padded(x4[s:s + step], geo)
            b = xp.shape[0]
            g = G4[s:s + step].float()
            per = _weight_grad(xp.reshape(1, b * geo.C_in, *xp.shape[2:]),
                               g.reshape(1, b * geo.C_out, *g.shape[2:]), geo, b * geo.groups, b * geo.C_out)
            out[s:s + b] = per.view(b, geo.C_out, geo.D)
        return out
    step = max(1, _IM2COL_CHUNK // (geo.groups * geo.D * geo.T))
    for s in range(0, B, step):
        U = im2col(x4[s:s + step], geo)  # [b, g, D, T]
        b = U.shape[0]
        g = G4[s:s + step].float().reshape(b * geo.groups, geo.P, geo.T)
        torch.bmm(g, U.reshape(b * geo.groups, geo.D, geo.T).transpose(1, 2),
                  out=out[s:s + b].view(b * geo.groups, geo.P, geo.D))
    return out


# The plain-torch ghost path's input Gram U^T U: "auto" (the time model,
# dpprims.torch.handlers.cpu_cost.conv_gram_costs), "im2col" or "shifted" (tests force each).
_GRAM = "auto"


def padded_positions(geo: Conv2dGeometry) -> int:
    """N = H_p * W_p: the positions of x with the conv's low padding and the high padding (or
    crop) that yields exactly H_out x W_out (:func:`_padded`)."""
    hp, wp = _padded_hw(geo)
    return hp * wp


def gram_method(geo: Conv2dGeometry) -> str:
    """How the plain-torch ghost path forms U^T U for this conv ("im2col" or "shifted")."""
    if _GRAM != "auto":
        return _GRAM
    from dpprims.torch.handlers.cpu_cost import conv_gram_costs  # (lazy: handlers import this module)

    costs = conv_gram_costs(geo.B, geo.T, geo.D, geo.groups, geo.KH * geo.KW, padded_positions(geo))
    return min(costs, key=costs.get)


def shifted_input_gram(x4: torch.Tensor, geo: Conv2dGeometry) -> torch.Tensor:
    """U^T U [b*groups, H_out, W_out, H_out, W_out] (fp32) of a chunk without an im2col.

    With X the padded input of one example and group ([C_in/g, N] over the N = H_p * W_p padded
    positions) and M = X^T X [N, N], the patch of output position t holds X at positions
    pos_t + off_o over the taps o (pos_t = ho*SH*W_p + wo*SW, off_o = kh*DH*W_p + kw*DW), so
    u_t . u_t' = sum_o M[pos_t + off_o, pos_t' + off_o]: per tap, a strided [T, T] block of M
    (one as_strided view, no index tensors), added up. Exact: the same products as the im2col
    Gram in another summation order. Entries of M at positions no window reads (stride gaps)
    are never read, so a non-finite input value there changes nothing, as for the im2col."""
    xp = _padded(x4, geo)
    b, c_in, hp, wp = xp.shape
    n, g = hp * wp, geo.groups
    X = xp.reshape(b * g, c_in // g, n)
    M = torch.bmm(X.transpose(1, 2), X)  # [b*g, N, N]
    ho, wo = geo.H_out, geo.W_out
    taps = M.as_strided((b * g, geo.KH, geo.KW, ho, wo, ho, wo),
                        (n * n, geo.DH * wp * (n + 1), geo.DW * (n + 1), geo.SH * wp * n, geo.SW * n,
                         geo.SH * wp, geo.SW))
    S = taps[:, 0, 0].clone()
    for kh in range(geo.KH):
        for kw in range(geo.KW):
            if kh or kw:
                S += taps[:, kh, kw]  # one elementwise add per tap (a strided reduction is 4x slower)
    return S


def _torch_weight_sq_norms(x4, G4, geo: Conv2dGeometry, method: str) -> torch.Tensor:
    """Per-example squared norms on the plain-torch path, by the method the plan chose (the
    methods agree up to fp32 summation order):

    * "ghost": sum over groups of <U^T U, G^T G>_F: [T, T] Gram matrices per example and group,
      G^T G by a batched GEMM (2*T^2*P flops) and U^T U from the explicit im2col U (2*T^2*D
      flops) or, where the time model says it is cheaper (small spatial sizes), from the Gram
      matrix of the padded input (:func:`shifted_input_gram`); chunked over examples (at most
      ~2^24 values of im2col or Gram matrices at once);
    * "direct": the per-example weight gradients built a chunk at a time
      (:func:`per_example_weight_grads`), square-summed, then dropped."""
    if geo.B == 0:  # an empty batch (B = 0) is a real step: no norms, nothing to chunk
        return torch.zeros(0, device=x4.device, dtype=torch.float32)
    if method == "direct":
        out = []
        step = _chunk(geo, geo.C_out * geo.D)
        for s in range(0, geo.B, step):
            per = per_example_weight_grads(x4[s:s + step], G4[s:s + step], geo)
            out.append(sq_rows(per.flatten(1)))
        return torch.cat(out)
    Tn = geo.T
    shifted = gram_method(geo) == "shifted"
    if shifted:
        n = padded_positions(geo)
        per_example = geo.groups * (n * n + 2 * Tn * Tn) + geo.C_in * n + geo.C_out * Tn
    else:
        per_example = geo.groups * (geo.D * Tn + 2 * Tn * Tn) + geo.C_out * Tn
    step = _chunk(geo, per_example)
    out = []
    for s in range(0, geo.B, step):
        xs = x4[s:s + step]
        b = xs.shape[0]
        if shifted:
            uu = shifted_input_gram(xs, geo)
        else:
            U = im2col(xs, geo).reshape(b * geo.groups, geo.D, Tn)  # [b*g, D, T]
            uu = torch.bmm(U.transpose(1, 2), U)  # [b*g, T, T]
        g = G4[s:s + step].float().reshape(b * geo.groups, geo.P, Tn)
        gg = torch.bmm(g.transpose(1, 2), g)  # [b*g, T, T]
        out.append(_sq_dot(uu, gg).reshape(b, geo.groups).sum(1))
    return torch.cat(out)


def _sq_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a_k, b_k>_F for each k of two [n, s, t] tensors (a vectorised row-wise dot product)."""
    return torch.linalg.vecdot(a.flatten(1), b.flatten(1))


def clipped_sum_of_rows(per_example: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_i c_i v_i of kept per-example gradients [B, *shape] (fp32) as one GEMV over B (the
    "instantiate" clipped sum). Examples with c_i == 0 are left out (indexed away, not
    multiplied), so the non-finite gradient of a dropped example cannot reach the sum. Reads
    c on the host (free on CPU, where this path runs)."""
    B = per_example.shape[0]
    _check_factors(c, B, per_example)
    flat = per_example.flatten(1)
    keep = c != 0
    if not bool(keep.all()):
        flat, c = flat[keep], c[keep]
    return (c.unsqueeze(0) @ flat).reshape(per_example.shape[1:])


def _symmetric_padding_fits(geo: Conv2dGeometry) -> bool:
    """True when torch's own conv with padding (PH, PW) on both sides gives exactly H_out x
    W_out, so the framework can pad implicitly (no padded copy of x)."""
    h = (geo.H + 2 * geo.PH - geo.DH * (geo.KH - 1) - 1) // geo.SH + 1
    w = (geo.W + 2 * geo.PW - geo.DW * (geo.KW - 1) - 1) // geo.SW + 1
    return (h, w) == (geo.H_out, geo.W_out)


def _torch_clipped_weight_grad(x4, G4, c, geo: Conv2dGeometry) -> torch.Tensor:
    """sum_i c_i G_i^T U_i as ONE ordinary conv weight gradient of (c * G) and x (Book-Keeping).
    Examples with c_i == 0 are left out of both operands (selected away, not multiplied), so
    their non-finite values cannot leak; this reads c on the host (the CPU path)."""
    keep = c != 0
    if not bool(keep.all()):
        idx = keep.nonzero().squeeze(1)
        if idx.numel() == 0:
            return x4.new_zeros((geo.C_out, geo.D), dtype=torch.float32)
        x4, G4, c = x4.index_select(0, idx), G4.index_select(0, idx), c.index_select(0, idx)
    g = G4.float() * c.view(-1, 1, 1, 1)
    xs, pad = _conv_input(x4, geo)
    return _weight_grad(xs, g, geo, geo.groups, geo.C_out, pad).reshape(geo.C_out, geo.D)


__all__ = [
    "conv_geometry", "conv2d_weight_sq_norms", "conv2d_clipped_weight_grad", "conv2d_bias_grads",
    "conv2d_bias_sq_norms", "conv2d_clipped_bias_grad", "clipped_rows_sum", "unfold", "im2col",
    "per_example_weight_grads", "per_example_build", "per_example_build_for", "sq_rows", "clipped_sum_of_rows",
    "shifted_input_gram", "gram_method", "padded_positions",
]
