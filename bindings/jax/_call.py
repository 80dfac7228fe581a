"""How a JAX op reaches a Triton kernel, and which of its three paths a call takes.

Paths (chosen per call, recorded in ``LAST_PATH``, never silently):

* ``"jax-triton"``: the compiled Triton kernel through ``jax_triton.triton_call`` (GPU).
* ``"jnp"``: the op's own pure-jnp implementation of the same math (the CPU default; also the
  fallback on a GPU without jax-triton, announced by a warning).
* ``"interpreter"``: the SAME kernel, launch spec and argument list as ``"jax-triton"``, run by
  Triton's CPU interpreter inside a ``jax.pure_callback`` (needs TRITON_INTERPRET=1 before the
  kernels are imported, and torch for the interpreter's buffers). CI uses it to test the JAX
  kernel wiring - argument order, strides, grid, output shapes, partial-sum reductions - without
  a GPU.

Choice: ``use_path(...)`` (context manager, innermost wins), else the environment variable
``DPPRIMS_JAX_BACKEND`` (``auto`` | ``jnp`` | ``interpreter`` | ``jax-triton``), else ``auto``.

``auto`` is chosen by the platform the function is LOWERED for, not by the host: where
jax_triton imports and the kernels are compiled ones (TRITON_INTERPRET unset), every op is a
``jax.lax.platform_dependent`` of its Triton kernel (``cuda``) and its jnp implementation (every
other platform). One jitted function therefore lowers to ``triton_kernel_call`` custom calls for
cuda and to plain XLA for cpu, whatever machine traces it (``jax.export`` for cuda on a CPU-only
host works; pass the GPU's compute capability with :func:`use_compute_capability`, since there is
no device to ask). ROCm lowers to the jnp path: the kernels are untested there. Without
jax_triton (or with interpreter kernels) ``auto`` is the jnp path everywhere (a warning on a GPU).

``jnp``, ``interpreter`` and ``jax-triton`` force that path for every platform (forcing
``jax-triton`` and lowering for cpu fails in JAX: triton_kernel_call has no cpu lowering).

``LAST_PATH[op]`` is set when an op is traced (for ``auto``: the path the host's default backend
takes) and overwritten when it is lowered, with the path that was actually lowered - so after a
``jax.export(..., platforms=["cuda"])`` it says "jax-triton" even on a CPU host. (Lowering for
several platforms at once lowers both branches: the last one lowered is recorded.)

One function, :func:`arrange`, turns a :class:`KernelCall` (kernel, launch spec, named inputs
and outputs) into the positional argument list, output shapes, grid and constexprs; both
:func:`launch` paths consume its result, so the CPU interpreter test exercises exactly the
argument list that ``triton_call`` receives on a GPU.

jax-triton's calling convention: ``triton_call(*args, out_shape=...)`` binds its positional
arguments (arrays and Python scalars) to the kernel's first parameters and appends the output
pointers right after them; keyword arguments are constexprs. Every dpprims kernel therefore takes
(input arrays and runtime scalars, outputs, constexprs) (shared/STYLE.md), and shapes and strides
go in as runtime scalars: jax-triton writes their values into the launch (the custom call's
backend config) and compiles one kernel per (kernel, dtypes, constexprs, num_warps, which
scalars are 1) - not one per layer shape. (jax-triton makes a scalar equal to 1 a constexpr.)
A scalar after the outputs would have to be a constexpr; ``arrange`` allows that but no kernel
needs it. Python scalars are still fixed values of the compiled XLA program, so per-step runtime
values (clip norm, seed, step) are one-element arrays.

Nothing here imports jax_triton, torch or a GPU runtime at import time.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import mlir

log = logging.getLogger("dpprims")

PATHS = ("jax-triton", "jnp", "interpreter")
ENV_VAR = "DPPRIMS_JAX_BACKEND"
CC_ENV_VAR = "DPPRIMS_JAX_COMPUTE_CAPABILITY"
KERNEL_PLATFORMS = ("cuda",)
"""Platforms whose lowering of an ``auto`` op is the Triton kernel (all others: jnp)."""

LAST_PATH: dict[str, str] = {}
"""op name -> the path its last call took (recorded at trace time under jit)."""

_local = threading.local()
_warned: set[str] = set()
# Triton's interpreter keeps the running program's grid index and its patched language
# functions in process-wide state; XLA may run independent callbacks on several threads.
_INTERPRETER_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------
# path selection
# --------------------------------------------------------------------------------------------
def _check_path(path: str) -> str:
    p = str(path).strip().lower()
    if p not in PATHS + ("auto",):
        raise ValueError(f"dpprims JAX backend must be one of {PATHS + ('auto',)}, got {path!r}")
    return p


@contextlib.contextmanager
def use_path(path: str):
    """Run dpprims JAX ops inside the block on ``path`` ("jax-triton" | "jnp" | "interpreter" |
    "auto"). Overrides ``DPPRIMS_JAX_BACKEND``; nests (innermost wins); thread-local.

    The path is read when an op is traced: a function jitted (and traced) outside the block
    keeps its path when called inside it. Trace inside the block (a fresh ``jax.jit``), and read
    ``LAST_PATH`` to see what ran."""
    p = _check_path(path)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(p)
    try:
        yield p
    finally:
        stack.pop()


def _requested() -> str:
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _check_path(os.environ.get(ENV_VAR, "auto") or "auto")


@functools.lru_cache(maxsize=None)
def _jax_triton_available() -> bool:
    try:
        import jax_triton  # noqa: F401
    except Exception:  # ImportError, or jax-triton's own "needs GPU jaxlib" error
        return False
    return True


def which_path() -> str:
    """The path the next dpprims JAX op call takes (see the module docstring)."""
    p = _requested()
    if p != "auto":
        return p
    if jax.default_backend() != "gpu":
        return "jnp"
    if _jax_triton_available():
        return "jax-triton"
    if "jax-triton-missing" not in _warned:
        _warned.add("jax-triton-missing")
        warnings.warn("dpprims: JAX runs on a GPU but jax_triton cannot be imported; dpprims JAX ops "
                      "fall back to their pure-jnp implementations (pip install jax-triton for the "
                      "fused kernels)", RuntimeWarning, stacklevel=3)
    return "jnp"


def record(op: str) -> str:
    """Choose the path for one call of ``op`` by the host (``which_path``), record it in
    ``LAST_PATH`` and return it. Ops use :func:`dispatch`, which chooses by the lowering platform
    under ``auto``; this host choice is what diagnostics use."""
    p = which_path()
    LAST_PATH[op] = p
    if p == "jnp" and op not in _warned:
        _warned.add(op)
        log.info("dpprims JAX op %s runs its pure-jnp implementation (%s=interpreter runs the Triton "
                 "kernel through the interpreter on CPU)", op, ENV_VAR)
    return p


@contextlib.contextmanager
def use_compute_capability(cc: int | None):
    """Compile the Triton kernels of ops traced inside the block for compute capability ``cc``
    (e.g. 90 for sm_90) instead of asking GPU 0 when lowering: what ``jax.export`` for cuda needs
    on a machine without a GPU. Overrides ``DPPRIMS_JAX_COMPUTE_CAPABILITY``; nests; thread-local.
    ``None`` restores asking the device."""
    if cc is not None and (not isinstance(cc, (int, np.integer)) or isinstance(cc, bool) or cc < 10):
        raise ValueError(f"compute capability must be an int like 80 or 90, got {cc!r}")
    stack = getattr(_local, "cc", None)
    if stack is None:
        stack = _local.cc = []
    stack.append(None if cc is None else int(cc))
    try:
        yield cc
    finally:
        stack.pop()


def compute_capability() -> int | None:
    """The compute capability kernels are compiled for (None: jax-triton asks GPU 0)."""
    stack = getattr(_local, "cc", None)
    if stack:
        return stack[-1]
    v = os.environ.get(CC_ENV_VAR, "").strip()
    if not v:
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{CC_ENV_VAR} must be an integer like 90, got {v!r}") from None


# --------------------------------------------------------------------------------------------
# platform-chosen dispatch
# --------------------------------------------------------------------------------------------
def _kernels_compiled() -> bool:
    from dpprims.kernels import linear as _kl  # imports triton only

    return not _is_interpreted(_kl._linear_norm_direct_kernel)


def platform_dispatch() -> bool:
    """True when an ``auto`` op is chosen by the lowering platform (jax_triton importable and the
    kernels compiled, not interpreted)."""
    return _requested() == "auto" and _kernels_compiled() and _jax_triton_available()


# An identity primitive marking, inside each path's computation, which path it is: its lowering
# rule runs only for the branch that is actually lowered, and records that in LAST_PATH.
_path_p = Primitive("dpprims_path")
_path_p.def_impl(lambda x, *, op, path: x)
_path_p.def_abstract_eval(lambda x, *, op, path: x)


def _path_lowering(ctx, x, *, op, path):
    LAST_PATH[op] = path
    return [x]


mlir.register_lowering(_path_p, _path_lowering)


def _mark(args: tuple, op: str, path: str) -> tuple:
    leaves, tree = jax.tree_util.tree_flatten(args)
    for i, v in enumerate(leaves):
        if _is_array(v):
            leaves[i] = _path_p.bind(jnp.asarray(v), op=op, path=path)
            break
    return jax.tree_util.tree_unflatten(tree, leaves)


def dispatch(op: str, args: tuple, jnp_fn, kernel_fn):
    """One op call: ``jnp_fn(*args)`` or ``kernel_fn(path, *args)`` (path "jax-triton" or
    "interpreter"), both returning the same pytree of arrays.

    ``auto`` with :func:`platform_dispatch`: ``lax.platform_dependent`` of the kernel (cuda;
    its outputs cast to the jnp path's dtypes, e.g. float64 under x64) and the jnp path (every
    other platform), so the lowering platform decides. Otherwise the host's path (``record``).
    Where the kernel branch exists the op cannot be ``jax.vmap``-ed (jax-triton has no batching
    rule), on any platform; no dpprims code vmaps these ops."""
    if platform_dispatch():
        LAST_PATH[op] = which_path()  # the host's choice; the lowering overwrites it
        expected = jax.eval_shape(jnp_fn, *args)

        def on_kernel_platform(*a):
            out = kernel_fn("jax-triton", *_mark(a, op, "jax-triton"))
            return jax.tree_util.tree_map(lambda o, e: o.astype(e.dtype), out, expected)

        def elsewhere(*a):
            return jnp_fn(*_mark(a, op, "jnp"))

        return lax.platform_dependent(*args, default=elsewhere,
                                      **{p: on_kernel_platform for p in KERNEL_PLATFORMS})
    path = record(op)
    if path == "jnp":
        return jnp_fn(*args)
    if path == "jax-triton":
        args = _mark(args, op, path)
    return kernel_fn(path, *args)


# --------------------------------------------------------------------------------------------
# ops are not differentiable, on every path alike
# --------------------------------------------------------------------------------------------
def nondifferentiable(name: str, fn, *arrays, **static):
    """``fn(*arrays, **static)`` wrapped in a ``jax.custom_vjp`` whose forward rule raises.

    jax-triton and pure_callback cannot be differentiated while the jnp path could be, silently
    giving different programs per path; every op therefore refuses differentiation the same
    way. (The DP engine never differentiates them: it differentiates the model w.r.t. the
    zero perturbations only, then calls these ops on the results.)"""

    @jax.custom_vjp
    def op(*xs):
        return fn(*xs, **static)

    def fwd(*xs):
        raise TypeError(f"dpprims op {name} is not differentiable (it computes per-example norms or "
                        "clipped gradient sums from activations and output gradients)")

    def bwd(res, g):  # pragma: no cover - fwd raises first
        raise TypeError(f"dpprims op {name} is not differentiable")

    op.defvjp(fwd, bwd)
    return op(*arrays)


# --------------------------------------------------------------------------------------------
# one kernel launch, described once
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelCall:
    """A Triton kernel launch, by kernel parameter name.

    inputs: parameter name -> jax array (input buffer) or Python int/float (scalar);
    outputs: parameter name -> jax.ShapeDtypeStruct (buffers the kernel writes);
    constexprs: the launch spec's constexprs plus the op's flags;
    grid, num_warps: from the launch spec (kernels/*_spec).
    """

    kernel: Any
    grid: tuple
    inputs: dict
    outputs: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    name: str = ""
    zeroed: tuple = ()  # output names the kernel needs zero-filled (e.g. atomic ticket counters)


@dataclass(frozen=True)
class Arranged:
    """What both launch paths consume: positional kernel arguments (arrays and scalars, in
    kernel parameter order, up to the first output), the output shapes (in parameter order),
    and keyword constexprs (the spec's plus scalars that follow the outputs)."""

    kernel: Any
    args: tuple          # ((name, value), ...)
    out_names: tuple
    out_shapes: tuple    # (jax.ShapeDtypeStruct, ...)
    metaparams: dict
    grid: tuple
    num_warps: int
    zeroed: tuple = ()   # indices into out_names of zero-filled outputs


def _is_array(v) -> bool:
    return isinstance(v, (jax.Array, np.ndarray)) or hasattr(v, "aval")


_TRITON_CALL_KWARGS = {"kernel", "out_shape", "out_type", "grid", "name", "custom_call_target_name",
                       "num_warps", "num_stages", "num_ctas", "compute_capability", "enable_fp_fusion",
                       "input_output_aliases", "zeroed_outputs", "debug", "serialized_metadata"}


def arrange(call: KernelCall) -> Arranged:
    """Order a :class:`KernelCall` by the kernel's signature, for triton_call and the interpreter.

    Checks that every kernel parameter is supplied exactly once, that the outputs are
    consecutive parameters, that nothing but arrays and scalars precedes them and that no array
    follows them (jax-triton could not pass it)."""
    kernel = call.kernel
    names = list(kernel.arg_names)
    supplied = {}
    for group in (call.inputs, call.outputs, call.constexprs):
        for k in group:
            if k in supplied:
                raise TypeError(f"{call.name}: kernel parameter {k!r} supplied twice")
            supplied[k] = group
    unknown = sorted(set(supplied) - set(names))
    missing = [n for n in names if n not in supplied]
    if unknown or missing:
        raise TypeError(f"{call.name}: kernel {kernel_name(kernel)} parameters missing {missing}, "
                        f"unknown {unknown}")
    if not call.outputs:
        raise TypeError(f"{call.name}: a kernel call needs at least one output")
    out_idx = sorted(names.index(n) for n in call.outputs)
    first, last = out_idx[0], out_idx[-1]
    if out_idx != list(range(first, last + 1)):
        raise TypeError(f"{call.name}: the output parameters {list(call.outputs)} of {kernel_name(kernel)} "
                        "are not consecutive; jax-triton appends outputs after the positional arguments")
    args = []
    for n in names[:first]:
        if n in call.constexprs:
            raise TypeError(f"{call.name}: constexpr {n!r} precedes the outputs of {kernel_name(kernel)}; "
                            "jax-triton binds positional arguments in parameter order")
        args.append((n, call.inputs[n]))
    metaparams = {}
    for n in names[last + 1:]:
        v = call.constexprs[n] if n in call.constexprs else call.inputs[n]
        if _is_array(v):
            raise TypeError(f"{call.name}: array argument {n!r} follows the outputs of {kernel_name(kernel)}; "
                            "jax-triton cannot pass it")
        if n in _TRITON_CALL_KWARGS:
            raise TypeError(f"{call.name}: kernel parameter {n!r} clashes with a triton_call keyword")
        metaparams[n] = v
    out_names = tuple(names[first:last + 1])
    out_shapes = tuple(jax.ShapeDtypeStruct(tuple(call.outputs[n].shape), call.outputs[n].dtype)
                       for n in out_names)
    unknown_zeroed = sorted(set(call.zeroed) - set(out_names))
    if unknown_zeroed:
        raise TypeError(f"{call.name}: zeroed {unknown_zeroed} are not outputs of {kernel_name(kernel)}")
    return Arranged(kernel, tuple(args), out_names, out_shapes, metaparams, tuple(int(g) for g in call.grid),
                    int(call.num_warps), tuple(out_names.index(n) for n in call.zeroed))


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(kernel))


def launch(call: KernelCall, path: str, aliases: dict | None = None) -> dict:
    """Run ``call`` on ``path`` ("jax-triton" or "interpreter"); returns {output name: array}.
    ``aliases`` {input name: output name}: buffers the kernel updates in place (jax-triton's
    ``input_output_aliases``; the interpreter path copies and needs none)."""
    arr = arrange(call)
    if path == "jax-triton":
        outs = _launch_jax_triton(arr, aliases)
    elif path == "interpreter":
        outs = _launch_interpreter(arr)
    else:
        raise ValueError(f"launch needs path 'jax-triton' or 'interpreter', got {path!r}")
    return dict(zip(arr.out_names, outs))


# -- jax-triton ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _jax_triton():
    try:
        import jax_triton as jt
    except Exception as e:  # ImportError, or jax-triton refusing a CPU-only jaxlib
        raise RuntimeError("the 'jax-triton' path needs the jax_triton package and a GPU build of "
                           f"jaxlib ({type(e).__name__}: {e}); use DPPRIMS_JAX_BACKEND=jnp on CPU") from e
    params = inspect.signature(jt.triton_call).parameters
    # jax-triton 0.3 calls the output description out_shape, 0.4 renamed it out_type.
    out_kw = "out_shape" if "out_shape" in params else "out_type"
    return jt, out_kw


def _launch_jax_triton(arr: Arranged, aliases: dict | None = None):
    jt, out_kw = _jax_triton()
    kernel = arr.kernel
    if _is_interpreted(kernel):
        raise RuntimeError("the 'jax-triton' path got an interpreter kernel: TRITON_INTERPRET=1 was set "
                           "when dpprims.kernels was imported")
    kw = {out_kw: list(arr.out_shapes)}
    cc = compute_capability()
    if cc is not None:
        kw["compute_capability"] = cc
    if aliases:
        # jax-triton counts array arguments only (scalars are not operands)
        array_names = [n for n, v in arr.args if _is_array(v)]
        kw["input_output_aliases"] = {array_names.index(i): arr.out_names.index(o) for i, o in aliases.items()}
    if arr.zeroed:
        kw["zeroed_outputs"] = tuple(arr.zeroed)
    outs = jt.triton_call(*[v for _, v in arr.args], kernel=kernel, grid=arr.grid,
                          num_warps=arr.num_warps, **kw, **arr.metaparams)
    return list(outs) if isinstance(outs, (list, tuple)) else [outs]


# -- Triton interpreter through pure_callback ------------------------------------------------
def _is_interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover - very old triton
        return False
    return isinstance(kernel, InterpretedFunction)


def _to_torch(a: np.ndarray):
    import torch

    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(a, copy=True))


def _to_numpy(t, dtype) -> np.ndarray:
    import torch

    dtype = np.dtype(dtype)
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16 if hasattr(torch, "uint16") else torch.int16).numpy().view(dtype)
    return t.numpy().astype(dtype, copy=False)


def _torch_dtype(dtype):
    import torch

    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return torch.bfloat16
    return torch.from_numpy(np.zeros(0, dtype)).dtype


def _launch_interpreter(arr: Arranged):
    kernel = arr.kernel
    if not _is_interpreted(kernel):
        raise RuntimeError(f"the 'interpreter' path needs TRITON_INTERPRET=1 in the environment before "
                           f"dpprims.kernels is imported (kernel {kernel_name(kernel)} is compiled)")
    try:
        import torch  # noqa: F401  - the interpreter reads buffers through torch's data_ptr/storage
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("the 'interpreter' path needs torch (CPU) for the Triton interpreter's buffers") from e

    array_pos = [i for i, (_, v) in enumerate(arr.args) if _is_array(v)]
    arrays = [arr.args[i][1] for i in array_pos]
    scalars = {i: v for i, (_, v) in enumerate(arr.args) if not _is_array(v)}
    out_shapes = arr.out_shapes

    def callback(*host_arrays):
        import torch

        args = [None] * len(arr.args)
        for i, v in scalars.items():
            # np.float32 marks an fp32 scalar for jax-triton; the interpreter (like torch) wants a float
            args[i] = v.item() if isinstance(v, np.generic) else v
        for i, a in zip(array_pos, host_arrays):
            args[i] = _to_torch(a)
        outs = []
        for j, s in enumerate(out_shapes):
            o = torch.empty(tuple(s.shape), dtype=_torch_dtype(s.dtype))
            # Poisoned: an element the kernel forgets to write fails the comparison.
            o.fill_(0 if j in arr.zeroed else (float("nan") if o.is_floating_point() else -1))
            outs.append(o)
        with _INTERPRETER_LOCK:
            kernel[arr.grid](*args, *outs, **arr.metaparams, num_warps=arr.num_warps)
        return tuple(_to_numpy(o, s.dtype) for o, s in zip(outs, out_shapes))

    res = jax.pure_callback(callback, tuple(out_shapes), *arrays)
    return list(res)


# --------------------------------------------------------------------------------------------
# small helpers shared by the op modules
# --------------------------------------------------------------------------------------------
def strides(x) -> tuple:
    """Element strides of a row-major (C-order) array of x's shape: JAX arrays are dense
    row-major buffers as far as a custom call (and pure_callback) sees them."""
    shape = tuple(int(s) for s in jnp.shape(x))
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(out))


def acc_dtype(*xs):
    """The accumulation/result dtype of the jnp paths: float32, or float64 for float64 inputs."""
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def f32(shape) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.float32)
