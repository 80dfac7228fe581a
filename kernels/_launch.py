"""Framework-neutral launch specs shared by the torch and the JAX bindings.

A launch spec is everything a binding needs to start a kernel besides the arrays: the grid,
the constexpr block sizes and ``num_warps``. Both bindings call the same ``*_spec`` function, so
launch arithmetic exists exactly once (shared/STYLE.md).

This module imports only the standard library and triton; it never queries a device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1).

    Read at launch time, never cached: the interpreter runs one program at a time in Python,
    so specs pick large blocks there (few programs) and GPU-sized blocks otherwise.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def block(n: int, gpu_max: int, interp_max: int = 128, lo: int = 16) -> int:
    """A power-of-two block for a dimension of size n: at least ``lo`` (tl.dot needs >= 16),
    at most ``gpu_max`` on a GPU or ``interp_max`` under the interpreter."""
    hi = interp_max if interpreting() else gpu_max
    return max(lo, min(next_pow2(n), hi))


DEFAULT_ARCH = 90
"""Compute capability (80 = A100, 90 = H100) that launch specs assume when the bindings cannot
read one from a device (CPU interpreter, or the meta tensors / eval_shape of
dpprims.kernel_report, which sets it to the architecture it reports). Bindings read the real
one at launch time; nothing reads a device at import time."""


def check_arch(arch: int) -> int:
    """The spec functions' ``arch``: 80 (sm_80 rules) or 90 (sm_90 rules; newer parts use these)."""
    arch = int(arch)
    if arch < 80:
        raise ValueError(f"dpprims kernels need compute capability >= 8.0, got arch={arch}")
    return 90 if arch >= 90 else 80


@dataclass(frozen=True)
class LaunchSpec:
    """grid: tuple of program counts; constexprs: kernel constexpr keyword arguments
    (BLOCK_* sizes, flags); num_warps: warps per program; outputs: named output shapes that
    are not the caller's own (e.g. partial-sum buffers of a two-stage reduction)."""

    grid: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    outputs: dict = field(default_factory=dict)
