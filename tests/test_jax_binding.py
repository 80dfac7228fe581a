"""JAX bindings of the kernels (dpprims.bindings.jax): the three paths of every op.

* "interpreter" (the Triton kernel, launched with exactly the argument list, grid and output
  shapes that jax_triton.triton_call gets on a GPU, run by Triton's CPU interpreter inside a
  pure_callback; output buffers start as NaN) must equal the "jnp" path;
* the "jnp" path must equal the float64 oracle (dpprims.reference);
* "jax-triton" (GPU-marked) must equal "jnp".

Inputs are float32 (x64 is on in tests: every array is created as float32 explicitly) at odd
shapes.
"""
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import dpprims.bindings.jax as J  # noqa: E402
from dpprims import reference as ref  # noqa: E402
from dpprims.bindings.jax import _call  # noqa: E402
from dpprims.bindings.jax.conv import conv_out_spatial  # noqa: E402
from dpprims.kernels import linear as klinear  # noqa: E402

INTERPRETED = _call._is_interpreted(klinear._linear_norm_direct_kernel)
needs_interp = pytest.mark.skipif(not INTERPRETED, reason="kernels are compiled (TRITON_INTERPRET unset): "
                                  "the interpreter path cannot run")

TOL = 3e-6  # max |out - ref| / max |ref| for float32 inputs


def _rng(seed=None):
    return np.random.default_rng(seed)


def f32(*shape, rng=None, scale=1.0):
    rng = rng or _rng()
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype=jnp.float32)


def _check(out, expected, what, tol=TOL):
    out = np.asarray(out, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert out.shape == expected.shape, f"{what}: shape {out.shape} != {expected.shape}"
    assert np.all(np.isfinite(out)), f"{what}: non-finite output (an element the kernel did not write?) {out.ravel()[:8]}"
    err = np.max(np.abs(out - expected), initial=0.0) / max(np.max(np.abs(expected), initial=0.0), 1e-30)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}\nout={out.ravel()[:6]}\nref={expected.ravel()[:6]}"


def _paths(fn, op_names=()):
    """fn() on the jnp path and on the interpreter path, checking which path each op took."""
    with J.use_path("jnp"):
        a = fn()
    for op in op_names:
        assert J.LAST_PATH[op] == "jnp", (op, J.LAST_PATH)
    with J.use_path("interpreter"):
        b = fn()
    for op in op_names:
        assert J.LAST_PATH[op] == "interpreter", (op, J.LAST_PATH)
    return a, b


def _both_close(fn, expected, what, op_names=(), tol=TOL):
    a, b = _paths(fn, op_names)
    for x, y, e, tag in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(expected),
                            range(len(jax.tree.leaves(a)))):
        _check(x, e, f"{what}[{tag}] jnp vs oracle", tol)
        _check(y, x, f"{what}[{tag}] interpreter vs jnp", tol)


def d64(x):
    return jnp.asarray(np.asarray(x, dtype=np.float64))


# --------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------
LIN_SHAPES = [  # B, T, D, P
    pytest.param(5, 7, 23, 11, id="B5-T7-D23-P11"),
    pytest.param(3, 1, 33, 17, id="B3-T1-D33-P17"),
    pytest.param(2, 19, 16, 32, id="B2-T19-D16-P32"),
]


@needs_interp
@pytest.mark.parametrize("B,T,D,P", LIN_SHAPES)
def test_linear_norms(B, T, D, P):
    A, G = f32(B, T, D), f32(B, T, P)
    expected = ref.linear_weight_sq_norms_direct(d64(A), d64(G))
    for method in (["outer"] if T == 1 else ["direct", "ghost"]):
        _both_close(lambda: J.linear_weight_sq_norms(A, G, method), expected, f"linear {method}",
                    [f"linear_weight_sq_norms[{method}]"])
    _both_close(lambda: J.linear_bias_sq_norms(G), ref.linear_bias_sq_norms(d64(G)), "bias norm",
                ["linear_bias_sq_norms"])


