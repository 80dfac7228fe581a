"""JAX models (dpprims.models.jax_resnet) and the torch <-> flax weight converter.

The JAX ResNets / MLP / CNN are the torch ones layer for layer: converted weights give the
same outputs, and dpprims.torch.DPEngine and dpprims.jax.clipped_grad give the same clipped
gradient sums and per-example norms on the same weights and batch.
"""
import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
pytest.importorskip("flax")
import jax.numpy as jnp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dpprims.jax as dpj  # noqa: E402
from dpprims.models import convert_jax as CJ  # noqa: E402
from dpprims.models import jax_resnet as JR  # noqa: E402
from dpprims.models import torch_resnet as TR  # noqa: E402
from dpprims.models import torch_small as TS  # noqa: E402
from dpprims.models.convert import choose_num_groups  # noqa: E402


def _nchw(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _nhwc(x):
    return jnp.asarray(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))


def _converted(jmodel, tmodel, xj):
    template = jax.eval_shape(lambda: jmodel.init(jax.random.key(0), xj)["params"])
    return jax.tree.map(jnp.asarray, CJ.torch_to_flax(tmodel.state_dict(), template))


PAIRS = [
    pytest.param(lambda: (JR.resnet18(num_classes=5, cifar=True, width=4), TR.resnet18(num_classes=5, cifar=True, width=4)),
                 (2, 3, 8, 8), True, id="resnet18-cifar-w4"),
    pytest.param(lambda: (JR.resnet50(num_classes=5, width=4, num_groups=4), TR.resnet50(num_classes=5, width=4, num_groups=4)),
                 (2, 3, 21, 19), True, id="resnet50-w4-odd-size"),
    pytest.param(lambda: (JR.small_cnn(num_classes=4, channels=(6, 8), hidden=7),
                          TS.small_cnn(in_channels=3, num_classes=4, channels=(6, 8), hidden=7)),
                 (2, 3, 9, 7), True, id="cnn-odd-size"),
    pytest.param(lambda: (JR.small_cnn(num_classes=4, channels=(5,), hidden=0, num_groups=None, pool_size=3),
                          TS.small_cnn(in_channels=2, num_classes=4, channels=(5,), hidden=0, num_groups=None, pool_size=3)),
                 (2, 2, 8, 8), True, id="cnn-no-norm-no-hidden-pool3"),
    pytest.param(lambda: (JR.mlp(hidden=(7, 5), num_classes=3, activation="gelu"),
                          TS.mlp(3 * 4 * 4, hidden=(7, 5), num_classes=3, activation="gelu")),
                 (2, 3, 4, 4), False, id="mlp-gelu"),
]


@pytest.mark.parametrize("make,shape,images", PAIRS)
def test_converted_weights_compute_the_same_function(make, shape, images):
    jm, tm = make()
    x = _nchw(shape)
    xj = _nhwc(x) if images else jnp.asarray(x)  # the MLP flattens whatever layout it gets
    params = _converted(jm, tm, xj)
    assert sum(a.size for a in jax.tree.leaves(params)) == sum(p.numel() for p in tm.parameters())
    with torch.no_grad():
        yt = tm(torch.from_numpy(x)).numpy()
    yj = np.asarray(jax.jit(jm.apply)({"params": params}, xj))
    np.testing.assert_allclose(yj, yt, rtol=1e-4, atol=3e-5)
    # and back: flax -> torch is the exact inverse
    back = CJ.flax_to_torch(params)
    sd = tm.state_dict()
    assert set(back) == {k for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)


def test_full_size_parameter_counts_match_torchvision():
    for build, count in ((JR.resnet18, 11_689_512), (JR.resnet34, 21_797_672), (JR.resnet50, 25_557_032)):
        shapes = jax.eval_shape(lambda: build().init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32)))
        assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"])) == count, build.__name__


def test_group_rule_and_names():
    for c in (1, 3, 4, 16, 32, 37, 48, 64, 100, 512):
        for g in (1, 2, 8, 32):
            assert JR.choose_num_groups(c, g) == choose_num_groups(c, g)
    assert isinstance(JR.get_jax_model("resnet18-cifar", width=4), JR.ResNet)
    assert JR.get_jax_model("ResNet50").block is JR.Bottleneck
    assert isinstance(JR.get_jax_model("cnn"), JR.SmallCNN) and isinstance(JR.get_jax_model("mlp"), JR.MLP)
    with pytest.raises(ValueError, match="unknown model"):
        JR.get_jax_model("vgg16")
    assert CJ.torch_key(("layer1.0", "downsample.1", "scale")) == "layer1.0.downsample.1.weight"


