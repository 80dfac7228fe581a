"""dpprims.jax.clipped_grad against the float64 oracle (dpprims.reference: vmap of grad).

Models run in float32 (x64 is on in tests, so every array is created float32 explicitly); the
oracle runs the same flax model in float64 on the same weights. Agreement: every parameter
leaf to 1e-5 relative (Frobenius norm of the difference over the norm of the oracle's leaf).
"""
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
import jax.numpy as jnp  # noqa: E402

import dpprims.jax as dpj  # noqa: E402
from dpprims import reference as ref  # noqa: E402
from dpprims.bindings.jax import _call  # noqa: E402
from dpprims.kernels import linear as klinear  # noqa: E402

INTERPRETED = _call._is_interpreted(klinear._linear_norm_direct_kernel)
REL = 1e-5


def xent(logits, labels):
    """Per-example softmax cross-entropy [B] (sum reduction within an example)."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]


def loss(out, batch):
    return xent(out, batch[1])


def f32(*shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def labels(B, k, seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, k, B), jnp.int32)


def init(model, x, seed=0):
    """Random float32 parameters for ``model`` from numpy (no flax initialisers: their per-shape
    PRNG compilations dominate a CPU test). Kernels He-scaled, norm scales around 1, biases small."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            return jnp.asarray(rng.standard_normal(s.shape) * np.sqrt(2.0 / fan_in), jnp.float32)
        if name == "scale":
            return jnp.asarray(1.0 + 0.2 * rng.standard_normal(s.shape), jnp.float32)
        return jnp.asarray(0.2 * rng.standard_normal(s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


_ORACLES: dict = {}
_ENGINES: dict = {}


def oracle(model, params, batch, C, mask=None, clipping="flat", gamma=0.01):
    """reference.clipped_grad in float64 on the same weights (one compilation per model and
    options: the clip norm is a traced argument)."""
    key = (repr(model), clipping, gamma, mask is None)
    if key not in _ORACLES:
        def single(p, ex):
            xi, yi = ex
            return xent(model.apply({"params": p}, xi[None]), yi[None])[0]

        _ORACLES[key] = jax.jit(lambda p, b, m, C: ref.clipped_grad(single, p, b, C, mask=m, clipping=clipping,
                                                                   gamma=gamma))
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    x, y = batch
    x64 = x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return _ORACLES[key](p64, (x64, y), mask, jnp.float64(C))


def engine(model, params, batch, C, mask=None, **kw):
    """dpprims.jax.clipped_grad under jit (one compilation per model, options and path)."""
    key = (repr(model), repr(sorted(kw.items())), mask is None, _call.which_path())
    if key not in _ENGINES:
        loss_fn = dpj.make_loss_fn(model, loss)
        _ENGINES[key] = jax.jit(lambda p, b, m, C: dpj.clipped_grad(loss_fn, p, b, max_grad_norm=C, mask=m, **kw))
    return _ENGINES[key](params, batch, mask, jnp.float32(C))


def assert_tree_close(got, expected, what, rel=REL):
    gl = jax.tree_util.tree_leaves_with_path(got)
    el = jax.tree.leaves(expected)
    assert len(gl) == len(el), f"{what}: {len(gl)} leaves != {len(el)}"
    for (path, a), b in zip(gl, el):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, f"{what}{jax.tree_util.keystr(path)}: shape {a.shape} != {b.shape}"
        assert np.all(np.isfinite(a)), f"{what}{jax.tree_util.keystr(path)}: non-finite"
        nb = np.linalg.norm(b)
        err = np.linalg.norm(a - b) / nb if nb > 0 else np.linalg.norm(a)
        assert err <= rel, f"{what}{jax.tree_util.keystr(path)}: relative error {err:.2e} > {rel:.0e} (|ref|={nb:.3e})"
    assert jax.tree.structure(got) == jax.tree.structure(expected), what


def check_against_oracle(model, batch, C=1.0, mask=None, clipping="flat", gamma=0.01, params=None, **kw):
    params = params if params is not None else init(model, batch[0])
    g, n = engine(model, params, batch, C, mask, clipping=clipping, gamma=gamma, **kw)
    gr, nr = oracle(model, params, batch, C, mask, clipping, gamma)
    assert_tree_close(g, gr, type(model).__name__)
    fin = np.isfinite(np.asarray(nr))
    np.testing.assert_array_equal(np.isfinite(np.asarray(n)), fin)
    np.testing.assert_allclose(np.asarray(n)[fin], np.asarray(nr)[fin], rtol=REL)
    assert n.dtype == jnp.float32 and all(a.dtype == jnp.float32 for a in jax.tree.leaves(g))
    return g, n, params


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(dpj.Dense(12, name="fc1")(x))
        x = dpj.LayerNorm(name="ln")(x)
        return dpj.Dense(3, name="fc2")(x)


class SeqModel(nn.Module):
    """Embed -> Dense on [B, T, d] (T > 1: ghost / direct) used twice (weight sharing) -> LayerNorm."""

    @nn.compact
    def __call__(self, ids):
        h = dpj.Embed(11, 6, name="emb")(ids)
        shared = dpj.Dense(6, name="shared")
        h = nn.tanh(shared(h))
        h = shared(h)  # second call of the same layer: per-example gradient = sum over calls
        h = dpj.LayerNorm(use_bias=False, name="ln")(h)
        h = dpj.Dense(9, use_bias=False, name="proj")(h)
        return dpj.Dense(3, name="head")(h.mean(axis=1))


CONV_CONFIGS = [
    pytest.param(dict(kernel_size=(1, 1), strides=2, padding="VALID"), id="k1-s2-valid"),
    pytest.param(dict(kernel_size=(3, 2), strides=(2, 1), padding="SAME", kernel_dilation=(1, 2),
                      feature_group_count=2), id="k3x2-s2x1-same-d1x2-g2"),
    pytest.param(dict(kernel_size=(2, 3), strides=2, padding=((1, 0), (2, 1)), feature_group_count=4,
                      use_bias=False), id="k2x3-s2-asym-g4-nobias"),
]


class CNN(nn.Module):
    conv: dict

    @nn.compact
    def __call__(self, x):
        x = dpj.Conv(8, name="conv", **self.conv)(x)
        x = nn.relu(dpj.GroupNorm(num_groups=4, epsilon=1e-5, name="gn")(x))
        x = dpj.Conv(4, (3, 3), padding=1, feature_group_count=2, use_bias=False, name="conv2")(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, H*W, C]: a 1-D conv over the positions
        x = dpj.Conv(5, 3, padding="CAUSAL", kernel_dilation=2, name="conv1d")(x)
        return dpj.Dense(3, name="head")(x.mean(axis=1))


# --------------------------------------------------------------------------------------------
# against the oracle
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clipping", ["flat", "automatic"])
def test_mlp_matches_oracle(clipping):
    B = 7
    batch = (f32(B, 10, scale=2.0), labels(B, 3))
    mask = jnp.asarray([1, 1, 0, 1, 1, 1, 0])
    # C between the smallest and the largest norm: some examples clipped, some not
    check_against_oracle(MLP(), batch, C=1.5, mask=mask, clipping=clipping)


def test_sequence_model_embed_shared_layer_matches_oracle():
    B, T = 4, 9
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 11, (B, T)), jnp.int32)
    batch = (ids, labels(B, 3))
    for method in ("ghost", "direct"):
        check_against_oracle(SeqModel(), batch, C=0.5, norm_method=method)
    plan = {p["layer"]: p for p in dpj.LAST_PLAN}
    assert plan["shared"]["T"] == 2 * T and plan["shared"]["method"] == "direct"  # concatenated calls


