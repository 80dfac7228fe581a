"""JAX on a GPU, checked without one: dpprims' JAX ops lower to Triton custom calls for cuda.

On this CPU-only machine, with jaxlib's CUDA plugin (``pip install --no-deps --target
build/jax-cuda12-plugin jax-cuda12-plugin==<jaxlib version>``, as the README's test command does:
it fills in ``jax._src.lib.gpu_triton``) and jax-triton,
``jax.export(jax.jit(f), platforms=["cuda"])`` lowers a function that calls dpprims ops exactly
as it would on a GPU: the ``auto`` path chooses by the lowering platform, so the SAME jitted
function gives ``triton_kernel_call`` custom calls for cuda and plain XLA for cpu. The kernels are
compiled to PTX for sm_90 (``use_compute_capability(90)``: there is no device to ask).

What this checks, per model (``clipped_grad`` of the ResNet-18-GN twin, of an Embed / Dense /
LayerNorm model over a sequence, and the noisy optimizer update):

* every DP layer's norm kernel and clipped-sum kernel, the clip-factor kernel and the fused
  update / noise kernels appear as ``triton_kernel_call`` s, counted against the model's layers
  (read from its parameters, not from dpprims' plan), each clipped sum with its layer's [P, D];
* no per-example weight gradient exists anywhere in the program (no tensor [B, P, D] or
  [B, *kernel_shape] for any DP layer) - and the same detector DOES find them in the oracle's
  vmap-of-grad program, so it can fail;
* every kernel's PTX (decoded from the zlib backend config) targets sm_90;
* the same jitted function lowered for cpu has no custom call at all.

What only a GPU run can show: that the kernels execute (launch configuration, shared memory,
aliasing), their numerics against the jnp path, and their speed (tests marked ``gpu``,
bench/gpu_check).

The kernels must be compiled ones (TRITON_INTERPRET unset) while the rest of the suite runs
them in the interpreter, so the lowering runs in one child process (this file as a script),
which writes what it found as JSON; the tests read that.

Triton compiles per model (``env -u TRITON_INTERPRET PYTHONPATH=build/jax-cuda12-plugin python
tests/test_jax_lowering.py count resnet18 32``: jax-triton's compiled-kernel cache after exporting
clipped_grad for cuda, ResNet-GN twins at width 64, CIFAR 32x32, B = 32). Before the kernel
argument reorder (shapes and strides after the outputs, hence constexprs) -> after (runtime
scalars; what still tells compiles apart is block sizes, KH/KW, direct vs ghost, and scalars
equal to 1, which jax-triton specialises): ResNet-18 35 -> 27 compiles for 86 kernel calls,
ResNet-50 68 -> 32 for 218 calls.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zlib

import pytest

# Odd and unlike every layer width, so a [B, P, D] tensor cannot be confused with an activation.
# Above 64 on purpose: the clipped sums' split-K launch (kernels/linear.py clipped_sum_split) cuts
# the batch into at most 64 slices of whole examples, so at B <= 64 a small layer gets one slice
# per example and its [split, P, D] partials ARE the examples' clipped gradients c_i G_i (a
# scheduling choice of the launch spec, which this detector would rightly flag).
B = 67


# ============================================================================================
# child: export for cuda and report
# ============================================================================================
def _custom_calls(mlir_text: str):
    """[(target, result shapes, decoded backend config bytes or None)] of every custom call."""
    from jax._src.interpreters import mlir as jmlir
    from jax._src.lib.mlir import ir

    out = []
    with jmlir.make_ir_context():
        module = ir.Module.parse(mlir_text)

        def walk(op):
            for region in op.regions:
                for block in region.blocks:
                    for o in block.operations:
                        o = o.operation
                        if o.name == "stablehlo.custom_call":
                            target = ir.StringAttr(o.attributes["call_target_name"]).value
                            cfg = None
                            if "backend_config" in o.attributes:
                                try:
                                    cfg = zlib.decompress(ir.StringAttr(o.attributes["backend_config"]).value_bytes)
                                except Exception:  # not a zlib config (not a triton call)
                                    cfg = None
                            shapes = [list(ir.RankedTensorType(r.type).shape) for r in o.results]
                            out.append((target, shapes, cfg))
                        walk(o)

        walk(module.operation)
    return out


def _tensor_shapes(mlir_text: str) -> set:
    shapes = set()
    for m in re.finditer(r"tensor<([0-9x]+)x[a-z]+[0-9]*>", mlir_text):
        shapes.add(tuple(int(d) for d in m.group(1).split("x")))
    return shapes


def _per_example_weight_shapes(tensor_shapes: set, layers: dict, batch: int) -> list:
    """Tensors [batch, ...] whose trailing dims are a DP layer's weight shape or its [P, D]."""
    found = []
    for name, shapes in layers.items():
        for s in tensor_shapes:
            if len(s) >= 3 and s[0] == batch and any(sorted(s[1:]) == sorted(w) for w in shapes):
                found.append((name, list(s)))
    return found


