"""dpprims' Gaussian noise and fused DP update from JAX (dpprims.bindings.jax.noise / .update).

* the jnp path draws the torch ops' numbers: Philox words bit for bit (Random123 known answers),
  normals bit for bit with LIBM = "numpy" (the CPU default; the torch plain path runs with
  TRITON_INTERPRET switched off for the call) and within XLA_LIBM_RTOL with LIBM = "xla", under
  jit, with and without x64;
* the interpreter path (the Triton kernel through jax.pure_callback, outputs poisoned with NaN)
  equals the jnp path bit for bit;
* distribution: KS accepts sigma and rejects 2/3 and 3/2 sigma; the extreme tail (u = 2^-128)
  gives 13.32 on every path; noise differs across steps, ranks, seeds and pair offsets;
* noisy_update: noise_std = 0 equals torch.optim (SGD momentum / nesterov, Adam, AdamW) over
  several steps; with noise it is (grad + std z) / normaliser with z from gaussian_noise, and it
  equals torch's add_noise_and_step bit for bit; jit with traced step / seed / lr never retraces.
"""
import math

import numpy as np
import pytest
import torch
from scipy import stats

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import dpprims.bindings.jax as J  # noqa: E402
from dpprims import noise as nz  # noqa: E402
from dpprims.bindings.jax import _call  # noqa: E402
from dpprims.bindings.jax import noise as JN  # noqa: E402
from dpprims.bindings.jax import update as JU  # noqa: E402
from dpprims.bindings.torch import noise as TN  # noqa: E402
from dpprims.bindings.torch import update as TU  # noqa: E402
from dpprims.kernels import noise as knoise  # noqa: E402
from _paths import one_torch_thread, plain_torch_path  # noqa: E402,F401 (fixture import registers it)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # single-threaded torch, as before

SEED = 0x5EED_1234_ABCD_0042
INTERPRETED = _call._is_interpreted(knoise._gaussian_noise_kernel)
needs_interp = pytest.mark.skipif(not INTERPRETED, reason="kernels are compiled (TRITON_INTERPRET unset): "
                                  "the interpreter path cannot run")
ON_CPU = jax.default_backend() == "cpu"
cpu_only = pytest.mark.skipif(not ON_CPU, reason="bit-exactness with the torch CPU path needs JAX on the CPU")


@pytest.fixture
def libm(monkeypatch):
    """Set dpprims.bindings.jax.noise.LIBM for one test."""
    def set_(value):
        monkeypatch.setattr(JN, "LIBM", value)
    set_("numpy")
    return set_


def _torch_noise(n, **kw):
    with plain_torch_path():
        return TN.gaussian_noise(n, device="cpu", **kw).numpy()


def _on(path, fn, *args, **kw):
    with J.use_path(path):
        out = fn(*args, **kw)
        out = jax.tree.map(np.asarray, out)
    return out


