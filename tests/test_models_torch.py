"""dpprims.models (PyTorch): GroupNorm ResNets matching torchvision, small models, BN->GN converter."""
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from dpprims.models import (  # noqa: E402
    MODEL_NAMES,
    choose_num_groups,
    convert_batchnorm_to_groupnorm,
    get_model,
    load_torchvision_state_dict,
    mlp,
    resnet18,
    resnet34,
    resnet50,
    small_cnn,
)

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def torchvision_param_names(depth):
    """Parameter names of torchvision.models.resnet{depth}, enumerated from its layout
    (torchvision cannot be installed here)."""
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3]}[depth]
    bottleneck = depth == 50
    names = ["conv1.weight", "bn1.weight", "bn1.bias"]
    for stage, nb in enumerate(blocks, start=1):
        for b in range(nb):
            p = f"layer{stage}.{b}"
            convs = 3 if bottleneck else 2
            for k in range(1, convs + 1):
                names += [f"{p}.conv{k}.weight", f"{p}.bn{k}.weight", f"{p}.bn{k}.bias"]
            # downsample in block 0 of stages 2-4, and of stage 1 for Bottleneck (64 -> 256)
            if b == 0 and (stage > 1 or bottleneck):
                names += [f"{p}.downsample.0.weight", f"{p}.downsample.1.weight", f"{p}.downsample.1.bias"]
    return names + ["fc.weight", "fc.bias"]


def meta_model(builder, **kw):
    with torch.device("meta"):  # no memory, no real init cost
        return builder(**kw)


# ----------------------------------------------------------------------------- ResNets


@pytest.mark.parametrize("builder,depth,count,n_tensors", [
    (resnet18, 18, 11_689_512, 62),
    (resnet34, 34, 21_797_672, 110),
    (resnet50, 50, 25_557_032, 161),
])
def test_resnet_matches_torchvision_params(builder, depth, count, n_tensors):
    m = meta_model(builder, num_classes=1000)
    assert n_params(m) == count
    names = [n for n, _ in m.named_parameters()]
    assert len(names) == n_tensors
    assert names == torchvision_param_names(depth)  # same names, same order
    # state dict: only parameters (GroupNorm has no running stats)
    assert list(m.state_dict().keys()) == names
    assert not any(isinstance(mod, BN_TYPES) for mod in m.modules())