def _layer_weights(params) -> dict:
    """{layer: [weight shape, (P, D)]} for every weight matrix / conv kernel of the params."""
    import jax

    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [getattr(k, "key", str(k)) for k in path]
        if keys[-1] in ("kernel", "embedding") and len(leaf.shape) >= 2:
            shape = tuple(leaf.shape)
            if keys[-1] == "embedding":
                pd = shape
            else:
                pd = (shape[-1], int(__import__("math").prod(shape[:-1])))
            out["/".join(keys[:-1])] = [shape, pd]
    return out


def _kernel_info(cfg: bytes) -> dict:
    names = re.findall(rb"\.entry\s+(\w+)", cfg)
    targets = re.findall(rb"\.target\s+(\w+)", cfg)
    return dict(kernel=names[0].decode() if names else None, targets=sorted({t.decode() for t in targets}))


def _report(f, args, cpu_check: bool = True) -> dict:
    import jax
    from jax import export

    from dpprims.bindings.jax import _call

    _call.LAST_PATH.clear()
    jf = jax.jit(f)
    with _call.use_compute_capability(90):
        exp = export.export(jf, platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("triton_kernel_call")])(*args)
    text = exp.mlir_module()
    calls = _custom_calls(text)
    rep = dict(
        calls=[dict(target=t, shapes=s, **(_kernel_info(c) if c else dict(kernel=None, targets=[])))
               for t, s, c in calls],
        tensor_shapes=sorted(_tensor_shapes(text)),
        last_path=dict(_call.LAST_PATH))
    if cpu_check:  # the same jitted function, lowered for the host: no custom call, jnp everywhere
        _call.LAST_PATH.clear()
        cpu_text = jf.trace(*args).lower(lowering_platforms=("cpu",)).as_text()
        rep["cpu_custom_calls"] = sorted({t for t, _, _ in _custom_calls(cpu_text)})
        rep["cpu_last_path"] = dict(_call.LAST_PATH)
    return rep


def _struct(tree):
    import jax

    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _clipped_grad_case(model, x, y) -> dict:
    import jax
    import jax.numpy as jnp

    import dpprims.jax as dpj

    def loss(out, batch):
        return -jnp.take_along_axis(jax.nn.log_softmax(out), batch[1][:, None], axis=1)[:, 0]

    loss_fn = dpj.make_loss_fn(model, loss)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]

    def step(params, x, y, mask, C):
        return dpj.clipped_grad(loss_fn, params, (x, y), max_grad_norm=C, mask=mask)

    args = (_struct(params), _struct(x), _struct(y), jax.ShapeDtypeStruct((x.shape[0],), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.float32))
    rep = _report(step, args)
    rep["layers"] = _layer_weights(params)
    rep["plan"] = [dict(p) if isinstance(p, dict) else repr(p) for p in dpj.LAST_PLAN]
    rep["param_paths"] = ["/".join(getattr(k, "key", str(k)) for k in path)
                          for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    return rep


def _oracle_case(model, x, y) -> dict:
    """vmap-of-grad per-example gradients of the same model (the oracle): must show [B, P, D]."""
    import jax
    import jax.numpy as jnp

    from dpprims import reference as ref

    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]

    def single(p, ex):
        xi, yi = ex
        out = model.apply({"params": p}, xi[None])
        return -jax.nn.log_softmax(out)[0, yi]

    def f(params, x, y):
        return ref.per_example_grads(single, params, (x, y))

    from jax import export
    text = export.export(jax.jit(f), platforms=["cpu"])(_struct(params), _struct(x), _struct(y)).mlir_module()
    return dict(tensor_shapes=sorted(_tensor_shapes(text)), layers=_layer_weights(params))


