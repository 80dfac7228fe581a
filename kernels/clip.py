"""Per-example clip factors from per-example squared gradient norms.

    n_i = sqrt(sum_l ||G_i^l||^2)
    flat (Abadi et al., Opacus):       c_i = min(1, C / (n_i + 1e-6))
    automatic (Bu et al., AUTO-S):     c_i = C / (n_i + gamma)

Privacy-relevant edge cases, decided here once for every engine:

* padding rows (mask 0) get c_i = 0: they contribute nothing to the clipped sum;
* a non-finite n_i (inf or NaN anywhere in example i's gradient) gets c_i = 0, so the example
  contributes nothing rather than poisoning the sum; the engines count and report these;
* C = 0 gives c_i = 0 for all i; C = inf with flat clipping gives c_i = 1 (no clipping);
  negative or NaN C is rejected by the bindings before any launch;
* an example with n_i = 0 gets c_i = 1 (flat) or C / gamma (automatic): its gradient is 0, so
  its contribution is 0 either way.

With c_i as above every contribution c_i * G_i has norm c_i * n_i <= C (flat: equality only
when n_i > C, and the 1e-6 keeps it strictly below; automatic: n_i / (n_i + gamma) < 1).

Rounding-aware factors (design (c) of docs/PRIVACY.md, HAS_SLACK): the engine passes per
example ``slack[0, i] = rho_i`` (sqrt of sum_l (u_l S_i^l)^2, the relative rounding term) and
``slack[1, i] = alpha_i`` (the absolute, subnormal-range term) of the layers whose clipped sum
rounds c_i g_t onto the input dtype. The factors become

    flat:       c_i = clamp((C - alpha_i) / (n_i + rho_i + 1e-6), 0, 1)
    automatic:  c_i = max(0, C - alpha_i) / (n_i + rho_i + gamma)

so that c_i n_i + c_i rho_i + alpha_i <= C, which bounds the rounded contribution (proof in
docs/PRIVACY.md). A non-finite rho_i or alpha_i gives c_i = 0 like a non-finite n_i; mask and
the C = 0 / inf rules are unchanged (C = inf: alpha is finite, so c_i = 1 for flat clipping).

``max_grad_norm`` is a one-element device array (a runtime value, not a compile-time constant).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._launch import LaunchSpec, block, cdiv

FLAT_EPS = 1e-6


@triton.jit
def _clip_factor_kernel(
    sq_norm_ptr, mask_ptr, slack_ptr, max_norm_ptr,
    B, gamma,
    factor_ptr, norm_ptr,
    HAS_MASK: tl.constexpr, HAS_SLACK: tl.constexpr, AUTOMATIC: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """factor[i] = c_i, norm[i] = n_i (module docstring); ``slack_ptr`` [2, B] fp32 (rho, alpha)
    is read only when HAS_SLACK (a dummy buffer otherwise), ``mask_ptr`` only when HAS_MASK."""
    pid = tl.program_id(0)
    offs = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    valid = offs < B
    sq = tl.load(sq_norm_ptr + offs, mask=valid, other=0.0).to(tl.float32)  # [BLOCK_B]
    n = tl.sqrt(sq)
    C = tl.load(max_norm_ptr).to(tl.float32)
    finite = (n == n) & (n < float("inf"))
    if HAS_SLACK:
        rho = tl.load(slack_ptr + offs, mask=valid, other=0.0).to(tl.float32)  # [BLOCK_B] relative term
        alpha = tl.load(slack_ptr + B + offs, mask=valid, other=0.0).to(tl.float32)  # [BLOCK_B] absolute term
        finite = finite & (rho == rho) & (rho < float("inf")) & (alpha == alpha) & (alpha < float("inf"))
        if AUTOMATIC:
            c = tl.maximum(C - alpha, 0.0) / (n + rho + gamma)
        else:
            c = tl.minimum(tl.maximum((C - alpha) / (n + rho + 1e-6), 0.0), 1.0)
    else:
        if AUTOMATIC:
            c = C / (n + gamma)
        else:
            c = tl.minimum(C / (n + 1e-6), 1.0)
    keep = finite
    if HAS_MASK:
        m = tl.load(mask_ptr + offs, mask=valid, other=0)
        keep = keep & (m != 0)
    c = tl.where(keep, c, 0.0)
    tl.store(factor_ptr + offs, c, mask=valid)
    tl.store(norm_ptr + offs, n, mask=valid)


def clip_factor_spec(B: int) -> LaunchSpec:
    bb = block(B, 1024, 4096)
    return LaunchSpec(grid=(cdiv(B, bb),), constexprs=dict(BLOCK_B=bb), num_warps=4)