def _eq(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    same = (a == b) | (np.isnan(a.astype(np.float64)) & np.isnan(b.astype(np.float64)))
    if not same.all():
        i = np.flatnonzero(~same.reshape(-1))[:5]
        raise AssertionError(f"{what}: {np.count_nonzero(~same)} of {a.size} differ, e.g. at {i.tolist()}: "
                             f"{a.reshape(-1)[i].tolist()} vs {b.reshape(-1)[i].tolist()}")


# ----------------------------------------------------------------------------- Philox
@pytest.mark.parametrize("path", ["jnp", pytest.param("interpreter", marks=needs_interp)])
def test_philox_known_answers(path):
    """Random123's Philox4x32-10 known-answer vectors (uint32 only: no x64 needed)."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, expected in cases:
        got = _on(path, JN.philox4x32_words, key[0] | (key[1] << 32), np.array(ctr, np.int64).reshape(4, 1))
        assert got.dtype == np.uint32 and got.reshape(-1).tolist() == list(expected), (path, ctr)


def test_philox_words_equal_torch_path(libm):
    ctr = np.random.default_rng(1).integers(0, 2**32, (4, 777), dtype=np.int64)
    with plain_torch_path():
        ref = TN.philox4x32_words(SEED, torch.from_numpy(ctr)).numpy()
    with jax.enable_x64(False):
        got = _on("jnp", JN.philox4x32_words, SEED, ctr)
    assert (got.astype(np.int64) == ref).all()


# ----------------------------------------------------------------------------- jnp == torch == kernel
NOISE_CASES = [  # n, pair_offset, step, rank
    pytest.param(1, 0, 0, 0, id="n1"),
    pytest.param(1237, 5, 1, 0, id="n1237"),
    pytest.param(20, 2**32 - 3, 5, 1, id="n20-carry-into-c1"),
    pytest.param(4099, 2**33 + 7, 123456, 3, id="n4099-off2^33"),
    pytest.param(2**15 + 1, 2**62, 2**31 - 1, 2**20 - 1, id="n32769-maxstep-maxrank"),
]


@cpu_only
@pytest.mark.parametrize("n,pair_offset,step,rank", NOISE_CASES)
def test_jnp_equals_torch_path_bit_for_bit(n, pair_offset, step, rank, libm):
    """LIBM = numpy: the jnp path (eager with x64; jitted without x64 for two cases) is the torch
    plain path's noise bit for bit (odd sizes: the half-used last pair too)."""
    kw = dict(std=1.0, seed=SEED, step=step, pair_offset=pair_offset, rank=rank)
    ref = _torch_noise(n, **kw)
    assert ref.shape == (n,) and np.isfinite(ref).all()
    _eq(_on("jnp", JN.gaussian_noise, n, **kw), ref, "jnp eager")
    if n not in (1237, 2**15 + 1):
        return  # the x64-off jit check on two of the cases (compile time)
    jitted = jax.jit(lambda seed, step: JN.gaussian_noise(n, std=1.0, seed=seed, step=step, pair_offset=pair_offset,
                                                          rank=rank))
    with jax.enable_x64(False):
        got = _on("jnp", jitted, JN.as_seed_array(SEED), jnp.asarray([step], jnp.int32))
    _eq(got, ref, "jnp jit, x64 off")


@cpu_only
@pytest.mark.parametrize("n,pair_offset,step,rank", NOISE_CASES[1:4])
def test_jnp_with_xla_libm_within_documented_tolerance(n, pair_offset, step, rank, libm):
    """LIBM = xla (pure XLA, no callback): the same Philox words and word selection, z within
    XLA_LIBM_RTOL relative of the torch path (libm differences only)."""
    libm("xla")
    kw = dict(std=1.0, seed=SEED, step=step, pair_offset=pair_offset, rank=rank)
    ref = _torch_noise(n, **kw).astype(np.float64)
    got = jax.jit(lambda: JN.gaussian_noise(n, **kw))
    with J.use_path("jnp"):
        got = np.asarray(got(), np.float64)
    err = np.abs(got - ref)
    assert (err <= JN.XLA_LIBM_RTOL * np.abs(ref)).all(), (err / np.maximum(np.abs(ref), 1e-30)).max()


@needs_interp
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_interpreter_equals_jnp_with_x(dtype, libm):
    """(x + std z) / normaliser on the interpreter (NaN-poisoned outputs) == jnp, bit for bit,
    shape (3, 5, 7) (odd), bf16 rounded to nearest even on both; and == the torch op."""
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5, 7)), dtype)
    kw = dict(std=0.7, normaliser=3.0, seed=SEED, step=2, pair_offset=100, rank=1, x=x)
    a = _on("jnp", JN.gaussian_noise, x, **kw)
    b = _on("interpreter", JN.gaussian_noise, x, **kw)
    assert J.LAST_PATH["gaussian_noise"] == "interpreter"
    _eq(b, a, "interpreter vs jnp")
    xt = torch.from_numpy(np.array(x.astype(jnp.float32))).to(torch.bfloat16 if dtype == jnp.bfloat16 else
                                                                 torch.float32)
    t = TN.add_gaussian_noise_(xt.clone(), std=0.7, normaliser=3.0, seed=SEED, step=2, pair_offset=100, rank=1)
    _eq(a.astype(np.float32), t.float().numpy(), "jnp vs torch op")


@needs_interp
def test_interpreter_equals_jnp_noise_only_traced_scalars(libm):
    """std z / normaliser with std, normaliser, seed and step all traced (one jit, two paths)."""
    def f(std, norm, seed, step):
        return JN.gaussian_noise((37, 3), std=std, normaliser=norm, seed=seed, step=step, pair_offset=9)

    args = (jnp.float32(1.3), jnp.float32(4.0), JN.as_seed_array(SEED), jnp.asarray([7], jnp.int32))
    _eq(_on("interpreter", jax.jit(f), *args), _on("jnp", jax.jit(f), *args), "interpreter vs jnp")