def _models():
    import flax.linen as nn
    import jax.numpy as jnp
    import numpy as np

    import dpprims.jax as dpj
    from dpprims.models.jax_resnet import resnet18

    class SeqModel(nn.Module):
        """Embed -> Dense (T > 1) -> LayerNorm -> Dense over the sequence -> mean -> Dense head."""

        @nn.compact
        def __call__(self, ids):
            h = dpj.Embed(29, 12, name="emb")(ids)
            h = nn.gelu(dpj.Dense(20, name="fc1")(h))
            h = dpj.LayerNorm(name="ln")(h)
            h = dpj.Dense(14, name="fc2")(h)
            return dpj.Dense(3, name="head")(h.mean(axis=1))

    rng = np.random.default_rng(0)
    return {
        "resnet18": (resnet18(num_classes=10, cifar=True, width=8, num_groups=4),
                     # 10 x 10: positions per stage 100, 25, 9, 4 - never a channel count or a
                     # conv's C_in*k*k, so no activation [B, T, C] looks like a [B, P, D]
                     jnp.asarray(rng.standard_normal((B, 10, 10, 3)), jnp.float32),
                     jnp.asarray(rng.integers(0, 10, B), jnp.int32)),
        "seq": (SeqModel(), jnp.asarray(rng.integers(0, 29, (B, 11)), jnp.int32),
                jnp.asarray(rng.integers(0, 3, B), jnp.int32)),
    }


