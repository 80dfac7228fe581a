"""jax.jit for the oracle, accepting any host array-like (numpy, CPU torch tensors).

The oracle is jitted only so that test suites compile once per shape instead of once per
primitive (eager JAX compiles every primitive for every new shape). jit changes nothing in
what is computed. jax.jit itself refuses foreign arrays such as torch tensors; leaves that are
neither JAX / numpy arrays nor Python scalars, strings or callables go through np.asarray first.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

_PASS = (jax.Array, jax.core.Tracer, np.ndarray, np.generic, int, float, complex, bool, str)


def _to_jax_compatible(leaf):
    if leaf is None or isinstance(leaf, _PASS) or callable(leaf):
        return leaf
    return np.asarray(leaf)


def host_arrays(tree):
    """`tree` with every foreign array-like leaf converted by np.asarray (no device transfer)."""
    return jax.tree_util.tree_map(_to_jax_compatible, tree)


def jit(fn=None, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` whose arguments first pass through `host_arrays`."""
    if fn is None:
        return functools.partial(jit, **jit_kwargs)
    jitted = jax.jit(fn, **jit_kwargs)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return jitted(*host_arrays(args), **host_arrays(kwargs))

    return wrapper
