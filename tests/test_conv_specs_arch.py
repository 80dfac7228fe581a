"""Architecture-dependent launch specs of the conv clipped weight-gradient sums (kernels/conv.py).

sm_80 and sm_90 take different blocks / warps for design (a) (issue 11: the sm_80 choices
come from builds compiled for sm_80 and read with cuobjdump, see the spec docstrings), so:

* the spec functions return the documented choice per architecture, at GPU sizes (interpreter
  off), for ResNet layer shapes and odd shapes, and their grids cover the weight;
* sm_90's half-precision choice is pinned to what the committed sm_90 report was compiled with
  (fp32 operands take sm_80's 32 x 32 tiles on sm_90 too, whose former tiles spilled);
* the bindings launch exactly the sm_80 (sm_90) spec when the architecture is 80 (90): the
  torch binding through dpprims.kernel_report's capture on meta tensors (the real launch code,
  as the compiled-kernel report uses it), the JAX binding's launch builder under
  ``use_compute_capability``. The capture needs the kernels as compiled objects, so it runs in a
  subprocess without TRITON_INTERPRET (the test session sets it).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from dpprims.kernels import conv as K
from dpprims.kernels._launch import cdiv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _geo(B, C_in, H, W, C_out, k, s=1, p=0, d=1, groups=1):
    H_out = (H + 2 * p - d * (k - 1) - 1) // s + 1
    W_out = (W + 2 * p - d * (k - 1) - 1) // s + 1
    return K.Conv2dGeometry(B=B, C_in=C_in, H=H, W=W, C_out=C_out, H_out=H_out, W_out=W_out, KH=k, KW=k,
                            SH=s, SW=s, PH=p, PW=p, DH=d, DW=d, groups=groups)


# ResNet-50-GN 224 (B = 64) / ResNet-18-GN CIFAR (B = 256) layers, and odd shapes
GEOS = [
    pytest.param(_geo(64, 3, 224, 224, 64, 7, s=2, p=3), id="r50-conv1"),
    pytest.param(_geo(64, 64, 56, 56, 256, 1), id="r50-layer1-conv3"),
    pytest.param(_geo(64, 128, 56, 56, 128, 3, s=2, p=1), id="r50-layer2.0-conv2"),
    pytest.param(_geo(64, 256, 14, 14, 256, 3, p=1), id="r50-layer3-conv2"),
    pytest.param(_geo(64, 512, 7, 7, 512, 3, p=1), id="r50-layer4-conv2"),
    pytest.param(_geo(256, 64, 32, 32, 64, 3, p=1), id="r18-layer1-conv"),
    pytest.param(_geo(256, 256, 8, 8, 256, 3, p=1), id="r18-layer3-conv"),
    pytest.param(_geo(5, 7, 13, 11, 33, 3, p=1), id="odd-B5-Cin7-Cout33"),
    pytest.param(_geo(3, 12, 9, 9, 18, 3, p=2, d=2, groups=3), id="odd-B3-groups3-dil2"),
]


@pytest.fixture
def gpu_sizes(monkeypatch):
    """Specs as on a GPU: interpreting() reads TRITON_INTERPRET at call time."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _blocks(spec):
    c = spec.constexprs
    return c["BLOCK_P"], c["BLOCK_D"], c["BLOCK_K"], spec.num_warps


def _check_cover(spec, geo, unit):
    """The grid covers every weight element of every group and every example (or row) once."""
    bp, bd = spec.constexprs["BLOCK_P"], spec.constexprs["BLOCK_D"]
    assert spec.grid[0] == geo.groups * cdiv(geo.P, bp) and spec.grid[1] == cdiv(geo.D, bd)
    per = spec.outputs[unit]
    total = geo.B if unit == "examples_per_split" else geo.B * geo.T
    assert (spec.grid[2] - 1) * per < total <= spec.grid[2] * per
    assert spec.outputs["partials"] == (spec.grid[2], geo.C_out, geo.D)


