"""Fused DP noise + normalisation + optimizer update: one elementwise pass per parameter.

    g = (clipped_grad_sum + std * z) / normaliser       z: the generator of kernels/noise.py,
                                                           same (seed, step, pair_offset, rank)
                                                           -> the same z as _gaussian_noise_kernel
then, in place, exactly torch.optim's single-tensor update (dampening 0, maximize False,
amsgrad False), fp32 arithmetic, results cast to the buffers' dtypes on store:

    SGD    d = g + wd p;  if momentum buffer: buf = mu buf + d (buf starts at 0, so the first step
           gives buf = d as torch does);  d = d + mu buf (nesterov) or d = buf;  p = p - lr d
    Adam   g = g + wd p;  m = m + (1 - b1) (g - m);  v = b2 v + (1 - b2) g g;
           p = p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps),   bc_i = 1 - b_i^t
    AdamW  p = p (1 - lr wd), then Adam with wd = 0.

The bias corrections use the runtime step t (int32 device array, t >= 1, torch's state['step']
after its increment) and are computed once per program in fp64 by repeated squaring of
b_i = 1 - (1 - b_i) (the hyper array stores 1 - b_i as well, as torch rounds it separately).

Hyper-parameters are one fp32 device array (so schedules and CUDA graphs need no recompiles):
    [std, normaliser, lr, beta1 | momentum, beta2, eps, weight_decay, 1 - beta1, 1 - beta2]
(:func:`hyper_values`); its first two entries are the noise kernel's scal array. The optimizer
kind is a constexpr. param / state pointers come in twice (inputs, then outputs; torch passes the
same tensor, JAX aliases the buffers), and the noisy normalised gradient g can be written out
(WRITE_GRAD) for logging and tests.
"""
import triton
import triton.language as tl

from ._launch import LaunchSpec, block, cdiv
from .noise import _cast_for_store, _noise_block

SGD = 0
ADAM = 1
ADAMW = 2
OPTIMIZERS = {"sgd": SGD, "adam": ADAM, "adamw": ADAMW}
OPTIMIZER_NAMES = {k: name for name, k in OPTIMIZERS.items()}  # kind -> "sgd" | "adam" | "adamw"

H_STD, H_NORMALISER, H_LR, H_BETA1, H_BETA2, H_EPS, H_WEIGHT_DECAY, H_OMB1, H_OMB2 = range(9)
N_HYPER = 9


def hyper_values(*, std: float, normaliser: float, lr: float = 0.0, momentum: float = 0.0,
                 betas: tuple = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 optimizer: str = "sgd") -> list:
    """The hyper array's entries (Python floats; the binding turns them into an fp32 array)."""
    b1, b2 = (float(momentum), 0.0) if optimizer == "sgd" else (float(betas[0]), float(betas[1]))
    return [float(std), float(normaliser), float(lr), b1, b2, float(eps), float(weight_decay),
            1.0 - b1, 1.0 - b2]


def adam_scalars_host(t: int, hyper) -> tuple:
    """(lr / bc1, sqrt(bc2), 1 - lr wd) as float32 from the step t and the fp32 hyper values
    (a sequence of floats, layout above), computed in fp64 as the kernel does: the Adam scalars
    of the bindings' CPU paths (torch fused numba update, JAX host update), bit for bit the
    kernel's with or without x64. numpy doubles: a step <= 0 (outside the documented contract,
    e.g. traced) gives inf / NaN as the kernel does, not a Python exception."""
    import numpy as np

    f64 = np.float64
    lr, wd, omb1, omb2 = (f64(hyper[i]) for i in (H_LR, H_WEIGHT_DECAY, H_OMB1, H_OMB2))
    t = int(t)  # Python's >> and & on a negative int act on two's complement, as the kernel's int32
    with np.errstate(all="ignore"):
        bc1 = f64(1.0) - f64(pow_f64_host(float(f64(1.0) - omb1), t))
        bc2 = f64(1.0) - f64(pow_f64_host(float(f64(1.0) - omb2), t))
        return np.float32(lr / bc1), np.float32(np.sqrt(bc2)), np.float32(f64(1.0) - lr * wd)


def pow_f64_host(base: float, t: int) -> float:
    """:func:`_pow_f64` in Python doubles (the same squarings in the same order, so the same
    rounding): the Adam bias corrections of the bindings' CPU paths (torch plain, JAX host)."""
    acc = 1.0
    for i in range(31):
        if (t >> i) & 1:
            acc = acc * base
        base = base * base
    return acc


@triton.jit
def _pow_f64(base, t):
    """base ** t for an fp64 scalar base and an int32 scalar t >= 0 (31 squarings, fp64)."""
    acc = base * 0.0 + 1.0
    for i in tl.static_range(31):
        acc = tl.where(((t >> i) & 1) != 0, acc * base, acc)
        base = base * base
    return acc


