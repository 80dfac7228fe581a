"""dpprims.jax.cpu_norms: per-example conv weight-gradient norms by the offset decomposition
(the engine's jnp path), against an independent float64 oracle - jax.vmap(jax.grad) of
lax.conv_general_dilated per example, squared and summed - at odd shapes with strides, dilation,
groups, asymmetric padding, 1-D convs, 1x1 kernels and T = 1, both methods, chunked and not;
non-finite examples stay non-finite; the CPU cost model's choices; and the engine's clipped
gradient on a small conv net equals the per-example oracle with both methods."""
import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import dpprims.bindings.jax as J  # noqa: E402
from dpprims.jax import cpu_norms as CN  # noqa: E402

# (B, spatial, C_in, C_out, kernel, strides, padding, dilation, groups)
GEOS = [
    (5, (9, 7), 3, 4, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
    (3, (11, 10), 4, 6, (3, 2), (2, 3), ((2, 0), (1, 1)), (1, 1), 2),
    (4, (12, 9), 2, 5, (3, 3), (1, 2), ((0, 1), (2, 2)), (2, 1), 1),
    (3, (8, 8), 6, 3, (1, 1), (2, 2), ((0, 0), (0, 0)), (1, 1), 3),
    (2, (5, 5), 3, 7, (5, 5), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),  # T = 1
    (4, (13,), 3, 5, (3,), (2,), ((1, 2),), (2,), 1),  # 1-D
]


def _oracle(x, G, k, s, pads, d, groups):
    """sum over parameters of (per-example weight gradient)^2 in float64, by autodiff of the
    conv forward on one example: d/dw <conv(x_i, w), G_i> = the example's weight gradient."""
    n = x.ndim - 2
    sp = "HW"[-n:] if n == 2 else "W"
    w0 = jnp.zeros(tuple(k) + (x.shape[-1] // groups, G.shape[-1]), jnp.float64)

    def one(xi, gi):
        def f(w):
            dn = lax.conv_dimension_numbers((1,) + xi.shape, w.shape, (f"N{sp}C", f"{sp}IO", f"N{sp}C"))
            y = lax.conv_general_dilated(xi[None], w, s, pads, rhs_dilation=d, dimension_numbers=dn,
                                         feature_group_count=groups, precision=lax.Precision.HIGHEST)
            return jnp.sum(y[0] * gi)
        return jnp.sum(jax.grad(f)(w0) ** 2)

    return jax.vmap(one)(x.astype(jnp.float64), G.astype(jnp.float64))


def _data(geo, rng, dtype):
    B, spatial, cin, cout, k, s, pads, d, groups = geo
    x = jnp.asarray(rng.normal(size=(B,) + spatial + (cin,)), dtype)
    out = [(n + lo + hi - (kk - 1) * dd - 1) // ss + 1 for n, (lo, hi), kk, ss, dd in zip(spatial, pads, k, s, d)]
    G = jnp.asarray(rng.normal(size=(B,) + tuple(out) + (cout,)), dtype)
    return x, G


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("method", ["direct", "ghost"])
@pytest.mark.parametrize("gi", range(len(GEOS)))
def test_norms_equal_per_example_oracle(gi, method, chunked, monkeypatch):
    if chunked:
        monkeypatch.setattr(CN, "_CHUNK_ELEMS", 1)  # one example per chunk: the lax.map path
    geo = GEOS[gi]
    rng = np.random.default_rng(100 + gi)
    _, _, _, _, k, s, pads, d, groups = geo
    for dtype, rtol in ((jnp.float64, 1e-10), (jnp.float32, 2e-5)):
        x, G = _data(geo, rng, dtype)
        with J.use_path("jnp"):
            got = jax.jit(lambda x, G: CN.conv_weight_sq_norms(x, G, kernel_size=k, strides=s, padding=pads,
                                                               dilation=d, groups=groups, method=method))(x, G)
        assert got.dtype == (jnp.float64 if dtype == jnp.float64 else jnp.float32)
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(_oracle(x, G, k, s, pads, d, groups)),
                                   rtol=rtol, err_msg=f"{geo} {method} {dtype}")


@pytest.mark.parametrize("method", ["direct", "ghost"])
def test_nonfinite_example_stays_nonfinite_and_empty_batch(method):
    geo = GEOS[1]
    _, _, _, _, k, s, pads, d, groups = geo
    x, G = _data(geo, np.random.default_rng(3), jnp.float32)
    kw = dict(kernel_size=k, strides=s, padding=pads, dilation=d, groups=groups, method=method)
    x = x.at[1, 2, 3, 0].set(jnp.inf)
    G = G.at[2, 0, 0, 1].set(jnp.nan)
    with J.use_path("jnp"):
        got = np.asarray(CN.conv_weight_sq_norms(x, G, **kw))
        empty = CN.conv_weight_sq_norms(x[:0], G[:0], **kw)
    assert np.isfinite(got[0]) and not np.isfinite(got[1]) and not np.isfinite(got[2])
    assert empty.shape == (0,)


def test_cpu_cost_model_choices():
    """ResNet-18-CIFAR (B = 32) layers, where both methods were timed on the 2-core machine:
    direct at 32x32 and 16x16 (T >= 256), ghost at 8x8 and 4x4; T = 1 is ghost (the closed form);
    a forced method is kept."""
    assert CN.choose_cpu_conv_method(1024, 576, 64, 9) == "direct"
    assert CN.choose_cpu_conv_method(1024, 27, 64, 9) == "direct"
    assert CN.choose_cpu_conv_method(256, 1152, 128, 9) == "direct"
    assert CN.choose_cpu_conv_method(64, 2304, 256, 9) == "ghost"
    assert CN.choose_cpu_conv_method(16, 4608, 512, 9) == "ghost"
    assert CN.choose_cpu_conv_method(1, 4608, 512, 9) == "ghost"
    assert CN.choose_cpu_conv_method(16, 4608, 512, 9, "direct") == "direct"
    with pytest.raises(ValueError, match="conv norm method"):
        CN.choose_cpu_conv_method(16, 4608, 512, 9, "outer")


@pytest.mark.parametrize("method", ["direct", "ghost", "auto"])
def test_engine_clipped_grad_of_conv_net_equals_oracle(method):
    """clipped_grad of a small conv net (stride 2, groups, GroupNorm, Dense head) on the jnp path:
    sum_i c_i g_i with the flat clip factors of the oracle's per-example gradient norms."""
    import flax.linen as nn
    import optax

    import dpprims.jax as dpj

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = dpj.Conv(6, (3, 3), strides=(2, 2), padding="SAME")(x)
            x = dpj.GroupNorm(num_groups=2)(x)
            x = nn.relu(x)
            x = dpj.Conv(4, (3, 3), feature_group_count=2, padding=((1, 0), (0, 1)))(x)
            return dpj.Dense(3)(x.reshape(x.shape[0], -1))

    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(5, 9, 7, 2)))
    y = jnp.asarray(rng.integers(0, 3, 5))
    model = Net()
    params = model.init(jax.random.PRNGKey(0), x)["params"]

    def loss_one(p, xi, yi):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xi[None]), yi[None])[0]

    pe = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(params, x, y)
    norms = jnp.sqrt(sum(jnp.sum(l.reshape(5, -1) ** 2, axis=1) for l in jax.tree.leaves(pe)))
    C = 0.7
    c = jnp.minimum(1.0, C / (norms + 1e-6))
    expect = jax.tree.map(lambda l: jnp.einsum("b,b...->...", c, l), pe)
    loss_fn = dpj.make_loss_fn(model, lambda out, batch: optax.softmax_cross_entropy_with_integer_labels(out, batch[1]))
    with J.use_path("jnp"):
        grads, got_norms = dpj.clipped_grad(loss_fn, params, (x, y), max_grad_norm=C, norm_method=method)
    # the engine's norms are float32 (and flax's parameters): fp32 tolerances
    np.testing.assert_allclose(np.asarray(got_norms), np.asarray(norms), rtol=2e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expect)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