@pytest.mark.parametrize("geo", GEOS)
@pytest.mark.parametrize("itemsize", [2, 4], ids=["half", "fp32"])
def test_design_a_sm80_choice(gpu_sizes, geo, itemsize):
    """sm_80 design (a): half operands 128 x 64 tiles at 8 warps, fp32 operands 32 x 32 at 4
    warps, BLOCK_K <= 32 for both (the builds that compiled without spills; sm_90 fp32 takes
    the same tiles with BLOCK_K <= 16)."""
    spec = K.conv2d_clipped_weight_grad_spec(geo, arch=80, itemsize=itemsize)
    bp, bd, bk, warps = _blocks(spec)
    cap_p, cap_d, cap_k, want_warps = (128, 64, 32, 8) if itemsize == 2 else (32, 32, 32, 4)
    assert bp == max(16, min(cap_p, 1 << (geo.P - 1).bit_length()))
    assert bd == max(16, min(cap_d, 1 << (geo.D - 1).bit_length()))
    assert bk <= cap_k and bk in (16, 32, 64)
    assert warps == want_warps
    _check_cover(spec, geo, "examples_per_split")
    # compute capabilities 8.x (e.g. 86, 89) take the sm_80 rules
    assert _blocks(K.conv2d_clipped_weight_grad_spec(geo, arch=86, itemsize=itemsize)) == _blocks(spec)
    if itemsize == 4:  # fp32: the same tiles on sm_90, BLOCK_K <= 16 there
        bp90, bd90, bk90, w90 = _blocks(K.conv2d_clipped_weight_grad_spec(geo, arch=90, itemsize=4))
        assert (bp90, bd90, w90) == (bp, bd, warps) and bk90 <= 16


# (geometry id, itemsize) -> (BLOCK_P, BLOCK_D, BLOCK_K, num_warps) on sm_90: half operands as
# compiled in bench/results/kernel-report-sm90 (unchanged by the sm_80 choices)
SM90 = {("r50-conv1", 2): (64, 128, 32, 8), ("r50-layer1-conv3", 2): (128, 64, 32, 8),
        ("r50-layer2.0-conv2", 2): (128, 128, 16, 8), ("r50-layer3-conv2", 2): (128, 128, 16, 8),
        ("r18-layer1-conv", 2): (64, 128, 32, 8),
        # fp32 operands: 32 x 32 at 4 warps on sm_90 too (the former 128 x 64 / 64 x 64 spilled)
        ("r50-layer1-conv3", 4): (32, 32, 16, 4), ("r50-layer3-conv2", 4): (32, 32, 16, 4),
        ("r18-layer1-conv", 4): (32, 32, 16, 4)}


@pytest.mark.parametrize("key", sorted(SM90), ids=[f"{k[0]}-{'half' if k[1] == 2 else 'fp32'}" for k in sorted(SM90)])
def test_design_a_sm90_unchanged(gpu_sizes, key):
    geo = {p.id: p.values[0] for p in GEOS}[key[0]]
    spec = K.conv2d_clipped_weight_grad_spec(geo, arch=90, itemsize=key[1])
    assert _blocks(spec) == SM90[key]
    _check_cover(spec, geo, "examples_per_split")


@pytest.mark.parametrize("geo", GEOS)
def test_design_c_same_on_both(gpu_sizes, geo):
    """Design (c), half operands: one accumulator, 128 x 128 at 8 warps on sm_80 as on sm_90."""
    s80 = K.conv2d_clipped_weight_grad_rounded_spec(geo, arch=80, itemsize=2)
    s90 = K.conv2d_clipped_weight_grad_rounded_spec(geo, arch=90, itemsize=2)
    assert _blocks(s80) == _blocks(s90)
    bp, bd, bk, warps = _blocks(s80)
    assert bp == max(16, min(128, 1 << (geo.P - 1).bit_length()))
    assert bd == max(16, min(128, 1 << (geo.D - 1).bit_length()))
    assert warps == (8 if bp * bd >= 64 * 128 else 4)
    _check_cover(s80, geo, "rows_per_split")


def test_arch_below_80_is_refused():
    geo = GEOS[1].values[0]
    for fn in (K.conv2d_clipped_weight_grad_spec, K.conv2d_clipped_weight_grad_rounded_spec):
        with pytest.raises(ValueError, match="compute capability"):
            fn(geo, arch=75)