# ----------------------------------------------------------------------------- extreme tail
def _tail_words():
    half = 2**31  # theta = 0
    return np.array([
        (0, 0, 0, half, 0),  # u = 2^-128: z0 = Z_MAX
        (0, 0, 0, 0, 0),  # theta = -pi: z0 = -Z_MAX
        (0, 0, 0, half + 2**30, 0),  # theta = pi/2: z1 = Z_MAX
        (0, 0, 0, half, 2**32 - 1),  # u = 2^-96
        (0, 1, 0, half, 0),  # u ~ 2^-64
        (1, 0, 0, half, 0),  # u ~ 2^-32: 6.66 > tl.randn's 5.68
        (2**32 - 1, 2**32 - 1, 2**32 - 1, half, 2**32 - 1),  # u = 1: z = 0
    ], dtype=np.int64).T.copy()


@pytest.mark.parametrize("path,lib", [("jnp", "numpy"), ("jnp", "xla"),
                                      pytest.param("interpreter", "numpy", marks=needs_interp)])
def test_smallest_uniform_gives_z_max_on_every_path(path, lib, libm):
    """All-zero words (u = 2^-128) give the kernel's 13.3209 (bit for bit with the torch path
    except for LIBM = xla's last-ulp libm differences); the same word selection everywhere."""
    libm(lib)
    words = _tail_words()
    z = _on(path, JN.normal_pair_from_words, words).astype(np.float64)
    with plain_torch_path():
        ref = TN.normal_pair_from_words(torch.from_numpy(words)).double().numpy()
    if lib == "numpy":
        _eq(z, ref, f"{path} vs torch path")
    else:
        assert (np.abs(z - ref) <= JN.XLA_LIBM_RTOL * np.abs(ref) + 1e-12).all(), (z, ref)
    assert z[0, 0] == pytest.approx(nz.Z_MAX, rel=2e-6) and z[0, 1] == pytest.approx(-nz.Z_MAX, rel=2e-6)
    assert z[1, 2] == pytest.approx(nz.Z_MAX, rel=2e-6)
    assert z[0, 3] == pytest.approx(math.sqrt(192 * math.log(2)), rel=2e-6)
    assert z[0, 4] == pytest.approx(nz.Z_MAX_U64, rel=1e-5)
    assert z[0, 5] > nz.Z_MAX_TL_RANDN
    assert z[0, 6] == 0.0 and z[1, 6] == 0.0
    assert np.abs(z).max() <= nz.Z_MAX * (1 + 2**-21)