@triton.jit
def _noisy_update_kernel(grad_ptr, param_ptr, state1_ptr, state2_ptr, seed_ptr, step_ptr, hyper_ptr,
                         n_elements, pair_offset, stream_word,
                         param_out_ptr, state1_out_ptr, state2_out_ptr, grad_out_ptr,
                         OPTIMIZER: tl.constexpr, NESTEROV: tl.constexpr, HAS_STATE1: tl.constexpr,
                         WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """grad: clipped gradient sum; state1: momentum buffer (SGD, HAS_STATE1) or exp_avg (Adam);
    state2: exp_avg_sq (Adam); unused pointers are dummies. All flat, contiguous, n_elements."""
    pid = tl.program_id(0).to(tl.int64)
    z = _noise_block(seed_ptr, step_ptr, pid, pair_offset, stream_word, BLOCK)  # [BLOCK] fp32
    std = tl.load(hyper_ptr + 0).to(tl.float32)  # H_STD
    normaliser = tl.load(hyper_ptr + 1).to(tl.float32)  # H_NORMALISER
    lr = tl.load(hyper_ptr + 2).to(tl.float32)  # H_LR
    beta1 = tl.load(hyper_ptr + 3).to(tl.float32)  # H_BETA1 (momentum for SGD)
    wd = tl.load(hyper_ptr + 6).to(tl.float32)  # H_WEIGHT_DECAY

    offs = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] int64
    mask = offs < n_elements
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) + std * z
    g = tl.div_rn(g, normaliser)
    if WRITE_GRAD:
        tl.store(grad_out_ptr + offs, _cast_for_store(g, grad_out_ptr), mask=mask)
    p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    if OPTIMIZER == 0:  # SGD
        d = g + wd * p
        if HAS_STATE1:
            buf = tl.load(state1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            buf = buf * beta1 + d
            tl.store(state1_out_ptr + offs, _cast_for_store(buf, state1_out_ptr), mask=mask)
            if NESTEROV:
                d = d + beta1 * buf
            else:
                d = buf
        p = p - lr * d
    else:  # Adam / AdamW
        beta2 = tl.load(hyper_ptr + 4).to(tl.float32)  # H_BETA2
        eps = tl.load(hyper_ptr + 5).to(tl.float32)  # H_EPS
        omb1 = tl.load(hyper_ptr + 7)  # H_OMB1: 1 - beta1
        omb2 = tl.load(hyper_ptr + 8)  # H_OMB2: 1 - beta2
        t = tl.load(step_ptr)
        bc1 = 1.0 - _pow_f64(1.0 - omb1.to(tl.float64), t)  # fp64 scalars
        bc2 = 1.0 - _pow_f64(1.0 - omb2.to(tl.float64), t)
        step_size = (lr.to(tl.float64) / bc1).to(tl.float32)
        bc2_sqrt = tl.sqrt(bc2).to(tl.float32)  # fp64 sqrt is IEEE (sqrt.rn.f64)
        if OPTIMIZER == 2:  # AdamW: decoupled decay
            decay = (1.0 - lr.to(tl.float64) * wd.to(tl.float64)).to(tl.float32)
            p = p * decay
        else:  # Adam: L2 term in the gradient
            g = g + wd * p
        m = tl.load(state1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(state2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = m + omb1.to(tl.float32) * (g - m)
        v = v * beta2 + omb2.to(tl.float32) * g * g
        tl.store(state1_out_ptr + offs, _cast_for_store(m, state1_out_ptr), mask=mask)
        tl.store(state2_out_ptr + offs, _cast_for_store(v, state2_out_ptr), mask=mask)
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p - tl.div_rn(step_size * m, denom)
    tl.store(param_out_ptr + offs, _cast_for_store(p, param_out_ptr), mask=mask)


def noisy_update_spec(n_elements: int, optimizer: str, *, nesterov: bool = False, has_state1: bool = False,
                      write_grad: bool = False) -> LaunchSpec:
    """Launch spec of ``_noisy_update_kernel`` (n_elements > 0). GPU: 1024 elements per program,
    4 warps (memory bound: 5-7 fp32 streams per element); interpreter: up to 2^16."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    BLOCK = block(n_elements, gpu_max=1024, interp_max=1 << 16, lo=16)
    kind = OPTIMIZERS[optimizer]
    return LaunchSpec(
        grid=(cdiv(n_elements, BLOCK),),
        constexprs={"OPTIMIZER": kind, "NESTEROV": bool(nesterov) and kind == SGD,
                    "HAS_STATE1": bool(has_state1) or kind != SGD, "WRITE_GRAD": bool(write_grad),
                    "BLOCK": BLOCK},
        num_warps=4,
    )
