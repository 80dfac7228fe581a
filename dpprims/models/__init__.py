"""DP-compatible model zoo and model conversion (PyTorch and JAX).

``import dpprims.models`` does not import torch: the names below are resolved lazily, on first
access, from the torch submodules.

* :mod:`.torch_resnet`: ``resnet18/34/50`` - torchvision's ResNets with GroupNorm (same module
  names and parameter counts), ``cifar=True`` stem, reduced ``width``; ``ResNet``,
  ``BasicBlock``, ``Bottleneck``, ``load_torchvision_state_dict``.
* :mod:`.torch_small`: ``mlp``, ``small_cnn``, ``get_model(name, ...)``, ``MODEL_NAMES``.
* :mod:`.torch_transformer`: ``small_transformer``, ``SmallTransformer`` (ViT-style encoder on
  image patches or token ids; torch's TransformerEncoderLayer with DPMultiheadAttention).
* ``convert_multihead_attention(model)`` (from dpprims.torch.attention): nn.MultiheadAttention ->
  DPMultiheadAttention with the same weights, for nn.TransformerEncoderLayer and friends.
* :mod:`.convert`: ``convert_batchnorm_to_groupnorm(model, num_groups=32)``,
  ``choose_num_groups``, ``group_norm``.
* :mod:`.jax_resnet` (JAX/Flax twins, NHWC): ``get_jax_model(name, ...)``; the constructors
  stay under ``dpprims.models.jax_resnet`` because their names match the torch ones.
* :mod:`.jax_transformer`: the Flax twin of the small transformer (``small_transformer``,
  ``SmallTransformer``, ``SelfAttention`` from dpprims.jax.Dense), same module names as the torch
  one, so ``torch_to_flax`` moves its weights.
* :mod:`.convert_jax`: ``torch_to_flax``, ``flax_to_torch``, ``load_flax_into_torch`` (one set
  of weights for both frameworks).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    # torch_resnet
    "ResNet": "torch_resnet",
    "BasicBlock": "torch_resnet",
    "Bottleneck": "torch_resnet",
    "resnet18": "torch_resnet",
    "resnet34": "torch_resnet",
    "resnet50": "torch_resnet",
    "load_torchvision_state_dict": "torch_resnet",
    # torch_small
    "mlp": "torch_small",
    "small_cnn": "torch_small",
    "SmallCNN": "torch_small",
    "get_model": "torch_small",
    "MODEL_NAMES": "torch_small",
    # torch_transformer
    "SmallTransformer": "torch_transformer",
    "small_transformer": "torch_transformer",
    # convert
    "convert_batchnorm_to_groupnorm": "convert",
    "choose_num_groups": "convert",
    "group_norm": "convert",
    "convert_multihead_attention": "_attention",
    # JAX
    "get_jax_model": "jax_resnet",
    "torch_to_flax": "convert_jax",
    "flax_to_torch": "convert_jax",
    "load_flax_into_torch": "convert_jax",
}
_SUBMODULES = ("torch_resnet", "torch_small", "torch_transformer", "convert", "jax_resnet", "jax_transformer",
               "convert_jax")

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover - for static analysers only
    from .convert import choose_num_groups, convert_batchnorm_to_groupnorm, group_norm
    from .torch_resnet import (BasicBlock, Bottleneck, ResNet, load_torchvision_state_dict, resnet18,
                               resnet34, resnet50)
    from .torch_small import MODEL_NAMES, SmallCNN, get_model, mlp, small_cnn
    from .torch_transformer import SmallTransformer, small_transformer
    from dpprims.torch.attention import convert_multihead_attention


def __getattr__(name: str):
    if name in _LAZY:
        where = _LAZY[name]
        path = "dpprims.torch.attention" if where == "_attention" else f"{__name__}.{where}"
        module = importlib.import_module(path)
        value = getattr(module, name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