@pytest.mark.parametrize("conv", CONV_CONFIGS)
def test_cnn_matches_oracle(conv):
    B = 3
    batch = (f32(B, 7, 6, 4), labels(B, 3))
    check_against_oracle(CNN(conv), batch, C=0.7, mask=jnp.asarray([1, 0, 1]))


def test_resnet18_gn_matches_oracle():
    from dpprims.models.jax_resnet import resnet18

    # reduced width, 8x8 CIFAR stem; num_groups=2 so that the 1x1 maps of stage 4 still
    # normalise over several channels (one channel per group would make them constant)
    model = resnet18(num_classes=5, cifar=True, width=4, num_groups=2)
    B = 3
    batch = (f32(B, 8, 8, 3), labels(B, 5))
    check_against_oracle(model, batch, C=1.0, mask=jnp.asarray([1, 1, 0]))
    kinds = {p["kind"] for p in dpj.LAST_PLAN}
    assert kinds == {"conv", "norm", "dense"}


# --------------------------------------------------------------------------------------------
# paths, jit, options
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not INTERPRETED, reason="kernels are compiled (TRITON_INTERPRET unset)")
def test_interpreter_path_equals_jnp_path():
    B = 3
    model = CNN(dict(kernel_size=(3, 2), strides=(2, 1), padding="SAME", kernel_dilation=(1, 2),
                     feature_group_count=2))
    batch = (f32(B, 7, 6, 4), labels(B, 3))
    params = init(model, batch[0])
    mask = jnp.asarray([1, 1, 0])
    with dpj.use_path("jnp"):
        a = engine(model, params, batch, 0.7, mask)
    dpj.LAST_PATH.clear()
    with dpj.use_path("interpreter"):  # a fresh jit: the path is chosen when jit traces
        b = engine(model, params, batch, 0.7, mask)
    assert set(dpj.LAST_PATH.values()) == {"interpreter"}
    assert {"conv_weight_sq_norms[direct]", "conv_clipped_weight_grad", "norm_affine_per_example_grads",
            "clip_factors", "linear_clipped_weight_grad"} <= set(dpj.LAST_PATH)
    assert_tree_close(b[0], a[0], "interpreter vs jnp", rel=2e-6)
    np.testing.assert_allclose(np.asarray(b[1]), np.asarray(a[1]), rtol=2e-6)