def test_resnet_names_and_shapes_spot_checks():
    r18 = meta_model(resnet18)
    sd = dict(r18.named_parameters())
    for name, shape in {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.weight": (128,),
        "layer3.1.conv2.weight": (256, 256, 3, 3),
        "layer4.1.bn2.bias": (512,),
        "fc.weight": (1000, 512),
    }.items():
        assert tuple(sd[name].shape) == shape, name
    r50 = meta_model(resnet50)
    sd = dict(r50.named_parameters())
    assert tuple(sd["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(sd["layer3.5.conv3.weight"].shape) == (1024, 256, 1, 1)
    assert tuple(sd["fc.weight"].shape) == (1000, 2048)
    # v1.5: the stride sits on the 3x3 conv of the bottleneck
    assert r50.layer2[0].conv1.stride == (1, 1) and r50.layer2[0].conv2.stride == (2, 2)
    assert r50.layer2[0].downsample[0].stride == (2, 2)
    # the norm modules are GroupNorm with 32 groups at full width
    assert isinstance(r50.bn1, nn.GroupNorm) and r50.bn1.num_groups == 32
    assert isinstance(r50.layer4[2].bn3, nn.GroupNorm) and r50.layer4[2].bn3.num_channels == 2048


def test_resnet_cifar_stem_and_init():
    m = resnet18(num_classes=10, cifar=True, width=8)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, nn.Identity)
    # kaiming normal, fan_out: std = sqrt(2 / (C_out * k * k))
    w = resnet18(width=64).layer3[0].conv2.weight
    assert abs(w.std().item() - (2 / (256 * 9)) ** 0.5) < 0.1 * (2 / (256 * 9)) ** 0.5
    for mod in m.modules():
        if isinstance(mod, nn.GroupNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
    z = resnet50(num_classes=10, cifar=True, width=8, zero_init_residual=True)
    assert torch.all(z.layer1[0].bn3.weight == 0) and torch.all(z.layer1[0].bn2.weight == 1)
    z = resnet18(num_classes=10, cifar=True, width=8, zero_init_residual=True)
    assert torch.all(z.layer1[0].bn2.weight == 0) and torch.all(z.layer1[0].bn1.weight == 1)


@pytest.mark.parametrize("width,num_groups", [(8, 32), (8, 4), (12, 32), (6, 32)])
def test_resnet_groups_divide_channels(width, num_groups):
    m = resnet50(num_classes=10, cifar=True, width=width, num_groups=num_groups)
    gns = [mod for mod in m.modules() if isinstance(mod, nn.GroupNorm)]
    assert gns
    for gn in gns:
        C, g = gn.num_channels, gn.num_groups
        assert C % g == 0 and 1 <= g <= min(num_groups, C)
        assert g == max(d for d in range(1, min(num_groups, C) + 1) if C % d == 0)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_resnet_forward_shapes(name):
    torch.manual_seed(0)
    x_cifar = torch.randn(2, 3, 32, 32)
    m = get_model(name + "-cifar", num_classes=10, width=4)
    out = m(x_cifar)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # ImageNet stem: /32 overall, so 64x64 -> 2x2 before the average pool
    m = get_model(name, num_classes=7, in_channels=1, width=4)
    out = m(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("train", [False, True])
def test_resnet_per_example_independence(train):
    """GroupNorm does not mix examples: example 0's output ignores the rest of the batch."""
    torch.manual_seed(0)
    m = resnet18(num_classes=10, cifar=True, width=8).double()
    m.train(train)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y[0] = x[0]
    with torch.no_grad():
        out_x, out_y, out_single = m(x), m(y), m(x[:1])
    assert not torch.allclose(out_x[1:], out_y[1:])
    torch.testing.assert_close(out_x[0], out_y[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_x[0], out_single[0], rtol=1e-12, atol=1e-12)
    # and the gradient of example 0's output w.r.t. the other inputs is exactly zero
    xg = x.clone().requires_grad_(True)
    m(xg)[0].sum().backward()
    assert torch.all(xg.grad[1:] == 0) and xg.grad[0].abs().sum() > 0


def test_load_torchvision_state_dict():
    src = resnet18(num_classes=10, cifar=True, width=8)
    sd = dict(src.state_dict())
    # a torchvision-style state dict also has BatchNorm running statistics
    for name, mod in src.named_modules():
        if isinstance(mod, nn.GroupNorm):
            C = mod.num_channels
            sd[f"{name}.running_mean"] = torch.zeros(C)
            sd[f"{name}.running_var"] = torch.ones(C)
            sd[f"{name}.num_batches_tracked"] = torch.tensor(0)
    dst = resnet18(num_classes=10, cifar=True, width=8)
    load_torchvision_state_dict(dst, sd)
    for (n1, p1), (n2, p2) in zip(src.named_parameters(), dst.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    other = resnet18(num_classes=3, cifar=True, width=8)
    load_torchvision_state_dict(other, sd, skip_fc=True)
    assert torch.equal(other.conv1.weight, src.conv1.weight) and other.fc.weight.shape == (3, 64)
    with pytest.raises(RuntimeError):
        load_torchvision_state_dict(other, sd)  # fc shape mismatch


def test_resnet_works_with_opacus_grad_sample():
    """No in-place op on a hooked module's output (full backward hooks forbid that)."""
    opacus = pytest.importorskip("opacus")
    import warnings

    m = resnet18(num_classes=10, cifar=True, width=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = opacus.GradSampleModule(m)
        gsm(torch.randn(3, 3, 8, 8)).sum().backward()
    assert m.layer1[0].bn1.weight.grad_sample.shape == (3, 4)


# ----------------------------------------------------------------------------- small models


def test_mlp():
    m = mlp(28 * 28, hidden=(64, 32), num_classes=10, activation="tanh")
    out = m(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    linears = [l for l in m if isinstance(l, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(784, 64), (64, 32), (32, 10)]
    assert sum(isinstance(l, nn.Tanh) for l in m) == 2
    assert mlp(4, hidden=(), num_classes=3)(torch.randn(2, 4)).shape == (2, 3)
    m = mlp(8, hidden=(16,), num_classes=2, activation=nn.GELU)
    assert isinstance(m[2], nn.GELU)
    with pytest.raises(ValueError, match="relu"):
        mlp(8, activation="nope")


@pytest.mark.parametrize("size,in_ch", [(8, 1), (28, 1), (32, 3), (5, 1), (1, 2)])
def test_small_cnn_any_size(size, in_ch):
    m = small_cnn(in_channels=in_ch, num_classes=10)
    out = m(torch.randn(3, in_ch, size, size))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert not any(isinstance(mod, BN_TYPES) for mod in m.modules())
    assert any(isinstance(mod, nn.GroupNorm) for mod in m.modules())


def test_get_model_dispatch():
    assert set(MODEL_NAMES) == {"mlp", "cnn", "transformer", "resnet18", "resnet34", "resnet50",
                                "resnet18-cifar", "resnet34-cifar", "resnet50-cifar"}
    m = get_model("mlp", num_classes=10, in_channels=1, input_size=8)
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    m = get_model("mlp", num_classes=3, in_channels=1, input_size=(64,), hidden=(16,))
    assert m(torch.randn(2, 64)).shape == (2, 3)
    m = get_model("cnn", num_classes=10, in_channels=1, input_size=28)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    m = get_model("transformer", num_classes=10, in_channels=1, input_size=28, width=16)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10) and m.patch == 7 and m.pos.weight.shape == (16, 16)
    m = get_model("ResNet50_CIFAR", num_classes=10, width=4)
    assert m.cifar and isinstance(m.layer1[0].conv3, nn.Conv2d)
    assert not get_model("resnet34", num_classes=10, width=4).cifar
    with pytest.raises(ValueError) as e:
        get_model("vgg16")
    for valid in MODEL_NAMES:
        assert valid in str(e.value)
    with pytest.raises(ValueError, match="input_size"):
        get_model("mlp", num_classes=10)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_no_batchnorm_anywhere(name):
    m = get_model(name, num_classes=10, in_channels=3, input_size=8,
                  **({"width": 4} if name.startswith("resnet") else {}))
    assert not any(isinstance(mod, BN_TYPES) for mod in m.modules())


# ----------------------------------------------------------------------------- converter


def test_choose_num_groups():
    assert choose_num_groups(64) == 32
    assert choose_num_groups(16) == 16
    assert choose_num_groups(48) == 24
    assert choose_num_groups(100) == 25
    assert choose_num_groups(37) == 1
    assert choose_num_groups(64, 8) == 8
    assert choose_num_groups(12, 8) == 6
    for C in range(1, 130):
        for g in (1, 3, 8, 32):
            k = choose_num_groups(C, g)
            assert C % k == 0 and k <= min(C, g)
    with pytest.raises(ValueError):
        choose_num_groups(0)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU())
        self.block = nn.ModuleDict({"inner": nn.Sequential(nn.Conv2d(48, 16, 1), nn.BatchNorm2d(16, affine=False))})
        self.head = nn.Sequential(nn.Flatten(1), nn.Linear(16 * 4 * 4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
        self.vol = nn.BatchNorm3d(6)
        self.sync = nn.SyncBatchNorm(64)

    def forward(self, x):
        x = self.block["inner"](self.features(x))
        return self.head(x)


def test_convert_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.Conv2d(64, 10, 1), nn.BatchNorm2d(10), nn.Flatten(1))
    out = convert_batchnorm_to_groupnorm(model)
    assert out is model
    assert isinstance(model[1], nn.GroupNorm) and model[1].num_groups == 32 and model[1].num_channels == 64
    assert isinstance(model[4], nn.GroupNorm) and model[4].num_groups == 10
    y = model(torch.randn(4, 3, 6, 6))
    assert y.shape == (4, 10 * 16) and torch.isfinite(y).all()


def test_convert_nested_and_kinds():
    torch.manual_seed(0)
    model = Nested()
    with torch.no_grad():
        model.features[1].weight.fill_(2.0)
    model.features[1].bias.requires_grad_(False)
    model.eval()
    convert_batchnorm_to_groupnorm(model, num_groups=8)
    assert not any(isinstance(m, BN_TYPES) for m in model.modules())
    gn = model.features[1]
    assert isinstance(gn, nn.GroupNorm) and (gn.num_groups, gn.num_channels) == (8, 48)
    assert torch.all(gn.weight == 2.0) and not gn.bias.requires_grad and gn.weight.requires_grad
    assert not gn.training  # mode inherited
    inner = model.block["inner"][1]
    assert (inner.num_groups, inner.num_channels, inner.affine) == (8, 16, False)
    assert isinstance(model.head[2], nn.GroupNorm) and model.head[2].num_channels == 8
    assert isinstance(model.vol, nn.GroupNorm) and (model.vol.num_groups, model.vol.num_channels) == (6, 6)
    assert isinstance(model.sync, nn.GroupNorm) and model.sync.num_groups == 8
    model.train()
    y = model(torch.randn(3, 3, 4, 4))
    assert y.shape == (3, 3) and torch.isfinite(y).all()
    y.sum().backward()


def test_convert_keeps_dtype_device_and_sharing():
    shared = nn.BatchNorm2d(32, dtype=torch.float64)
    model = nn.Sequential(shared, nn.Sequential(shared))
    convert_batchnorm_to_groupnorm(model)
    assert model[0] is model[1][0] and model[0].weight.dtype == torch.float64
    with torch.device("meta"):
        meta = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4))
    convert_batchnorm_to_groupnorm(meta)
    assert meta[1].weight.device.type == "meta"
    # a bare BatchNorm cannot be replaced in place: the replacement is returned
    gn = convert_batchnorm_to_groupnorm(nn.BatchNorm1d(12), num_groups=5)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 4
    lazy = nn.Sequential(nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="lazy"):
        convert_batchnorm_to_groupnorm(lazy)


def test_import_without_torch():
    """`import dpprims.models` must not import torch (lazy attributes)."""
    code = (
        "import sys; import dpprims.models as m; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'get_model' in dir(m); "
        "m.get_model; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
