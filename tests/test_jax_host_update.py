"""The jnp path's host update (bindings/jax/update.py::_update_host): all fp32 leaves in one
``buffer_callback`` into dpprims.noise_cpu.noisy_update, in place on aliased buffers.

Reference: the XLA update ``_update_jnp`` with LIBM = "numpy" - an independent implementation of
the same generator (uint32 Philox in XLA, numpy's float32 log / cos / sin) and of the kernel's
update arithmetic - and, second, the XLA update on the host noise (HOST_UPDATE off). Bit for bit,
x64 on (conftest), fresh random inputs at odd sizes, a leaf large enough for several noise chunks
and threads. Also: donation updates in place and the caller's arrays are never written without
it; bf16 buffers take the XLA update; Adam's bias corrections are the fp64 ones without x64 too.
"""
import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import dpprims.bindings.jax as J  # noqa: E402
from dpprims import noise_cpu  # noqa: E402
from dpprims.bindings.jax import noise as JN  # noqa: E402
from dpprims.bindings.jax import update as JU  # noqa: E402

pytestmark = [
    pytest.mark.skipif(jax.default_backend() != "cpu", reason="the host update is the CPU jnp path"),
    pytest.mark.skipif(JU._buffer_callback is None or not noise_cpu.available(),
                       reason="needs jax.experimental.buffer_callback and numba"),
]

SEED = 0x1234_5678_9ABC_DEF1
# the host update's buffer callback aliases its outputs to the parameter / state operands (the host
# noise of the XLA update is a buffer callback too, without aliases)
HOST_MARK = "output_operand_alias"
# odd sizes; "big" has 2 * 17011 + 1 elements: more than one noise chunk (CHUNK_PAIRS pairs) and
# split over threads, with an odd tail
SHAPES = {"big": (34023,), "k": (13, 7), "v": (5,), "z": (3, 1, 3)}
CASES = {
    "sgd": ("sgd", dict(lr=0.05)),
    "sgd-momentum": ("sgd", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    "sgd-nesterov": ("sgd", dict(lr=0.05, momentum=0.8, nesterov=True)),
    "adam": ("adam", dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.02)),
    "adamw": ("adamw", dict(lr=1e-3, weight_decay=0.1)),
}


def _tree(rng, scale=1.0, dtype=jnp.float32):
    return {k: jnp.asarray(rng.normal(0, scale, s), dtype) for k, s in SHAPES.items()}


def _runner(case, *, std=1.7, normaliser=9.0, rank=3, donate=False):
    opt, kw = CASES[case]

    def step_fn(p, g, s, step):
        return JU.noisy_update(p, g, s, noise_std=std, normaliser=normaliser, seed=SEED, step=step, rank=rank,
                               optimizer=opt, return_noisy_grads=True, **kw)

    return jax.jit(step_fn, donate_argnums=(0, 2) if donate else ())


def _steps(case, params, grads, mode, monkeypatch, donate=False):
    """Two jitted steps (traced step) with the update of ``mode``: "host", "xla-host-noise"
    (HOST_UPDATE off) or "xla-numpy" (XLA Philox + numpy libm: no dpprims.noise_cpu at all)."""
    with monkeypatch.context() as m:
        m.setattr(JU, "HOST_UPDATE", mode == "host")
        if mode == "xla-numpy":
            m.setattr(JN, "_libm", lambda: "numpy")
        opt, kw = CASES[case]
        state = JU.init_opt_state(params, opt, momentum=kw.get("momentum", 0.0))
        state = jax.tree.map(lambda a: a + 0.125, state)  # nonzero state: its update is exercised
        fn = _runner(case, donate=donate)
        text = fn.lower(params, grads[0], state, jnp.asarray([1], jnp.int32)).as_text()
        p, s = (jax.tree.map(jnp.copy, t) for t in (params, state)) if donate else (params, state)
        noisy = []
        with J.use_path("jnp"):
            for i, g in enumerate(grads):
                p, s, ng = fn(p, g, s, jnp.asarray([i + 1], jnp.int32))
                noisy.append(ng)
        return jax.tree.map(np.asarray, (p, s, noisy)), text