def test_jit_with_mask_and_traced_clip_norm():
    B = 6
    model = MLP()
    batch = (f32(B, 10, scale=2.0), labels(B, 3))
    params = init(model, batch[0])
    loss_fn = dpj.make_loss_fn(model, loss)
    step = jax.jit(lambda p, b, m, C: dpj.clipped_grad(loss_fn, p, b, max_grad_norm=C, mask=m, return_aux=True))
    mask = jnp.asarray([1, 1, 1, 0, 1, 0])
    g, n, aux = step(params, batch, mask, jnp.float32(0.8))
    gr, _ = oracle(model, params, batch, 0.8, mask)
    assert_tree_close(g, gr, "jit vs oracle")
    assert int(aux["clipped"]) == int(np.sum((np.asarray(n) > 0.8) & (np.asarray(mask) != 0)))
    assert aux["losses"].shape == (B,)
    # a new clip norm is a new runtime value, not a new compilation
    before = step._cache_size()
    g3, _, _ = step(params, batch, mask, jnp.float32(0.3))
    assert step._cache_size() == before  # no retrace / recompile
    assert_tree_close(g3, oracle(model, params, batch, 0.3, mask)[0], "C=0.3")


def test_padding_and_nonfinite_examples_contribute_nothing():
    B = 5
    model = MLP()
    x = f32(B, 10)
    params = init(model, x)
    x_bad = x.at[1, 3].set(jnp.nan).at[3, 0].set(jnp.inf)  # row 1: padding, row 3: a real example
    mask = jnp.asarray([1, 0, 1, 1, 1])
    loss_fn = dpj.make_loss_fn(model, loss)
    y = labels(B, 3)
    g, n, aux = jax.jit(lambda p, b, m: dpj.clipped_grad(loss_fn, p, b, max_grad_norm=1.0, mask=m, return_aux=True))(
        params, (x_bad, y), mask)
    assert int(aux["nonfinite"]) == 1 and not np.isfinite(np.asarray(n)[3])
    # the same as the batch without rows 1 and 3
    keep = jnp.asarray([0, 2, 4])
    gr, _ = oracle(model, params, (x[keep], y[keep]), 1.0)
    assert_tree_close(g, gr, "without padding / non-finite rows")


