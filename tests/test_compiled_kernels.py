"""Every kernel of the package, compiled (never run) for sm_90 and sm_80 at small shapes.

Checks, from the compiled code (issue 11):

* every Triton kernel defined in dpprims.kernels is launched by the bindings in this capture
  (a kernel nothing exercises here would escape the other checks) and compiles for both
  targets;
* no build spills registers (ptxas -v spill bytes, read when the cubin uses local memory);
* every build that feeds fp16/bf16 data to ``tl.dot`` issues tensor-core instructions
  (wgmma / mma.sync in the PTX), the clipped weight-gradient sums included.

The launches come from the REAL bindings: one DP step (forward, engine backward, clip factors,
clipped sums, fused noise + update) of small ResNet-18-GN, transformer-block and MLP models in
fp32 and bf16, plus the ops a step does not reach (noise diagnostics, Adam/AdamW, masked and
automatic clip factors, fp16, grouped conv) and the JAX binding's launch builder (with sm_90 specs), all captured on
shape-only data by dpprims.kernel_report. Compiling needs the kernels as compiled objects, so
the capture and compile run in a subprocess without TRITON_INTERPRET (the test session has it
set). Builds that differ only in block sizes are represented by the one with the largest
blocks (most registers), which keeps this to one compile per kernel x dtypes x flags x arch.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent(r'''
    import inspect, json, math, sys, time
    sys.path.insert(0, sys.argv[2])
    import torch
    import kernel_report as K            # bench/kernel_report.py
    from dpprims import kernel_report as kr
    from dpprims.bindings.torch import conv as C, linear as L, noise as N, update as U

    def meta(*s, dt=torch.float32):
        return torch.empty(*s, device="meta", dtype=dt)

    def extra_ops(arch):
        """Ops a default SGD step of the models does not reach."""
        with kr.record_torch_launches(arch) as ls:
            with kr.layer_label("<noise diagnostics>"):
                N.gaussian_noise(meta(1000), std=1.0, seed=1, step=1)
                N.add_gaussian_noise_(meta(1000), std=1.0, seed=1, step=1)
                N.philox4x32_words(1, meta(4, 100, dt=torch.int32))
                N.normal_pair_from_words(meta(5, 100, dt=torch.int32))
            with kr.layer_label("<clip factors: mask, automatic>"):
                L.clip_factors(meta(7), meta(7, dt=torch.bool), meta(1), True, 0.01)
            with kr.layer_label("<clip factors: rounding slack>"):
                L.clip_factors(meta(7), None, meta(1), False, 0.01, meta(2, 7))
            for opt in ("adam", "adamw"):
                p = meta(300); p.grad = meta(300)
                with kr.layer_label(f"<{opt}>"):
                    U.add_noise_and_step([p], state={}, noise_std=1.0, normaliser=8.0, seed=1, step=1,
                                         optimizer=opt, lr=1e-3, weight_decay=0.1)
            for dt in (torch.float16, torch.bfloat16):
                A, G, c = meta(3, 40, 24, dt=dt), meta(3, 40, 20, dt=dt), meta(3)
                with kr.layer_label(f"<linear {dt}>"):
                    for m in ("ghost", "direct"):
                        L.linear_weight_sq_norms(A, G, m)
                    L.linear_clipped_weight_grad(A, G, c)
                    L.linear_clipped_weight_grad(A, G, c, "ieee", "rounded")  # design (c)
                x, g = meta(3, 8, 9, 9, dt=dt), meta(3, 8, 9, 9, dt=dt)
                with kr.layer_label(f"<conv groups=2 {dt}>"):
                    for m in ("ghost", "direct"):
                        C.conv2d_weight_sq_norms(x, g, [3, 3], [1, 1], [1, 1], [1, 1], 2, m)
                    C.conv2d_clipped_weight_grad(x, g, c, [3, 3], [1, 1], [1, 1], [1, 1], 2)
                    C.conv2d_clipped_weight_grad(x, g, c, [3, 3], [1, 1], [1, 1], [1, 1], 2, "ieee", "rounded")
                    C.conv2d_bias_grads(g)
        return ls

    def main():
        out_path, arches = sys.argv[1], [int(a) for a in sys.argv[3].split(",")]
        result = dict(kernels={}, builds=[], capture_errors=[])
        import dpprims.kernels as kpkg, pkgutil, importlib
        from triton.runtime.jit import JITFunction
        for info in pkgutil.iter_modules(kpkg.__path__):
            mod = importlib.import_module(f"dpprims.kernels.{info.name}")
            for name, v in vars(mod).items():
                if isinstance(v, JITFunction) and name.endswith("_kernel") and v.__module__ == mod.__name__:
                    result["kernels"][name] = dict(module=mod.__name__, dot="tl.dot(" in inspect.getsource(v.fn))
        t0 = time.time()
        todo = {}
        for arch in arches:
            launches = []
            for name, (builder, make_input, B) in K._models(small=True).items():
                for dt in ("fp32", "bf16"):
                    launches += K.capture_torch(builder, make_input, B, K.DTYPES[dt], arch)[0]
            launches += extra_ops(arch)
            for name, (builder, shape) in (K._jax_models(small=True).items() if arch == arches[0] else ()):
                for dt in ("fp32", "bf16"):
                    try:
                        launches += K.capture_jax(builder, shape, dt, arch)
                    except Exception as e:
                        result["capture_errors"].append(f"jax {name} {dt}: {type(e).__name__}: {e}")
            # one representative per kernel x signature x declared flags: the largest blocks and warps
            reps = {}
            for ln in launches:
                b, _ = kr.specialise(ln, arch)
                declared = {p.name for p in ln.kernel.params if p.is_constexpr}
                flags = tuple((k, v) for k, v in b.constexprs
                              if k in declared and not k.startswith("BLOCK") and k not in ("KH", "KW"))
                key = (b.kernel_name, tuple(v for _, v in b.signature if v.startswith("*")), flags)
                size = (math.prod(v for k, v in b.constexprs if k.startswith("BLOCK")), b.num_warps)
                if key not in reps or size > reps[key][0]:
                    reps[key] = (size, ln, b)
            todo.update({b: ln for _, ln, b in reps.values()})
        result["capture_seconds"] = time.time() - t0
        builds = kr.compile_builds(list(todo.items()), jobs=2)
        for b, ln in todo.items():
            result["builds"].append(dict(arch=b.arch, kernel=b.kernel_name, build=b.short(), layer=ln.layer,
                                         framework=ln.framework, half=kr.multiplies_half(b), **builds[b]))
        result["seconds"] = time.time() - t0
        with open(out_path, "w") as f:
            json.dump(result, f, default=str)

    if __name__ == "__main__":  # spawned compile workers re-import this module
        main()
''')


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "builds.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(out), os.path.join(ROOT, "bench"), "90,80"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        pytest.fail(f"capture/compile subprocess failed (rc {r.returncode}):\n{r.stderr[-6000:]}")
    with open(out) as f:
        return json.load(f)


def _fmt(rows) -> str:
    return "\n".join(f"  sm_{b['arch']} {b['build']} (layer {b['layer']}, {b['framework']}): "
                     f"{b.get('error') or ''}" for b in rows)


def test_capture_covers_every_kernel(compiled):
    assert not compiled["capture_errors"], "\n".join(compiled["capture_errors"])
    for arch in (90, 80):
        seen = {b["kernel"] for b in compiled["builds"] if b["arch"] == arch}
        missing = sorted(set(compiled["kernels"]) - seen)
        assert not missing, (f"sm_{arch}: kernels defined in dpprims.kernels that no captured launch reached "
                             f"(add the op to tests/test_compiled_kernels.py): {missing}")


def test_every_build_compiles(compiled):
    bad = [b for b in compiled["builds"] if "error" in b]
    assert not bad, "builds that do not compile:\n" + _fmt(bad)


def test_no_build_spills(compiled):
    bad = [b for b in compiled["builds"] if "error" not in b and b["spills"]]
    assert not bad, "builds that spill registers (store/load bytes):\n" + "\n".join(
        f"  sm_{b['arch']} {b['build']}: {b['registers']} regs, {b['spill_store_bytes']}/{b['spill_load_bytes']} B"
        for b in bad)


def test_half_precision_dots_use_tensor_cores(compiled):
    dot = {k for k, v in compiled["kernels"].items() if v["dot"]}
    half = [b for b in compiled["builds"] if "error" not in b and b["half"] and b["kernel"] in dot]
    assert half, "no half-precision build of a tl.dot kernel was captured"
    clipped = [b for b in half if "clipped" in b["kernel"]]
    assert clipped, "no half-precision clipped weight-gradient build was captured"
    bad = [b for b in half if not b["tensor_cores"]]
    assert not bad, ("builds that multiply fp16/bf16 data without a tensor-core instruction "
                     "(ptx wgmma / mma.sync = 0; fp32 FMA instead):\n" + "\n".join(
                         f"  sm_{b['arch']} {b['build']} (layer {b['layer']}): fma.rn.f32 {b['ptx']['fma_f32']}"
                         for b in bad))


def test_split_k_epilogue_is_ordered(compiled):
    """Every clipped weight-gradient build (Linear designs (a)/(b)/(c), Conv (a)/(c)) carries the
    in-kernel split-K reduction of kernels/linear.py ``_store_split_tile`` with its memory
    ordering intact in the PTX: the partial stores (``st.global.cg``), then a CTA barrier, then
    ONE gpu-scope acq_rel ticket atomic, and the reads of the slices' partials
    (``ld.global.cg``) only after it. Without the barrier or the acquire the last slice could
    sum a partial before it is written (an uninitialised workspace: no bound on the sum)."""
    clipped = [b for b in compiled["builds"] if "error" not in b and "_clipped_weight_grad" in b["kernel"]]
    kernels = {b["kernel"] for b in clipped}
    assert len(kernels) >= 5, kernels
    bad = [b for b in clipped if not (b["ptx"]["atom_acq_rel_gpu"] == 1 and b["ptx"]["split_epilogue_ordered"])]
    assert not bad, "clipped-sum builds without an ordered split-K epilogue:\n" + "\n".join(
        f"  sm_{b['arch']} {b['build']}: {b['ptx']}" for b in bad)


NORM_SPECS = [("linear", "linear_norm_direct_spec"), ("linear", "linear_norm_ghost_spec"),
              ("linear", "rows_sq_norm_spec"), ("linear", "linear_bias_norm_spec"),
              ("conv", "conv2d_norm_direct_spec"), ("conv", "conv2d_norm_ghost_spec"),
              ("conv", "conv2d_bias_grads_spec"), ("norm_affine", "norm_affine_grads_spec"),
              ("embedding", "embedding_norm_ghost_spec")]


@pytest.mark.parametrize("module,name", NORM_SPECS, ids=[n for _, n in NORM_SPECS])
def test_norm_specs_take_the_architecture(module, name):
    """Every norm-kernel launch spec takes ``arch`` (both bindings pass it; 90 by default)."""
    import importlib
    import inspect

    fn = getattr(importlib.import_module(f"dpprims.kernels.{module}"), name)
    p = inspect.signature(fn).parameters.get("arch")
    assert p is not None and p.default == 90, f"{name} has no arch=90 keyword"


def test_arch_rules(monkeypatch):
    """sm_86/89 use the sm_80 rules, newer parts the sm_90 ones, pre-Ampere is refused; on a GPU
    (interpreter off) the ghost Gram tile follows the arch."""
    from dpprims.kernels import _launch, linear

    assert [_launch.check_arch(a) for a in (80, 86, 89, 90, 100)] == [80, 80, 80, 90, 90]
    with pytest.raises(ValueError, match="compute capability"):
        _launch.check_arch(75)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    s90 = linear.linear_norm_ghost_spec(3, 513, 768, 768, arch=90)
    s80 = linear.linear_norm_ghost_spec(3, 513, 768, 768, arch=80)
    assert (s90.constexprs["BLOCK_T"], s80.constexprs["BLOCK_T"]) == (64, 32)
    assert s90.grid == (3, 9, 9) and s80.grid == (3, 17, 17)
