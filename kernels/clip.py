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

``max_grad_norm`` is a one-element device array (a runtime value, not a compile-time constant).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._launch import LaunchSpec, block, cdiv

FLAT_EPS = 1e-6


@triton.jit
def _clip_factor_kernel(
    sq_norm_ptr, mask_ptr, max_norm_ptr,
    B, gamma,
    factor_ptr, norm_ptr,
    HAS_MASK: tl.constexpr, AUTOMATIC: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    valid = offs < B
    sq = tl.load(sq_norm_ptr + offs, mask=valid, other=0.0).to(tl.float32)  # [BLOCK_B]
    n = tl.sqrt(sq)
    C = tl.load(max_norm_ptr).to(tl.float32)
    finite = (n == n) & (n < float("inf"))
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
