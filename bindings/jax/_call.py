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
``DPPRIMS_JAX_BACKEND`` (``auto`` | ``jnp`` | ``interpreter`` | ``jax-triton``), else ``auto``:
``"jax-triton"`` when JAX's default backend is a GPU, ``"jnp"`` otherwise. Under ``jax.jit``
the path is chosen (and recorded) when the function is traced.

One function, :func:`arrange`, turns a :class:`KernelCall` (kernel, launch spec, named inputs
and outputs) into the positional argument list, output shapes, grid and constexprs; both
:func:`launch` paths consume its result, so the CPU interpreter test exercises exactly the
argument list that ``triton_call`` receives on a GPU.

jax-triton's calling convention: ``triton_call(*args, out_shape=...)`` binds its positional
arguments (arrays and Python scalars) to the kernel's first parameters and appends the output
pointers right after them; keyword arguments are constexprs. A kernel whose output pointers sit
before some of its scalar parameters (``a_ptr, g_ptr, out_ptr, T, D, P, strides...``) is launched
with those trailing scalars as constexprs (compile-time constants; they are shapes and strides,
static under ``jit`` anyway). Python scalars are always compile-time values for jax-triton, so
per-step runtime values (the clip norm) are one-element arrays.

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

log = logging.getLogger("dpprims")

PATHS = ("jax-triton", "jnp", "interpreter")
ENV_VAR = "DPPRIMS_JAX_BACKEND"

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
    """Choose the path for one call of ``op``, record it in ``LAST_PATH`` and return it."""
    p = which_path()
    LAST_PATH[op] = p
    if p == "jnp" and op not in _warned:
        _warned.add(op)
        log.info("dpprims JAX op %s runs its pure-jnp implementation (%s=interpreter runs the Triton "
                 "kernel through the interpreter on CPU)", op, ENV_VAR)
    return p


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
    return Arranged(kernel, tuple(args), out_names, out_shapes, metaparams, tuple(int(g) for g in call.grid),
                    int(call.num_warps))


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(kernel))


def launch(call: KernelCall, path: str) -> dict:
    """Run ``call`` on ``path`` ("jax-triton" or "interpreter"); returns {output name: array}."""
    arr = arrange(call)
    if path == "jax-triton":
        outs = _launch_jax_triton(arr)
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


def _launch_jax_triton(arr: Arranged):
    jt, out_kw = _jax_triton()
    kernel = arr.kernel
    if _is_interpreted(kernel):
        raise RuntimeError("the 'jax-triton' path got an interpreter kernel: TRITON_INTERPRET=1 was set "
                           "when dpprims.kernels was imported")
    kw = {out_kw: list(arr.out_shapes)}
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
            args[i] = v
        for i, a in zip(array_pos, host_arrays):
            args[i] = _to_torch(a)
        outs = []
        for s in out_shapes:
            o = torch.empty(tuple(s.shape), dtype=_torch_dtype(s.dtype))
            # Poisoned: an element the kernel forgets to write fails the comparison.
            o.fill_(float("nan") if o.is_floating_point() else -1)
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