# --------------------------------------------------------------------------------------------
# the bindings launch the spec of the architecture
# --------------------------------------------------------------------------------------------
_SCRIPT = textwrap.dedent(r'''
    import json, sys
    import torch
    from dpprims import kernel_report as kr
    from dpprims.bindings.torch import conv as C
    from dpprims.kernels import conv as K

    # (B, C_in, H, W, C_out, k, s, p, groups): a ResNet-50 1x1 / 3x3 / strided layer and odd shapes
    CASES = [(4, 64, 14, 14, 256, 1, 1, 0, 1), (3, 96, 9, 9, 160, 3, 1, 1, 1), (5, 40, 11, 13, 72, 3, 2, 1, 1),
             (2, 12, 9, 9, 18, 3, 1, 1, 3)]
    DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

    def geo(B, Ci, H, W, Co, k, s, p, g):
        Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
        return K.Conv2dGeometry(B=B, C_in=Ci, H=H, W=W, C_out=Co, H_out=Ho, W_out=Wo, KH=k, KW=k, SH=s, SW=s,
                                PH=p, PW=p, DH=1, DW=1, groups=g)

    def spec_dict(s):
        return dict(grid=list(s.grid), num_warps=s.num_warps,
                    blocks={k: v for k, v in s.constexprs.items() if k.startswith("BLOCK")})

    out = []
    for arch in (80, 90):
        for case in CASES:
            B, Ci, H, W, Co, k, s, p, g = case
            for name, dt in DT.items():
                designs = ("auto", "rounded") if name != "fp32" else ("auto",)
                for design in designs:
                    x = torch.empty(B, Ci, H, W, dtype=dt, device="meta")
                    Gr = torch.empty(B, Co, (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1, dtype=dt, device="meta")
                    c = torch.empty(B, device="meta")
                    with kr.record_torch_launches(arch) as ls:
                        C.conv2d_clipped_weight_grad(x, Gr, c, [k, k], [s, s], [p, p], [1, 1], g, "ieee", design)
                    fn = (K.conv2d_clipped_weight_grad_rounded_spec if design == "rounded"
                          else K.conv2d_clipped_weight_grad_spec)
                    want = spec_dict(fn(geo(*case), arch=arch, itemsize=dt.itemsize))
                    got = [dict(grid=list(l.grid), num_warps=l.num_warps,
                                blocks={kk: getattr(v, "value", v) for kk, v in l.kwargs.items()
                                        if kk.startswith("BLOCK")},
                                kernel=l.name) for l in ls]
                    out.append(dict(framework="torch", arch=arch, case=case, dtype=name, design=design,
                                    want=want, got=got))

    import jax.numpy as jnp
    from dpprims.bindings.jax import _call
    from dpprims.bindings.jax import conv as JC
    JDT = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}
    for arch in (80, 90):
        for case in CASES:
            B, Ci, H, W, Co, k, s, p, g = case
            gg = geo(*case)
            for name, dt in JDT.items():
                x = jnp.zeros((B, H, W, Ci), dt)
                Gr = jnp.zeros((B, gg.H_out, gg.W_out, Co), dt)
                c = jnp.ones((B,), jnp.float32)
                with _call.use_compute_capability(arch):
                    call = JC.conv_clipped_weight_grad_call(x, Gr, c, gg, "ieee")
                item = call.inputs["x_ptr"].dtype.itemsize
                want = spec_dict(K.conv2d_clipped_weight_grad_spec(gg, arch=arch, itemsize=item))
                got = [dict(grid=list(call.grid), num_warps=call.num_warps,
                            blocks={kk: v for kk, v in call.constexprs.items() if kk.startswith("BLOCK")},
                            kernel=call.kernel.fn.__name__ if hasattr(call.kernel, "fn") else str(call.kernel))]
                out.append(dict(framework="jax", arch=arch, case=case, dtype=name, design="auto", itemsize=item,
                                want=want, got=got))
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
''')


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("specs") / "launches.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"capture subprocess failed (rc {r.returncode}):\n{r.stderr[-6000:]}")
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_bindings_launch_the_arch_spec(launched, framework):
    rows = [r for r in launched if r["framework"] == framework]
    assert len(rows) >= (2 * 4 * 5 if framework == "torch" else 2 * 4 * 3)
    bad = []
    for r in rows:
        got = [g for g in r["got"] if "clipped_weight_grad" in g["kernel"]]
        if len(got) != 1 or {k: got[0][k] for k in ("grid", "num_warps", "blocks")} != r["want"]:
            bad.append(f"sm_{r['arch']} {r['case']} {r['dtype']} {r['design']}: launched {r['got']}, spec {r['want']}")
    assert not bad, "\n".join(bad)
    # the architecture matters where the choices differ: half-precision design (a) at C_in = 96 (D = 864)
    half = {r["arch"]: r["got"][0] for r in rows
            if r["design"] == "auto" and r["dtype"] == "bf16" and r["case"][1] == 96}
    assert half[80]["blocks"]["BLOCK_D"] == 64 and half[80]["num_warps"] == 8
    assert half[90]["blocks"]["BLOCK_D"] == 128 and half[90]["num_warps"] == 8
    fp32 = {r["arch"]: r["got"][0] for r in rows if r["design"] == "auto" and r["dtype"] == "fp32"
            and r["case"][1] == 96 and r.get("itemsize", 4) == 4}
    assert fp32[80]["blocks"]["BLOCK_P"] == 32 and fp32[80]["blocks"]["BLOCK_D"] == 32 and fp32[80]["num_warps"] == 4
