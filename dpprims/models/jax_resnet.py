"""ResNet-18/34/50 with GroupNorm, a small MLP and a small CNN in Flax, built from dpprims.jax layers.

The same networks as :mod:`dpprims.models.torch_resnet` and :mod:`dpprims.models.torch_small`,
layer for layer: the same widths (``width * (1, 2, 4, 8)``), v1.5 strides (a Bottleneck's
stride on its 3x3 conv), GroupNorm group rule (:func:`choose_num_groups`: the largest divisor of
C not above ``num_groups``) with torch's eps 1e-5, the CIFAR stem (3x3 stride-1 conv, no
max-pool), the same initialisation (Kaiming-normal fan-out convs, unit/zero norms, torch's
default Linear init). Images are NHWC (channels last) in JAX.

Module names are torch's module names (``conv1``, ``layer1.0``, ``downsample.0``, ``fc``,
``features.0``, ``classifier.1``; an MLP's layers are ``"1"``, ``"3"``, ... as in the torch
``nn.Sequential``), so a flax parameter path joined with dots is the torch state-dict key and
:mod:`dpprims.models.convert_jax` converts weights in both directions.

Every trainable layer is a dpprims.jax layer, so the models work with
``dpprims.jax.clipped_grad`` (and as plain flax models anywhere else).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpprims.jax import Conv, Dense, GroupNorm

__all__ = [
    "ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50",
    "MLP", "SmallCNN", "mlp", "small_cnn", "get_jax_model", "choose_num_groups",
]

# torchvision's conv init: kaiming_normal_(mode="fan_out", nonlinearity="relu"), untruncated.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear / Conv default weight init: kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
    """torch's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def choose_num_groups(num_channels: int, num_groups: int = 32) -> int:
    """Largest divisor of ``num_channels`` that is ``<= num_groups`` (the rule of
    :func:`dpprims.models.convert.choose_num_groups`, restated here so that the JAX models do
    not import torch)."""
    num_channels, num_groups = int(num_channels), int(num_groups)
    if num_channels < 1 or num_groups < 1:
        raise ValueError(f"num_channels and num_groups must be >= 1, got {num_channels}, {num_groups}")
    for g in range(min(num_groups, num_channels), 0, -1):
        if num_channels % g == 0:
            return g
    return 1


def _gn(channels: int, num_groups: int, name: str, zero: bool = False):
    return GroupNorm(num_groups=choose_num_groups(channels, num_groups), epsilon=1e-5, use_fast_variance=False,
                     scale_init=nn.initializers.zeros if zero else nn.initializers.ones, name=name)


def _conv(features: int, k: int, stride: int, padding: int, name: str, groups: int = 1, dilation: int = 1):
    return Conv(features, (k, k), strides=stride, padding=padding, kernel_dilation=dilation,
                feature_group_count=groups, use_bias=False, kernel_init=conv_init, name=name)