def test_edge_cases_clip_norm_and_empty_batch():
    model = MLP()
    x = f32(4, 10)
    params = init(model, x)
    loss_fn = dpj.make_loss_fn(model, loss)
    batch = (x, labels(4, 3))
    g, _ = engine(model, params, batch, 0.0)
    assert all(not np.any(np.asarray(a)) for a in jax.tree.leaves(g))
    # C = inf (flat): no clipping, the plain sum of per-example gradients
    g, _ = engine(model, params, batch, math.inf)
    assert_tree_close(g, oracle(model, params, batch, math.inf)[0], "C=inf")
    g, n = dpj.clipped_grad(loss_fn, params, (x[:0], labels(4, 3)[:0]), max_grad_norm=1.0)
    assert n.shape == (0,) and all(not np.any(np.asarray(a)) for a in jax.tree.leaves(g))
    assert jax.tree.structure(g) == jax.tree.structure(params)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="max_grad_norm"):
            dpj.clipped_grad(loss_fn, params, (x, labels(4, 3)), max_grad_norm=bad)
    with pytest.raises(ValueError, match="finite"):
        dpj.clipped_grad(loss_fn, params, (x, labels(4, 3)), max_grad_norm=math.inf, clipping="automatic")


def test_errors_name_the_problem():
    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="plain")(nn.relu(dpj.Dense(5, name="dp")(x)))

    x = f32(3, 4)
    model = Mixed()
    params = init(model, x)

    def run(loss_fn, p, batch, **kw):  # errors surface while jit traces: nothing is compiled
        return jax.jit(lambda p, b: dpj.clipped_grad(loss_fn, p, b, max_grad_norm=1.0, **kw))(p, batch)

    with pytest.raises(ValueError, match="plain"):
        run(dpj.make_loss_fn(model, loss), params, (x, labels(3, 3)))
    mlp = MLP()
    p = init(mlp, f32(3, 10))
    scalar = dpj.make_loss_fn(mlp, lambda out, b: jnp.mean(xent(out, b[1])))
    with pytest.raises(ValueError, match="per-example"):
        run(scalar, p, (f32(3, 10), labels(3, 3)))
    with pytest.raises(ValueError, match="norm_method"):
        run(dpj.make_loss_fn(mlp, loss), p, (f32(3, 10), labels(3, 3)), norm_method={"nope": "ghost"})


def test_layers_are_drop_in_flax_layers():
    """Outside the engine the DP layers compute their flax counterparts (same params)."""
    x = f32(2, 5, 6, 4)
    for dp, ref_layer in [
        (dpj.Dense(7), nn.Dense(7)),
        (dpj.Conv(6, (3, 2), strides=(2, 1), padding="SAME", kernel_dilation=(1, 2), feature_group_count=2),
         nn.Conv(6, (3, 2), strides=(2, 1), padding="SAME", kernel_dilation=(1, 2), feature_group_count=2)),
        (dpj.GroupNorm(num_groups=2), nn.GroupNorm(num_groups=2)),
        (dpj.LayerNorm(), nn.LayerNorm()),
    ]:
        v = {"params": init(ref_layer, x)}
        v_dp = jax.eval_shape(lambda: dp.init(jax.random.key(0), x))
        assert jax.tree.structure(v_dp["params"]) == jax.tree.structure(v["params"])
        np.testing.assert_allclose(np.asarray(dp.apply(v, x)), np.asarray(ref_layer.apply(v, x)), rtol=2e-5, atol=2e-6)
    ids = jnp.asarray([[1, 2], [3, 0]], jnp.int32)
    e, e_ref = dpj.Embed(5, 3), nn.Embed(5, 3)
    v = {"params": init(e_ref, ids)}
    np.testing.assert_array_equal(np.asarray(e.apply(v, ids)), np.asarray(e_ref.apply(v, ids)))
