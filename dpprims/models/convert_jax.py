"""Weights between torch state dicts and flax params, so one set of weights runs in both.

Convention (the one of :mod:`dpprims.models.jax_resnet`): a flax module path joined with dots
is the torch module name (``("layer1.0", "downsample.0")`` <-> ``layer1.0.downsample.0``), and
the leaves map as

=================  =========================  ==========================================
flax leaf          torch parameter            layout change
=================  =========================  ==========================================
Dense ``kernel``   Linear ``weight``          [in, out] <-> [out, in] (transpose)
Conv ``kernel``    Conv1d/2d ``weight``       [*k, in/groups, out] <-> [out, in/groups, *k]
``scale``          GroupNorm/LayerNorm weight none
``embedding``      Embedding ``weight``       none ([V, D] in both)
``bias``           ``bias``                   none
=================  =========================  ==========================================

The flax side tells which is which (leaf names), so :func:`torch_to_flax` takes a flax params
template (from ``model.init`` or ``jax.eval_shape``); :func:`flax_to_torch` needs none. Images
are NCHW in torch and NHWC in the JAX models: transpose the inputs, not the weights.
Neither direction imports torch unless torch tensors are passed or asked for.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["torch_to_flax", "flax_to_torch", "torch_key", "load_flax_into_torch"]

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_key(path) -> str:
    """The torch state-dict key of a flax param path (tuple of names, leaf last)."""
    *mods, leaf = path
    if leaf not in _LEAF_TO_TORCH:
        raise ValueError(f"no torch counterpart for flax parameter {'/'.join(path)!r} (leaf {leaf!r})")
    return ".".join(list(mods) + [_LEAF_TO_TORCH[leaf]])


def _to_torch_layout(leaf: str, a: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if a.ndim == 2:
            return a.T
        # conv [*k, in/groups, out] -> [out, in/groups, *k]
        n = a.ndim - 2
        return np.transpose(a, (n + 1, n) + tuple(range(n)))
    return a


def _to_flax_layout(leaf: str, a: np.ndarray, ndim: int) -> np.ndarray:
    if leaf == "kernel":
        if ndim == 2:
            return a.T
        n = ndim - 2
        # torch [out, in/groups, *k] -> [*k, in/groups, out]
        return np.transpose(a, tuple(range(2, n + 2)) + (1, 0))
    return a


def _numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def _leaves(tree, path=()):
    for k, v in tree.items():
        if hasattr(v, "items"):
            yield from _leaves(v, path + (k,))
        else:
            yield path + (k,), v


def torch_to_flax(state_dict: Mapping, template, *, strict: bool = True, dtype=None) -> dict:
    """A flax params dict with the structure of ``template`` filled from a torch state dict.

    ``template``: flax params (arrays or ShapeDtypeStructs) of the matching JAX model. Every
    template leaf must find its torch key with the right shape (after the layout change). With
    ``strict``, torch entries that no flax leaf uses raise too, except the BatchNorm running
    statistics and ``num_batches_tracked`` buffers. ``dtype``: cast every leaf (default: the
    template's dtype). Returns nested dicts of numpy arrays (``jax.tree.map(jnp.asarray, ...)``
    moves them to the device).
    """
    sd = {k: v for k, v in state_dict.items()}
    used, out = set(), {}
    for path, ref in _leaves(template):
        key = torch_key(path)
        if key not in sd:
            raise KeyError(f"torch state dict has no {key!r} for flax parameter {'/'.join(path)}")
        a = _to_flax_layout(path[-1], _numpy(sd[key]), len(ref.shape))
        if tuple(a.shape) != tuple(ref.shape):
            raise ValueError(f"{key}: torch shape {tuple(_numpy(sd[key]).shape)} gives {tuple(a.shape)} "
                             f"in flax layout, the template has {tuple(ref.shape)}")
        a = np.ascontiguousarray(a).astype(dtype or ref.dtype)
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = a
        used.add(key)
    if strict:
        skip = ("running_mean", "running_var", "num_batches_tracked")
        extra = sorted(k for k in sd if k not in used and not k.endswith(skip))
        if extra:
            raise ValueError(f"torch state dict entries without a flax parameter: {extra}")
    return out


def flax_to_torch(params, *, as_torch: bool = False) -> dict:
    """{torch key: array in torch layout} from flax params (numpy arrays, or torch tensors with
    ``as_torch=True``). Feed it to ``torch_model.load_state_dict`` (see :func:`load_flax_into_torch`)."""
    out = {}
    for path, v in _leaves(params):
        a = np.ascontiguousarray(_to_torch_layout(path[-1], np.asarray(v)))
        out[torch_key(path)] = a
    if as_torch:
        import torch

        out = {k: torch.from_numpy(np.array(v)) for k, v in out.items()}
    return out


def load_flax_into_torch(torch_model, params, strict: bool = True):
    """Copy flax ``params`` into ``torch_model`` (same architecture); returns load_state_dict's result."""
    import torch

    sd = flax_to_torch(params)
    own = torch_model.state_dict()
    tensors = {}
    for k, v in sd.items():
        t = torch.from_numpy(np.array(v))
        tensors[k] = t.to(own[k].dtype) if k in own else t
    return torch_model.load_state_dict(tensors, strict=strict)