@needs_interp
@pytest.mark.parametrize("B,T,D,P", LIN_SHAPES)
def test_linear_clipped_sums(B, T, D, P):
    rng = _rng()
    A, G = f32(B, T, D, rng=rng), f32(B, T, P, rng=rng)
    c = jnp.asarray(rng.uniform(0.1, 2.0, B), jnp.float32).at[0].set(0.0)
    # the dropped example holds inf/NaN: it must contribute exactly nothing
    A = A.at[0, 0, 0].set(jnp.inf)
    G = G.at[0, -1, -1].set(jnp.nan)
    exp_w = ref.linear_clipped_weight_grad(d64(A), d64(G), d64(c))
    exp_b = ref.linear_clipped_bias_grad(d64(G), d64(c))
    _both_close(lambda: J.linear_clipped_weight_grad(A, G, c), exp_w, "clipped W", ["linear_clipped_weight_grad"])
    _both_close(lambda: J.linear_clipped_bias_grad(G, c), exp_b, "clipped b", ["linear_clipped_bias_grad"])


@needs_interp
def test_rows_sq_norm_and_2d_inputs():
    x = f32(4, 37)
    _both_close(lambda: J.rows_sq_norm(x), jnp.sum(d64(x) ** 2, axis=1), "rows", ["rows_sq_norm"])
    A, G = f32(4, 9), f32(4, 5)  # [B, features] is T = 1
    _both_close(lambda: J.linear_weight_sq_norms(A, G, "outer"),
                ref.linear_weight_sq_norms_direct(d64(A)[:, None], d64(G)[:, None]), "outer 2d")