class BasicBlock(nn.Module):
    planes: int
    stride: int = 1
    downsample: bool = False
    num_groups: int = 32
    zero_init_residual: bool = False
    expansion = 1

    @nn.compact
    def __call__(self, x):
        identity = x
        out = _conv(self.planes, 3, self.stride, 1, "conv1")(x)
        out = nn.relu(_gn(self.planes, self.num_groups, "bn1")(out))
        out = _conv(self.planes, 3, 1, 1, "conv2")(out)
        out = _gn(self.planes, self.num_groups, "bn2", self.zero_init_residual)(out)
        if self.downsample:
            identity = _conv(self.planes * self.expansion, 1, self.stride, 0, "downsample.0")(x)
            identity = _gn(self.planes * self.expansion, self.num_groups, "downsample.1")(identity)
        return nn.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride is on the 3x3 conv (conv2)."""

    planes: int
    stride: int = 1
    downsample: bool = False
    num_groups: int = 32
    zero_init_residual: bool = False
    expansion = 4

    @nn.compact
    def __call__(self, x):
        identity = x
        out = nn.relu(_gn(self.planes, self.num_groups, "bn1")(_conv(self.planes, 1, 1, 0, "conv1")(x)))
        out = nn.relu(_gn(self.planes, self.num_groups, "bn2")(_conv(self.planes, 3, self.stride, 1, "conv2")(out)))
        out = _conv(self.planes * 4, 1, 1, 0, "conv3")(out)
        out = _gn(self.planes * 4, self.num_groups, "bn3", self.zero_init_residual)(out)
        if self.downsample:
            identity = _conv(self.planes * 4, 1, self.stride, 0, "downsample.0")(x)
            identity = _gn(self.planes * 4, self.num_groups, "downsample.1")(identity)
        return nn.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with GroupNorm, NHWC input [B, H, W, in_channels].

    Attributes mirror :class:`dpprims.models.torch_resnet.ResNet`: ``block`` (BasicBlock or
    Bottleneck), ``layers`` (blocks per stage), ``num_classes``, ``cifar`` (3x3 stride-1 stem,
    no max-pool), ``width`` (planes of stage 1; 64 = torchvision), ``num_groups`` (maximal
    GroupNorm group count), ``zero_init_residual``. (``in_channels`` follows from the input.)
    """

    block: type = BasicBlock
    layers: Sequence[int] = (2, 2, 2, 2)
    num_classes: int = 1000
    cifar: bool = False
    width: int = 64
    num_groups: int = 32
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x):
        if len(self.layers) != 4:
            raise ValueError(f"layers must have 4 entries (one per stage), got {list(self.layers)}")
        if self.cifar:
            x = _conv(self.width, 3, 1, 1, "conv1")(x)
        else:
            x = _conv(self.width, 7, 2, 3, "conv1")(x)
        x = nn.relu(_gn(self.width, self.num_groups, "bn1")(x))
        if not self.cifar:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        inplanes = self.width
        exp = self.block.expansion
        for stage, (mult, n) in enumerate(zip((1, 2, 4, 8), self.layers), start=1):
            planes = self.width * mult
            stride = 1 if stage == 1 else 2
            for i in range(n):
                s = stride if i == 0 else 1
                down = i == 0 and (s != 1 or inplanes != planes * exp)
                x = self.block(planes, s, down, self.num_groups, self.zero_init_residual, name=f"layer{stage}.{i}")(x)
                inplanes = planes * exp
        x = jnp.mean(x, axis=(1, 2))
        fan_in = self.width * 8 * exp
        return Dense(self.num_classes, kernel_init=torch_default_init, bias_init=torch_default_bias_init(fan_in),
                     name="fc")(x)


def resnet18(num_classes: int = 1000, cifar: bool = False, width: int = 64, num_groups: int = 32,
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]) with GroupNorm. See :class:`ResNet`."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, cifar, width, num_groups, zero_init_residual)


def resnet34(num_classes: int = 1000, cifar: bool = False, width: int = 64, num_groups: int = 32,
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]) with GroupNorm. See :class:`ResNet`."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, cifar, width, num_groups, zero_init_residual)


def resnet50(num_classes: int = 1000, cifar: bool = False, width: int = 64, num_groups: int = 32,
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-50 (Bottleneck v1.5, [3, 4, 6, 3]) with GroupNorm. See :class:`ResNet`."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, cifar, width, num_groups, zero_init_residual)


# --------------------------------------------------------------------------------------------
# small models (dpprims.models.torch_small)
# --------------------------------------------------------------------------------------------
_ACTIVATIONS = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "gelu": lambda x: nn.gelu(x, approximate=False),  # torch.nn.GELU() is the erf form
    "silu": nn.silu,
    "elu": nn.elu,
    "leaky_relu": lambda x: nn.leaky_relu(x, 0.01),
    "sigmoid": nn.sigmoid,
}

Activation = Union[str, Callable]


def _activation(act: Activation) -> Callable:
    if callable(act):
        return act
    try:
        return _ACTIVATIONS[act.lower()]
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; valid: {sorted(_ACTIVATIONS)}") from None


def _dense(features: int, fan_in: int, name: str, use_bias: bool = True):
    return Dense(features, use_bias=use_bias, kernel_init=torch_default_init,
                 bias_init=torch_default_bias_init(fan_in), name=name)


class MLP(nn.Module):
    """``flatten -> [Dense -> act] * len(hidden) -> Dense``, torch_small.mlp's layers. The input is
    flattened from axis 1 in the layout it comes in (feed NCHW images to match a torch MLP)."""

    hidden: Sequence[int] = (256,)
    num_classes: int = 10
    activation: Activation = "relu"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        act = _activation(self.activation)
        idx = 1  # torch: Flatten is module 0, then (Linear, act) pairs
        for h in self.hidden:
            x = act(_dense(int(h), x.shape[-1], str(idx), self.use_bias)(x))
            idx += 2
        return _dense(self.num_classes, x.shape[-1], str(idx), self.use_bias)(x)


