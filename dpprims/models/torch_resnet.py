"""ResNet-18/34/50 with GroupNorm, layer for layer torchvision's architecture.

Same structure, module names and initialisation as ``torchvision.models.resnet`` (v1.5:
the stride of a Bottleneck sits on its 3x3 conv; downsample = ``conv1x1 + norm``; Kaiming-normal
fan-out init of the convs, norm weight 1 / bias 0, optional zero-init of the last norm of each
residual branch), with one change: every BatchNorm2d is an ``nn.GroupNorm``. The norm modules
keep torchvision's names (``bn1``, ``bn2``, ``bn3``, ``downsample.1``), so parameter names are
identical; GroupNorm has the same affine parameters as BatchNorm (weight and bias per channel),
so parameter counts are identical too (11,689,512 / 21,797,672 / 25,557,032 for ResNet-18/34/50
with 1000 classes). A torchvision state dict loads with :func:`load_torchvision_state_dict`
(which drops the BatchNorm running statistics).

Extras: ``cifar=True`` gives the usual CIFAR stem (3x3 stride-1 conv, no max-pool) for 32x32
inputs; ``width`` scales all stages (``width * (1, 2, 4, 8)`` planes; 64 is torchvision's);
``num_groups`` is the maximal group count of each GroupNorm, the actual count being the largest
divisor of the channel number not above it (:func:`dpprims.models.convert.choose_num_groups`).

The ReLUs are not in-place (torchvision's are): an in-place op on the output of a module that
carries a full backward hook (Opacus' GradSampleModule, hook-based DP engines) is an autograd
error. No parameters or names change; it costs one extra activation buffer per ReLU.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, List, Mapping, Optional, Sequence, Type, Union

import torch
from torch import Tensor, nn

from .convert import group_norm

__all__ = [
    "ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50",
    "load_torchvision_state_dict",
]

NormLayer = Callable[[int], nn.Module]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding (torchvision's helper)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution (torchvision's helper)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, norm_layer: Optional[NormLayer] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = group_norm
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride is on the 3x3 conv (conv2)."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, norm_layer: Optional[NormLayer] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = group_norm
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet with a configurable norm layer (GroupNorm by default).

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, e.g. ``[2, 2, 2, 2]`` for ResNet-18.
        num_classes: size of the final ``fc`` layer.
        in_channels: channels of the input image.
        cifar: CIFAR stem (3x3 stride-1 ``conv1``, ``maxpool`` = Identity) instead of the
            ImageNet stem (7x7 stride-2 ``conv1`` + 3x3 stride-2 max-pool).
        width: planes of the first stage (stages use ``width * (1, 2, 4, 8)``); 64 = torchvision.
        num_groups: maximal GroupNorm group count (largest divisor of C not above it is used).
        zero_init_residual: zero the weight of the last norm of each residual branch
            (``bn2`` in BasicBlock, ``bn3`` in Bottleneck), as torchvision's option.
        norm_layer: ``callable(num_channels) -> nn.Module`` overriding the GroupNorm
            (``num_groups`` is then ignored). It must not mix examples if used for DP training.
    """

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: Sequence[int],
                 num_classes: int = 1000, in_channels: int = 3, cifar: bool = False, width: int = 64,
                 num_groups: int = 32, zero_init_residual: bool = False,
                 norm_layer: Optional[NormLayer] = None) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must have 4 entries (one per stage), got {list(layers)}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if norm_layer is None:
            norm_layer = partial(group_norm, num_groups=num_groups)
        self._norm_layer = norm_layer
        self.inplanes = width
        self.cifar = bool(cifar)

        if cifar:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

        # torchvision's init (fc keeps nn.Linear's default init, as in torchvision).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                if m.weight is not None:
                    nn.init.constant_(m.weight, 1)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                last = None
                if isinstance(m, Bottleneck):
                    last = m.bn3
                elif isinstance(m, BasicBlock):
                    last = m.bn2
                if last is not None and getattr(last, "weight", None) is not None:
                    nn.init.constant_(last.weight, 0)

    def _make_layer(self, block: Type[Union[BasicBlock, Bottleneck]], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers: List[nn.Module] = [block(self.inplanes, planes, stride, downsample, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _resnet(block, layers, num_classes, in_channels, cifar, width, num_groups, zero_init_residual,
            norm_layer) -> ResNet:
    return ResNet(block, layers, num_classes=num_classes, in_channels=in_channels, cifar=cifar,
                  width=width, num_groups=num_groups, zero_init_residual=zero_init_residual,
                  norm_layer=norm_layer)


def resnet18(num_classes: int = 1000, in_channels: int = 3, cifar: bool = False, width: int = 64,
             num_groups: int = 32, zero_init_residual: bool = False,
             norm_layer: Optional[NormLayer] = None) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]) with GroupNorm. See :class:`ResNet`."""
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, cifar, width, num_groups,
                   zero_init_residual, norm_layer)


def resnet34(num_classes: int = 1000, in_channels: int = 3, cifar: bool = False, width: int = 64,
             num_groups: int = 32, zero_init_residual: bool = False,
             norm_layer: Optional[NormLayer] = None) -> ResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]) with GroupNorm. See :class:`ResNet`."""
    return _resnet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels, cifar, width, num_groups,
                   zero_init_residual, norm_layer)


def resnet50(num_classes: int = 1000, in_channels: int = 3, cifar: bool = False, width: int = 64,
             num_groups: int = 32, zero_init_residual: bool = False,
             norm_layer: Optional[NormLayer] = None) -> ResNet:
    """ResNet-50 (Bottleneck v1.5, [3, 4, 6, 3]) with GroupNorm. See :class:`ResNet`."""
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, cifar, width, num_groups,
                   zero_init_residual, norm_layer)


_BN_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def load_torchvision_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True,
                                skip_fc: bool = False):
    """Load a torchvision ResNet state dict into a GroupNorm ResNet of the same depth and width.

    The BatchNorm running statistics (``*.running_mean``, ``*.running_var``,
    ``*.num_batches_tracked``) have no GroupNorm counterpart and are dropped; every other key has
    the same name and shape, so the load is strict by default. ``skip_fc=True`` also drops
    ``fc.weight`` / ``fc.bias`` (fine-tuning with another number of classes; then
    ``strict`` only checks the rest). The BatchNorm scales/shifts become the GroupNorm ones: a
    warm start, not the same function (the normalisation statistics differ).
    Returns ``model.load_state_dict``'s result.
    """
    sd = {k: v for k, v in state_dict.items() if not k.endswith(_BN_BUFFER_SUFFIXES)}
    if skip_fc:
        sd = {k: v for k, v in sd.items() if k not in ("fc.weight", "fc.bias")}
        if strict:
            own = model.state_dict()
            missing = sorted(set(own) - set(sd) - {"fc.weight", "fc.bias"})
            unexpected = sorted(set(sd) - set(own))
            if missing or unexpected:
                raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
            return model.load_state_dict(sd, strict=False)
    return model.load_state_dict(sd, strict=strict)
