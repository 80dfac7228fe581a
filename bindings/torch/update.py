"""torch ops for the fused DP step: noise + normalisation + SGD / Adam / AdamW update in one pass
per parameter (kernels/update.py).

Ops (torch.library.custom_op; fake implementations for torch.compile):

* ``dpprims::noisy_sgd_update(param!, momentum_buffer!?, grad, seed, step, hyper, pair_offset,
  rank, nesterov, write_grad) -> Tensor``
* ``dpprims::noisy_adam_update(param!, exp_avg!, exp_avg_sq!, grad, seed, step, hyper,
  pair_offset, rank, decoupled, write_grad) -> Tensor``  (decoupled=True: AdamW)

Both compute g = (grad + std z) / normaliser with z exactly the noise of
``dpprims::gaussian_noise`` for the same (seed, step, pair_offset, rank), update the parameter and
its state in place with torch.optim's semantics, and return g when write_grad (else an empty
tensor). hyper: fp32[9] device array, layout ``dpprims.kernels.update.hyper_values``; seed int32[2],
step int32[1] (1-based for Adam's bias correction). Backends as in ``_backend``: Triton kernel on
CUDA and under the interpreter, else the same arithmetic in torch (bit-compatible on CPU).

User API: :func:`add_noise_and_step` over a parameter list.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from dpprims import noise as _nz
from dpprims import noise_cpu as _ncpu
from dpprims.kernels import update as _ku

from . import _backend
from ._backend import record
from .noise import (THREADED_MIN, _check_scalars, _cpu_pool, _seed_ints, _ufunc, as_seed_tensor, as_step_tensor,
                    gaussian_noise_torch)

__all__ = ["add_noise_and_step", "make_hyper"]


# ----------------------------------------------------------------------------- plain torch
def _adam_scalars_f64(step: Tensor, hyper: Tensor) -> tuple:
    """(lr / bc1, sqrt(bc2), 1 - lr wd) as float32, computed in fp64 as kernels/update.py does."""
    return _ku.adam_scalars_host(int(step.reshape(-1)[0].item()), hyper.tolist())


def _fused_cpu_ok(*ts) -> bool:
    """The numba fused update applies: numba present, CPU, fp32, contiguous (else the torch ops)."""
    return _ncpu.available() and all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32
                                                   and t.is_contiguous()) for t in ts)


def _update_torch(kind: int, param: Tensor, s1: Optional[Tensor], s2: Optional[Tensor], grad: Tensor,
                  seed: Tensor, step: Tensor, hyper: Tensor, pair_offset: int, rank: int, nesterov: bool,
                  grad_out: Optional[Tensor]) -> None:
    f32 = torch.float32
    if _fused_cpu_ok(param, s1, s2, grad, grad_out, hyper):
        # one pass per chunk: noise (dpprims.noise_cpu) + the kernel's update arithmetic, in place
        k0, k1 = _seed_ints(seed)
        threads, pool = _cpu_pool(param.numel())
        _ncpu.noisy_update(
            _ku.OPTIMIZER_NAMES[kind], *(
                None if t is None else t.detach().numpy() for t in (param, grad, s1, s2, grad_out)),
            hyper=hyper.tolist()[:_ku.N_HYPER], adam_scalars=None if kind == _ku.SGD else _adam_scalars_f64(step, hyper),
            nesterov=nesterov, k0=k0, k1=k1, step=int(step.reshape(-1)[0].item()) & 0xFFFFFFFF,
            stream_word=_nz.stream_word(rank), pair_offset=pair_offset,
            threads=threads, pool=pool)
        return
    z = gaussian_noise_torch(param.numel(), seed, step, pair_offset, rank).reshape(param.shape)
    std, norm, lr, b1, b2, eps, wd, omb1, omb2 = (hyper[i] for i in range(_ku.N_HYPER))
    g = (grad.to(f32) + std * z) / norm
    if grad_out is not None:
        grad_out.copy_(g)
    p = param.to(f32)
    if kind == _ku.SGD:
        d = g + wd * p
        if s1 is not None:
            buf = s1.to(f32) * b1 + d
            s1.copy_(buf)
            d = d + b1 * buf if nesterov else buf
        p = p - lr * d
    else:
        t = int(step.reshape(-1)[0].item())
        lr64, wd64 = float(lr), float(wd)
        bc1 = 1.0 - _ku.pow_f64_host(1.0 - float(omb1), t)
        bc2 = 1.0 - _ku.pow_f64_host(1.0 - float(omb2), t)
        step_size = torch.tensor(np.float32(lr64 / bc1))
        bc2_sqrt = torch.tensor(np.float32(math.sqrt(bc2)))
        if kind == _ku.ADAMW:
            p = p * torch.tensor(np.float32(1.0 - lr64 * wd64))
        else:
            g = g + wd * p
        m = s1.to(f32)
        m = m + omb1 * (g - m)
        v = s2.to(f32) * b2 + omb2 * g * g
        s1.copy_(m)
        s2.copy_(v)
        denom = _ufunc(np.sqrt, v) / bc2_sqrt + eps
        p = p - (step_size * m) / denom
    param.copy_(p)


def _cpu_segment(param: Tensor, s1: Optional[Tensor], s2: Optional[Tensor], grad: Tensor, threads: int, pool,
                 pair_offset: int, write_grad: bool):
    """add_noise_and_step's eager CPU path for one parameter: ``(segment, g)`` for
    dpprims.noise_cpu.noisy_update_many (the arguments ``_update_torch``'s numba branch passes to
    noisy_update, so the same bits), all the step's parameters in one call, without the
    custom-op dispatch (~20 us a parameter); ``g`` is the noisy-gradient buffer (or an empty
    tensor). None where it does not apply (then the op runs, with its own checks)."""
    n = param.numel()
    if n == 0 or not all(t is None or (t.shape == param.shape and t.is_contiguous()) for t in (grad, s1, s2)):
        return None
    if not param.is_contiguous() or not _fused_cpu_ok(param, s1, s2, grad):
        return None
    _nz.check_pair_range(pair_offset, n)
    record("noisy_update", param, "torch")  # its callers run on the plain-torch backend only
    grad_out = torch.empty_like(grad) if write_grad else None
    seg = tuple(None if t is None else t.detach().numpy() for t in (param, grad, s1, s2, grad_out))
    threads = threads if pool is not None or n >= THREADED_MIN else 1  # see noise._cpu_pool
    return seg + (pair_offset, threads), (grad_out if write_grad else grad.new_empty(0))


def _launch_update(kind: int, param: Tensor, s1: Optional[Tensor], s2: Optional[Tensor], grad: Tensor,
                   seed: Tensor, step: Tensor, hyper: Tensor, pair_offset: int, rank: int, nesterov: bool,
                   write_grad: bool) -> Tensor:
    for name, t in (("param", param), ("grad", grad), ("state", s1), ("state", s2)):
        if t is None:
            continue
        if t.shape != param.shape or t.device != param.device:
            raise ValueError(f"{name}: shape {tuple(t.shape)} on {t.device} != parameter {tuple(param.shape)} "
                             f"on {param.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (dpprims makes no silent copies)")
    _check_scalars(seed, step, hyper, param.device, n_scal=_ku.N_HYPER)
    n = param.numel()
    _nz.check_pair_range(pair_offset, n)
    backend = record("noisy_update", param)
    grad_out = torch.empty_like(grad) if write_grad else grad.new_empty(0)
    if n == 0:
        return grad_out
    if backend == "torch":
        _update_torch(kind, param, s1, s2, grad, seed, step, hyper, pair_offset, rank, nesterov,
                      grad_out if write_grad else None)
        return grad_out
    name = _ku.OPTIMIZER_NAMES[kind]
    spec = _ku.noisy_update_spec(n, name, nesterov=nesterov, has_state1=s1 is not None, write_grad=write_grad)
    d1 = s1 if s1 is not None else param  # dummies: never read or written (HAS_STATE1 / OPTIMIZER)
    d2 = s2 if s2 is not None else param
    dg = grad_out if write_grad else param
    _ku._noisy_update_kernel[spec.grid](
        grad, param, d1, d2, seed, step, hyper, n, int(pair_offset), _nz.stream_word(rank),
        param, d1, d2, dg, num_warps=spec.num_warps, **spec.constexprs)
    return grad_out


@torch.library.custom_op("dpprims::noisy_sgd_update", mutates_args=("param", "momentum_buffer"))
def _noisy_sgd_update_op(param: Tensor, momentum_buffer: Optional[Tensor], grad: Tensor, seed: Tensor,
                         step: Tensor, hyper: Tensor, pair_offset: int, rank: int, nesterov: bool,
                         write_grad: bool) -> Tensor:
    return _launch_update(_ku.SGD, param, momentum_buffer, None, grad, seed, step, hyper, pair_offset, rank,
                          nesterov, write_grad)


@_noisy_sgd_update_op.register_fake
def _(param, momentum_buffer, grad, seed, step, hyper, pair_offset, rank, nesterov, write_grad):
    return torch.empty_like(grad) if write_grad else grad.new_empty(0)


@torch.library.custom_op("dpprims::noisy_adam_update", mutates_args=("param", "exp_avg", "exp_avg_sq"))
def _noisy_adam_update_op(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, seed: Tensor,
                          step: Tensor, hyper: Tensor, pair_offset: int, rank: int, decoupled: bool,
                          write_grad: bool) -> Tensor:
    return _launch_update(_ku.ADAMW if decoupled else _ku.ADAM, param, exp_avg, exp_avg_sq, grad, seed, step,
                          hyper, pair_offset, rank, False, write_grad)


@_noisy_adam_update_op.register_fake
def _(param, exp_avg, exp_avg_sq, grad, seed, step, hyper, pair_offset, rank, decoupled, write_grad):
    return torch.empty_like(grad) if write_grad else grad.new_empty(0)


# ----------------------------------------------------------------------------- user API
def _init_opt_buffers(state: dict, params, kind: int, has_momentum: bool) -> None:
    """The optimizer buffers of ``state`` at the first step, zero-initialised like torch.optim:
    exp_avg / exp_avg_sq (Adam, AdamW), momentum_buffer (SGD with momentum)."""
    if ("exp_avg" in state or kind == _ku.SGD) and ("momentum_buffer" in state or not has_momentum):
        return  # every step after the first: nothing to create (and no no_grad context to enter)
    with torch.no_grad():
        if kind != _ku.SGD and "exp_avg" not in state:
            state["exp_avg"] = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]
            state["exp_avg_sq"] = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]
        if has_momentum and "momentum_buffer" not in state:
            state["momentum_buffer"] = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]


def _eager_cpu(params, seed, step) -> bool:
    """add_noise_and_step's whole-list CPU path applies: integer seed and step, eager (not traced),
    every parameter an fp32 CPU tensor on the plain-torch backend, numba present."""
    if isinstance(seed, Tensor) or isinstance(step, Tensor) or not params or torch.compiler.is_compiling():
        return False
    if not all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params):
        return False
    return _backend.backend_for(params[0]) == "torch" and _ncpu.available()


def _step_eager_cpu(params, state, kind, has_momentum, *, noise_std, normaliser, seed, step, rank, optimizer, lr,
                    momentum, nesterov, weight_decay, betas, eps, write_grad):
    """The step over the whole list in one dpprims.noise_cpu.noisy_update_many call, with the
    per-step scalars computed once in Python: the fp32 hyper values as make_hyper's tensor holds
    them (float(np.float32(v))), the seed words and step as the ops read them, Adam's scalars
    from those by kernels.update.adam_scalars_host; so the same arguments as the per-parameter op path,
    the same bits (each parameter's segment from ``_cpu_segment``). None (nothing done) where
    some parameter, grad or buffer is not one the fused path takes (not contiguous, another
    shape or dtype): then the op path runs, with its checks and errors. The optimizer buffers
    exist already (``_init_opt_buffers``)."""
    _nz.check_step(step)
    hyper = [float(np.float32(v)) for v in _ku.hyper_values(
        std=noise_std, normaliser=normaliser, lr=lr, momentum=momentum, betas=betas, eps=eps,
        weight_decay=weight_decay, optimizer=optimizer)]
    adam = None if kind == _ku.SGD else _ku.adam_scalars_host(int(step), hyper)
    k0, k1 = (w & 0xFFFFFFFF for w in _nz.seed_words(seed))
    threads, pool = _cpu_pool()
    segments, out = [], []
    s1s = state.get("momentum_buffer") if kind == _ku.SGD else state["exp_avg"]
    s2s = None if kind == _ku.SGD else state["exp_avg_sq"]
    if pool == "omp":
        got = _step_omp(params, state["pair_offsets"], s1s if (kind != _ku.SGD or has_momentum) else None, s2s,
                        kind, hyper, adam, nesterov, k0, k1, int(step) & 0xFFFFFFFF, _nz.stream_word(int(rank)),
                        threads, write_grad)
        if got is not None:
            return got
    for i, (p, off) in enumerate(zip(params, state["pair_offsets"])):
        if p.numel() == 0:
            out.append(torch.empty_like(p) if write_grad else p.new_empty(0))
            continue
        # no clipped sum reached it (grad None): zero, and it still gets noise and a step
        g = p.grad if p.grad is not None else torch.zeros_like(p, memory_format=torch.contiguous_format)
        s1 = s1s[i] if (kind != _ku.SGD or has_momentum) else None
        s2 = s2s[i] if s2s is not None else None
        got = _cpu_segment(p, s1, s2, g, threads, pool, off, write_grad)
        if got is None:  # a layout the fused path does not take: the op path, with its checks
            return None
        segments.append(got[0])
        out.append(got[1])
    _ncpu.noisy_update_many(_ku.OPTIMIZER_NAMES[kind], segments, hyper=hyper,
                            adam_scalars=adam, nesterov=bool(nesterov), k0=k0, k1=k1, step=int(step) & 0xFFFFFFFF,
                            stream_word=_nz.stream_word(int(rank)), pool=pool)
    return out


def _step_omp(params, offsets, s1s, s2s, kind, hyper, adam, nesterov, k0, k1, step, stream_word, threads,
              write_grad):
    """_step_eager_cpu on torch's OpenMP team through dpprims.noise_cpu.noisy_update_rows: the
    buffers by ``data_ptr()`` (no numpy views, ~100 us less Python a step for the default MLP),
    every one checked here (``_fused_cpu_ok`` and the parameter's shape) and kept alive in ``keep``
    for the call. Returns the noisy gradients (write_grad; else an empty list: add_noise_and_step
    returns None), or None where a buffer is not one the fused path takes (then _step_eager_cpu's
    per-segment checks and the op path decide), nothing done."""
    rows, out, keep = [], [], []
    for i, (p, off) in enumerate(zip(params, offsets)):
        n = p.numel()
        if n == 0:
            if write_grad:
                out.append(torch.empty_like(p))
            continue
        # no clipped sum reached it (grad None): zero, and it still gets noise and a step
        g = p.grad if p.grad is not None else torch.zeros_like(p, memory_format=torch.contiguous_format)
        s1 = s1s[i] if s1s is not None else None
        s2 = s2s[i] if s2s is not None else None
        go = torch.empty_like(g) if write_grad else None
        ts = (p, g, s1, s2, go)
        if not _fused_cpu_ok(*ts) or any(t is not None and t.shape != p.shape for t in ts[1:]):
            return None
        keep.append(ts)
        rows.append((off, n) + tuple(0 if t is None else t.data_ptr() for t in ts))
        if write_grad:
            out.append(go)
    if rows:
        record("noisy_update", params[0], "torch")
        if not _ncpu.noisy_update_rows(_ku.OPTIMIZER_NAMES[kind], rows, hyper=hyper, adam_scalars=adam,
                                       nesterov=bool(nesterov), k0=k0, k1=k1, step=step, stream_word=stream_word,
                                       threads=threads):
            return None
    del keep
    return out


def make_hyper(*, noise_std: float, normaliser: float, optimizer: str = "sgd", lr: float = 0.0,
               momentum: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
               device=None) -> Tensor:
    """The fp32[9] hyper-parameter array of the fused ops (layout: kernels/update.py)."""
    vals = _ku.hyper_values(std=noise_std, normaliser=normaliser, lr=lr, momentum=momentum, betas=betas,
                            eps=eps, weight_decay=weight_decay, optimizer=optimizer)
    return torch.tensor(vals, dtype=torch.float32, device=device)


def add_noise_and_step(params, *, state: dict, noise_std: float, normaliser: float, seed, step, rank: int = 0,
                       optimizer: str = "sgd", lr: float, momentum: float = 0.0, nesterov: bool = False,
                       weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
                       return_noisy_grads: bool = False):
    """One private optimizer step over ``params``, one fused kernel per parameter:

        g_i = (p_i.grad + noise_std * z_i) / normaliser,   then p_i <- optimizer step with g_i

    params: list of parameters (the same list, same order, every step) whose ``.grad`` holds the
        clipped gradient sum of the logical batch (None = zero: an empty Poisson batch still gets
        noise and a step). Parameters and grads must be contiguous; grads are read, not changed.
    state: a dict owned by the caller, ``{}`` at the first step; holds the optimizer buffers
        ('momentum_buffer' or 'exp_avg'/'exp_avg_sq' lists, zero-initialised like torch.optim),
        the pair offsets and the last step (checked: the parameter list must not change).
    noise_std: sigma * C.  normaliser: q * N (expected batch size; never the sampled size).
    seed: int in [0, 2^64) (e.g. dpprims.noise.secure_seed()) or int32[2] tensor.
    step: int in [1, 2^31) or int32[1] tensor: the 1-based optimizer step, which is also the noise
        stream. Integer steps must increase from call to call (a repeated step would repeat the
        noise); tensor steps (for CUDA graphs) are the caller's responsibility.
    rank: data-parallel rank (< 2^20) of the process drawing the noise.
    optimizer: "sgd" (lr, momentum, nesterov, weight_decay; dampening 0), "adam" (lr, betas, eps,
        L2 weight_decay) or "adamw" (decoupled weight_decay), all with torch.optim's semantics.
    return_noisy_grads: also return the list of g_i (for logging); otherwise returns None.

    Guarantee: the released g_i are the Gaussian mechanism with std noise_std on clipped sums of
    sensitivity C (noise drawn once per logical batch, from dpprims' generator: extra delta at
    most dpprims.noise.truncation_delta_bound(sigma, q, steps)). Edge cases: noise_std = 0 gives
    the non-private update (tests); parameters with no elements are skipped; non-finite clipped
    sums propagate (the clipping stage zeroes non-finite examples).
    """
    params = list(params)
    if optimizer not in _ku.OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(_ku.OPTIMIZERS)}, got {optimizer!r}")
    if nesterov and (optimizer != "sgd" or momentum <= 0):
        raise ValueError("nesterov needs optimizer='sgd' and momentum > 0")
    if not normaliser > 0:
        raise ValueError(f"normaliser (q * N) must be > 0, got {normaliser}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    numels = [p.numel() for p in params]
    if "pair_offsets" not in state:
        state["numels"] = numels
        state["pair_offsets"], state["total_pairs"] = _nz.pair_offsets(numels)
        state["optimizer"] = optimizer
        state["last_step"] = None
    elif state["numels"] != numels or state["optimizer"] != optimizer:
        raise ValueError("add_noise_and_step: the parameter list or optimizer changed since the state was created")
    if not isinstance(step, Tensor):
        _nz.check_step(step)
        if optimizer != "sgd" and int(step) < 1:
            raise ValueError(f"Adam's bias correction needs step >= 1, got {step}")
        if state["last_step"] is not None and int(step) <= state["last_step"]:
            raise ValueError(f"step {int(step)} <= previous step {state['last_step']}: the noise of a step "
                             "must never be reused")
    kind = _ku.OPTIMIZERS[optimizer]
    has_momentum = optimizer == "sgd" and momentum != 0
    _init_opt_buffers(state, params, kind, has_momentum)
    if _eager_cpu(params, seed, step):
        out = _step_eager_cpu(params, state, kind, has_momentum, noise_std=noise_std, normaliser=normaliser, seed=seed,
                              step=step, rank=rank, optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov,
                              weight_decay=weight_decay, betas=betas, eps=eps, write_grad=bool(return_noisy_grads))
        if out is not None:
            state["last_step"] = int(step)
            return out if return_noisy_grads else None
    with torch.no_grad():
        cache: dict = {}
        out = []
        compiling = torch.compiler.is_compiling()  # traced: the ops (their fakes) must be seen
        for i, (p, off) in enumerate(zip(params, state["pair_offsets"])):
            d = p.device
            if d not in cache:
                cache[d] = (as_seed_tensor(seed, d), as_step_tensor(step, d),
                            make_hyper(noise_std=noise_std, normaliser=normaliser, optimizer=optimizer, lr=lr,
                                       momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay,
                                       device=d))
            seed_t, step_t, hyper = cache[d]
            grad = p.grad if p.grad is not None else torch.zeros_like(p, memory_format=torch.contiguous_format)
            if d.type == "cpu" and not compiling and _backend.backend_for(p) == "torch" and _ncpu.available():
                key = ("direct", d)
                if key not in cache:  # the per-step scalars of the eager CPU path, read once
                    k0, k1 = _seed_ints(seed_t)
                    cache[key] = dict(hyper=hyper.tolist()[:_ku.N_HYPER], k0=k0, k1=k1,
                                      step=int(step_t.reshape(-1)[0].item()) & 0xFFFFFFFF, pool=_cpu_pool(),
                                      adam=None if kind == _ku.SGD else _adam_scalars_f64(step_t, hyper), segments=[])
                s1 = (state["momentum_buffer"][i] if has_momentum else None) if kind == _ku.SGD else state["exp_avg"][i]
                s2 = None if kind == _ku.SGD else state["exp_avg_sq"][i]
                got = _cpu_segment(p, s1, s2, grad, *cache[key]["pool"], off, bool(return_noisy_grads))
                if got is not None:
                    cache[key]["segments"].append(got[0])
                    out.append(got[1])
                    continue
            if kind == _ku.SGD:
                buf = state["momentum_buffer"][i] if has_momentum else None
                g = _noisy_sgd_update_op(p, buf, grad, seed_t, step_t, hyper, off, int(rank), bool(nesterov),
                                         bool(return_noisy_grads))
            else:
                g = _noisy_adam_update_op(p, state["exp_avg"][i], state["exp_avg_sq"][i], grad, seed_t, step_t,
                                          hyper, off, int(rank), kind == _ku.ADAMW, bool(return_noisy_grads))
            out.append(g)
        for key, sc in cache.items():
            if isinstance(key, tuple) and key[0] == "direct" and sc["segments"]:
                _ncpu.noisy_update_many(
                    _ku.OPTIMIZER_NAMES[kind], sc["segments"], hyper=sc["hyper"],
                    adam_scalars=sc["adam"], nesterov=bool(nesterov), k0=sc["k0"], k1=sc["k1"], step=sc["step"],
                    stream_word=_nz.stream_word(int(rank)), pool=sc["pool"][1])
    if not isinstance(step, Tensor):
        state["last_step"] = int(step)
    return out if return_noisy_grads else None