def test_converter_errors():
    jm, tm = JR.mlp(hidden=(4,), num_classes=2), TS.mlp(6, hidden=(4,), num_classes=2)
    xj = jnp.zeros((1, 6), jnp.float32)
    template = jax.eval_shape(lambda: jm.init(jax.random.key(0), xj)["params"])
    sd = dict(tm.state_dict())
    with pytest.raises(ValueError, match="without a flax parameter"):
        CJ.torch_to_flax(dict(sd, extra=torch.zeros(1)), template)
    del sd["3.bias"]
    with pytest.raises(KeyError, match="3.bias"):
        CJ.torch_to_flax(sd, template)


# --------------------------------------------------------------------------------------------
# torch DPEngine == JAX clipped_grad on the same weights and batch
# --------------------------------------------------------------------------------------------
def _torch_clipped(tm, x, y, C, mask):
    from dpprims.torch import DPEngine

    engine = DPEngine(tm, max_grad_norm=C)
    tm.zero_grad(set_to_none=True)
    loss = F.cross_entropy(tm(torch.from_numpy(x)), torch.from_numpy(y), reduction="none")
    norms = engine.backward(loss, mask=torch.from_numpy(mask))
    grads = {k: p.grad.detach().numpy().copy() for k, p in tm.named_parameters()}
    engine.detach()
    return grads, norms.detach().numpy()


def _jax_clipped(jm, params, xj, y, C, mask):
    def loss(out, batch):
        return -jnp.take_along_axis(jax.nn.log_softmax(out), batch[1][:, None], axis=1)[:, 0]

    loss_fn = dpj.make_loss_fn(jm, loss)
    f = jax.jit(lambda p, b, m: dpj.clipped_grad(loss_fn, p, b, max_grad_norm=C, mask=m))
    g, n = f(params, (xj, jnp.asarray(y)), jnp.asarray(mask))
    return CJ.flax_to_torch(g), np.asarray(n)


def _compare_engines(jm, tm, x, xj, C=0.8):
    B = x.shape[0]
    y = np.random.default_rng(5).integers(0, 3, B).astype(np.int64)
    mask = (np.arange(B) % 3 != 1).astype(np.int64)
    params = _converted(jm, tm, xj)
    gt, nt = _torch_clipped(tm, x, y, C, mask)
    gj, nj = _jax_clipped(jm, params, xj, y, C, mask)
    valid = mask != 0
    np.testing.assert_allclose(nj[valid], nt[valid], rtol=1e-5)
    assert set(gj) == set(gt)
    for k in gt:
        err = np.linalg.norm(gj[k] - gt[k]) / max(np.linalg.norm(gt[k]), 1e-30)
        assert err <= 1e-5, f"{k}: torch vs jax relative error {err:.2e}"


def test_torch_engine_and_jax_engine_agree_mlp():
    jm, tm = JR.mlp(hidden=(9, 7), num_classes=3), TS.mlp(12, hidden=(9, 7), num_classes=3)
    x = _nchw((5, 12), seed=2) * 2
    _compare_engines(jm, tm, x, jnp.asarray(x))


def test_torch_engine_and_jax_engine_agree_cnn(monkeypatch):
    # the torch engine's plain-torch backend (the interpreter path of its conv kernels is
    # tested in test_conv_kernels); this test is about the two engines and the two models
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    jm = JR.small_cnn(num_classes=3, channels=(4, 6), hidden=5, num_groups=2)
    tm = TS.small_cnn(in_channels=2, num_classes=3, channels=(4, 6), hidden=5, num_groups=2)
    x = _nchw((4, 2, 7, 6), seed=3)
    _compare_engines(jm, tm, x, _nhwc(x))


@pytest.mark.slow
def test_torch_engine_and_jax_engine_agree_resnet18(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    jm = JR.resnet18(num_classes=3, cifar=True, width=4, num_groups=2)
    tm = TR.resnet18(num_classes=3, cifar=True, width=4, num_groups=2)
    x = _nchw((3, 3, 8, 8), seed=4)
    _compare_engines(jm, tm, x, _nhwc(x))