@cpu_only
def test_extension_word_path_equals_torch(monkeypatch, libm):
    """The second Philox block (c3 | 1, read only when w0 == w1 == 0: probability 2^-64, so never
    seen naturally) is forced for every third pair by zeroing w0, w1 of the main block in BOTH
    implementations; the jnp path must still equal the torch path bit for bit, and the forced
    pairs land beyond the 64-bit-uniform radius sqrt(128 ln 2) = 9.42 only through x0."""
    def forced(orig, mod):
        def philox(c0, c1, c2, c3, k0, k1):
            w0, w1, w2, w3 = orig(c0, c1, c2, c3, k0, k1)
            force = ((c0 % 3) == 0) & ((c3 & 1) == 0)
            return mod.where(force, 0 * w0, w0), mod.where(force, 0 * w1, w1), w2, w3
        return philox

    monkeypatch.setattr(JN, "philox4x32_10", forced(JN.philox4x32_10, jnp))
    monkeypatch.setattr(TN, "_philox4x32_10", forced(TN._philox4x32_10, torch))
    monkeypatch.setenv("DPPRIMS_NOISE_CPU", "0")  # the plain-torch Philox (patched); numba's: test_noise.py
    n, off, step, rank = 301, 2**32 - 50, 9, 3
    ref = _torch_noise(n, std=1.0, seed=SEED, step=step, pair_offset=off, rank=rank)
    z = jax.jit(lambda: JN._noise_z.__wrapped__(JN.as_seed_array(SEED), JN.as_step_array(step),
                                                  JN.noise_words(off, rank), n=n, libm="numpy"))()
    _eq(np.asarray(z), ref, "forced extension block")
    pairs = np.arange(n // 2) + off
    rho = np.hypot(ref[0:n - 1:2], ref[1:n:2])
    forced_pairs = (pairs & 0xFFFFFFFF) % 3 == 0
    assert (rho[forced_pairs] >= nz.Z_MAX_U64 * (1 - 1e-6)).all() and (rho[~forced_pairs] < nz.Z_MAX_U64).all()


# ----------------------------------------------------------------------------- distribution
def test_ks_accepts_sigma_and_rejects_wrong_scales():
    """n = 20000 (jnp path, jitted): at 2/3 or 3/2 sigma the KS distance is ~0.09, 12x the
    p = 1e-6 critical value (rejection is certain); at sigma a valid alpha = 1e-3 test."""
    sigma = 1.7
    f = jax.jit(lambda step: JN.gaussian_noise(20000, std=sigma, seed=SEED, step=step))
    z = _on("jnp", f, jnp.asarray([5], jnp.int32)).astype(np.float64)
    assert stats.kstest(z, stats.norm(scale=sigma).cdf).pvalue > 1e-3
    assert stats.kstest(z, stats.norm(scale=sigma * 2 / 3).cdf).pvalue < 1e-6
    assert stats.kstest(z, stats.norm(scale=sigma * 3 / 2).cdf).pvalue < 1e-6
    assert stats.kstest(z, stats.norm(loc=0.1 * sigma, scale=sigma).cdf).pvalue < 1e-6


def test_noise_unique_across_steps_ranks_seeds_offsets():
    """Different (pair range, step, seed, seed high word, rank): no equal values and correlation
    within 5 standard errors of 0; the same arguments give the same noise."""
    n = 20000
    base = dict(std=1.0, seed=SEED, step=3, pair_offset=0, rank=0)
    with J.use_path("jnp"):
        ref = np.asarray(JN.gaussian_noise(n, **base))
        _eq(np.asarray(JN.gaussian_noise(n, **base)), ref, "determinism")
        variants = {"pair_offset": dict(base, pair_offset=n // 2), "step": dict(base, step=4),
                    "seed": dict(base, seed=SEED + 1), "seed-high-word": dict(base, seed=SEED ^ (1 << 40)),
                    "rank": dict(base, rank=1)}
        for name, kw in variants.items():
            z = np.asarray(JN.gaussian_noise(n, **kw))
            assert not np.any(z == ref), name
            r = np.corrcoef(z.astype(np.float64), ref.astype(np.float64))[0, 1]
            assert abs(r) < 5 / math.sqrt(n), (name, r)


def test_parameter_noise_is_a_slice_of_one_stream():
    """Leaf i's noise is pairs [offset_i, offset_i + ceil(n_i / 2)) of one stream."""
    numels = [1237, 4, 3]
    offsets, total = nz.pair_offsets(numels)
    with J.use_path("jnp"):
        stream = np.asarray(JN.gaussian_noise(2 * total, seed=SEED, step=4))
        for n, off in zip(numels, offsets):
            _eq(np.asarray(JN.gaussian_noise(n, seed=SEED, step=4, pair_offset=off)), stream[2 * off: 2 * off + n],
                f"slice n={n}")


def test_vmap_over_steps_and_empty_shapes():
    f = jax.vmap(lambda s: JN.gaussian_noise(11, seed=SEED, step=s))
    with J.use_path("jnp"):
        got = np.asarray(f(jnp.asarray([[1], [2]], jnp.int32)))
        for i, s in enumerate((1, 2)):
            _eq(got[i], np.asarray(JN.gaussian_noise(11, seed=SEED, step=s)), f"vmap row {i}")
        assert JN.gaussian_noise((0, 3), seed=SEED, step=1).shape == (0, 3)


def test_argument_checks():
    with pytest.raises(ValueError, match="seed"):
        JN.gaussian_noise(4, seed=2**64, step=1)
    with pytest.raises(ValueError, match="int32\\[2\\]"):
        JN.gaussian_noise(4, seed=jnp.zeros(3, jnp.int32), step=1)
    with pytest.raises(ValueError, match="step"):
        JN.gaussian_noise(4, seed=1, step=2**31)
    with pytest.raises(ValueError, match="rank"):
        JN.gaussian_noise(4, seed=1, step=1, rank=2**20)
    with pytest.raises(ValueError, match="2\\^63"):
        JN.gaussian_noise(10, seed=1, step=1, pair_offset=2**63 - 2)
    with pytest.raises(ValueError, match="normaliser"):
        JN.gaussian_noise(4, seed=1, step=1, normaliser=0.0)
    with pytest.raises(ValueError, match="shape"):
        JN.gaussian_noise((2, 2), seed=1, step=1, x=jnp.zeros(4, jnp.float32))


# ----------------------------------------------------------------------------- fused update
CASES = {
    "sgd": ("sgd", dict(lr=0.1), torch.optim.SGD),
    "sgd-momentum": ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=0.01), torch.optim.SGD),
    "sgd-nesterov": ("sgd", dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=1e-3), torch.optim.SGD),
    "adam": ("adam", dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05), torch.optim.Adam),
    "adamw": ("adamw", dict(lr=1e-2, weight_decay=0.1), torch.optim.AdamW),
}
SHAPES = {"w": (13, 7), "b": (1,), "blocks": [(3, 3)]}  # odd sizes; tree_leaves order: b, blocks[0], w