def _eq(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    assert same.all(), f"{what}: {np.count_nonzero(~same)} of {a.size} differ, max |d| {np.nanmax(np.abs(a - b))}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_host_update_equals_xla_update_bit_for_bit(case, monkeypatch):
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    params = _tree(rng)
    grads = [_tree(rng, 4.0) for _ in range(2)]
    host, text = _steps(case, params, grads, "host", monkeypatch)
    assert HOST_MARK in text
    for mode in ("xla-numpy", "xla-host-noise"):
        ref, rtext = _steps(case, params, grads, mode, monkeypatch)
        assert HOST_MARK not in rtext
        for i, (a, b) in enumerate(zip(jax.tree.leaves(host), jax.tree.leaves(ref))):
            _eq(a, b, f"{case} {mode} array {i}")


@pytest.mark.parametrize("case", ["sgd-momentum", "adamw"])
def test_donated_buffers_updated_in_place_and_inputs_kept_otherwise(case, monkeypatch):
    rng = np.random.default_rng(7)
    params = _tree(rng)
    grads = [_tree(rng, 2.0) for _ in range(2)]
    keep = jax.tree.map(np.array, (params, grads))
    plain, _ = _steps(case, params, grads, "host", monkeypatch)
    # without donation the caller's arrays are untouched (XLA copies before the in-place callback)
    for a, b in zip(jax.tree.leaves((params, grads)), jax.tree.leaves(keep)):
        _eq(a, b, "input modified")
    donated, _ = _steps(case, params, grads, "host", monkeypatch, donate=True)
    for i, (a, b) in enumerate(zip(jax.tree.leaves(plain), jax.tree.leaves(donated))):
        _eq(a, b, f"donated array {i}")

    # in place: the donated parameter buffer is the result's buffer (no copy)
    opt, kw = CASES[case]
    fn = _runner(case, donate=True)
    p = jax.tree.map(jnp.copy, params)
    # init_opt_state shares one zeros tree between Adam's two buffers: distinct copies to donate
    s = jax.tree.map(jnp.copy, JU.init_opt_state(params, opt, momentum=kw.get("momentum", 0.0)))
    ptr = p["big"].unsafe_buffer_pointer()
    with J.use_path("jnp"):
        new_p, _, _ = fn(p, grads[0], s, jnp.asarray([1], jnp.int32))
    assert p["big"].is_deleted()
    assert new_p["big"].unsafe_buffer_pointer() == ptr


def test_bf16_buffers_take_the_xla_update(monkeypatch):
    rng = np.random.default_rng(8)
    params = _tree(rng, dtype=jnp.bfloat16)
    grads = [_tree(rng, 2.0, jnp.bfloat16)]
    host, text = _steps("sgd-momentum", params, grads, "host", monkeypatch)
    assert HOST_MARK not in text
    ref, _ = _steps("sgd-momentum", params, grads, "xla-numpy", monkeypatch)
    for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(ref)):
        _eq(a.astype(np.float32), b.astype(np.float32), "bf16")


@pytest.mark.parametrize("case", ["adam", "adamw"])
def test_adam_bias_corrections_fp64_without_x64(case, monkeypatch):
    """The host computes lr / bc1, sqrt(bc2), 1 - lr wd in fp64 whatever x64 says: x64 off equals
    x64 on (the XLA update without x64 is within a few ulp only, test_jax_noise.test_without_x64)."""
    rng = np.random.default_rng(9)
    params = _tree(rng)
    grads = [_tree(rng, 3.0) for _ in range(2)]
    ref, _ = _steps(case, params, grads, "host", monkeypatch)
    with jax.enable_x64(False):
        got, _ = _steps(case, params, grads, "host", monkeypatch)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        _eq(a, b, "x64 off vs on")


def test_adam_scalars_host_match_kernel_formula():
    """_adam_scalars_host against an independent fp64 evaluation (math.pow is exact enough for t
    small; the kernel's squarings are compared at t = 1, 2, 3, 1000 within 1 fp32 ulp) and at a
    step <= 0 (outside the contract) it gives inf / NaN, never a Python exception."""
    h = np.zeros(9, np.float32)
    h[JU._ku.H_LR], h[JU._ku.H_WEIGHT_DECAY], h[JU._ku.H_OMB1], h[JU._ku.H_OMB2] = 1e-3, 0.1, 0.1, 0.001
    hf = [float(x) for x in h]
    for t in (1, 2, 3, 1000):
        a, b, c = JU._adam_scalars_host(t, hf)
        lr, wd, b1, b2 = (float(h[i]) for i in (JU._ku.H_LR, JU._ku.H_WEIGHT_DECAY, JU._ku.H_OMB1, JU._ku.H_OMB2))
        exp = (np.float32(lr / (1 - (1 - b1) ** t)), np.float32(np.sqrt(1 - (1 - b2) ** t)), np.float32(1 - lr * wd))
        for got, want in zip((a, b, c), exp):
            assert got.dtype == np.float32 and abs(int(got.view(np.int32)) - int(want.view(np.int32))) <= 1, (t, got, want)
    a, b, _ = JU._adam_scalars_host(0, hf)
    assert np.isinf(a) and b == 0


def test_env_switch_keeps_the_xla_update(monkeypatch):
    rng = np.random.default_rng(10)
    params = _tree(rng)
    monkeypatch.setattr(JU, "HOST_UPDATE", False)
    fn = _runner("sgd-momentum")
    s = JU.init_opt_state(params, "sgd", momentum=0.9)
    assert HOST_MARK not in fn.lower(params, params, s, jnp.asarray([1], jnp.int32)).as_text()


@pytest.mark.parametrize("n,offset,rank", [(1, 0, 0), (7, 5, 2), (40001, 2**32 - 3, 1)])
def test_buffer_noise_equals_pure_callback_noise(n, offset, rank, monkeypatch):
    """The host noise written into XLA's buffer (BUFFER_NOISE) is the pure_callback's array bit
    for bit, including a pair range that carries into the high counter word."""
    words = jnp.asarray(JN.noise_words(offset, rank))
    seed = JN.as_seed_array(SEED)
    outs = []
    for buffered in (True, False):
        monkeypatch.setattr(JN, "BUFFER_NOISE", buffered)
        f = jax.jit(lambda st, b=buffered: JN._noise_z_host(seed, st, words, n))
        text = f.lower(jnp.asarray([3], jnp.int32)).as_text()
        assert ("xla_buffer_python_cpu_callback" in text) == buffered
        outs.append(np.asarray(f(jnp.asarray([3], jnp.int32))))
    _eq(outs[0], outs[1], "buffer vs pure_callback noise")
    ref = noise_cpu.gaussian_noise(n, SEED & 0xFFFFFFFF, SEED >> 32, 3, JN._nz.stream_word(rank), offset)
    _eq(outs[0], ref, "vs dpprims.noise_cpu")
