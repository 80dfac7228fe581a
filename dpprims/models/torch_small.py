"""Small PyTorch models for DP-SGD examples and tests, plus the :func:`get_model` dispatcher.

Every model here is DP-compatible: no BatchNorm, only GroupNorm (per-example normalisation),
no in-place activations (those break full backward hooks, see :mod:`.torch_resnet`).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .convert import group_norm

__all__ = ["mlp", "small_cnn", "get_model", "MODEL_NAMES"]

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
}

Activation = Union[str, Callable[[], nn.Module]]


def _make_activation(activation: Activation) -> nn.Module:
    """A fresh activation module from a name (see ``_ACTIVATIONS``) or a zero-argument factory
    (an ``nn.Module`` subclass such as ``nn.Tanh`` or any callable returning a module)."""
    if isinstance(activation, str):
        try:
            return _ACTIVATIONS[activation.lower()]()
        except KeyError:
            raise ValueError(f"unknown activation {activation!r}; valid: {sorted(_ACTIVATIONS)}") from None
    if isinstance(activation, nn.Module):
        raise TypeError("pass the activation as a name or a class/factory (e.g. nn.Tanh), not an "
                        "instance, so that each layer gets its own module")
    module = activation()
    if not isinstance(module, nn.Module):
        raise TypeError(f"activation factory returned {type(module).__name__}, not an nn.Module")
    return module


def mlp(in_features: int, hidden: Sequence[int] = (256,), num_classes: int = 10,
        activation: Activation = "relu", bias: bool = True) -> nn.Sequential:
    """Multi-layer perceptron: ``Flatten -> [Linear -> act] * len(hidden) -> Linear``.

    The input is flattened from dim 1 on, so images ``(N, C, H, W)`` with
    ``C * H * W == in_features`` work directly. ``hidden=()`` gives logistic/softmax regression.
    """
    if in_features < 1:
        raise ValueError(f"in_features must be >= 1, got {in_features}")
    layers = [nn.Flatten(1)]
    d = int(in_features)
    for h in hidden:
        layers += [nn.Linear(d, int(h), bias=bias), _make_activation(activation)]
        d = int(h)
    layers.append(nn.Linear(d, num_classes, bias=bias))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """``features`` (conv3x3 -> GroupNorm -> act -> 2x2 max-pool, per entry of ``channels``),
    ``pool`` (adaptive average pooling to ``pool_size x pool_size``, so any input size works),
    ``classifier`` (Flatten -> Linear -> act -> Linear)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: Sequence[int] = (32, 64),
                 hidden: int = 128, num_groups: Optional[int] = 8, activation: Activation = "relu",
                 pool_size: int = 2) -> None:
        super().__init__()
        if len(channels) < 1:
            raise ValueError("channels must have at least one entry")
        feats = []
        c_in = in_channels
        for c in channels:
            feats.append(nn.Conv2d(c_in, c, kernel_size=3, padding=1))
            if num_groups:
                feats.append(group_norm(c, num_groups))
            feats.append(_make_activation(activation))
            # ceil_mode keeps a 1-pixel map at 1 pixel, so tiny inputs (digits 8x8 -> 4 -> 2 -> 1) work.
            feats.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            c_in = c
        self.features = nn.Sequential(*feats)
        self.pool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        layers = [nn.Flatten(1)]
        d = c_in * pool_size * pool_size
        if hidden:
            layers += [nn.Linear(d, hidden), _make_activation(activation)]
            d = hidden
        layers.append(nn.Linear(d, num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def small_cnn(in_channels: int = 1, num_classes: int = 10, channels: Sequence[int] = (32, 64),
              hidden: int = 128, num_groups: Optional[int] = 8, activation: Activation = "relu",
              pool_size: int = 2) -> SmallCNN:
    """Small CNN for MNIST (28x28), sklearn digits (8x8), CIFAR (32x32) or any other size.

    Each stage is conv3x3 (padding 1) -> GroupNorm(choose_num_groups(C, num_groups), C) ->
    activation -> 2x2 max-pool (ceil mode); then adaptive average pooling to
    ``pool_size x pool_size``, and Linear(C * pool_size^2, hidden) -> activation ->
    Linear(hidden, num_classes). ``num_groups=None`` (or 0) drops the norm layers,
    ``hidden=0`` the hidden linear layer. Default (1 input channel, 10 classes): 53,194 params.
    """
    return SmallCNN(in_channels, num_classes, channels, hidden, num_groups, activation, pool_size)


MODEL_NAMES: Tuple[str, ...] = (
    "mlp", "cnn", "transformer",
    "resnet18", "resnet34", "resnet50",
    "resnet18-cifar", "resnet34-cifar", "resnet50-cifar",
)


def _spatial_numel(input_size) -> int:
    if isinstance(input_size, int):
        return input_size * input_size
    return int(math.prod(int(s) for s in input_size))


def get_model(name: str, num_classes: int = 10, in_channels: int = 3,
              input_size: Union[int, Sequence[int], None] = None, **kwargs) -> nn.Module:
    """Build a model by name. Valid names: ``MODEL_NAMES`` (case-insensitive, ``_`` = ``-``).

    * ``"mlp"``: :func:`mlp` with ``in_features = in_channels * H * W``; needs ``input_size``
      (an int ``S`` for ``S x S`` images, or the spatial shape ``(H, W)``; ``(D,)`` with
      ``in_channels=1`` for flat feature vectors).
    * ``"cnn"``: :func:`small_cnn` (any ``input_size``, which is not needed).
    * ``"transformer"``: :func:`dpprims.models.torch_transformer.small_transformer`, a ViT-style
      encoder on image patches; needs ``input_size`` (H, W) (or ``vocab_size=`` for token ids).
    * ``"resnetNN"``: ImageNet-stem ResNet (for ~224x224 inputs), ``"resnetNN-cifar"``: CIFAR stem
      (for ~32x32 inputs), GroupNorm everywhere (:mod:`dpprims.models.torch_resnet`).

    Extra keyword arguments go to the constructor (e.g. ``hidden=(512,)`` for the MLP,
    ``width=16, num_groups=8`` for a ResNet).
    """
    from . import torch_resnet

    key = str(name).strip().lower().replace("_", "-")
    if key == "mlp":
        if input_size is None:
            raise ValueError("get_model('mlp') needs input_size (spatial size, e.g. 28 or (28, 28))")
        return mlp(in_channels * _spatial_numel(input_size), num_classes=num_classes, **kwargs)
    if key == "cnn":
        return small_cnn(in_channels=in_channels, num_classes=num_classes, **kwargs)
    if key == "transformer":
        from .torch_transformer import small_transformer

        if input_size is None and "vocab_size" not in kwargs:
            raise ValueError("get_model('transformer') needs input_size (image size, e.g. 28 or (28, 28)) "
                             "or vocab_size= for token ids")
        if "width" in kwargs:  # the CLI's --width: the model dimension
            kwargs["dim"] = kwargs.pop("width")
        return small_transformer(num_classes=num_classes, in_channels=in_channels, input_size=input_size, **kwargs)
    cifar = key.endswith("-cifar")
    base = key[: -len("-cifar")] if cifar else key
    builders = {"resnet18": torch_resnet.resnet18, "resnet34": torch_resnet.resnet34,
                "resnet50": torch_resnet.resnet50}
    if base in builders:
        return builders[base](num_classes=num_classes, in_channels=in_channels, cifar=cifar, **kwargs)
    raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