def _tree(rng, scale=1.0):
    return {"w": jnp.asarray(rng.standard_normal(SHAPES["w"]) * scale, jnp.float32),
            "b": jnp.asarray(rng.standard_normal(SHAPES["b"]) * scale, jnp.float32),
            "blocks": [jnp.asarray(rng.standard_normal(s) * scale, jnp.float32) for s in SHAPES["blocks"]]}


def test_leaf_order_is_tree_leaves_order():
    """The documented parameter order: jax.tree_util.tree_leaves (dict keys sorted)."""
    leaves = jax.tree.leaves(_tree(np.random.default_rng(0)))
    assert [tuple(x.shape) for x in leaves] == [SHAPES["b"], SHAPES["blocks"][0], SHAPES["w"]]


def _run_jax(case, params, grads, *, std, normaliser, steps, rank=0, path="jnp", jit=False, grads_out=False):
    opt, kw, _ = CASES[case]
    state = JU.init_opt_state(params, opt, momentum=kw.get("momentum", 0.0))

    def step_fn(p, g, s, step):
        return JU.noisy_update(p, g, s, noise_std=std, normaliser=normaliser, seed=SEED, step=step, rank=rank,
                               optimizer=opt, return_noisy_grads=grads_out, **kw)

    fn = jax.jit(step_fn) if jit else step_fn
    outs = []
    with J.use_path(path):
        for t in steps:
            res = fn(params, grads[t], state, jnp.asarray([t], jnp.int32) if jit else t)
            params, state = res[0], res[1]
            if grads_out:
                outs.append(res[2])
        params, state, outs = jax.tree.map(np.asarray, (params, state, outs))
    return params, state, outs


