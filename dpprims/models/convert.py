"""Make a user's model DP-compatible: replace BatchNorm by GroupNorm.

BatchNorm normalises each example with statistics of the whole batch, so an example's output
(and gradient) depends on the other examples: per-example gradients, and with them DP-SGD's
per-example clipping, are not defined. GroupNorm normalises each example on its own and has the
same affine parameters (one scale and one shift per channel), so it is the usual drop-in
replacement (Opacus' ``ModuleValidator.fix`` does the same).

Rule for the number of groups: for a layer with ``C`` channels the GroupNorm gets
``choose_num_groups(C, num_groups)`` groups, the *largest divisor of C that is <= num_groups*
(GroupNorm needs the group count to divide ``C``). With the default ``num_groups=32`` this is 32
for every multiple of 32, ``C`` itself for ``C <= 32`` (one channel per group, i.e.
InstanceNorm-like), and e.g. 24 for ``C = 48``, 25 for ``C = 100``; for a prime ``C > 32`` it
falls back to 1 group (LayerNorm over channels and positions).

Caveat for ``BatchNorm1d`` on ``(N, C)`` inputs (after a Linear layer): GroupNorm normalises
within each example over the ``C / groups`` channels of a group, so with one channel per group
(``C <= num_groups``) every output equals the bias. Pass a smaller ``num_groups`` (e.g. 1,
LayerNorm-like) for models whose BatchNorm1d layers see 2-D inputs.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

__all__ = ["choose_num_groups", "group_norm", "convert_batchnorm_to_groupnorm"]


def choose_num_groups(num_channels: int, num_groups: int = 32) -> int:
    """Largest divisor of ``num_channels`` that is ``<= num_groups`` (at least 1).

    >>> choose_num_groups(64), choose_num_groups(16), choose_num_groups(48), choose_num_groups(37)
    (32, 16, 24, 1)
    """
    num_channels = int(num_channels)
    num_groups = int(num_groups)
    if num_channels < 1:
        raise ValueError(f"num_channels must be >= 1, got {num_channels}")
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    for g in range(min(num_groups, num_channels), 0, -1):
        if num_channels % g == 0:
            return g
    return 1  # unreachable: 1 divides everything


def group_norm(num_channels: int, num_groups: int = 32, eps: float = 1e-5, affine: bool = True,
               **factory_kwargs) -> nn.GroupNorm:
    """``nn.GroupNorm`` over ``num_channels`` with ``choose_num_groups(num_channels, num_groups)``
    groups. ``factory_kwargs`` (device, dtype) go to the constructor."""
    return nn.GroupNorm(choose_num_groups(num_channels, num_groups), num_channels, eps=eps,
                        affine=affine, **factory_kwargs)


def _gn_from_bn(bn: nn.modules.batchnorm._BatchNorm, num_groups: int, copy_affine: bool) -> nn.GroupNorm:
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        raise ValueError(
            f"cannot convert uninitialised lazy {type(bn).__name__}: its number of channels is not "
            "known yet. Run one forward pass (or use a non-lazy BatchNorm) before converting.")
    # Keep device and dtype of the replaced module (parameters first, then buffers).
    ref = next(iter(bn.parameters(recurse=False)), None)
    if ref is None:
        ref = next(iter(bn.buffers(recurse=False)), None)
    factory = {}
    if ref is not None:
        factory = {"device": ref.device, "dtype": ref.dtype if ref.is_floating_point() else None}
    C = bn.num_features
    gn = group_norm(C, num_groups, eps=bn.eps, affine=bn.affine, **factory)
    if bn.affine and copy_affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
        gn.weight.requires_grad_(bn.weight.requires_grad)
        gn.bias.requires_grad_(bn.bias.requires_grad)
    gn.train(bn.training)
    return gn


def convert_batchnorm_to_groupnorm(model: nn.Module, num_groups: int = 32, *,
                                   copy_affine: bool = True) -> nn.Module:
    """Replace every BatchNorm in ``model`` by a GroupNorm, in place, and return the model.

    Covers ``BatchNorm1d/2d/3d``, their lazy variants (once initialised) and ``SyncBatchNorm``
    (anything deriving from ``torch.nn.modules.batchnorm._BatchNorm``). Each replacement is
    ``nn.GroupNorm(choose_num_groups(C, num_groups), C, eps=bn.eps, affine=bn.affine)``: the same
    number of channels, the same ``eps`` and affine flag, the group count being the largest
    divisor of ``C`` that is ``<= num_groups`` (see the module docstring, including the caveat for
    BatchNorm1d on 2-D inputs). The new module is created on the device and with the dtype of the
    one it replaces and inherits its train/eval mode.

    ``copy_affine=True`` (default) copies the BatchNorm scale and shift (and their
    ``requires_grad``) into the GroupNorm: for a freshly initialised model that is the same as
    GroupNorm's own init (ones, zeros); for a pretrained one it is a warm start, not an
    equivalent model (the normalisation statistics differ). Running statistics are dropped.

    A module instance used at several places stays shared after conversion. If ``model`` is
    itself a BatchNorm it cannot be replaced in place: the new GroupNorm is returned instead, so
    always use the return value (``model = convert_batchnorm_to_groupnorm(model)``).
    """
    bn_type = nn.modules.batchnorm._BatchNorm
    if isinstance(model, bn_type):
        return _gn_from_bn(model, num_groups, copy_affine)

    replaced: Dict[int, nn.Module] = {}
    visited = set()

    def visit(module: nn.Module) -> None:
        if id(module) in visited:
            return
        visited.add(id(module))
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            if isinstance(child, bn_type):
                new = replaced.get(id(child))
                if new is None:
                    new = _gn_from_bn(child, num_groups, copy_affine)
                    replaced[id(child)] = new
                setattr(module, name, new)
            else:
                visit(child)

    visit(model)
    return model
