"""Tests of dpprims.reference, the oracle, against independent computations.

Independent means: an explicit Python loop of jax.grad per example, a dense / conv / norm /
embedding layer written out and differentiated by JAX autodiff, and torch (a loop of
torch.autograd.grad per example on the torch functional ops, plus F.unfold / F.group_norm /
F.layer_norm). Inputs are fresh random float64 arrays; the seed is printed (shown on failure)
and can be pinned with DPPRIMS_TEST_SEED.
"""
import math
import os

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dpprims.reference as ref  # noqa: E402

RTOL = 1e-10  # float64, relative to the largest magnitude of the expected tensor


@pytest.fixture
def rng():
    seed = int(os.environ.get("DPPRIMS_TEST_SEED", np.random.SeedSequence().entropy % 2**63))
    print(f"rng seed {seed} (rerun with DPPRIMS_TEST_SEED={seed})")
    return np.random.default_rng(seed)


def assert_close(actual, expected, what="", rtol=RTOL):
    """Max-abs error relative to max |expected|; says where and by how much on failure."""
    a, e = np.asarray(actual), np.asarray(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    assert np.all(np.isfinite(a)), f"{what}: non-finite output {a}"
    if e.size == 0:
        return
    diff = np.abs(a.astype(np.float64) - e.astype(np.float64))
    scale = max(float(np.max(np.abs(e))), np.finfo(np.float64).tiny)
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    rel = float(diff[worst]) / scale
    assert rel <= rtol, (
        f"{what}: max abs error {diff[worst]:.3e} at {worst} (got {a[worst]!r}, expected {e[worst]!r}), "
        f"{rel:.3e} relative to max |expected| {scale:.3e}, tol {rtol}"
    )


def t64(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


# ===================================================================== general (vmap of grad)
def _mlp_loss(params, example):
    h = jnp.tanh(example["x"] @ params["w1"] + params["b1"])
    out = h @ params["w2"] + params["b2"]
    return jnp.sum(jnp.square(out - example["y"]))


def _mlp_setup(rng, batch=5, d=7, h=6, k=3):
    params = {
        "w1": jax.device_put(rng.normal(size=(d, h))),
        "b1": jax.device_put(rng.normal(size=h)),
        "w2": jax.device_put(rng.normal(size=(h, k))),
        "b2": jax.device_put(rng.normal(size=k)),
    }
    batch_tree = {"x": jax.device_put(rng.normal(size=(batch, d))), "y": jax.device_put(rng.normal(size=(batch, k)))}
    grad_one = jax.jit(jax.grad(_mlp_loss))
    loop = [grad_one(params, {"x": batch_tree["x"][i], "y": batch_tree["y"][i]}) for i in range(batch)]
    flat = np.stack([np.concatenate([np.ravel(g[key]) for key in sorted(g)]) for g in loop])  # [B, P]
    return params, batch_tree, loop, flat


def test_per_example_grads_match_python_loop(rng):
    params, batch, loop, flat = _mlp_setup(rng)
    grads = ref.per_example_grads(_mlp_loss, params, batch)
    for key in params:
        assert_close(grads[key], np.stack([np.asarray(g[key]) for g in loop]), f"grad {key}")
        assert grads[key].dtype == jnp.float64
    assert_close(ref.per_example_norms(grads), np.linalg.norm(flat, axis=1), "norms")
    assert_close(ref.per_example_sq_norms(grads), np.sum(flat**2, axis=1), "sq norms")


@pytest.mark.parametrize("clipping,gamma", [("flat", 0.01), ("automatic", 0.01), ("automatic", 0.5)])
def test_clipped_grad_matches_numpy(rng, clipping, gamma):
    params, batch, loop, flat = _mlp_setup(rng, batch=6)
    norms = np.linalg.norm(flat, axis=1)
    clip = float(np.median(norms))  # some examples clipped, some not
    mask = np.array([1, 1, 0, 1, 1, 0], dtype=np.float64)
    if clipping == "flat":
        factors = np.minimum(1.0, clip / (norms + 1e-6))
        assert 0 < np.sum(factors < 1) < len(factors)
    else:
        factors = clip / (norms + gamma)
    factors = factors * mask
    expected = np.sum(factors[:, None] * flat, axis=0)

    summed, got_norms = ref.clipped_grad(_mlp_loss, params, batch, clip, mask=mask, clipping=clipping, gamma=gamma)
    assert_close(got_norms, norms, "norms")
    assert_close(np.concatenate([np.ravel(summed[key]) for key in sorted(summed)]), expected, "clipped sum")


# ===================================================================== clip factors / clipped sum
@pytest.mark.parametrize("clipping", ["flat", "automatic"])
def test_clip_factors_formula(rng, clipping):
    norms = rng.exponential(size=17) * 3
    clip, gamma = 1.3, 0.07
    got = ref.clip_factors(jnp.array(norms), clip, clipping=clipping, gamma=gamma)
    expected = np.minimum(1.0, clip / (norms + 1e-6)) if clipping == "flat" else clip / (norms + gamma)
    assert_close(got, expected, f"{clipping} factors")
    assert np.all(np.asarray(got) * norms <= clip * (1 + 1e-12))  # the guarantee


def test_clip_factors_edge_cases():
    norms = jnp.array([0.0, 0.5, 2.0, np.nan, np.inf, 1e300])
    # C = 0: everything zero, also the zero-norm example.
    for clipping in ref.CLIPPINGS:
        np.testing.assert_array_equal(ref.clip_factors(norms, 0.0, clipping=clipping), np.zeros(6))
    # C = inf, flat: no clipping for finite norms, non-finite norms still dropped.
    np.testing.assert_array_equal(ref.clip_factors(norms, np.inf), [1, 1, 1, 0, 0, 1])
    # finite C: norm 0 -> 1 (flat) or C / gamma (automatic); non-finite -> 0.
    flat = np.asarray(ref.clip_factors(norms, 1.0))
    np.testing.assert_array_equal(flat[[0, 1, 3, 4]], [1, 1, 0, 0])
    assert flat[2] == pytest.approx(1.0 / (2.0 + 1e-6), rel=1e-15)
    auto = np.asarray(ref.clip_factors(norms, 1.0, clipping="automatic", gamma=0.25))
    np.testing.assert_allclose(auto, [4.0, 1 / 0.75, 1 / 2.25, 0, 0, 1e-300], rtol=1e-15)
    # mask: bool and 0/1 floats zero the padding rows.
    keep = np.array([True, False, True, True, False, True])
    for mask in (keep, keep.astype(np.float64), jnp.array(keep.astype(np.int32))):
        np.testing.assert_array_equal(ref.clip_factors(norms, 1.0, mask=mask), flat * keep)
    # empty batch
    assert ref.clip_factors(jnp.zeros((0,)), 1.0).shape == (0,)
    assert ref.clip_factors(jnp.zeros((0,)), 1.0, clipping="automatic", mask=np.zeros(0)).shape == (0,)
    # dtype preserved
    assert ref.clip_factors(jnp.array([1.0, 2.0], jnp.float32), 1.0).dtype == jnp.float32
    assert ref.clip_factors(norms, 1.0).dtype == jnp.float64


def test_clip_factors_rejects_bad_arguments():
    norms = jnp.array([1.0, 2.0])
    for bad in (-1.0, np.nan, -np.inf):
        with pytest.raises(ValueError, match="max_grad_norm"):
            ref.clip_factors(norms, bad)
    with pytest.raises(ValueError, match="finite max_grad_norm"):
        ref.clip_factors(norms, np.inf, clipping="automatic")
    for gamma in (0.0, -1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="gamma"):
            ref.clip_factors(norms, 1.0, clipping="automatic", gamma=gamma)
    with pytest.raises(ValueError, match="'flat', 'automatic'"):
        ref.clip_factors(norms, 1.0, clipping="Flat")
    with pytest.raises(ValueError, match="mask"):
        ref.clip_factors(norms, 1.0, mask=np.ones(3))


def test_clip_factors_under_jit(rng):
    norms = jnp.array(rng.exponential(size=5))
    got = jax.jit(lambda n, c: ref.clip_factors(n, c))(norms, 0.8)
    assert_close(got, np.minimum(1, 0.8 / (np.asarray(norms) + 1e-6)), "jit factors")


def test_clipped_sum_drops_non_finite_examples_with_zero_factor(rng):
    g = rng.normal(size=(5, 3, 4))
    h = rng.normal(size=(5, 2))
    g[1] = np.nan
    g[3, 0, 0] = np.inf
    h[3] = -np.inf
    factors = rng.uniform(0.1, 1, size=5)
    factors[[1, 3]] = 0.0
    out = ref.clipped_sum({"g": jax.device_put(g), "h": (jax.device_put(h),)}, jax.device_put(factors))
    keep = [0, 2, 4]
    assert_close(out["g"], np.einsum("b,bij->ij", factors[keep], g[keep]), "g")
    assert_close(out["h"][0], factors[keep] @ h[keep], "h")
    # the same through the layer closed forms, with the non-finite values in A as well as G
    A, G = rng.normal(size=(5, 4, 6)), rng.normal(size=(5, 4, 3))
    A[1], G[3] = np.nan, np.inf
    assert_close(
        ref.linear_clipped_weight_grad(A, G, factors), np.einsum("b,btp,btd->pd", factors[keep], G[keep], A[keep]), "W"
    )
    assert_close(ref.linear_clipped_bias_grad(G, factors), factors[keep] @ G[keep].sum(1), "b")


def test_empty_batch():
    zero = ref.clipped_sum({"w": jnp.zeros((0, 3, 2))}, jnp.zeros((0,)))
    np.testing.assert_array_equal(zero["w"], np.zeros((3, 2)))
    A, G = jnp.zeros((0, 4, 5)), jnp.zeros((0, 4, 3))
    for fn in (ref.linear_weight_sq_norms_direct, ref.linear_weight_sq_norms_ghost):
        assert fn(A, G).shape == (0,)
    assert ref.linear_clipped_weight_grad(A, G, jnp.zeros(0)).shape == (3, 5)
    x, Gc = jnp.zeros((0, 2, 5, 5)), jnp.zeros((0, 4, 5, 5))
    for method in ref.CONV_NORM_METHODS:
        assert ref.conv2d_weight_sq_norms(x, Gc, (4, 2, 3, 3), padding=1, method=method).shape == (0,)
    np.testing.assert_array_equal(
        ref.conv2d_clipped_weight_grad(x, Gc, jnp.zeros(0), (4, 2, 3, 3), padding=1), np.zeros((4, 2, 3, 3))
    )
    assert ref.per_example_norms({"a": jnp.zeros((0, 3)), "b": jnp.zeros((0,))}).shape == (0,)
    assert ref.embedding_sq_norms(jnp.zeros((0, 3), jnp.int32), jnp.zeros((0, 3, 2))).shape == (0,)


# ===================================================================== linear
def _dense_loss(params, example):
    # <Y, G> with Y = A W^T + b: its gradient w.r.t. (W, b) is exactly the layer's weight gradient
    y = example["a"] @ params["w"].T + params["b"]
    return jnp.sum(y * example["g"])


@pytest.mark.parametrize(
    "B,T,d,p",
    [
        pytest.param(5, None, 13, 11, id="B5-2D-d13-p11"),
        pytest.param(5, 7, 13, 11, id="B5-T7-d13-p11"),
        pytest.param(4, 1, 8, 8, id="B4-T1-d8-p8"),
        pytest.param(3, 16, 4, 32, id="B3-T16-d4-p32"),
        pytest.param(1, 3, 1, 2, id="B1-T3-d1-p2"),
        pytest.param(3, (2, 3), 5, 4, id="B3-T2x3-d5-p4"),
    ],
)
def test_linear_closed_forms(rng, B, T, d, p):
    mid = () if T is None else (T if isinstance(T, tuple) else (T,))
    A = rng.normal(size=(B, *mid, d))
    G = rng.normal(size=(B, *mid, p))
    params = {"w": jax.device_put(rng.normal(size=(p, d))), "b": jax.device_put(rng.normal(size=p))}
    grads = ref.per_example_grads(_dense_loss, params, {"a": jax.device_put(A), "g": jax.device_put(G)})
    w_sq = np.sum(np.asarray(grads["w"]) ** 2, axis=(1, 2))
    b_sq = np.sum(np.asarray(grads["b"]) ** 2, axis=1)

    assert_close(ref.linear_per_example_weight_grads(A, G), grads["w"], "per-example W")
    assert_close(ref.linear_per_example_bias_grads(G), grads["b"], "per-example b")
    assert_close(ref.linear_weight_sq_norms_direct(A, G), w_sq, "direct")
    assert_close(ref.linear_weight_sq_norms_ghost(A, G), w_sq, "ghost")
    assert_close(ref.linear_bias_sq_norms(G), b_sq, "bias")
    if T is None:  # T = 1 identity ||a||^2 ||g||^2
        assert_close(w_sq, np.sum(A**2, 1) * np.sum(G**2, 1), "T=1 identity")

    c = rng.uniform(0, 1, size=B)
    c[0] = 0.0
    assert_close(ref.linear_clipped_weight_grad(A, G, c), np.einsum("b,bpd->pd", c, grads["w"]), "clipped W")
    assert_close(ref.linear_clipped_bias_grad(G, c), c @ np.asarray(grads["b"]), "clipped b")


def test_dtype_is_preserved(rng):
    A = jax.device_put(np.asarray(rng.normal(size=(3, 4, 5)), np.float32))
    G = jax.device_put(np.asarray(rng.normal(size=(3, 4, 2)), np.float32))
    c = jax.device_put(np.asarray([0.5, 0.0, 1.0], np.float32))
    outs = [
        ref.linear_weight_sq_norms_direct(A, G),
        ref.linear_weight_sq_norms_ghost(A, G),
        ref.linear_bias_sq_norms(G),
        ref.linear_clipped_weight_grad(A, G, c),
        ref.per_example_norms({"a": A}),
        ref.clipped_sum({"a": A}, c)["a"],
        ref.conv1d_weight_sq_norms(A, G[:, :, :2], (4, 4, 4)),
        ref.conv1d_weight_sq_norms(A, G[:, :, :2], (4, 4, 4), method="ghost"),
        ref.groupnorm_xhat(A, 2),
        ref.layernorm_xhat(A, 5),
        ref.norm_affine_per_example_grads(A, A, 1)[0],
        ref.embedding_sq_norms(jnp.zeros((3, 4), jnp.int32), G),
        ref.embedding_clipped_grad(jnp.zeros((3, 4), jnp.int32), G, c, 3),
    ]
    for i, out in enumerate(outs):
        assert out.dtype == jnp.float32, f"output {i} has dtype {out.dtype}"


# ===================================================================== conv
def _torch_conv_per_example(fn, x, G, weight, bias, **kw):
    """Loop of torch.autograd.grad over examples: ([B, *weight], [B, C_out])."""
    dws, dbs = [], []
    for i in range(x.shape[0]):
        w = t64(weight).requires_grad_()
        b = t64(bias).requires_grad_()
        y = fn(t64(x[i : i + 1]), w, b, **kw)
        dw, db = torch.autograd.grad(y, (w, b), grad_outputs=t64(G[i : i + 1]))
        dws.append(dw.numpy())
        dbs.append(db.numpy())
    return np.stack(dws), np.stack(dbs)


CONV2D_CASES = [
    # C_in, C_out, H, W, kernel, stride, padding, dilation, groups
    pytest.param(3, 4, 7, 8, (3, 3), 2, 1, 1, 1, id="k3-stride2-pad1"),
    pytest.param(2, 3, 9, 8, (3, 3), 1, (1, 2), 2, 1, id="pad1x2-dil2"),
    pytest.param(4, 6, 5, 6, (3, 3), 1, "same", 1, 2, id="same-k3-groups2"),
    pytest.param(2, 3, 6, 5, (4, 2), 1, "same", (1, 2), 1, id="same-k4x2-dil1x2"),
    pytest.param(3, 6, 5, 6, (3, 3), 1, "valid", 1, 3, id="depthwise-x2-valid"),
    pytest.param(2, 3, 6, 5, (3, 1), (2, 1), (1, 0), 1, 1, id="k3x1-stride2x1"),
    pytest.param(4, 4, 9, 8, (2, 3), (2, 1), (0, 1), (1, 2), 2, id="mixed-groups2"),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("c_in,c_out,H,W,kernel,stride,padding,dilation,groups", CONV2D_CASES)
def test_conv2d_vs_torch(rng, c_in, c_out, H, W, kernel, stride, padding, dilation, groups):
    B = 3
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = rng.normal(size=(B, c_in, H, W))
    weight = rng.normal(size=(c_out, c_in // groups, *kernel))
    bias = rng.normal(size=c_out)
    y_torch = F.conv2d(t64(x), t64(weight), None, **kw).numpy()
    assert_close(ref.conv2d_forward(x, weight, **kw), y_torch, "forward")
    G = rng.normal(size=y_torch.shape)
    dw, db = _torch_conv_per_example(F.conv2d, x, G, weight, bias, **kw)

    assert_close(ref.conv2d_per_example_weight_grads(x, G, weight.shape, **kw), dw, "per-example W")
    assert_close(ref.conv2d_per_example_bias_grads(G), db, "per-example b")
    w_sq = np.sum(dw**2, axis=(1, 2, 3, 4))
    for method in ref.CONV_NORM_METHODS:
        assert_close(ref.conv2d_weight_sq_norms(x, G, weight.shape, **kw, method=method), w_sq, method)
    assert_close(ref.conv2d_bias_sq_norms(G), np.sum(db**2, axis=1), "bias norms")
    c = rng.uniform(0, 1, size=B)
    c[1] = 0.0
    clipped = ref.conv2d_clipped_weight_grad(x, G, c, weight.shape, **kw)
    assert_close(clipped, np.einsum("b,b...->...", c, dw), "clipped W")
    assert_close(ref.conv2d_clipped_bias_grad(G, c), c @ db, "clipped b")

    U = np.asarray(ref.conv2d_unfold(x, kernel, stride, padding, dilation))
    if not isinstance(padding, str):  # F.unfold takes no 'same' / 'valid'
        expected = F.unfold(t64(x), kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
        assert_close(U, expected.numpy(), "unfold vs F.unfold")
    # all cases: the per-group GEMM U_g W_g^T reproduces torch's conv output
    d, p = (c_in // groups) * math.prod(kernel), c_out // groups
    W2 = weight.reshape(c_out, d)
    y_unf = np.concatenate([U[:, :, g * d : (g + 1) * d] @ W2[g * p : (g + 1) * p].T for g in range(groups)], axis=2)
    assert_close(y_unf.transpose(0, 2, 1).reshape(y_torch.shape), y_torch, "unfold GEMM vs conv2d")


@pytest.mark.parametrize(
    "c_in,c_out,L,k,stride,padding,dilation,groups",
    [
        pytest.param(3, 5, 12, 4, 2, 1, 1, 1, id="k4-stride2-pad1"),
        pytest.param(2, 3, 10, 4, 1, "same", 2, 1, id="same-k4-dil2"),
        pytest.param(4, 6, 9, 3, 1, 2, 1, 2, id="groups2"),
        pytest.param(3, 3, 7, 5, 1, "valid", 1, 3, id="depthwise-valid"),
    ],
)
def test_conv1d_vs_torch(rng, c_in, c_out, L, k, stride, padding, dilation, groups):
    B = 3
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = rng.normal(size=(B, c_in, L))
    weight = rng.normal(size=(c_out, c_in // groups, k))
    bias = rng.normal(size=c_out)
    y_torch = F.conv1d(t64(x), t64(weight), None, **kw).numpy()
    assert_close(ref.conv1d_forward(x, weight, **kw), y_torch, "forward")
    G = rng.normal(size=y_torch.shape)
    dw, db = _torch_conv_per_example(F.conv1d, x, G, weight, bias, **kw)

    assert_close(ref.conv1d_per_example_weight_grads(x, G, weight.shape, **kw), dw, "per-example W")
    assert_close(ref.conv1d_per_example_bias_grads(G), db, "per-example b")
    for method in ref.CONV_NORM_METHODS:
        got = ref.conv1d_weight_sq_norms(x, G, weight.shape, **kw, method=method)
        assert_close(got, np.sum(dw**2, axis=(1, 2, 3)), method)
    assert_close(ref.conv1d_bias_sq_norms(G), np.sum(db**2, axis=1), "bias norms")
    c = rng.uniform(0, 1, size=B)
    c[2] = 0.0
    clipped = ref.conv1d_clipped_weight_grad(x, G, c, weight.shape, **kw)
    assert_close(clipped, np.einsum("b,b...->...", c, dw), "clipped W")
    assert_close(ref.conv1d_clipped_bias_grad(G, c), c @ db, "clipped b")
    if not isinstance(padding, str):
        U = F.unfold(t64(x)[:, :, None, :], (1, k), dilation=(1, dilation), padding=(0, padding), stride=(1, stride))
        assert_close(ref.conv1d_unfold(x, k, stride, padding, dilation), U.transpose(1, 2).numpy(), "unfold")


def test_conv_rejects_bad_configs():
    x = jnp.zeros((2, 4, 5, 5))
    with pytest.raises(ValueError, match="stride 1"):
        ref.conv2d_unfold(x, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="groups"):
        ref.conv2d_per_example_weight_grads(x, jnp.zeros((2, 3, 3, 3)), (3, 2, 3, 3), groups=2)
    with pytest.raises(ValueError, match="shape"):
        ref.conv2d_per_example_weight_grads(x, jnp.zeros((2, 4, 5, 5)), (4, 4, 3, 3))  # G is for padding=1
    with pytest.raises(ValueError, match="method"):
        ref.conv2d_weight_sq_norms(x, jnp.zeros((2, 4, 3, 3)), (4, 4, 3, 3), method="fast")


# ===================================================================== GroupNorm / LayerNorm
def _torch_affine_per_example(fn, x, G, shape):
    dws, dbs = [], []
    for i in range(x.shape[0]):
        w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        b = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        y = fn(t64(x[i : i + 1]), w, b)
        dw, db = torch.autograd.grad(y, (w, b), grad_outputs=t64(G[i : i + 1]))
        dws.append(dw.numpy())
        dbs.append(db.numpy())
    return np.stack(dws), np.stack(dbs)


def _check_affine(rng, x_hat, G, channel_axis, dw, db):
    got_w, got_b = ref.norm_affine_per_example_grads(x_hat, G, channel_axis)
    assert_close(got_w, dw, "per-example weight")
    assert_close(got_b, db, "per-example bias")
    sq_w, sq_b = ref.norm_affine_sq_norms(x_hat, G, channel_axis)
    flat = lambda t: np.sum(t.reshape(t.shape[0], -1) ** 2, axis=1)
    assert_close(sq_w, flat(dw), "weight sq norms")
    assert_close(sq_b, flat(db), "bias sq norms")
    c = rng.uniform(0, 1, size=x_hat.shape[0])
    c[0] = 0.0
    cw, cb = ref.norm_affine_clipped_grads(x_hat, G, c, channel_axis)
    assert_close(cw, np.einsum("b,b...->...", c, dw), "clipped weight")
    assert_close(cb, np.einsum("b,b...->...", c, db), "clipped bias")


@pytest.mark.parametrize(
    "shape,groups,eps",
    [
        pytest.param((3, 6, 4, 5), 3, 1e-5, id="C6-G3-2d"),
        pytest.param((2, 4, 3, 3), 1, 1e-3, id="G1-eps1e-3"),
        pytest.param((3, 4, 5, 2), 4, 1e-5, id="G=C"),
        pytest.param((4, 6, 7), 2, 1e-2, id="1d"),
    ],
)
def test_groupnorm_vs_torch(rng, shape, groups, eps):
    x = rng.normal(size=shape) * 0.3 + rng.normal()
    x_hat = ref.groupnorm_xhat(x, groups, eps)
    assert_close(x_hat, F.group_norm(t64(x), groups, eps=eps).numpy(), "x_hat")
    G = rng.normal(size=shape)
    dw, db = _torch_affine_per_example(lambda xi, w, b: F.group_norm(xi, groups, w, b, eps), x, G, shape[1])
    _check_affine(rng, x_hat, G, 1, dw, db)


@pytest.mark.parametrize(
    "shape,normalized_shape,channel_axis,eps",
    [
        pytest.param((3, 5, 7), (7,), -1, 1e-5, id="BTD-D"),
        pytest.param((3, 5, 7), (5, 7), (1, 2), 1e-3, id="BTD-TD"),
        pytest.param((4, 6), 6, 1, 1e-2, id="BD"),
        pytest.param((2, 3, 4, 5), (5,), 3, 1e-5, id="BHWD-D"),
    ],
)
def test_layernorm_vs_torch(rng, shape, normalized_shape, channel_axis, eps):
    x = rng.normal(size=shape) * 0.3 + rng.normal()
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    x_hat = ref.layernorm_xhat(x, normalized_shape, eps)
    assert_close(x_hat, F.layer_norm(t64(x), ns, eps=eps).numpy(), "x_hat")
    G = rng.normal(size=shape)
    dw, db = _torch_affine_per_example(lambda xi, w, b: F.layer_norm(xi, ns, w, b, eps), x, G, ns)
    _check_affine(rng, x_hat, G, channel_axis, dw, db)


# ===================================================================== Embedding
def _torch_embedding_per_example(ids, G, V, padding_idx):
    out = []
    for i in range(ids.shape[0]):
        w = torch.randn(V, G.shape[-1], dtype=torch.float64, requires_grad=True)
        y = F.embedding(torch.from_numpy(ids[i : i + 1]), w, padding_idx=padding_idx)
        (dw,) = torch.autograd.grad(y, w, grad_outputs=t64(G[i : i + 1]))
        out.append(dw.numpy())
    return np.stack(out)


@pytest.mark.parametrize(
    "B,T,V,p,padding_idx",
    [
        pytest.param(4, 9, 6, 5, None, id="repeats"),
        pytest.param(4, 9, 6, 5, 2, id="repeats-pad2"),
        pytest.param(3, 7, 5, 3, -1, id="pad-neg1"),
        pytest.param(5, 1, 7, 4, None, id="T1"),
        pytest.param(2, 6, 40, 3, 0, id="mostly-distinct-pad0"),
    ],
)
def test_embedding_vs_torch(rng, B, T, V, p, padding_idx):
    ids = rng.integers(0, V, size=(B, T))
    if T > 1:
        ids[:, 1] = ids[:, 0]  # at least one repeated token per example
    if padding_idx is not None:
        ids[:, -1] = padding_idx % V
    G = rng.normal(size=(B, T, p))
    expected = _torch_embedding_per_example(ids, G, V, padding_idx)
    sq = np.sum(expected**2, axis=(1, 2))
    ids_j = jax.device_put(ids.astype(np.int32))

    per_example = ref.embedding_per_example_grads(ids_j, G, V, padding_idx)
    assert_close(per_example, expected, "per-example grads")
    assert_close(np.sum(np.asarray(per_example) ** 2, axis=(1, 2)), sq, "materialised norms")
    G_in = G.copy()
    if padding_idx is not None:
        G_in[ids == padding_idx % V] = np.nan  # padding positions must be ignored entirely
    assert_close(ref.embedding_sq_norms(ids_j, G_in, padding_idx, num_embeddings=V), sq, "ghost norms")
    c = rng.uniform(0, 1, size=B)
    c[-1] = 0.0
    clipped = ref.embedding_clipped_grad(ids_j, G_in, c, V, padding_idx)
    assert_close(clipped, np.einsum("b,bvp->vp", c, expected), "clipped")
    if T == 1:  # 1-D ids / 2-D G form
        assert_close(ref.embedding_sq_norms(ids_j[:, 0], G[:, 0]), sq, "1-D ids")


def test_embedding_rejects_bad_ids():
    with pytest.raises(ValueError, match="token ids"):
        ref.embedding_per_example_grads(jnp.array([[0, 5]]), jnp.zeros((1, 2, 3)), 5)
    with pytest.raises(ValueError, match="num_embeddings"):
        ref.embedding_sq_norms(jnp.array([[0, 1]]), jnp.zeros((1, 2, 3)), padding_idx=-1)


def test_accepts_numpy_and_cpu_torch_inputs(rng):
    A, G = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4, 2))
    expected = ref.linear_weight_sq_norms_ghost(A, G)
    assert_close(ref.linear_weight_sq_norms_ghost(t64(A), t64(G)), expected, "torch inputs")
    assert_close(ref.linear_weight_sq_norms_ghost(jax.device_put(A), G), expected, "mixed inputs")
    ids = rng.integers(0, 3, size=(3, 4))
    assert_close(ref.embedding_sq_norms(torch.from_numpy(ids), t64(G)), ref.embedding_sq_norms(ids, G), "embedding")
    c = ref.clip_factors(t64(rng.exponential(size=3)), 1.0)
    assert c.shape == (3,) and c.dtype == jnp.float64