@pytest.mark.parametrize("case", ["sgd-momentum", "adam", "adamw"])
def test_std0_matches_torch_optim(case):
    """noise_std = 0: the fused step over a pytree is torch.optim's step on grad / normaliser,
    4 steps (a few fp32 ulp: torch.optim's foreach / addcdiv order differs from the kernel's)."""
    opt, kw, ref_cls = CASES[case]
    rng = np.random.default_rng(0)
    params = _tree(rng)
    grads = {t: _tree(rng, 3.0) for t in range(1, 5)}
    got, state, _ = _run_jax(case, params, grads, std=0.0, normaliser=7.0, steps=range(1, 5), jit=True)
    leaves = jax.tree.leaves(params)
    ref_p = [torch.nn.Parameter(torch.from_numpy(np.array(p))) for p in leaves]
    ref = ref_cls(ref_p, **kw)
    for t in range(1, 5):
        for q, g in zip(ref_p, jax.tree.leaves(grads[t])):
            q.grad = torch.from_numpy(np.array(g)) / 7.0
        ref.step()
    for a, q in zip(jax.tree.leaves(got), ref_p):
        np.testing.assert_allclose(a, q.detach().numpy(), rtol=2e-6, atol=2e-6, err_msg=case)
    for name in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        if name in state:
            for a, q in zip(jax.tree.leaves(state[name]), ref_p):
                np.testing.assert_allclose(a, ref.state[q][name].numpy(), rtol=2e-6, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("case", ["sgd-nesterov", "adamw"])
def test_noise_equals_gaussian_noise_and_torch_optim(case, libm):
    """std > 0: the noisy gradient of leaf i is (grad + std z) / N with z the slice of
    gaussian_noise's stream at the leaf's pair offset (tree_leaves order), bit for bit (numpy's
    float32 ops round like the kernel's), and the update is torch.optim's on it."""
    opt, kw, ref_cls = CASES[case]
    rng = np.random.default_rng(1)
    params = _tree(rng)
    grads = {t: _tree(rng, 3.0) for t in (1, 2, 3)}
    std, normaliser, rank = 1.3, 11.0, 5
    got, _, noisy = _run_jax(case, params, grads, std=std, normaliser=normaliser, steps=(1, 2, 3), rank=rank,
                             grads_out=True)
    leaves = jax.tree.leaves(params)
    offsets, total = nz.pair_offsets([p.size for p in leaves])
    ref_p = [torch.nn.Parameter(torch.from_numpy(np.array(p))) for p in leaves]
    ref = ref_cls(ref_p, **kw)
    stream = jax.jit(lambda step: JN.gaussian_noise(2 * total, seed=SEED, step=step, rank=rank))
    for i, t in enumerate((1, 2, 3)):
        z_all = _on("jnp", stream, jnp.asarray([t], jnp.int32))
        for q, g, off, got_g in zip(ref_p, jax.tree.leaves(grads[t]), offsets, jax.tree.leaves(noisy[i])):
            z = z_all[2 * off: 2 * off + g.size].reshape(g.shape)
            expect = (np.asarray(g) + np.float32(std) * z) / np.float32(normaliser)
            _eq(got_g, expect, f"noisy grad step {t}")
            q.grad = torch.from_numpy(np.array(got_g))
        ref.step()
    for a, q in zip(jax.tree.leaves(got), ref_p):
        np.testing.assert_allclose(a, q.detach().numpy(), rtol=2e-6, atol=2e-6, err_msg=case)


@cpu_only
@pytest.mark.parametrize("case,dtype", [("sgd-nesterov", "bf16"), ("adam", "fp32"), ("adamw", "bf16")])
def test_jnp_interpreter_and_torch_agree_bit_for_bit(case, dtype, libm):
    """jnp (jitted) == interpreter == torch add_noise_and_step (plain path) bit for bit, params,
    optimizer state and noisy grads, 3 steps with noise, fp32 and bf16 buffers (x64 on: Adam's
    bias corrections in fp64 like the kernel)."""
    opt, kw, _ = CASES[case]
    jdt, tdt = (jnp.float32, torch.float32) if dtype == "fp32" else (jnp.bfloat16, torch.bfloat16)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda a: a.astype(jdt), _tree(rng))
    grads = {t: jax.tree.map(lambda a: a.astype(jdt), _tree(rng, 3.0)) for t in (1, 2, 3)}
    common = dict(std=0.9, normaliser=5.0, steps=(1, 2, 3), rank=2, grads_out=True)
    results = {"jnp": _run_jax(case, params, grads, jit=True, **common)}
    if INTERPRETED:
        results["interpreter"] = _run_jax(case, params, grads, path="interpreter", **common)
    ref_p = [torch.nn.Parameter(torch.from_numpy(np.array(p.astype(jnp.float32))).to(tdt))
             for p in jax.tree.leaves(params)]
    state, ref_g = {}, []
    with plain_torch_path():
        for t in (1, 2, 3):
            for q, g in zip(ref_p, jax.tree.leaves(grads[t])):
                q.grad = torch.from_numpy(np.array(g.astype(jnp.float32))).to(tdt)
            ref_g += TU.add_noise_and_step(ref_p, state=state, noise_std=0.9, normaliser=5.0, seed=SEED, step=t, rank=2,
                                           optimizer=opt, return_noisy_grads=True, **kw)
    ref_bufs = [b for k in ("momentum_buffer", "exp_avg", "exp_avg_sq") for b in state.get(k, [])]
    ref_all = [t.detach().float().numpy() for t in ref_p + ref_bufs + ref_g]
    for path, (p, s, g) in results.items():
        got = jax.tree.leaves(p) + [b for k in ("momentum_buffer", "exp_avg", "exp_avg_sq") if k in s
                                    for b in jax.tree.leaves(s[k])] + [x for gi in g for x in jax.tree.leaves(gi)]
        assert len(got) == len(ref_all)
        for i, (a, b) in enumerate(zip(got, ref_all)):
            assert a.dtype == jdt, (path, a.dtype)
            _eq(a.astype(np.float32), b, f"{path} vs torch, array {i}")


