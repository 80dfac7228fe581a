"""Conv2d / Conv1d kernels (through the torch ops) against the pure-JAX oracle, dpprims.reference.

CPU: the Triton kernels run through the interpreter (conftest), at small odd shapes with
fresh random inputs. Every output buffer a binding allocates starts as NaN (POISON), so an
element a kernel forgets to write fails. The oracle computes per-example gradients by
jax.grad of a single-example conv (float64), independent of the im2col math under test.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

jnp = pytest.importorskip("jax.numpy")
from dpprims import reference as ref  # noqa: E402
from dpprims.bindings.torch import _backend  # noqa: E402
from dpprims.bindings.torch import conv as ops  # noqa: E402
from dpprims.kernels.conv import choose_conv_norm_method, conv_norm_flops, conv_pads  # noqa: E402

# max |out - ref| / max |ref| allowed, per input dtype
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# the clipped GEMM rounds c_i * G to the operand dtype once: one more half-precision rounding
TOL_SUM = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _conf(B, C_in, C_out, k, s=1, p=0, d=1, g=1, hw=(9, 8)):
    return dict(B=B, C_in=C_in, C_out=C_out, k=k, s=s, p=p, d=d, g=g, hw=hw)


# 2-D configurations: (conf, id). k is a tuple (kh, kw); hw the input size.
CONV2D = [
    pytest.param(_conf(3, 5, 7, (3, 3), s=2, p=1), id="B3-Cin5-Cout7-k3x3-s2-p1-d1-g1"),
    pytest.param(_conf(2, 3, 5, (3, 3), p=(1, 2), hw=(7, 6)), id="B2-Cin3-Cout5-k3x3-s1-p1x2-d1-g1"),
    pytest.param(_conf(2, 4, 6, (3, 2), p="same", hw=(7, 9)), id="B2-Cin4-Cout6-k3x2-s1-same-d1-g1"),
    pytest.param(_conf(3, 3, 4, (3, 3), p="same", d=2, hw=(8, 7)), id="B3-Cin3-Cout4-k3x3-s1-same-d2-g1"),
    pytest.param(_conf(2, 5, 3, (2, 3), p="valid"), id="B2-Cin5-Cout3-k2x3-s1-valid-d1-g1"),
    pytest.param(_conf(3, 5, 7, (3, 1), s=2, p=1, d=2), id="B3-Cin5-Cout7-k3x1-s2-p1-d2-g1"),
    pytest.param(_conf(2, 4, 6, (3, 3), p=1, g=2), id="B2-Cin4-Cout6-k3x3-s1-p1-d1-g2"),
    pytest.param(_conf(2, 6, 6, (3, 3), s=(2, 1), p=1, g=6), id="B2-Cin6-Cout6-k3x3-s2x1-p1-d1-depthwise"),
    pytest.param(_conf(2, 3, 6, (3, 3), p=2, d=(1, 2), g=3), id="B2-Cin3-Cout6-k3x3-s1-p2-d1x2-depthwise-x2"),
    pytest.param(_conf(2, 4, 5, (1, 3), p=(0, 1)), id="B2-Cin4-Cout5-k1x3-s1-p0x1-d1-g1"),
    pytest.param(_conf(3, 6, 9, (1, 1), s=2), id="B3-Cin6-Cout9-k1x1-s2-p0-d1-g1"),
    pytest.param(_conf(2, 5, 17, (3, 3), hw=(3, 3)), id="B2-Cin5-Cout17-k3x3-T1"),
    pytest.param(_conf(1, 40, 33, (3, 3), p=1, hw=(13, 11)), id="B1-Cin40-Cout33-k3x3-s1-p1-T143"),
]
# 1-D configurations (Conv1d through the same kernels): k is a 1-tuple; hw the length.
CONV1D = [
    pytest.param(_conf(3, 4, 6, (3,), s=2, p=1, d=2, hw=(23,)), id="conv1d-B3-Cin4-Cout6-k3-s2-p1-d2-g1"),
    pytest.param(_conf(2, 4, 4, (4,), p="same", g=4, hw=(17,)), id="conv1d-B2-Cin4-Cout4-k4-same-depthwise"),
    pytest.param(_conf(2, 6, 3, (5,), p="valid", g=3, hw=(12,)), id="conv1d-B2-Cin6-Cout3-k5-valid-g3"),
]
CONFS = CONV2D + CONV1D
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def poison():
    _backend.POISON = True
    yield
    _backend.POISON = False


def _rng():
    return np.random.default_rng()


def _ntuple(v, n):
    return (v,) * n if isinstance(v, int) else tuple(v)


class Case:
    """One conv call: inputs, the op arguments, and the oracle (float64, dpprims.reference)."""

    def __init__(self, conf, dtype, device, B=None):
        rng = _rng()
        self.B = conf["B"] if B is None else B
        k = conf["k"]
        self.n = n = len(k)
        self.stride, self.dilation = _ntuple(conf["s"], n), _ntuple(conf["d"], n)
        self.padding, self.groups = conf["p"], conf["g"]
        self.pads = conv_pads(self.padding, k, self.stride, self.dilation)
        self.wshape = (conf["C_out"], conf["C_in"] // self.groups, *k)
        self.x = torch.tensor(rng.standard_normal((self.B, conf["C_in"], *conf["hw"])), dtype=dtype, device=device)
        y = (F.conv1d if n == 1 else F.conv2d)(self.x.float().cpu(), torch.zeros(self.wshape), None, self.stride,
                                               self.padding, self.dilation, self.groups)
        self.G = torch.tensor(rng.standard_normal(tuple(y.shape)), dtype=dtype, device=device)
        self.args = (list(k), list(self.stride), [lo for lo, _ in self.pads], list(self.dilation), self.groups)

    def ref_args(self):
        p = self.padding if isinstance(self.padding, str) else _ntuple(self.padding, self.n)
        return (self.wshape, self.stride, p, self.dilation, self.groups)

    def _np(self, t, keep=None):
        a = t.detach().double().cpu().numpy()
        return jnp.asarray(a if keep is None else a[keep])

    def sq_norms(self):
        f = ref.conv1d_weight_sq_norms if self.n == 1 else ref.conv2d_weight_sq_norms
        return f(self._np(self.x), self._np(self.G), *self.ref_args())

    def bias_sq_norms(self):
        return ref.conv2d_bias_sq_norms(self._np(self.G))

    def clipped(self, c, keep=None):
        f = ref.conv1d_clipped_weight_grad if self.n == 1 else ref.conv2d_clipped_weight_grad
        cc = self._np(c, keep)
        return (f(self._np(self.x, keep), self._np(self.G, keep), cc, *self.ref_args()),
                ref.conv2d_clipped_bias_grad(self._np(self.G, keep), cc))


def _check(out, expected, tol, what):
    out = np.asarray(out.detach().double().cpu().numpy())
    expected = np.asarray(expected, dtype=np.float64)
    assert out.shape == expected.shape, f"{what}: shape {out.shape} != {expected.shape}"
    assert np.all(np.isfinite(out)), f"{what}: non-finite output (unwritten element?) {out.ravel()[:8]}"
    err = np.max(np.abs(out - expected)) / max(np.max(np.abs(expected)), 1e-30)
    assert err <= tol, (f"{what}: relative error {err:.3e} > {tol:.1e}\n"
                        f"out={out.ravel()[:8]}\nref={expected.ravel()[:8]}")


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("conf", CONFS)
def test_weight_and_bias_sq_norms(conf, dtype, device):
    case = Case(conf, dtype, device)
    expected = case.sq_norms()
    for method in ("direct", "ghost"):
        _check(ops.conv2d_weight_sq_norms(case.x, case.G, *case.args, method), expected, TOL[dtype], f"{method} norm")
    _check(ops.conv2d_bias_sq_norms(case.G), case.bias_sq_norms(), TOL[dtype], "bias norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("conf", CONFS)
def test_clipped_sums(conf, dtype, device):
    case = Case(conf, dtype, device)
    c = torch.rand(case.B, device=device, dtype=torch.float32)
    w_ref, b_ref = case.clipped(c)
    w = ops.conv2d_clipped_weight_grad(case.x, case.G, c, *case.args)
    assert w.shape == case.wshape and w.dtype == torch.float32
    _check(w, w_ref, TOL_SUM[dtype], "clipped weight grad")
    _check(ops.conv2d_clipped_bias_grad(case.G, c), b_ref, TOL_SUM[dtype], "clipped bias grad")


def test_groups_have_no_cross_group_terms(device):
    """groups=2 is two independent convs: the norm is the sum of their norms. The 'ghost over
    all channels' shortcut (one Gram of the whole unfolded input, fastDP / private-transformers)
    adds cross-group terms and is measurably different: this test would catch it."""
    case = Case(_conf(3, 4, 6, (3, 3), p=1, g=2), torch.float32, device)
    x, G = case.x, case.G
    k, s, p, d, _ = case.args
    halves = sum(ops.conv2d_weight_sq_norms(x[:, 2 * i:2 * i + 2], G[:, 3 * i:3 * i + 3], k, s, p, d, 1, "ghost")
                 for i in range(2))
    for method in ("direct", "ghost"):
        torch.testing.assert_close(ops.conv2d_weight_sq_norms(x, G, *case.args, method), halves, rtol=1e-5, atol=0)
    U = ref.conv2d_unfold(case._np(x), (3, 3), 1, 1, 1)  # [B, T, C_in*9]
    Gt = case._np(G).reshape(3, 6, -1).transpose(0, 2, 1)
    wrong = np.asarray(ref.linear_weight_sq_norms_ghost(U, Gt))  # ignores the group structure
    assert np.max(np.abs(wrong - halves.double().cpu().numpy()) / wrong) > 1e-3


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("n", [1, 2], ids=["conv1d", "conv2d"])
def test_dropped_example_with_nonfinite_values_contributes_nothing(n, device):
    """c_i = 0 must mean 'nothing', even when example i holds inf/NaN (0 * inf = NaN)."""
    conf = _conf(5, 4, 6, (3,) * n, p=1, g=2, hw=(7,) * n)
    case = Case(conf, torch.float32, device)
    case.x[2].view(-1)[5] = float("inf")
    case.G[2].view(-1)[3] = float("nan")
    c = torch.rand(5, device=device) + 0.1
    c[2] = 0.0
    keep = np.array([0, 1, 3, 4])
    w_ref, b_ref = case.clipped(c, keep)
    _check(ops.conv2d_clipped_weight_grad(case.x, case.G, c, *case.args), w_ref, TOL_SUM[torch.float32], "weight")
    _check(ops.conv2d_clipped_bias_grad(case.G, c), b_ref, TOL_SUM[torch.float32], "bias")
    # and the norms flag exactly that example as non-finite
    for method in ("direct", "ghost"):
        sq = ops.conv2d_weight_sq_norms(case.x, case.G, *case.args, method)
        assert torch.isfinite(sq).tolist() == [True, True, False, True, True]


@pytest.mark.parametrize("method", ["direct", "ghost"])
@pytest.mark.parametrize("n", [1, 2], ids=["conv1d", "conv2d"])
def test_empty_batch(method, n, device):
    case = Case(_conf(2, 4, 6, (3,) * n, p=1, g=2, hw=(5,) * n), torch.float32, device, B=0)
    c = torch.zeros(0, device=device)
    assert ops.conv2d_weight_sq_norms(case.x, case.G, *case.args, method).shape == (0,)
    assert ops.conv2d_bias_sq_norms(case.G).shape == (0,)
    w = ops.conv2d_clipped_weight_grad(case.x, case.G, c, *case.args)
    assert w.shape == case.wshape and torch.all(w == 0)
    b = ops.conv2d_clipped_bias_grad(case.G, c)
    assert b.shape == (6,) and torch.all(b == 0)


def test_strided_inputs_need_no_copy(device):
    """Channels-last x and a sliced, transposed G go straight to the kernels."""
    case = Case(_conf(3, 5, 4, (3, 3), s=2, p=1, hw=(9, 9)), torch.float32, device)
    x = case.x.contiguous(memory_format=torch.channels_last)
    G = case.G.transpose(2, 3).contiguous().transpose(2, 3)  # W-major spatial layout
    Gbig = torch.zeros(3, 9, *G.shape[2:], device=device)
    Gbig[:, 2:6] = G
    G = Gbig[:, 2:6]
    assert not x.is_contiguous() and not G.is_contiguous()
    expected = case.sq_norms()
    for method in ("direct", "ghost"):
        _check(ops.conv2d_weight_sq_norms(x, G, *case.args, method), expected, TOL[torch.float32], f"strided {method}")
    c = torch.rand(3, device=device)
    w_ref, b_ref = case.clipped(c)
    _check(ops.conv2d_clipped_weight_grad(x, G, c, *case.args), w_ref, TOL_SUM[torch.float32], "strided clipped")
    _check(ops.conv2d_clipped_bias_grad(G, c), b_ref, TOL_SUM[torch.float32], "strided bias")


def test_deterministic_reruns(device):
    case = Case(_conf(4, 6, 5, (3, 3), p=1, g=1, hw=(10, 10)), torch.float32, device)
    c = torch.rand(4, device=device)
    for method in ("direct", "ghost"):
        a = ops.conv2d_weight_sq_norms(case.x, case.G, *case.args, method)
        assert torch.equal(a, ops.conv2d_weight_sq_norms(case.x, case.G, *case.args, method))
    w = ops.conv2d_clipped_weight_grad(case.x, case.G, c, *case.args)
    assert torch.equal(w, ops.conv2d_clipped_weight_grad(case.x, case.G, c, *case.args))


@pytest.mark.parametrize("conf", [CONV2D[2], CONV2D[8], CONV2D[5], CONV1D[0]])
def test_torch_backend_matches_interpreter(conf, monkeypatch):
    """The plain-torch CPU path (F.unfold per batch chunk) computes the same numbers."""
    case = Case(conf, torch.float32, "cpu")
    c = torch.rand(case.B)
    c[0] = 0.0
    results = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", mode)
        results[mode] = [ops.conv2d_weight_sq_norms(case.x, case.G, *case.args, "direct"),
                         ops.conv2d_weight_sq_norms(case.x, case.G, *case.args, "ghost"),
                         ops.conv2d_bias_sq_norms(case.G),
                         ops.conv2d_clipped_weight_grad(case.x, case.G, c, *case.args),
                         ops.conv2d_clipped_bias_grad(case.G, c)]
        expected_backend = "triton-interpreter" if mode == "1" else "torch"
        assert _backend.LAST_BACKEND["conv2d_clipped_weight_grad"] == expected_backend
        assert _backend.LAST_BACKEND["conv2d_weight_sq_norms[ghost]"] == expected_backend
    for a, b in zip(results["1"], results["0"]):
        # the same sums in another fp32 order: an element near zero (cancellation) can differ by
        # a few ulp of the tensor's largest values, so atol scales with them (a fixed 1e-6 failed
        # about 1 run in 3 on these fresh standard-normal inputs, up to 1.9e-6 off)
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6 * max(1.0, float(b.abs().max())))


def test_ops_trace_under_torch_compile():
    """The fake implementations let torch.compile trace the ops without graph breaks."""
    case = Case(_conf(3, 4, 6, (3, 3), s=2, p=1, g=2, hw=(7, 7)), torch.float32, "cpu")
    k, s, p, d, g = case.args

    def step(x, G):
        sq = ops.conv2d_weight_sq_norms(x, G, k, s, p, d, g, "ghost") + ops.conv2d_bias_sq_norms(G)
        c = torch.clamp(1.0 / (sq.sqrt() + 1e-6), max=1.0)
        return ops.conv2d_clipped_weight_grad(x, G, c, k, s, p, d, g), ops.conv2d_clipped_bias_grad(G, c), sq

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(case.x, case.G), step(case.x, case.G)):
        torch.testing.assert_close(got, want)


def test_cost_model_choice():
    # ResNet-18 at 32x32 (DESIGN.md): stage 1 direct, stage 4 ghost
    assert choose_conv_norm_method(1024, 64 * 9, 64) == "direct"
    assert choose_conv_norm_method(16, 512 * 9, 512) == "ghost"
    assert choose_conv_norm_method(1, 512 * 9, 512) == "ghost"  # T = 1: the 1x1 Gram closed form
    assert choose_conv_norm_method(1, 9, 4, "direct") == "direct"  # user override wins
    assert choose_conv_norm_method(16, 512 * 9, 512, "direct") == "direct"
    f = conv_norm_flops(64, 72, 8, groups=4)
    assert f == {"direct": 4 * 2 * 64 * 72 * 8, "ghost": 4 * 2 * 64 * 64 * 80}
    with pytest.raises(ValueError, match="norm_method"):
        choose_conv_norm_method(4, 4, 4, "fast")


def test_padding_arguments():
    assert conv_pads("same", (3, 2), (1, 1), (1, 1)) == ((1, 1), (0, 1))  # torch: extra at the end
    assert conv_pads("same", (4,), (1,), (1,)) == ((1, 2),)
    assert conv_pads("valid", (3, 3), (2, 2), (1, 1)) == ((0, 0), (0, 0))
    assert conv_pads((1, 2), (3, 3), (1, 1), (1, 1)) == ((1, 1), (2, 2))
    with pytest.raises(ValueError, match="layer 'conv7'.*stride 1"):
        conv_pads("same", (3, 3), (2, 2), (1, 1), layer="conv7")
    with pytest.raises(ValueError, match="layer 'c'.*padding"):
        conv_pads("full", (3, 3), (1, 1), (1, 1), layer="c")


def test_shape_errors_name_the_problem(device):
    case = Case(_conf(3, 4, 6, (3, 3), p=1, g=2, hw=(5, 5)), torch.float32, device)
    x, G = case.x, case.G
    with pytest.raises(ValueError, match="batch size"):
        ops.conv2d_weight_sq_norms(x, G[:2], *case.args, "direct")
    with pytest.raises(ValueError, match="same dtype"):
        ops.conv2d_weight_sq_norms(x, G.half(), *case.args, "direct")
    with pytest.raises(ValueError, match="groups=4"):
        ops.conv2d_weight_sq_norms(x, G, *case.args[:4], 4, "direct")
    with pytest.raises(ValueError, match="rank 4"):
        ops.conv2d_weight_sq_norms(x[:, :, 0], G, *case.args, "direct")
    with pytest.raises(ValueError, match="method"):
        ops.conv2d_weight_sq_norms(x, G, *case.args, "outer")
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        ops.conv2d_clipped_weight_grad(x, G, torch.ones(2, device=device), *case.args)


@pytest.mark.gpu
def test_realistic_shape_on_gpu():
    """ResNet-18 stage 2 at 32x32 input (B=64, 128 -> 128, 3x3, T=256) and a depthwise layer,
    in bf16: compiled kernels against a float64 per-example computation (F.unfold)."""
    for C, g in ((128, 1), (256, 256)):
        case = Case(_conf(64, C, C, (3, 3), p=1, g=g, hw=(16, 16)), torch.bfloat16, "cuda")
        c = torch.rand(64, device="cuda")
        geo, x4, G4 = ops.conv_geometry(case.x, case.G, *case.args)
        U = ops.unfold(x4.double(), geo).double().view(64, g, geo.D, geo.T)
        per_ex = torch.einsum("bgpt,bgdt->bgpd", G4.double().reshape(64, g, geo.P, geo.T), U)
        sq = per_ex.pow(2).sum((1, 2, 3))
        for method in ("direct", "ghost"):
            _check(ops.conv2d_weight_sq_norms(case.x, case.G, *case.args, method), sq.cpu().numpy(),
                   TOL[torch.bfloat16], method)
        expected = (per_ex * c.double().view(-1, 1, 1, 1)).sum(0).reshape(case.wshape)
        _check(ops.conv2d_clipped_weight_grad(case.x, case.G, c, *case.args), expected.cpu().numpy(),
               TOL_SUM[torch.bfloat16], "clipped")