def _adaptive_avg_pool(x, out: int):
    """torch's AdaptiveAvgPool2d((out, out)) on NHWC: bin i spans [floor(i*H/out), ceil((i+1)*H/out))."""
    B, H, W, C = x.shape
    if H % out == 0 and W % out == 0:
        return x.reshape(B, out, H // out, out, W // out, C).mean(axis=(2, 4))
    rows = []
    for i in range(out):
        h0, h1 = (i * H) // out, -(-((i + 1) * H) // out)
        cols = []
        for j in range(out):
            w0, w1 = (j * W) // out, -(-((j + 1) * W) // out)
            cols.append(x[:, h0:h1, w0:w1, :].mean(axis=(1, 2)))
        rows.append(jnp.stack(cols, axis=1))
    return jnp.stack(rows, axis=1)


class SmallCNN(nn.Module):
    """torch_small.SmallCNN in NHWC: per entry of ``channels`` conv3x3 (padding 1) ->
    GroupNorm -> act -> 2x2 max-pool (ceil mode); adaptive average pooling to
    ``pool_size x pool_size``; Dense(hidden) -> act -> Dense(num_classes). The pooled features
    are flattened in torch's (C, H, W) order so that converted weights compute the same function."""

    num_classes: int = 10
    channels: Sequence[int] = (32, 64)
    hidden: int = 128
    num_groups: Optional[int] = 8
    activation: Activation = "relu"
    pool_size: int = 2

    @nn.compact
    def __call__(self, x):
        if len(self.channels) < 1:
            raise ValueError("channels must have at least one entry")
        act = _activation(self.activation)
        idx = 0
        for c in self.channels:
            fan_in = x.shape[-1] * 9
            x = Conv(int(c), (3, 3), padding=1, kernel_init=torch_default_init,
                     bias_init=torch_default_bias_init(fan_in), name=f"features.{idx}")(x)
            idx += 1
            if self.num_groups:
                x = GroupNorm(num_groups=choose_num_groups(c, self.num_groups), epsilon=1e-5,
                              use_fast_variance=False, name=f"features.{idx}")(x)
                idx += 1
            x = act(x)
            idx += 1
            H, W = x.shape[1:3]
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding=((0, H % 2), (0, W % 2)))
            idx += 1
        x = _adaptive_avg_pool(x, self.pool_size)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch's flatten order
        if self.hidden:
            x = act(_dense(self.hidden, x.shape[-1], "classifier.1")(x))
            return _dense(self.num_classes, x.shape[-1], "classifier.3")(x)
        return _dense(self.num_classes, x.shape[-1], "classifier.1")(x)


def mlp(hidden: Sequence[int] = (256,), num_classes: int = 10, activation: Activation = "relu",
        bias: bool = True) -> MLP:
    """The JAX twin of :func:`dpprims.models.torch_small.mlp` (``in_features`` follows from the input)."""
    return MLP(tuple(hidden), num_classes, activation, bias)


def small_cnn(num_classes: int = 10, channels: Sequence[int] = (32, 64), hidden: int = 128,
              num_groups: Optional[int] = 8, activation: Activation = "relu", pool_size: int = 2) -> SmallCNN:
    """The JAX twin of :func:`dpprims.models.torch_small.small_cnn` (NHWC input)."""
    return SmallCNN(num_classes, tuple(channels), hidden, num_groups, activation, pool_size)


MODEL_NAMES: Tuple[str, ...] = ("mlp", "cnn", "transformer", "resnet18", "resnet34", "resnet50",
                                "resnet18-cifar", "resnet34-cifar", "resnet50-cifar")


def get_jax_model(name: str, num_classes: int = 10, input_size=None, **kwargs) -> nn.Module:
    """Build a JAX model by name (``MODEL_NAMES``, case-insensitive, ``_`` = ``-``), the twin of
    :func:`dpprims.models.torch_small.get_model` (input channels, and the size for every model but
    the transformer, follow from the input). ``input_size`` (H, W): the transformer's patch rule
    (:func:`dpprims.models.jax_transformer.small_transformer`; ``width`` is its dimension, as in
    the torch registry); the other models ignore it."""
    key = name.lower().replace("_", "-")
    if key == "mlp":
        return mlp(num_classes=num_classes, **kwargs)
    if key == "cnn":
        return small_cnn(num_classes=num_classes, **kwargs)
    if key == "transformer":
        from .jax_transformer import small_transformer

        if "width" in kwargs:  # the CLI's --width: the model dimension
            kwargs["dim"] = kwargs.pop("width")
        return small_transformer(num_classes, input_size=input_size, **kwargs)
    base, _, variant = key.partition("-")
    builders = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
    if base in builders and variant in ("", "cifar"):
        return builders[base](num_classes=num_classes, cifar=variant == "cifar", **kwargs)
    raise ValueError(f"unknown model {name!r}; valid: {MODEL_NAMES}")
