"""JAX op for the fused DP step (kernels/update.py): noise + normalisation + SGD / Adam / AdamW
update in one elementwise pass per parameter, on the three paths of ``_call``.

    g = (clipped_sum + noise_std * z) / normaliser     z: exactly ``gaussian_noise``'s numbers for
                                                          the same (seed, step, pair offset, rank)
    then torch.optim's single-tensor update (dampening 0, maximize False, amsgrad False):
    SGD    d = g + wd p;  buf = mu buf + d (buf starts at 0);  d = d + mu buf (nesterov) or buf;
           p = p - lr d
    Adam   g = g + wd p;  m = m + (1 - b1)(g - m);  v = b2 v + (1 - b2) g g;
           p = p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps),   bc_i = 1 - b_i^t, t = step >= 1
    AdamW  p = p (1 - lr wd), then Adam with wd = 0.

fp32 arithmetic, results cast (round to nearest even) to the buffers' dtypes. Runtime values are
device arrays (seed int32[2], step int32[1], the fp32[9] hyper array of ``kernels/update.py``), so
``jax.jit`` of a training step never recompiles for a new step, seed or learning rate.

Paths:

* ``"jax-triton"``: ``_noisy_update_kernel`` with ``noisy_update_spec``; the parameter and its
  optimizer state are aliased to the kernel's outputs (``input_output_aliases``), so under
  ``jax.jit(..., donate_argnums=...)`` the update is in place.
* ``"interpreter"``: the same kernel, spec and argument list in Triton's CPU interpreter.
* ``"jnp"``: the kernel's arithmetic operation for operation in jnp, with XLA's result-changing
  rewrites blocked (``noise.fp32_exact``, ``noise.div_rn``), all leaves in one jitted function.
  Its noise is one draw of the generator over the leaves' consecutive pair ranges, sliced per
  leaf (the same numbers as one draw per leaf; a single Philox loop in the compiled program,
  at most 2^32 pairs per step), bit for bit the kernel's with ``noise.LIBM`` = numpy (the CPU
  default). Adam's bias
  corrections are fp64 scalars as in the kernel when x64 is enabled - then the jnp path equals the
  interpreter (and the torch plain path) bit for bit on CPU; without x64 they are computed in fp32
  as -expm1(t log1p(-(1 - b))) (a few fp32 ulp in lr / bc1 and sqrt(bc2)).
  Optionally (``HOST_UPDATE`` / ``DPPRIMS_JAX_HOST_UPDATE=1``; off by default, see there), where
  the noise runs on the host anyway (LIBM resolves to "host": a CPU with numba) and every buffer is
  fp32, the whole update - noise and optimizer arithmetic of all leaves - is instead ONE
  ``buffer_callback`` into ``dpprims.noise_cpu.noisy_update`` (the torch plain path's numba code),
  in place on the aliased parameter / state buffers (:func:`_update_host`): the same numbers, with
  Adam's bias corrections in fp64 as the kernel (with or without x64).

Parameters are any pytree; its leaves, in ``jax.tree_util.tree_leaves`` order (dict keys sorted,
sequences in order), are the parameter list. Leaf i gets noise pairs
``dpprims.noise.pair_offsets([leaf.size for leaf in leaves])[0][i]`` - the same numbers that the
torch ``add_noise_and_step`` draws when given the same arrays in the same order.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dpprims import noise as _nz
from dpprims import noise_cpu as _ncpu
from dpprims.kernels import update as _ku

from . import _call
from . import noise as _jn
from ._call import KernelCall, nondifferentiable
from .noise import _is_traced, _noise_z, as_seed_array, as_step_array, div_rn, fp32_exact

__all__ = ["noisy_update", "init_opt_state", "make_hyper", "noisy_update_leaf", "OPTIMIZERS"]

OPTIMIZERS = tuple(_ku.OPTIMIZERS)
_F32 = jnp.float32
_M32 = 0xFFFFFFFF
_STATE_KEYS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq")}


# ----------------------------------------------------------------------------- state and hyper
def _check_optimizer(optimizer: str) -> str:
    if optimizer not in _ku.OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(_ku.OPTIMIZERS)}, got {optimizer!r}")
    return optimizer


def _is_zero(v) -> bool:
    return not _is_traced(v) and float(np.asarray(v).reshape(())) == 0.0


def init_opt_state(params, optimizer: str = "sgd", *, momentum=0.0) -> dict:
    """Zero optimizer state for ``params`` (torch.optim's initial state), a dict of pytrees shaped
    like ``params``, each buffer in its parameter's dtype:

    "sgd": ``{}`` when ``momentum`` is 0, else ``{"momentum_buffer": zeros}``;
    "adam" / "adamw": ``{"exp_avg": zeros, "exp_avg_sq": zeros}``.
    """
    _check_optimizer(optimizer)
    if optimizer == "sgd" and _is_zero(momentum):
        return {}
    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params)
    return {k: zeros for k in _STATE_KEYS[optimizer]}


def _hyper_entry(v, name):
    if _is_traced(v) or isinstance(v, (jax.Array, np.ndarray)):
        a = jnp.asarray(v)
        if a.size != 1:
            raise ValueError(f"{name} must be a scalar, got shape {a.shape}")
        return a.reshape(())
    return float(v)


def make_hyper(*, noise_std, normaliser, optimizer: str = "sgd", lr=0.0, momentum=0.0, betas=(0.9, 0.999),
               eps=1e-8, weight_decay=0.0):
    """The fp32[9] hyper-parameter array of the kernel (layout ``kernels/update.py::hyper_values``).
    Python floats go through ``hyper_values`` (1 - beta in double, then fp32, as torch); any entry
    may instead be a scalar array (traced under jit, e.g. a learning-rate schedule), then 1 - beta
    is computed in the array's precision."""
    _check_optimizer(optimizer)
    vals = dict(std=noise_std, normaliser=normaliser, lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay)
    vals = {k: _hyper_entry(v, k) for k, v in vals.items()}
    b = tuple(_hyper_entry(x, "betas") for x in betas)
    if len(b) != 2:
        raise ValueError(f"betas must be a pair, got {betas!r}")
    if all(isinstance(v, float) for v in list(vals.values()) + list(b)):
        return jnp.asarray(np.array(_ku.hyper_values(std=vals["std"], normaliser=vals["normaliser"], lr=vals["lr"],
                                                     momentum=vals["momentum"], betas=b, eps=vals["eps"],
                                                     weight_decay=vals["weight_decay"], optimizer=optimizer),
                                    dtype=np.float32))
    b1, b2 = (vals["momentum"], 0.0) if optimizer == "sgd" else b
    entries = [vals["std"], vals["normaliser"], vals["lr"], b1, b2, vals["eps"], vals["weight_decay"], 1.0 - b1,
               1.0 - b2]
    return jnp.stack([jnp.asarray(e).astype(_F32).reshape(()) for e in entries])


# ----------------------------------------------------------------------------- the jnp update
def _pow_f64(base, t):
    """kernels/update.py::_pow_f64: base ** t by 31 conditional squarings (fp64 scalar base,
    int32 scalar t >= 0), the same operations in the same order."""
    acc = base * 0.0 + 1.0
    for i in range(31):
        acc = jnp.where(((t >> i) & 1) != 0, acc * base, acc)
        base = base * base
    return acc


def _adam_scalars(step, hyper, x64: bool):
    """(lr / bc1, sqrt(bc2), 1 - lr wd) as fp32 scalars: fp64 as the kernel when x64 is enabled,
    else fp32 via expm1 / log1p (each within a few fp32 ulp of the fp64 value)."""
    t = step.reshape(1)[0].astype(jnp.int32)
    lr, wd, omb1, omb2 = hyper[_ku.H_LR], hyper[_ku.H_WEIGHT_DECAY], hyper[_ku.H_OMB1], hyper[_ku.H_OMB2]
    if x64:
        f64 = jnp.float64
        bc1 = 1.0 - _pow_f64(1.0 - omb1.astype(f64), t)
        bc2 = 1.0 - _pow_f64(1.0 - omb2.astype(f64), t)
        lr64, wd64 = lr.astype(f64), wd.astype(f64)
        prod = lr64 * wd64  # kept out of the subtraction below (no FMA: the kernel rounds it)
        prod = lax.bitcast_convert_type(lax.bitcast_convert_type(prod, jnp.uint64)
                                        | (prod != prod).astype(jnp.uint64), f64)
        return ((lr64 / bc1).astype(_F32), jnp.sqrt(bc2).astype(_F32), (1.0 - prod).astype(_F32))
    tf = t.astype(_F32)
    bc1 = -jnp.expm1(tf * jnp.log1p(-omb1))
    bc2 = -jnp.expm1(tf * jnp.log1p(-omb2))
    return lr / bc1, jnp.sqrt(bc2), 1.0 - fp32_exact(lr * wd)


@functools.partial(jax.jit, static_argnames=("offsets", "kind", "nesterov", "write_grad", "libm", "x64"))
def _update_jnp(params, grads, s1s, s2s, seed, step, hyper, words, *, offsets: tuple, kind: int, nesterov: bool,
                write_grad: bool, libm: str, x64: bool):
    """The kernel's update in jnp on lists of arrays of any shapes (s1s / s2s entries None where
    absent; each leaf's elements in row-major order are the kernel's flat elements); returns lists
    (params, s1s, s2s, gs) with those shapes (gs entries None unless write_grad). The leaves keep
    their shapes and each leaf's noise slice is reshaped to it: flattening the leaves instead made
    XLA:CPU split the update into more fusions and, with donated buffers, copy the parameter and
    state first (MLP 784x256 leaf: 0.55 vs 0.29 ms a step, donated).

    The noise of all leaves is ONE draw of the pairs [offsets[0], end): the leaves' pair ranges are
    consecutive (dpprims.noise.pair_offsets), so leaf i's z is that stream's slice at
    2 (offsets[i] - offsets[0]) - the same numbers as one draw per leaf (the generator is a
    function of the pair index only), but a single Philox loop in the compiled program instead of
    one per leaf. words: ``noise.noise_words(offsets[0], rank)``."""
    sizes = [math.prod(p.shape) for p in params]
    ends = [o + (n + 1) // 2 for o, n in zip(offsets, sizes)]
    z_all = _noise_z(seed, step, words, n=2 * (max(ends) - offsets[0]), libm=libm)
    std, norm, lr, b1 = hyper[_ku.H_STD], hyper[_ku.H_NORMALISER], hyper[_ku.H_LR], hyper[_ku.H_BETA1]
    wd, b2, eps = hyper[_ku.H_WEIGHT_DECAY], hyper[_ku.H_BETA2], hyper[_ku.H_EPS]
    omb1, omb2 = hyper[_ku.H_OMB1], hyper[_ku.H_OMB2]
    if kind != _ku.SGD:
        step_size, bc2_sqrt, decay = _adam_scalars(step, hyper, x64)
    r = fp32_exact
    out = ([], [], [], [])
    for param, grad, s1, s2, off, n in zip(params, grads, s1s, s2s, offsets, sizes):
        start = 2 * (off - offsets[0])
        z = z_all[start:start + n].reshape(param.shape)
        g = div_rn(grad.astype(_F32) + r(std * z), norm)
        g_out = g.astype(grad.dtype) if write_grad else None
        p = param.astype(_F32)
        if kind == _ku.SGD:
            d = g + r(wd * p)
            if s1 is not None:
                buf = r(s1.astype(_F32) * b1) + d
                s1 = buf.astype(s1.dtype)
                d = d + r(b1 * buf) if nesterov else buf
            p = p - r(lr * d)
        else:
            if kind == _ku.ADAMW:
                p = r(p * decay)  # the product stays out of the final subtraction
            else:
                g = g + r(wd * p)
            m = s1.astype(_F32)
            m = m + r(omb1 * (g - m))
            v = r(s2.astype(_F32) * b2) + r(r(omb2 * g) * g)
            s1, s2 = m.astype(s1.dtype), v.astype(s2.dtype)
            denom = div_rn(jnp.sqrt(v), bc2_sqrt) + eps
            p = p - (step_size * m) / denom
        for lst, val in zip(out, (p.astype(param.dtype), s1, s2, g_out)):
            lst.append(val)
    return out


# ----------------------------------------------------------------------------- the host update
try:  # in place on XLA's buffers from Python (JAX >= 0.7; experimental API)
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # pragma: no cover - older JAX: the XLA update above runs instead
    _buffer_callback = None


HOST_UPDATE = os.environ.get("DPPRIMS_JAX_HOST_UPDATE", "0").strip() == "1"
"""``DPPRIMS_JAX_HOST_UPDATE=1``: the jnp path's fp32 update runs as one host callback
(:func:`_update_host`) where the noise runs on the host anyway (LIBM resolves to "host"). Off by
default: the XLA update (``_update_jnp``) draws the noise in a callback that depends on nothing but
(seed, step), so XLA's CPU runtime runs it concurrently with the clipping pass, while the fused
callback must wait for the clipped sums. Measured in one process on the 2-core machine (each
variant traced afresh, min of 500 steps, load ~3.6; process CPU time in brackets): MLP 784-256-10
B=256 DP step 1.38 ms [2.31] with the XLA update (host noise into XLA's buffer) vs 1.79 ms [2.51]
fused, non-private 0.83 ms; ResNet-18-CIFAR w64 B=32 (load ~6) [1721 vs 1795 ms CPU]. Since the
leaves reach the callback unflattened (no copies into and out of the aliased buffers) and the
fused kernels no longer write z, the two are even on the MLP (median of 600 steps each, the
variants alternating in one process: host 2.31 ms, XLA 2.33 ms, non-private 1.51 ms), so the
default stays. Read at trace time. The same numbers either way (x64 on; without x64 the XLA
update's Adam bias corrections are fp32 approximations, the fused one's fp64)."""


def _host_ok(params, grads, s1s, s2s) -> bool:
    """The host update applies: ``HOST_UPDATE``, ``buffer_callback`` exists and every buffer is
    float32 (what ``dpprims.noise_cpu.noisy_update`` computes on; bf16 / fp64 buffers take
    ``_update_jnp``)."""
    return HOST_UPDATE and _buffer_callback is not None and all(
        a is None or jnp.result_type(a) == jnp.float32 for lst in (params, grads, s1s, s2s) for a in lst)


_adam_scalars_host = _ku.adam_scalars_host  # (t, fp32 hyper values) -> the kernel's Adam scalars


def _update_host(params, grads, s1s, s2s, seed, step, hyper, *, offsets: tuple, kind: int, rank: int,
                 nesterov: bool, write_grad: bool):
    """The fused update of all (float32, flat) leaves in ONE host callback into
    ``dpprims.noise_cpu.noisy_update`` (numba; the torch plain path's code): per noise chunk, the
    noise and the kernel's update arithmetic in one pass, in place.

    ``jax.experimental.buffer_callback`` hands XLA's buffers to Python: the parameters and the
    optimizer state are aliased to the outputs (``input_output_aliases``), so under
    ``jax.jit(..., donate_argnums=...)`` the update writes into the donated buffers with no copy
    (without donation XLA copies the inputs first: the caller's arrays are never modified), and z is
    never materialised in XLA. Against ``_update_jnp`` (the noise in one callback, then the update
    as XLA loops) this saves the noise vector's round trip through memory, one XLA pass per leaf
    and the callback's result copy.

    Privacy-relevant, unchanged: leaf i draws exactly the pairs [offsets[i], offsets[i] + ceil(n_i / 2))
    of the stream (seed, step, stream_word(rank)) - the numbers of one ``noisy_update_spec`` kernel
    launch per leaf at those pair offsets, bit for bit (numpy's float32 log / cos / sin, as the
    interpreter) - and g = (clipped_sum + std z) / normaliser with every fp32 operation of the kernel
    in its order. Adam's bias corrections are computed in fp64 on the host as in the kernel (with or
    without x64). noise_std, normaliser and lr stay runtime values (the hyper array)."""
    L = len(params)
    name = _ku.OPTIMIZER_NAMES[kind]
    stream = _nz.stream_word(rank)
    have1 = [s is not None for s in s1s]
    have2 = [s is not None for s in s2s]
    # flat inputs: seed, step, hyper, params..., grads..., present s1s..., present s2s...
    ins = [seed, step, hyper, *params, *grads, *[s for s in s1s if s is not None],
           *[s for s in s2s if s is not None]]
    sds = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
    outs = [sds(p) for p in params] + [sds(s) for s in s1s if s is not None] + \
        [sds(s) for s in s2s if s is not None] + ([sds(g) for g in grads] if write_grad else [])
    n1, n2 = sum(have1), sum(have2)
    aliases = {3 + i: i for i in range(L)}  # params -> their outputs
    aliases.update({3 + 2 * L + j: L + j for j in range(n1 + n2)})  # optimizer state -> its outputs

    def host(ctx, out, seed, step, hyper, *flat):
        del ctx
        gs = flat[L:2 * L]
        k0, k1 = (int(w) & _M32 for w in np.asarray(seed).reshape(-1)[:2])
        t = int(np.asarray(step).reshape(-1)[0])
        h = [float(x) for x in np.asarray(hyper).astype(np.float32).reshape(-1)[:_ku.N_HYPER]]
        adam = None if kind == _ku.SGD else _adam_scalars_host(t, h)
        po, so = out[:L], iter(out[L:L + n1 + n2])
        s1o = [next(so) if h1 else None for h1 in have1]
        s2o = [next(so) if h2 else None for h2 in have2]
        go = out[L + n1 + n2:] if write_grad else [None] * L
        # the aliased outputs hold the parameter / state values on entry; updated in place, all
        # leaves in one noisy_update_many call (contiguous small leaves share noise chunks)
        segs = [tuple(None if b is None else np.asarray(b) for b in (po[i], gs[i], s1o[i], s2o[i], go[i]))
                + (offsets[i], _jn._threads(np.asarray(po[i]).size)) for i in range(L)]
        _ncpu.noisy_update_many(name, segs, hyper=h, adam_scalars=adam, nesterov=nesterov, k0=k0, k1=k1,
                                step=t & _M32, stream_word=stream)

    res = _buffer_callback(host, outs, input_output_aliases=aliases, vmap_method="sequential")(*ins)
    new_p, rest = list(res[:L]), iter(res[L:L + n1 + n2])
    new_s1 = [next(rest) if h1 else None for h1 in have1]
    new_s2 = [next(rest) if h2 else None for h2 in have2]
    gs = list(res[L + n1 + n2:]) if write_grad else [None] * L
    return new_p, new_s1, new_s2, gs


# ----------------------------------------------------------------------------- kernel calls
def _check_leaf(kind: int, optimizer: str, param, grad, state1, state2):
    if kind != _ku.SGD and (state1 is None or state2 is None):
        raise ValueError(f"{optimizer} needs exp_avg and exp_avg_sq (init_opt_state)")
    shape = tuple(jnp.shape(param))
    for name, t in (("grad", grad), ("state1", state1), ("state2", state2)):
        if t is not None and tuple(jnp.shape(t)) != shape:
            raise ValueError(f"{name} shape {tuple(jnp.shape(t))} != parameter shape {shape}")
    for name, t in (("param", param), ("grad", grad), ("state1", state1), ("state2", state2)):
        if t is not None and not jnp.issubdtype(jnp.result_type(t), jnp.floating):
            raise ValueError(f"{name} must be floating point, got {jnp.result_type(t)}")


def _update_leaves(params, grads, s1s, s2s, seed, step, hyper, *, kind: int, offsets, rank: int, nesterov: bool,
                   write_grad: bool):
    """Fused updates of several parameter arrays (any shapes) with pair offsets ``offsets``
    (consecutive ranges: pair_offsets of the list, or one leaf). Returns lists (params, s1s, s2s, gs)
    with the input shapes; zero-size leaves are passed through."""
    shapes = [tuple(jnp.shape(p)) for p in params]
    live = [i for i, sh in enumerate(shapes) if math.prod(sh) > 0]
    res = [list(params), list(s1s), list(s2s),
           [jnp.zeros(sh, jnp.result_type(g)) if write_grad else None for sh, g in zip(shapes, grads)]]
    if not live:
        return res

    # the leaves keep their shapes up to the path that needs them flat: reshaping them here made
    # XLA copy every leaf into and out of the host update's in-place (aliased) buffers
    arrays = tuple([None if lst[i] is None else jnp.asarray(lst[i]) for i in live] for lst in (params, grads, s1s, s2s))
    outs = nondifferentiable("noisy_update", _update_arrays, seed, step, hyper, *arrays, kind=kind,
                             offsets=tuple(int(offsets[i]) for i in live), rank=int(rank), nesterov=bool(nesterov),
                             write_grad=bool(write_grad))
    for k, i in enumerate(live):
        for lst, o in zip(res, outs):
            if o[k] is not None:
                lst[i] = o[k]
    return res


def _flat(t):
    return None if t is None else t.reshape(-1)


def _shaped(lists, shapes):
    return tuple([None if o is None else o.reshape(sh) for o, sh in zip(lst, shapes)] for lst in lists)


def _update_arrays(seed, step, hyper, params, grads, s1s, s2s, *, kind, offsets, rank, nesterov, write_grad):
    """The update of non-empty leaves of any shapes (row-major; the host update takes them as they
    are, the XLA update and the kernels flattened); returns lists with the leaves' shapes."""
    shapes = [p.shape for p in params]

    def plain(seed, step, hyper, params, grads, s1s, s2s):
        libm = _jn._libm()
        if libm == "host" and _host_ok(params, grads, s1s, s2s):
            return _update_host(params, grads, s1s, s2s, seed, step, hyper, offsets=offsets, kind=kind, rank=rank,
                                nesterov=nesterov, write_grad=write_grad)
        return _shaped(_update_jnp(params, grads, s1s, s2s, seed, step, hyper, _jn.noise_words(offsets[0], rank), offsets=offsets,
                                   kind=kind, nesterov=nesterov, write_grad=write_grad, libm=libm,
                                   x64=bool(jax.config.jax_enable_x64)), shapes)

    def kernel(path, seed, step, hyper, params, grads, s1s, s2s):
        out = ([], [], [], [])
        for leaf in zip(params, grads, s1s, s2s, offsets):
            for lst, val in zip(out, _kernel_leaf(path, *(_flat(t) for t in leaf[:4]), leaf[4], seed, step, hyper,
                                                  kind=kind, rank=rank, nesterov=nesterov, write_grad=write_grad)):
                lst.append(val)
        return _shaped(out, shapes)

    return _call.dispatch("noisy_update", (seed, step, hyper, params, grads, s1s, s2s), plain, kernel)


def _kernel_leaf(path, param, grad, s1, s2, pair_offset, seed, step, hyper, *, kind, rank, nesterov, write_grad):
    """One launch of ``_noisy_update_kernel`` (jax-triton or interpreter) on flat arrays."""
    n = param.shape[0]
    name = _ku.OPTIMIZER_NAMES[kind]
    spec = _ku.noisy_update_spec(n, name, nesterov=nesterov, has_state1=s1 is not None, write_grad=write_grad)
    dummy = jnp.zeros((1,), _F32)  # HAS_STATE1 / OPTIMIZER / WRITE_GRAD off: never read or written

    def sds(a):
        return jax.ShapeDtypeStruct(a.shape, a.dtype)

    d1 = s1 if s1 is not None else dummy
    d2 = s2 if s2 is not None else dummy
    call = KernelCall(
        _ku._noisy_update_kernel, spec.grid,
        inputs=dict(grad_ptr=grad, param_ptr=param, state1_ptr=d1, state2_ptr=d2, seed_ptr=seed, step_ptr=step,
                    hyper_ptr=hyper, n_elements=n, pair_offset=int(pair_offset), stream_word=_nz.stream_word(rank)),
        outputs=dict(param_out_ptr=sds(param), state1_out_ptr=sds(d1), state2_out_ptr=sds(d2),
                     grad_out_ptr=sds(grad) if write_grad else sds(dummy)),
        constexprs=dict(spec.constexprs), num_warps=spec.num_warps, name="noisy_update")
    # the buffers the kernel updates in place (dummies are not aliased)
    aliases = {"param_ptr": "param_out_ptr"}
    if s1 is not None:
        aliases["state1_ptr"] = "state1_out_ptr"
    if s2 is not None:
        aliases["state2_ptr"] = "state2_out_ptr"
    outs = _launch_aliased(call, path, aliases)
    return (outs["param_out_ptr"], outs["state1_out_ptr"] if s1 is not None else None,
            outs["state2_out_ptr"] if s2 is not None else None, outs["grad_out_ptr"] if write_grad else None)


def noisy_update_leaf(param, grad, state1, state2, seed, step, hyper, *, optimizer: str, pair_offset: int,
                      rank: int = 0, nesterov: bool = False, write_grad: bool = False):
    """The fused update of one parameter array (any shape; flattened row-major) whose noise pairs
    start at ``pair_offset``: returns (param, state1, state2, g), g the noisy normalised gradient
    when ``write_grad`` (else None). state1: momentum buffer (SGD; None = no momentum) or exp_avg;
    state2: exp_avg_sq (Adam) or None. seed int32[2], step int32[1], hyper fp32[9] arrays
    (:func:`as_seed_array`, :func:`as_step_array`, :func:`make_hyper`)."""
    _check_optimizer(optimizer)
    kind = _ku.OPTIMIZERS[optimizer]
    param, grad = jnp.asarray(param), jnp.asarray(grad)
    _check_leaf(kind, optimizer, param, grad, state1, state2)
    if kind == _ku.SGD:
        state2 = None
    _nz.check_pair_range(pair_offset, math.prod(param.shape))
    _nz.stream_word(rank)
    res = _update_leaves([param], [grad], [state1], [state2], seed, step, hyper, kind=kind, offsets=[pair_offset],
                         rank=rank, nesterov=nesterov, write_grad=write_grad)
    return tuple(r[0] for r in res)


def _launch_aliased(call: KernelCall, path: str, aliases: dict) -> dict:
    """``_call.launch`` with ``input_output_aliases`` on the jax-triton path (by parameter name;
    jax-triton counts array arguments only). The interpreter path needs no aliasing."""
    return _call.launch(call, path, aliases=aliases)


# ----------------------------------------------------------------------------- user API
def noisy_update(params, clipped_sums, opt_state, *, noise_std, normaliser, seed, step, rank: int = 0,
                 optimizer: str = "sgd", lr, momentum=0.0, nesterov: bool = False, weight_decay=0.0,
                 betas=(0.9, 0.999), eps=1e-8, return_noisy_grads: bool = False):
    """One private optimizer step over the pytree ``params``, one fused kernel per leaf:

        g_i = (clipped_sums_i + noise_std * z_i) / normaliser,   then p_i <- optimizer step with g_i

    Returns ``(new_params, new_opt_state)`` (plus the pytree of g_i when ``return_noisy_grads``).

    params: pytree of floating arrays; leaf order = ``jax.tree_util.tree_leaves(params)``, which
        fixes each leaf's noise pairs (``dpprims.noise.pair_offsets`` over the leaf sizes: the same
        as torch's ``add_noise_and_step`` on the same arrays in the same order).
    clipped_sums: pytree of the same structure and shapes (the clipped gradient sum of the
        logical batch), or None for an empty Poisson batch: it still gets its noise and its step.
    opt_state: from :func:`init_opt_state` (same ``optimizer``; for SGD its momentum buffer decides
        whether momentum is used - a nonzero ``momentum`` without one is an error).
    noise_std: sigma * C. normaliser: q * N, the expected batch size (never the sampled one).
    seed: int in [0, 2^64) (e.g. dpprims.noise.secure_seed()) or int32[2] array.
    step: int in [1, 2^31) or a one-element int array (traced under jit): the 1-based optimizer step,
        which is also the noise stream. Never reuse a (seed, step, rank) for two updates.
    rank: data-parallel rank (< 2^20) of the process drawing the noise (static).
    optimizer: "sgd" (lr, momentum, nesterov, weight_decay; dampening 0), "adam" (L2 weight_decay)
        or "adamw" (decoupled weight_decay), torch.optim's semantics. Hyper-parameters may be
        Python floats or scalar arrays (traced: schedules without recompiles).

    Guarantee: the released g_i are the Gaussian mechanism with std noise_std on clipped sums of
    sensitivity C (extra delta of the generator's truncation at most
    dpprims.noise.truncation_delta_bound(sigma, q, steps)). Edge cases: noise_std = 0 gives the
    non-private update; empty leaves are returned unchanged; non-finite clipped sums propagate.
    Checks that need concrete values (step range, Adam's step >= 1, noise_std >= 0,
    normaliser > 0) are skipped for traced values: under jit they are the caller's contract.
    jit-compatible; under ``jax.jit(..., donate_argnums=...)`` the jax-triton path updates in place.
    """
    _check_optimizer(optimizer)
    kind = _ku.OPTIMIZERS[optimizer]
    if nesterov and (kind != _ku.SGD or (not _is_traced(momentum) and not float(momentum) > 0)):
        raise ValueError("nesterov needs optimizer='sgd' and momentum > 0")
    for name, v, ok, what in (("normaliser", normaliser, lambda x: x > 0, "> 0"),
                              ("noise_std", noise_std, lambda x: x >= 0, ">= 0")):
        if not _is_traced(v):
            f = float(np.asarray(v).reshape(()))
            if not (math.isfinite(f) and ok(f)):
                raise ValueError(f"{name} must be finite and {what}, got {f!r}")
    seed_a = as_seed_array(seed)
    step_a = as_step_array(step)
    if kind != _ku.SGD and not _is_traced(step_a) and int(np.asarray(step_a)[0]) < 1:
        raise ValueError(f"Adam's bias correction needs step >= 1, got {int(np.asarray(step_a)[0])}")

    leaves, treedef = jax.tree_util.tree_flatten(params)
    if clipped_sums is None:
        grads = [jnp.zeros(jnp.shape(p), jnp.result_type(p)) for p in leaves]
    else:
        gdef = jax.tree_util.tree_structure(clipped_sums)
        if gdef != treedef:
            raise ValueError(f"clipped_sums has structure {gdef}, params {treedef}")
        grads = jax.tree_util.tree_leaves(clipped_sums)
    opt_state = dict(opt_state or {})
    keys = _STATE_KEYS[optimizer]
    unknown = set(opt_state) - set(keys)
    if unknown:
        raise ValueError(f"opt_state has entries {sorted(unknown)} that {optimizer!r} does not use "
                         f"(init_opt_state(params, {optimizer!r}))")
    states = {}
    for k in keys:
        if k not in opt_state:
            if kind == _ku.SGD:
                if not _is_zero(momentum):
                    raise ValueError("momentum != 0 needs a momentum buffer: "
                                     "init_opt_state(params, 'sgd', momentum=...)")
                continue
            raise ValueError(f"opt_state lacks {k!r}: init_opt_state(params, {optimizer!r})")
        sdef = jax.tree_util.tree_structure(opt_state[k])
        if sdef != treedef:
            raise ValueError(f"opt_state[{k!r}] has structure {sdef}, params {treedef}")
        states[k] = jax.tree_util.tree_leaves(opt_state[k])

    hyper = make_hyper(noise_std=noise_std, normaliser=normaliser, optimizer=optimizer, lr=lr, momentum=momentum,
                       betas=betas, eps=eps, weight_decay=weight_decay)
    offsets, _ = _nz.pair_offsets([math.prod(jnp.shape(p)) for p in leaves])
    _nz.stream_word(rank)
    s1_key, s2_key = (keys + (None,))[:2]
    s1s = states.get(s1_key, [None] * len(leaves))
    s2s = states.get(s2_key, [None] * len(leaves))
    for p, g, s1, s2 in zip(leaves, grads, s1s, s2s):
        _check_leaf(kind, optimizer, p, g, s1, s2)
    new_p, s1n, s2n, noisy = _update_leaves(leaves, grads, s1s, s2s, seed_a, step_a, hyper, kind=kind,
                                            offsets=offsets, rank=rank, nesterov=nesterov,
                                            write_grad=return_noisy_grads)
    new_s = {k: v for k, v in ((s1_key, s1n), (s2_key, s2n)) if k in states}
    new_params = jax.tree_util.tree_unflatten(treedef, new_p)
    new_state = {k: jax.tree_util.tree_unflatten(treedef, v) for k, v in new_s.items()}
    if return_noisy_grads:
        return new_params, new_state, jax.tree_util.tree_unflatten(treedef, noisy)
    return new_params, new_state