@cpu_only
def test_jit_traces_once_with_traced_step_seed_and_lr(libm):
    """A jitted AdamW step with step, seed and a learning-rate schedule as arrays traces once and
    equals torch's add_noise_and_step (plain path) with the same per-step lr, bit for bit."""
    traces = []
    rng = np.random.default_rng(4)
    params, grads = _tree(rng), {t: _tree(rng) for t in (1, 2, 3)}

    @jax.jit
    def step_fn(p, g, s, seed, step, lr):
        traces.append(1)
        return JU.noisy_update(p, g, s, noise_std=1.1, normaliser=3.0, seed=seed, step=step, optimizer="adamw",
                               lr=lr, weight_decay=0.1)

    p_j, s_j = params, JU.init_opt_state(params, "adamw")
    ref_p = [torch.nn.Parameter(torch.from_numpy(np.array(p))) for p in jax.tree.leaves(params)]
    state = {}
    for t in (1, 2, 3):
        lr = float(np.float32(1e-2 / t))
        with J.use_path("jnp"):
            p_j, s_j = step_fn(p_j, grads[t], s_j, JN.as_seed_array(SEED), jnp.asarray([t], jnp.int32),
                               jnp.float32(lr))
        with plain_torch_path():
            for q, g in zip(ref_p, jax.tree.leaves(grads[t])):
                q.grad = torch.from_numpy(np.array(g))
            TU.add_noise_and_step(ref_p, state=state, noise_std=1.1, normaliser=3.0, seed=SEED, step=t,
                                  optimizer="adamw", lr=lr, weight_decay=0.1)
    assert len(traces) == 1
    for a, q in zip(jax.tree.leaves(p_j), ref_p):
        _eq(np.asarray(a), q.detach().numpy(), "jit with traced lr vs torch")


@pytest.mark.parametrize("case", ["adam"])
def test_without_x64(case, libm):
    """x64 off: Adam's fp32 bias corrections stay within a few fp32 ulp of the fp64 ones (the
    noise, without x64 too, is bit for bit: test_jnp_equals_torch_path_bit_for_bit)."""
    rng = np.random.default_rng(5)
    params, grads = _tree(rng), {t: _tree(rng, 3.0) for t in (1, 2, 3)}
    common = dict(std=0.9, normaliser=5.0, steps=(1, 2, 3), jit=True)
    ref, ref_s, _ = _run_jax(case, params, grads, **common)
    with jax.enable_x64(False):
        got, got_s, _ = _run_jax(case, params, grads, **common)
    for a, b in zip(jax.tree.leaves((got, got_s)), jax.tree.leaves((ref, ref_s))):
        assert a.dtype == np.float32
        if case.startswith("sgd"):
            _eq(a, b, "x64 off vs on")
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_empty_batch_and_empty_leaf(libm):
    """clipped_sums=None (no example sampled) still gets noise and a step; a 0-size leaf is fine."""
    params = {"a": jnp.arange(9, dtype=jnp.float32), "b": jnp.zeros((0, 3), jnp.float32),
              "c": jnp.ones(4, jnp.float32)}
    with J.use_path("jnp"):
        new, state, g = JU.noisy_update(params, None, {}, noise_std=1.0, normaliser=2.0, seed=SEED, step=1, lr=1.0,
                                        return_noisy_grads=True)
        offsets, _ = nz.pair_offsets([9, 0, 4])
        assert state == {} and new["b"].shape == (0, 3) and g["b"].shape == (0, 3)
        for k, off in (("a", offsets[0]), ("c", offsets[2])):
            z = JN.gaussian_noise(params[k].shape, seed=SEED, step=1, pair_offset=off, normaliser=2.0)
            _eq(np.asarray(g[k]), np.asarray(z), k)
            _eq(np.asarray(new[k]), np.asarray(params[k] - z), k)


def test_update_argument_checks():
    p = {"w": jnp.ones(6, jnp.float32)}
    kw = dict(noise_std=1.0, normaliser=2.0, seed=1, step=1, lr=0.1)
    with pytest.raises(ValueError, match="momentum buffer"):
        JU.noisy_update(p, p, {}, momentum=0.9, **kw)
    with pytest.raises(ValueError, match="nesterov"):
        JU.noisy_update(p, p, {}, nesterov=True, **kw)
    with pytest.raises(ValueError, match="step >= 1"):
        JU.noisy_update(p, p, JU.init_opt_state(p, "adam"), optimizer="adam", **dict(kw, step=0))
    with pytest.raises(ValueError, match="exp_avg"):
        JU.noisy_update(p, p, {}, optimizer="adam", **kw)
    with pytest.raises(ValueError, match="normaliser"):
        JU.noisy_update(p, p, {}, **dict(kw, normaliser=0.0))
    with pytest.raises(ValueError, match="structure"):
        JU.noisy_update(p, {"v": p["w"]}, {}, **kw)
    with pytest.raises(ValueError, match="optimizer"):
        JU.init_opt_state(p, "lion")


