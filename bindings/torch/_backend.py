"""Which implementation a torch op runs, decided per call and always inspectable.

* ``"triton"``: the compiled Triton kernel (CUDA tensors).
* ``"triton-interpreter"``: the same Triton kernel through Triton's CPU interpreter
  (CPU tensors with TRITON_INTERPRET=1 set before the kernels were defined).
* ``"torch"``: the plain-torch implementation of the same math (CPU tensors otherwise).

Nothing here queries a GPU at import time. The last backend each op ran is recorded in
``LAST_BACKEND`` and the first fall-back to plain torch is logged, so no path runs silently.
"""
from __future__ import annotations

import logging
import sys
import types

from dpprims.kernels import _launch
from dpprims.kernels._launch import interpreting

log = logging.getLogger("dpprims")

LAST_BACKEND: dict[str, str] = {}
_warned: set[str] = set()


def backend_for(t) -> str:
    """The backend an op called on tensor ``t`` runs on. On a CPU with TRITON_INTERPRET=1 the
    kernels must have been defined under the interpreter too (Triton decides when a kernel is
    defined, at the first import of its dpprims.kernels module): otherwise a clear error instead
    of Triton's "0 active drivers" at the launch."""
    if t.device.type == "cuda":
        return "triton"
    if t.device.type == "cpu":
        if not interpreting():
            return "torch"
        compiled = compiled_kernel_modules()
        if compiled:
            raise RuntimeError(
                f"TRITON_INTERPRET=1 is set, but dpprims' Triton kernels in {', '.join(compiled)} were defined "
                "before it was (Triton reads it when a kernel is defined, at the first import of the module), so "
                "they cannot run on this CPU: set TRITON_INTERPRET=1 before importing dpprims to run the kernels "
                "through the interpreter, or unset it (or set it to 0) for the plain-torch path")
        return "triton-interpreter"
    raise NotImplementedError(f"dpprims ops support cuda and cpu tensors, got device {t.device}")


_compiled_memo: dict = {}


def compiled_kernel_modules() -> list:
    """The imported dpprims.kernels modules holding a kernel defined for a GPU (a JITFunction:
    defined without TRITON_INTERPRET=1), memoised per set of imported modules. The imported
    submodules are read from the package's own attributes (the import system sets one per
    submodule), not by scanning sys.modules (~100 us a call with torch and jax loaded)."""
    pkg = sys.modules["dpprims.kernels"]
    mods = tuple(v for v in vars(pkg).values() if isinstance(v, types.ModuleType))
    got = _compiled_memo.get(mods)
    if got is None:
        got = _compiled_memo[mods] = [
            m.__name__ for m in mods
            if any(type(v).__name__ == "JITFunction" for v in vars(m).values())]
    return got


def arch_for(t) -> int:
    """Compute capability (80, 90, ...) of the GPU a kernel on tensor ``t`` runs on, read at
    launch time (never at import): the launch specs pick block sizes and warps per architecture."""
    if t.device.type == "cuda":
        import torch

        major, minor = torch.cuda.get_device_capability(t.device)
        return 10 * major + minor
    return _launch.DEFAULT_ARCH  # interpreter / meta tensors (kernels._launch.DEFAULT_ARCH)


def record(op: str, t, backend: str | None = None) -> str:
    """Pick the backend for ``op`` on tensor ``t`` (or take ``backend``, one the caller already
    picked for ``t`` in this call), record it, and log the first torch fallback."""
    b = backend_for(t) if backend is None else backend
    LAST_BACKEND[op] = b
    if b == "torch" and op not in _warned:
        _warned.add(op)
        log.info("dpprims op %s runs its plain-torch implementation on CPU "
                 "(set TRITON_INTERPRET=1 before import to run the Triton kernels on CPU)", op)
    return b


# Tests switch this on so that every output buffer a binding allocates starts as NaN: an
# element a kernel forgot to write then fails the comparison instead of passing by luck.
POISON = False


def empty(shape, *, device, dtype):
    """torch.empty for kernel outputs; NaN-filled while ``POISON`` is set (tests)."""
    import torch

    out = torch.empty(shape, device=device, dtype=dtype)
    if POISON:
        out.fill_(float("nan"))
    return out
