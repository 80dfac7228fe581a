"""Smoke tests of the benchmark harness (bench/): it runs end to end on this machine at tiny sizes
and writes what it promises - the machine line and command, a row for every implementation or
method (measured, or skipped with a reason), every target marked met / missed / not measured,
and the plot. No timing assertions: CPU numbers say nothing about the GPU.

The whole end-to-end smoke matrix (7 methods x 2 configs, three JAX compilations each) takes
minutes on a shared 2-core machine: it is marked slow (--runslow); the default run covers the
kernel microbenchmarks, the torch methods and one JAX method.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
E2E_METHODS = ["torch-nonprivate", "opacus-hooks", "opacus-ghost", "dpprims-torch", "jax-nonprivate", "jax-vmap",
               "dpprims-jax"]
QUICK_METHODS = E2E_METHODS[:5]
TARGET_NAMES = {"torch_vs_nonprivate", "torch_vs_opacus", "torch_memory", "jax_vs_nonprivate", "jax_vs_vmap",
                "norm_pass", "clipped_wgrad", "noisy_update_bw"}
STATUSES = {"met", "missed", "not measured"}


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _only_json(out: Path) -> dict:
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, f"expected one result file in {out}, got {files}"
    return json.loads(files[0].read_text())


def _check_machine(res: dict, script: str) -> None:
    assert res["machine_line"] and "Python" in res["machine_line"]
    m = res["machine"]
    assert script in m["command"], m["command"]
    for key in ("date", "python", "torch", "triton", "gpu", "driver", "cuda"):
        assert key in m, key


def _check_targets(res: dict) -> None:
    names = {t["target"] for t in res["targets"]}
    assert names == TARGET_NAMES, names ^ TARGET_NAMES
    for t in res["targets"]:
        assert t["status"] in STATUSES, t
        if t["status"] == "not measured":
            assert t.get("reason"), t


def _check_row_statuses(rows: list[dict]) -> None:
    for r in rows:
        assert r["status"] in ("ok", "skipped"), (r.get("method") or r.get("impl"), r["status"], r.get("reason"),
                                                  r.get("traceback", "")[-2000:])
        if r["status"] == "skipped":
            assert r.get("reason"), r


# --------------------------------------------------------------------------------------------
def test_kernel_microbenchmarks_smoke(tmp_path):
    """``pytest bench`` in smoke mode: every kernel case at tiny shapes, one call each (Triton
    interpreter on CPU), checked against the fp64 reference; results JSON written."""
    out = tmp_path / "kernels"
    proc = _run([sys.executable, "-m", "pytest", str(BENCH), "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                 "--bench-size=smoke", f"--bench-out={out}"], timeout=600)
    assert "dpprims kernel benchmarks" in proc.stdout
    res = _only_json(out)
    assert res["kind"] == "kernels" and res["settings"]["size"] == "smoke"
    _check_machine(res, "pytest")
    _check_targets(res)
    rows = res["rows"]
    _check_row_statuses(rows)
    suites = {r["suite"] for r in rows}
    assert suites == {"conv", "linear", "groupnorm", "embedding", "clip", "update"}, suites
    impls = {r["impl"] for r in rows if r["suite"] == "conv"}
    assert impls == {"dp-norm-direct", "dp-norm-ghost", "dp-clipped-wgrad", "opacus-materialise", "nonprivate-wgrad"}
    # the dp ops were compared against the fp64 reference in every conv / linear case
    checked = [r for r in rows if r["suite"] in ("conv", "linear") and r["impl"].startswith("dp-") and r["status"] == "ok"]
    assert checked and all(r.get("check_rel_err") is not None and r["check_rel_err"] < 1e-3 for r in checked)
    # linear cases at T = 1 and T > 1, conv shapes read off the model
    assert {r["T"] for r in rows if r["suite"] == "linear"} >= {1}
    assert any(r["T"] > 1 for r in rows if r["suite"] == "linear")
    assert any(r["model"] == "r18-32" for r in rows if r["suite"] == "conv")


def test_e2e_smoke_quick(tmp_path):
    """``bench/e2e.py --smoke`` for one config and the torch methods plus non-private JAX."""
    out = tmp_path / "e2e"
    proc = _run([sys.executable, str(BENCH / "e2e.py"), "--smoke", "--configs", "r18-32-b256", "--methods",
                 ",".join(QUICK_METHODS), "--out", str(out)], timeout=600)
    assert "| config | precision | method |" in proc.stdout
    res = _only_json(out)
    _check_machine(res, "e2e.py")
    _check_targets(res)
    rows = res["rows"]
    assert sorted(r["method"] for r in rows) == sorted(QUICK_METHODS)
    _check_row_statuses(rows)
    assert res["settings"]["smoke"] is True
    for r in rows:
        if r["status"] == "ok":
            assert r["examples_per_s"] > 0 and r["steps"] == 2
            assert r.get("max_batch"), r["method"]  # searched (torch) or skipped with a reason (JAX, smoke)
    png = out / res["plot"]
    assert png.exists() and png.stat().st_size > 1000
    assert res["markdown"].count("\n| r18-32-b256 |") == len(QUICK_METHODS)


@pytest.mark.slow
def test_e2e_smoke_all_methods(tmp_path):
    """The whole smoke matrix: both configs, all seven methods, the max-batch search everywhere."""
    out = tmp_path / "e2e-all"
    _run([sys.executable, str(BENCH / "e2e.py"), "--smoke", "--max-batch-cap", "8", "--out", str(out)], timeout=1800)
    res = _only_json(out)
    _check_machine(res, "e2e.py")
    _check_targets(res)
    _check_row_statuses(res["rows"])
    for cfg in ("r18-32-b256", "r50-224-b64"):
        assert sorted(r["method"] for r in res["rows"] if r["config"] == cfg) == sorted(E2E_METHODS)
    assert (out / res["plot"]).exists()


# --------------------------------------------------------------------------------------------
def test_targets_and_table_from_rows(tmp_path):
    """Target bookkeeping and the table on synthetic rows: a losing dpprims row is 'missed' and
    shown, a missing baseline makes its target 'not measured' with a reason, the plot renders."""
    sys.path.insert(0, str(BENCH))
    try:
        import e2e
        import plot as bplot
    finally:
        sys.path.remove(str(BENCH))

    def row(method, eps, mem, status="ok", cfg="r18-32-b256"):
        r = dict(config=cfg, precision="bf16", method=method, batch=256, model="resnet18", image=32, status=status)
        if status == "ok":
            r.update(examples_per_s=eps, step_ms_median=256 / eps * 1e3, step_ms_p10=1.0, step_ms_p90=2.0,
                     peak_mem_bytes=mem)
        else:
            r["reason"] = "out of memory at batch 256"
        return r

    rows = [row("torch-nonprivate", 1000.0, 10 * 2**30), row("opacus-hooks", 400.0, 30 * 2**30),
            row("dpprims-torch", 800.0, 12 * 2**30),  # 0.8x non-private: missed; 2x Opacus: missed
            row("jax-nonprivate", 1000.0, 9 * 2**30), row("jax-vmap", 0.0, None, status="oom"),
            row("dpprims-jax", 900.0, 9 * 2**30)]
    targets = {t["target"]: t for t in e2e.evaluate_targets(rows, smoke=False)}
    assert targets["torch_vs_nonprivate"]["status"] == "missed"
    assert targets["torch_vs_nonprivate"]["value"] == pytest.approx(0.8)
    assert targets["torch_vs_opacus"]["status"] == "missed"
    assert targets["torch_memory"]["status"] == "met"  # 1.2x
    assert targets["jax_vs_nonprivate"]["status"] == "met"  # 0.9x
    assert targets["jax_vs_vmap"]["status"] == "not measured" and "jax-vmap: oom" in targets["jax_vs_vmap"]["reason"]
    assert targets["norm_pass"]["status"] == "not measured"
    table = bplot.markdown_table(rows)
    assert "| dpprims-torch | 800 |" in table and "0.80" in table and "oom: out of memory" in table
    res = dict(machine_line="test", machine={"command": "test"}, settings={}, rows=rows, targets=list(targets.values()))
    png = bplot.plot(res, tmp_path / "t.png")
    assert png.exists()
    smoke = {t["target"]: t for t in e2e.evaluate_targets(rows, smoke=True)}
    assert all(t["status"] == "not measured" for t in smoke.values())


def test_layer_shapes_come_from_the_models():
    """The microbenchmark shapes are read off dpprims.models by forward hooks: ResNet-18 has 20
    convs (11 distinct shapes at 32x32) and one fc layer."""
    sys.path.insert(0, str(BENCH))
    try:
        from shapes import layer_shapes
    finally:
        sys.path.remove(str(BENCH))
    s = layer_shapes("r18-32")
    assert sum(c for _, _, c in s["conv"]) == 20 and len(s["conv"]) == 11
    assert [(x.T, x.D, x.P) for _, x, _ in s["linear"]] == [(1, 512, 10)]
    first = s["conv"][0][1]
    assert (first.B, first.C_in, first.H, first.C_out, first.H_out) == (256, 3, 32, 64, 32)
    s224 = layer_shapes("r50-224")
    assert sum(c for _, _, c in s224["conv"]) == 53
    assert s224["conv"][0][1].k == (7, 7) and s224["conv"][0][1].H_out == 112


def test_kernel_summary_from_rows():
    """The microbenchmark summary on synthetic timed rows (the CPU smoke never has timings):
    per-case ratios, the per-model sums weighted by layer count, and the kernel targets."""
    sys.path.insert(0, str(BENCH))
    try:
        from _micro import markdown, summarize_rows
    finally:
        sys.path.remove(str(BENCH))

    def row(layer, count, impl, ms, suite="conv", model="r18-32", auto="direct", gbs=None):
        return dict(case=f"{suite}|{model}|{layer}|x|bf16", suite=suite, model=model, layer=layer, count=count, shape="x",
                    mode="bf16", impl=impl, status="ok", T=16, d=9, p=8, auto_method=auto, median_ms=ms, gbs=gbs)

    rows = []
    # layer a (x2): norm 1, clipped 2, non-private 2, Opacus 12; layer b (x1): norm 2, clipped 3, non-private 2
    for layer, count, (nd, ng, cl, op, npv) in (("a", 2, (1.0, 5.0, 2.0, 12.0, 2.0)), ("b", 1, (9.0, 2.0, 3.0, 10.0, 2.0))):
        auto = "direct" if layer == "a" else "ghost"
        rows += [row(layer, count, "dp-norm-direct", nd, auto=auto), row(layer, count, "dp-norm-ghost", ng, auto=auto),
                 row(layer, count, "dp-clipped-wgrad", cl, auto=auto), row(layer, count, "opacus-materialise", op, auto=auto),
                 row(layer, count, "nonprivate-wgrad", npv, auto=auto)]
    rows += [row("u", 1, "dp-noisy-update-sgd-momentum", 1.0, suite="update", model="synthetic", gbs=2000.0),
             row("u", 1, "torch-copy", 1.0, suite="update", model="synthetic", gbs=3000.0)]
    rows[-1]["d"] = rows[-2]["d"] = 100
    summary = summarize_rows(rows, smoke=False)
    cases = {c["layer"]: c for c in summary["cases"]}
    assert cases["a"]["dp_total_ms"] == 3.0 and cases["a"]["speedup_vs_opacus"] == pytest.approx(4.0)
    assert cases["b"]["norm_ms"] == 2.0 and cases["b"]["best_norm_method"] == "ghost"
    (m,) = summary["models"]
    assert m["layers"] == 3
    assert m["norm_over_nonprivate"] == pytest.approx((2 * 1.0 + 2.0) / (2 * 2.0 + 2.0))
    assert m["clipped_over_nonprivate"] == pytest.approx((2 * 2.0 + 3.0) / 6.0)
    t = {(x["target"], x["where"]): x for x in summary["targets"]}
    assert t[("norm_pass", "r18-32 bf16 (conv+linear layers)")]["status"] == "missed"  # 0.67 > 0.5
    assert t[("clipped_wgrad", "r18-32 bf16 (conv+linear layers)")]["status"] == "missed"  # 1.17 > 1.15
    upd = [x for x in summary["targets"] if x["target"] == "noisy_update_bw"]
    assert len(upd) == 1 and upd[0]["status"] == "missed" and upd[0]["value"] == pytest.approx(2 / 3)
    text = markdown(summary, rows)
    assert "| r18-32 | a (x2) | bf16 |" in text and "4.00x" in text