@needs_interp
def test_jax_triton_wiring_with_aliases_on_cpu(monkeypatch, libm):
    """The jax-triton launch of the fused update without a GPU: a stand-in triton_call checks the
    input_output_aliases (array-argument index -> output index, equal shapes and dtypes: param and
    optimizer state updated in place) and runs the argument list it got through the interpreter."""
    seen = []

    class FakeJT:
        @staticmethod
        def triton_call(*args, kernel, grid, num_warps, input_output_aliases, out_shape, **metaparams):
            arrays = [a for a in args if hasattr(a, "shape")]
            for i, o in input_output_aliases.items():
                assert arrays[i].shape == out_shape[o].shape and arrays[i].dtype == out_shape[o].dtype
            seen.append(dict(input_output_aliases))
            names = kernel.arg_names
            arr = _call.Arranged(kernel, tuple(zip(names, args)), tuple(names[len(args):len(args) + len(out_shape)]),
                                 tuple(out_shape), metaparams, grid, num_warps)
            monkeypatch.setattr(_call, "_is_interpreted", is_interpreted)
            try:
                return _call._launch_interpreter(arr)
            finally:
                monkeypatch.setattr(_call, "_is_interpreted", lambda k: False)

    is_interpreted = _call._is_interpreted
    monkeypatch.setattr(_call, "_jax_triton", lambda: (FakeJT, "out_shape"))
    monkeypatch.setattr(_call, "_is_interpreted", lambda k: False)  # the launch refuses interpreted kernels
    rng = np.random.default_rng(7)
    params, grads = _tree(rng), {1: _tree(rng, 3.0)}
    got = _run_jax("adam", params, grads, std=0.9, normaliser=5.0, steps=(1,), path="jax-triton", grads_out=True)
    assert seen and all(a == {1: 0, 2: 1, 3: 2} for a in seen), seen  # param, exp_avg, exp_avg_sq
    ref = _run_jax("adam", params, grads, std=0.9, normaliser=5.0, steps=(1,), grads_out=True)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        _eq(a, b, "jax-triton wiring (interpreted) vs jnp")
    with J.use_path("jax-triton"):  # one leaf, plain SGD: only the parameter is aliased
        p, s1, s2, g = JU.noisy_update_leaf(params["w"], grads[1]["w"], None, None, JN.as_seed_array(SEED),
                                            JN.as_step_array(1), JU.make_hyper(noise_std=1.0, normaliser=2.0, lr=0.5),
                                            optimizer="sgd", pair_offset=17, write_grad=True)
    assert seen[-1] == {1: 0} and s1 is None and s2 is None and p.shape == params["w"].shape
    with J.use_path("jnp"):
        expect = JN.gaussian_noise(params["w"], seed=SEED, step=1, pair_offset=17, normaliser=2.0, x=grads[1]["w"])
    _eq(np.asarray(g), np.asarray(expect), "leaf noisy grad")
    _eq(np.asarray(p), np.asarray(params["w"]) - np.float32(0.5) * np.asarray(expect), "leaf sgd step")


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_jax_triton_path_matches_jnp():
    """The compiled kernels through jax_triton (aliased param / state buffers, donated under jit)
    against the jnp path: noise within GPU-transcendental tolerance, updates likewise."""
    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    if not _call._jax_triton_available():
        pytest.skip("jax_triton is not installed")
    z_ref = _on("jnp", JN.gaussian_noise, 100_003, seed=SEED, step=3, pair_offset=7, rank=2)
    z = _on("jax-triton", jax.jit(lambda: JN.gaussian_noise(100_003, seed=SEED, step=3, pair_offset=7, rank=2)))
    assert J.LAST_PATH["gaussian_noise"] == "jax-triton"
    np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-5)
    rng = np.random.default_rng(6)
    for case in ("sgd-nesterov", "adam", "adamw"):
        params, grads = _tree(rng), {t: _tree(rng, 3.0) for t in (1, 2)}
        ref = _run_jax(case, params, grads, std=0.9, normaliser=5.0, steps=(1, 2), grads_out=True)
        got = _run_jax(case, params, grads, std=0.9, normaliser=5.0, steps=(1, 2), grads_out=True,
                       path="jax-triton", jit=True)
        assert J.LAST_PATH["noisy_update"] == "jax-triton"
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=case)