def _update_case() -> dict:
    import jax
    import jax.numpy as jnp

    from dpprims.bindings.jax import gaussian_noise, init_opt_state, noisy_update

    params = {"w": jax.ShapeDtypeStruct((7, 13), jnp.float32), "b": jax.ShapeDtypeStruct((13,), jnp.float32),
              "e": jax.ShapeDtypeStruct((3, 5, 2), jnp.float32)}

    def step(params, grads, opt_state, seed, step):
        new_p, new_s = noisy_update(params, grads, opt_state, noise_std=1.3, normaliser=40.0, seed=seed,
                                    step=step, optimizer="adam", lr=1e-3)
        z = gaussian_noise(params["w"], seed=seed, step=step, std=2.0)
        return new_p, new_s, z

    opt = jax.eval_shape(lambda p: init_opt_state(p, "adam"), params)
    args = (params, params, opt, jax.ShapeDtypeStruct((2,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
    rep = _report(step, args)
    rep["n_leaves"] = len(jax.tree_util.tree_leaves(params))
    return rep


def child_main(out_path: str) -> None:
    import time

    import jax_triton.triton_lib as tlib

    t0 = time.perf_counter()
    result = {}
    for name, (model, x, y) in _models().items():
        result[name] = _clipped_grad_case(model, x, y)
    result["seq_oracle"] = _oracle_case(*_models()["seq"])
    result["update"] = _update_case()
    result["triton_compiles"] = len(tlib._COMPILED_KERNEL_CACHE)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    with open(out_path, "w") as f:
        json.dump(result, f)


def count_main() -> None:
    """Triton compiles per model: jax-triton's compiled-kernel cache after exporting
    clipped_grad for cuda (fresh process per model)."""
    import jax.numpy as jnp
    import numpy as np

    from dpprims.models.jax_resnet import resnet18, resnet50

    name = sys.argv[2]
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    model = {"resnet18": resnet18, "resnet50": resnet50}[name](num_classes=10, cifar=True)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    import time

    import jax_triton.triton_lib as tlib
    t0 = time.perf_counter()
    rep = _clipped_grad_case(model, x, y)
    n_calls = sum(c["target"] == "triton_kernel_call" for c in rep["calls"])
    print(json.dumps(dict(model=name, batch=batch, triton_kernel_calls=n_calls,
                          triton_compiles=len(tlib._COMPILED_KERNEL_CACHE),
                          seconds=round(time.perf_counter() - t0, 1))))


PLUGIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "jax-cuda12-plugin")
"""Where the README's test command installs jaxlib's CUDA plugin (``pip install --no-deps --target``):
only the lowering child gets it on its path; an ordinary ``import jax`` here never loads it."""


def _child_env() -> dict:
    env = dict(os.environ)
    if os.path.isdir(PLUGIN_DIR):
        env["PYTHONPATH"] = os.pathsep.join([PLUGIN_DIR] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("TRITON_INTERPRET", None)  # compiled kernels: the lowering compiles them to PTX
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("DPPRIMS_JAX_BACKEND", None)  # "auto": chosen by the lowering platform
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


if __name__ == "__main__":
    if sys.argv[1] == "child":
        child_main(sys.argv[2])
    elif sys.argv[1] == "count":
        count_main()
    else:
        raise SystemExit(f"usage: {sys.argv[0]} child OUT.json | count resnet18|resnet50 [batch]")


# ============================================================================================
# parent: the tests
# ============================================================================================
def _plugin_missing() -> str | None:
    code = "import jax_triton; from jax._src.lib import gpu_triton as g; g.get_compute_capability"
    r = subprocess.run([sys.executable, "-c", code], env=_child_env(), capture_output=True, text=True)
    if r.returncode:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return ("jax-triton with jaxlib's CUDA plugin is needed to lower for cuda (pip install jax-triton; pip install "
                f"--no-deps --target {PLUGIN_DIR} jax-cuda12-plugin==<jaxlib version>): " + last)
    return None


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    why = _plugin_missing()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("lowering") / "lowered.json"
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "child", str(out)], env=_child_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"the lowering child failed:\n{r.stderr[-6000:]}"
    with open(out) as f:
        return json.load(f)


def _triton_calls(rep) -> list:
    return [c for c in rep["calls"] if c["target"] == "triton_kernel_call"]


def _count(rep, *kernels) -> int:
    return sum(c["kernel"] in kernels for c in _triton_calls(rep))


def _check_common(rep, what, cpu_callbacks=()):
    calls = _triton_calls(rep)
    assert calls, f"{what}: no triton_kernel_call in the cuda lowering"
    others = sorted({c["target"] for c in rep["calls"]} - {"triton_kernel_call"})
    assert not others, f"{what}: unexpected custom calls {others} (a host callback would not run on a GPU)"
    for c in calls:
        assert c["kernel"], f"{what}: a triton_kernel_call without a PTX .entry"
        assert c["targets"] and all(t.startswith("sm_90") for t in c["targets"]), \
            f"{what}: kernel {c['kernel']} compiled for {c['targets']}, expected sm_90"
    assert set(rep["last_path"].values()) == {"jax-triton"}, f"{what}: LAST_PATH after the cuda lowering " \
                                                             f"{rep['last_path']}"
    assert set(rep["cpu_custom_calls"]) <= set(cpu_callbacks), \
        f"{what}: the cpu lowering has custom calls {rep['cpu_custom_calls']}"
    assert set(rep["cpu_last_path"].values()) == {"jnp"}, f"{what}: cpu LAST_PATH {rep['cpu_last_path']}"


def _check_no_per_example_weights(rep, what):
    found = _per_example_weight_shapes({tuple(s) for s in rep["tensor_shapes"]}, rep["layers"], B)
    assert not found, f"{what}: per-example weight gradients in the program: {found}"


LINEAR_CLIPPED = ("_linear_clipped_weight_grad_kernel", "_linear_clipped_weight_grad_rank1_kernel")


def _clipped_sum_shapes(rep, *kernels) -> list:
    """[P, D] of each call of a clipped weight-gradient kernel (its output: partials [S, P, D] or [P, D])."""
    return sorted(tuple(c["shapes"][0][-2:]) for c in _triton_calls(rep) if c["kernel"] in kernels)


def test_resnet18_clipped_grad_lowers_to_triton_for_cuda(lowered):
    rep = lowered["resnet18"]
    _check_common(rep, "resnet18")
    _check_no_per_example_weights(rep, "resnet18")
    layers = rep["layers"]
    convs = {k: v for k, v in layers.items() if len(v[0]) == 4}
    dense = {k: v for k, v in layers.items() if len(v[0]) == 2}
    gns = {p.rsplit("/", 1)[0] for p in rep["param_paths"] if p.endswith("/scale")}
    assert len(convs) == 20 and len(dense) == 1 and len(gns) == 20, (len(convs), len(dense), len(gns))
    # every conv: one norm kernel (direct or ghost) and one clipped sum with its own [C_out, C_in*k*k]
    assert _count(rep, "_conv2d_norm_direct_kernel", "_conv2d_norm_ghost_kernel") == len(convs)
    assert _clipped_sum_shapes(rep, "_conv2d_clipped_weight_grad_kernel") == sorted(
        tuple(v[1]) for v in convs.values())
    # every GroupNorm: per-example affine grads + their clipped sum
    assert _count(rep, "_norm_affine_grads_kernel") == len(gns)
    assert _count(rep, "_clipped_rows_sum_kernel") == len(gns)
    # the head (T = 1): ||a||^2, ||g||^2 and the bias norm through the row-norm kernel, clipped W and b
    assert _count(rep, "_rows_sq_norm_kernel") == 3
    assert _clipped_sum_shapes(rep, *LINEAR_CLIPPED) == [tuple(v[1]) for v in dense.values()]
    assert _count(rep, "_linear_clipped_bias_grad_kernel") == 1
    assert _count(rep, "_clip_factor_kernel") == 1


def test_sequence_model_clipped_grad_lowers_to_triton_for_cuda(lowered):
    rep = lowered["seq"]
    _check_common(rep, "seq")
    _check_no_per_example_weights(rep, "seq")
    layers = rep["layers"]
    dense = {k: v for k, v in layers.items() if k != "emb"}
    assert set(layers) == {"emb", "fc1", "fc2", "head"}, layers
    # Dense over T = 11 positions (fc1, fc2): direct or ghost norm, bias norm, clipped W and b;
    # the head (T = 1): row norms. Embedding: ghost norm with the indicator Gram + clipped scatter.
    assert _count(rep, "_linear_norm_direct_kernel", "_linear_norm_ghost_kernel") == 2
    assert _count(rep, "_linear_bias_norm_kernel") == 2
    assert _count(rep, "_rows_sq_norm_kernel") == 3
    assert _clipped_sum_shapes(rep, *LINEAR_CLIPPED) == sorted(tuple(v[1]) for v in dense.values())
    assert _count(rep, "_linear_clipped_bias_grad_kernel") == 3
    assert _count(rep, "_embedding_norm_ghost_kernel") == 1
    assert _count(rep, "_embedding_clipped_grad_kernel") == 1
    assert _count(rep, "_norm_affine_grads_kernel") == 1 and _count(rep, "_clipped_rows_sum_kernel") == 1
    assert _count(rep, "_clip_factor_kernel") == 1


def test_per_example_weight_detector_finds_the_oracles_gradients(lowered):
    """The [B, P, D] detector is not vacuous: vmap-of-grad (the oracle) materialises them."""
    rep = lowered["seq_oracle"]
    found = {name for name, _ in _per_example_weight_shapes({tuple(s) for s in rep["tensor_shapes"]},
                                                            rep["layers"], B)}
    assert {"fc1", "fc2", "head"} <= found, found


def test_noisy_update_lowers_to_triton_for_cuda(lowered):
    rep = lowered["update"]
    # on cpu the jnp noise takes float32 log/cos/sin from numpy (LIBM "numpy"): a host callback;
    # the fp32 fused update is one buffer callback into dpprims.noise_cpu (bindings/jax/update.py)
    _check_common(rep, "update", cpu_callbacks=("xla_ffi_python_cpu_callback", "xla_buffer_python_cpu_callback"))
    assert _count(rep, "_noisy_update_kernel") == rep["n_leaves"]
    assert _count(rep, "_gaussian_noise_kernel") == 1
    assert len(_triton_calls(rep)) == rep["n_leaves"] + 1


@pytest.mark.gpu
def test_auto_path_runs_the_kernels_on_a_gpu():
    """On a GPU (CUDA jaxlib, jax-triton, compiled kernels) the default path executes the Triton
    kernels inside one jitted function and agrees with the jnp path."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dpprims.bindings import jax as J
    from dpprims.bindings.jax import _call

    if jax.default_backend() != "gpu" or not _call.platform_dispatch():
        pytest.skip("needs JAX on a GPU with jax_triton and compiled kernels (TRITON_INTERPRET unset)")
    rng = np.random.default_rng(3)
    A = jnp.asarray(rng.standard_normal((6, 37, 70)), jnp.float32)
    G = jnp.asarray(rng.standard_normal((6, 37, 45)), jnp.float32)
    c = jnp.asarray(rng.uniform(0.1, 2.0, 6), jnp.float32).at[2].set(0.0)

    def ops(A, G, c):
        return (J.linear_weight_sq_norms(A, G, "ghost"), J.linear_weight_sq_norms(A, G, "direct"),
                J.linear_clipped_weight_grad(A, G, c), J.clip_factors(jnp.abs(A[:, 0, 0]), None, 0.7)[0])

    _call.LAST_PATH.clear()
    got = jax.jit(ops)(A, G, c)
    assert set(_call.LAST_PATH.values()) == {"jax-triton"}, _call.LAST_PATH
    with J.use_path("jnp"):
        expected = jax.jit(ops)(A, G, c)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-5)