# --------------------------------------------------------------------------------------------
# clip factors
# --------------------------------------------------------------------------------------------
def _np_clip_factors(sq, mask, C, clipping, gamma=0.01):
    """The contract of kernels/clip.py in float64 numpy (independent of every JAX path)."""
    n = np.sqrt(np.asarray(sq, np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        c = C / (n + gamma) if clipping == "automatic" else np.minimum(C / (n + 1e-6), 1.0)
    keep = np.isfinite(n) & (np.asarray(mask) != 0)
    return np.where(keep, c, 0.0), n


@needs_interp
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter on inf/inf
@pytest.mark.parametrize("clipping", ["flat", "automatic"])
def test_clip_factors(clipping):
    sq = jnp.asarray([4.0, 0.25, 0.0, jnp.inf, jnp.nan, 9.0, 1e-12], jnp.float32)
    mask = jnp.asarray([1, 1, 1, 1, 1, 0, 1])
    for C in (1.0, 0.0, 0.3) + ((math.inf,) if clipping == "flat" else ()):
        exp_c, exp_n = _np_clip_factors(sq, mask, C, clipping)
        a, b = _paths(lambda: J.clip_factors(sq, mask, C, clipping=clipping), ["clip_factors"])
        for (c_out, n_out), path in ((a, "jnp"), (b, "interpreter")):
            np.testing.assert_allclose(np.asarray(c_out), exp_c, rtol=2e-6, atol=0, err_msg=f"{path} C={C}")
            np.testing.assert_allclose(np.asarray(n_out), exp_n, rtol=2e-6, atol=0, err_msg=f"{path} C={C}")
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    # no mask, a one-element array as the clip norm
    a, b = _paths(lambda: J.clip_factors(sq[:3], None, jnp.asarray([0.5], jnp.float32), clipping=clipping))
    np.testing.assert_allclose(np.asarray(a[0]), _np_clip_factors(sq[:3], np.ones(3), 0.5, clipping)[0], rtol=2e-6)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_clip_norm_validation():
    sq = jnp.ones((3,), jnp.float32)
    with pytest.raises(ValueError, match=">= 0"):
        J.clip_factors(sq, None, -1.0)
    with pytest.raises(ValueError, match=">= 0"):
        J.clip_factors(sq, None, float("nan"))
    with pytest.raises(ValueError, match="finite"):
        J.clip_factors(sq, None, float("inf"), clipping="automatic")
    with pytest.raises(ValueError, match="clipping"):
        J.clip_factors(sq, None, 1.0, clipping="per-layer")
    with pytest.raises(ValueError, match="mask"):
        J.clip_factors(sq, jnp.ones((2,)), 1.0)


# --------------------------------------------------------------------------------------------
# Conv
# --------------------------------------------------------------------------------------------
CONV2D = [  # B, C_in, H, W, C_out, kernel, stride, padding (flax), dilation, groups
    pytest.param(3, 4, 7, 6, 6, (3, 2), (2, 1), "SAME", (1, 2), 2, id="k3x2-s2x1-same-d1x2-g2"),
    pytest.param(2, 3, 9, 5, 5, (3, 3), (1, 2), ((2, 0), (1, 1)), (2, 1), 1, id="k3-s1x2-asym-d2x1"),
    pytest.param(2, 6, 5, 5, 6, (1, 1), (2, 2), "VALID", (1, 1), 6, id="k1-s2-depthwise"),
]


def _conv_case(B, C_in, H, W, C_out, k, s, padding, d, g):
    pads = J.conv_padding(padding, (H, W), k, s, d)
    out = conv_out_spatial((H, W), k, s, pads, d)
    x, G = f32(B, H, W, C_in), f32(B, *out, C_out)
    return x, G, pads


def _torch_conv_args(x, G, pads):
    """The oracle's torch layout: NCHW arrays with the low/high padding applied explicitly."""
    xp = jnp.pad(d64(x), ((0, 0),) + tuple(pads) + ((0, 0),))
    return jnp.moveaxis(xp, -1, 1), jnp.moveaxis(d64(G), -1, 1)


@needs_interp
@pytest.mark.parametrize("B,C_in,H,W,C_out,k,s,padding,d,g", CONV2D)
def test_conv2d_norms_and_clipped_sum(B, C_in, H, W, C_out, k, s, padding, d, g):
    x, G, pads = _conv_case(B, C_in, H, W, C_out, k, s, padding, d, g)
    xt, Gt = _torch_conv_args(x, G, pads)
    wshape = (C_out, C_in // g) + tuple(k)
    kw = dict(kernel_size=k, strides=s, padding=pads, dilation=d, groups=g)
    expected = ref.conv2d_weight_sq_norms(xt, Gt, wshape, stride=s, padding=0, dilation=d, groups=g)
    for method in ("direct", "ghost"):
        _both_close(lambda: J.conv_weight_sq_norms(x, G, method=method, **kw), expected, f"conv {method}",
                    [f"conv_weight_sq_norms[{method}]"])
    c = jnp.asarray(_rng().uniform(0.1, 2.0, B), jnp.float32).at[-1].set(0.0)
    exp_w = ref.conv2d_clipped_weight_grad(xt, Gt, d64(c), wshape, stride=s, padding=0, dilation=d, groups=g)
    exp_w = jnp.transpose(exp_w, (2, 3, 1, 0))  # torch [O, I/g, kh, kw] -> flax [kh, kw, I/g, O]
    x = x.at[-1, 0, 0, 0].set(jnp.nan)  # the dropped example: contributes exactly nothing
    _both_close(lambda: J.conv_clipped_weight_grad(x, G, c, **kw), exp_w, "conv clipped W",
                ["conv_clipped_weight_grad"])


@needs_interp
def test_conv1d_causal_grouped():
    B, L, C_in, C_out, k, dl, g = 3, 11, 4, 6, 3, 2, 2
    pads = J.conv_padding("CAUSAL", (L,), (k,), (1,), (dl,))
    x, G = f32(B, L, C_in), f32(B, L, C_out)
    xt = jnp.moveaxis(jnp.pad(d64(x), ((0, 0), pads[0], (0, 0))), -1, 1)
    Gt = jnp.moveaxis(d64(G), -1, 1)
    wshape = (C_out, C_in // g, k)
    kw = dict(kernel_size=(k,), strides=(1,), padding=pads, dilation=(dl,), groups=g)
    expected = ref.conv1d_weight_sq_norms(xt, Gt, wshape, dilation=dl, groups=g)
    for method in ("direct", "ghost"):
        _both_close(lambda: J.conv_weight_sq_norms(x, G, method=method, **kw), expected, f"conv1d {method}")
    c = jnp.asarray([0.5, 0.0, 2.0], jnp.float32)
    exp_w = jnp.transpose(ref.conv1d_clipped_weight_grad(xt, Gt, d64(c), wshape, dilation=dl, groups=g), (2, 1, 0))
    _both_close(lambda: J.conv_clipped_weight_grad(x, G, c, **kw), exp_w, "conv1d clipped W")


def test_conv_padding_matches_flax():
    from jax import lax

    for padding, spatial, k, s, d in [("SAME", (7, 6), (3, 2), (2, 1), (1, 2)), ("VALID", (5, 5), (3, 3), (1, 1), (1, 1)),
                                      (1, (4, 4), (3, 3), (2, 2), (1, 1)), ([(1, 2), 0], (4, 4), (3, 3), (1, 1), (1, 1))]:
        pads = J.conv_padding(padding, spatial, k, s, d)
        x = jnp.ones((1,) + spatial + (1,), jnp.float32)
        w = jnp.ones(k + (1, 1), jnp.float32)
        ref_pad = padding if isinstance(padding, str) else pads
        dn = ("NHWC", "HWIO", "NHWC")
        y1 = lax.conv_general_dilated(x, w, s, ref_pad, rhs_dilation=d, dimension_numbers=dn)
        y2 = lax.conv_general_dilated(x, w, s, pads, rhs_dilation=d, dimension_numbers=dn)
        np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    with pytest.raises(NotImplementedError):
        J.conv_padding("CIRCULAR", (4, 4), (3, 3), (1, 1), (1, 1))


# --------------------------------------------------------------------------------------------
# norm affine, embedding
# --------------------------------------------------------------------------------------------
@needs_interp
def test_norm_affine():
    B, R, C = 3, 13, 7
    xh, G = f32(B, R, C), f32(B, R, C)
    ex_w = jnp.sum(d64(xh) * d64(G), axis=1)
    ex_b = jnp.sum(d64(G), axis=1)
    expected = (jnp.stack([ex_w, ex_b], axis=1), jnp.stack([jnp.sum(ex_w ** 2, 1), jnp.sum(ex_b ** 2, 1)], axis=1))
    _both_close(lambda: J.norm_affine_per_example_grads(xh, G), expected, "norm pe",
                ["norm_affine_per_example_grads"])
    c = jnp.asarray([1.5, 0.0, 0.25], jnp.float32)
    G = G.at[1].set(jnp.nan)
    exp = ref.norm_affine_clipped_grads(d64(xh), d64(G), d64(c), channel_axis=-1)
    _both_close(lambda: J.norm_affine_clipped_grads(xh, G, c), tuple(exp), "norm clipped", ["clipped_rows_sum"])


@needs_interp
def test_embedding():
    V, P = 6, 5
    ids = jnp.asarray([[1, 2, 1, 7, -3, 1], [0, 0, 0, 0, 0, 0], [5, 4, 3, 2, 1, 0]], jnp.int32)
    G = f32(3, 6, P)
    valid = (ids >= 0) & (ids < V)
    onehot = jax.nn.one_hot(jnp.where(valid, ids, V), V + 1, dtype=jnp.float64)[..., :V]  # invalid ids: no row
    pe = jnp.einsum("btv,btp->bvp", onehot, d64(G))
    _both_close(lambda: J.embedding_sq_norms(ids, G, V), jnp.sum(pe ** 2, axis=(1, 2)), "emb norm",
                ["embedding_sq_norms"])
    c = jnp.asarray([0.5, 0.0, 2.0], jnp.float32)
    _both_close(lambda: J.embedding_clipped_grad(ids, G, c, V), jnp.einsum("b,bvp->vp", d64(c), pe), "emb clipped",
                ["embedding_clipped_grad"])


# --------------------------------------------------------------------------------------------
# wiring, paths, jit, edge cases
# --------------------------------------------------------------------------------------------
def _all_kernel_calls():
    """A KernelCall of every kernel the JAX ops launch, at small odd shapes."""
    A, G = f32(2, 3, 4), f32(2, 3, 5)
    c = jnp.ones((2,), jnp.float32)
    x, Gc = f32(2, 5, 6, 4), f32(2, 5, 6, 6)
    pads = ((1, 1), (1, 1))
    geo = J.conv.geometry(x, Gc, (3, 3), (1, 1), pads, (1, 1), 2)
    ids = jnp.asarray([[0, 2, 1], [3, 3, -1]], jnp.int32)
    return [J.linear.linear_norm_call(A, G, "direct", "ieee"), J.linear.linear_norm_call(A, G, "ghost", "ieee"),
            J.linear.rows_sq_norm_call(A[:, 0]), J.linear.linear_bias_norm_call(G),
            J.linear.linear_clipped_weight_grad_call(A, G, c, "ieee"),
            J.linear.linear_clipped_weight_grad_call(A[:, :1], G[:, :1], c, "ieee"),
            J.linear.linear_clipped_bias_grad_call(G, c),
            J.conv.conv_norm_call(x, Gc, geo, "direct", "ieee"), J.conv.conv_norm_call(x, Gc, geo, "ghost", "ieee"),
            J.conv.conv_clipped_weight_grad_call(x, Gc, c, geo, "ieee"),
            J.embedding.embedding_norm_call(ids, G, "ieee"), J.embedding.embedding_clipped_grad_call(ids, G, c, 4, "ieee"),
            J.norm.norm_affine_grads_call(A, G[:, :, :4]), J.norm.clipped_rows_sum_call(A[:, 0], c),
            J.clip.clip_factor_call(c, None, jnp.ones((1,), jnp.float32), True, 0.01)]


def test_arrange_follows_jax_triton_convention():
    A, G = f32(2, 3, 4), f32(2, 3, 5)
    call = J.linear.linear_norm_call(A, G, "direct", "ieee")
    arr = J.arrange(call)
    # positional arguments: inputs, then shapes and strides as runtime scalars, in kernel order
    assert [n for n, _ in arr.args] == ["a_ptr", "g_ptr", "T", "D", "P", "stride_ab", "stride_at", "stride_ad",
                                        "stride_gb", "stride_gt", "stride_gp"]
    args = dict(arr.args)
    assert args["T"] == 3 and args["stride_ab"] == 12 and args["stride_gt"] == 5
    assert arr.out_names == ("out_ptr",)
    spec = klinear.linear_norm_direct_spec(2, 3, 4, 5)
    assert arr.out_shapes[0].shape == spec.outputs["partials"] and arr.grid == spec.grid
    # after the outputs: constexprs only (the spec's block sizes and the op's flags), no shapes
    assert arr.metaparams == dict(spec.constexprs, DOT_PRECISION="ieee")
    # the clip kernel: the clip norm is a one-element array (a runtime value), never a constexpr
    cc = J.clip.clip_factor_call(jnp.ones((3,), jnp.float32), None, jnp.ones((1,), jnp.float32), False, 0.01)
    arr = J.arrange(cc)
    # (slack_ptr: the rounding-aware factor's optional [2, B] input, a dummy buffer from JAX, which
    # keeps design (a) and so HAS_SLACK=False)
    assert [n for n, _ in arr.args] == ["sq_norm_ptr", "mask_ptr", "slack_ptr", "max_norm_ptr", "B", "gamma"]
    assert arr.metaparams["HAS_SLACK"] is False
    assert arr.out_names == ("factor_ptr", "norm_ptr") and "max_norm_ptr" not in arr.metaparams
    # gamma is an fp32 runtime scalar (a Python float would be fp64 to jax-triton, fp32 to torch)
    assert isinstance(dict(arr.args)["gamma"], np.float32)
    # every dpprims kernel launched from JAX: nothing but constexprs after its outputs
    for kcall in _all_kernel_calls():
        arr = J.arrange(kcall)
        names = list(kcall.kernel.arg_names)
        after = names[names.index(arr.out_names[-1]) + 1:]
        assert set(after) == set(arr.metaparams) <= set(kcall.constexprs), (kcall.name, after)


def test_arrange_rejects_bad_wiring():
    A, G = f32(2, 3, 4), f32(2, 3, 5)
    call = J.linear.linear_norm_call(A, G, "direct", "ieee")
    missing = dict(call.inputs)
    del missing["stride_gp"]
    with pytest.raises(TypeError, match="missing"):
        J.arrange(_call.KernelCall(call.kernel, call.grid, missing, call.outputs, call.constexprs))
    with pytest.raises(TypeError, match="unknown"):
        J.arrange(_call.KernelCall(call.kernel, call.grid, dict(call.inputs, bogus=1), call.outputs, call.constexprs))
    # an array after the outputs cannot be passed by jax-triton
    bad = dict(call.constexprs, BLOCK_T=jnp.ones((1,), jnp.int32))
    with pytest.raises(TypeError, match="follows the outputs"):
        J.arrange(_call.KernelCall(call.kernel, call.grid, call.inputs, call.outputs, bad))
    # a constexpr cannot precede the outputs (jax-triton binds positional arguments in order)
    inputs = dict(call.inputs)
    T = inputs.pop("T")
    with pytest.raises(TypeError, match="precedes the outputs"):
        J.arrange(_call.KernelCall(call.kernel, call.grid, inputs, call.outputs, dict(call.constexprs, T=T)))


def test_path_selection(monkeypatch):
    monkeypatch.delenv(J.ENV_VAR, raising=False)
    on_gpu = jax.default_backend() == "gpu" and _call._jax_triton_available()
    assert J.which_path() == ("jax-triton" if on_gpu else "jnp")
    monkeypatch.setenv(J.ENV_VAR, "interpreter")
    assert J.which_path() == "interpreter"
    with J.use_path("jnp"):
        assert J.which_path() == "jnp"
        with J.use_path("interpreter"):
            assert J.which_path() == "interpreter"
        assert J.which_path() == "jnp"
    monkeypatch.setenv(J.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="backend"):
        J.which_path()
    with pytest.raises(ValueError):
        with J.use_path("fast"):
            pass


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU error message")
def test_forcing_jax_triton_on_cpu_is_an_error():
    A, G = f32(2, 3, 4), f32(2, 3, 5)
    with J.use_path("jax-triton"):
        with pytest.raises(RuntimeError, match="jax"):
            J.linear_weight_sq_norms(A, G, "direct")


@needs_interp
def test_interpreter_under_jit():
    A, G = f32(3, 5, 7), f32(3, 5, 4)
    c = jnp.asarray([1.0, 0.0, 0.5], jnp.float32)
    with J.use_path("interpreter"):  # the path is chosen when jit traces
        f = jax.jit(lambda A, G, c: (J.linear_weight_sq_norms(A, G, "ghost"), J.linear_clipped_weight_grad(A, G, c)))
        n, w = f(A, G, c)
    _check(n, ref.linear_weight_sq_norms_direct(d64(A), d64(G)), "jit interp norm")
    _check(w, ref.linear_clipped_weight_grad(d64(A), d64(G), d64(c)), "jit interp W")


def test_ops_are_not_differentiable():
    A, G = f32(2, 3, 4), f32(2, 3, 5)
    with pytest.raises(TypeError, match="not differentiable"):
        jax.grad(lambda a: J.linear_weight_sq_norms(a, G, "ghost").sum())(A)


@pytest.mark.parametrize("path", ["jnp", pytest.param("interpreter", marks=needs_interp)])
def test_empty_batch(path):
    with J.use_path(path):
        A, G = jnp.zeros((0, 3, 4), jnp.float32), jnp.zeros((0, 3, 5), jnp.float32)
        c = jnp.zeros((0,), jnp.float32)
        assert J.linear_weight_sq_norms(A, G, "direct").shape == (0,)
        np.testing.assert_array_equal(J.linear_clipped_weight_grad(A, G, c), np.zeros((5, 4)))
        np.testing.assert_array_equal(J.linear_clipped_bias_grad(G, c), np.zeros((5,)))
        assert J.clip_factors(jnp.zeros((0,), jnp.float32), None, 1.0)[0].shape == (0,)
        x, Gc = jnp.zeros((0, 4, 4, 2), jnp.float32), jnp.zeros((0, 4, 4, 3), jnp.float32)
        kw = dict(kernel_size=(3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        assert J.conv_weight_sq_norms(x, Gc, **kw).shape == (0,)
        np.testing.assert_array_equal(J.conv_clipped_weight_grad(x, Gc, c, **kw), np.zeros((3, 3, 2, 3)))


# --------------------------------------------------------------------------------------------
# GPU: the jax-triton path
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_jax_triton_path_matches_jnp():
    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    if not _call._jax_triton_available():
        pytest.skip("jax_triton is not installed")
    rng = _rng(0)
    A, G = f32(6, 37, 70, rng=rng), f32(6, 37, 45, rng=rng)
    c = jnp.asarray(rng.uniform(0.1, 2.0, 6), jnp.float32).at[2].set(0.0)
    x, Gc, pads = _conv_case(4, 6, 11, 9, 8, (3, 3), (2, 1), "SAME", (1, 2), 2)
    kw = dict(kernel_size=(3, 3), strides=(2, 1), padding=pads, dilation=(1, 2), groups=2)
    ids = jnp.asarray(rng.integers(-1, 9, (6, 37)), jnp.int32)

    def ops():
        return dict(
            direct=J.linear_weight_sq_norms(A, G, "direct"), ghost=J.linear_weight_sq_norms(A, G, "ghost"),
            outer=J.linear_weight_sq_norms(A[:, :1], G[:, :1], "outer"), bias=J.linear_bias_sq_norms(G),
            W=J.linear_clipped_weight_grad(A, G, c), b=J.linear_clipped_bias_grad(G, c),
            clip=J.clip_factors(jnp.abs(A[:, 0, 0]), jnp.asarray([1, 1, 0, 1, 1, 1]), 0.7),
            conv_d=J.conv_weight_sq_norms(x, Gc, method="direct", **kw),
            conv_g=J.conv_weight_sq_norms(x, Gc, method="ghost", **kw),
            conv_W=J.conv_clipped_weight_grad(x, Gc, c[:4], **kw),
            norm=J.norm_affine_per_example_grads(A, A * 0.5 + 1.0), rows=J.clipped_rows_sum(A[:, 0], c),
            emb=J.embedding_sq_norms(ids, G, 8), emb_W=J.embedding_clipped_grad(ids, G, c, 8))

    with J.use_path("jnp"):
        expected = ops()
    with J.use_path("jax-triton"):
        got = jax.jit(ops)()
    assert set(J.LAST_PATH.values()) == {"jax-triton"}, J.LAST_PATH
    for k in expected:
        for a, b in zip(jax.tree.leaves(got[k]), jax.tree.leaves(expected[k])):
            _check(a, b, f"jax-triton {k}", tol=2e-5)
