"""bench/e2e.py --device cpu (issue 12): the CPU configs, result files, ratios and targets.

No timing assertions (ratios live in the benchmark's own output, never in unit tests): the
ratio/target logic is checked on synthetic rows, and one real CPU run of the default job's MLP
checks what a row promises (dpprims' own noise + update timed, the plain-torch path ran, the
JSON and markdown files with machine line and command).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import e2e  # noqa: E402


def _row(cfg, method, ms, **kw):
    fw = "jax" if method.startswith(("jax", "dpprims-jax")) else "torch"
    r = dict(config=cfg, method=method, framework=fw, status="ok", batch=32, step_ms_median=ms,
             step_ms_p10=ms * 0.9, step_ms_p90=ms * 1.1, examples_per_s=32 / (ms * 1e-3), notes={},
             step_ms_all=[ms * 1.1, ms, ms * 0.8])
    r.update(kw)
    return r


def test_cpu_ratios_and_targets_from_rows():
    cfg = "r18-cifar-w64-b32"
    rows = [_row(cfg, "torch-nonprivate", 100.0), _row(cfg, "opacus-hooks", 400.0),
            _row(cfg, "dpprims-torch", 180.0, notes={"noise_update_ms": 18.0}),
            _row(cfg, "jax-nonprivate", 50.0), _row(cfg, "jax-vmap", 200.0), _row(cfg, "dpprims-jax", 90.0),
            dict(config="mlp-784-256-b256", method="dpprims-jax", status="failed", reason="boom")]
    e2e.cpu_ratios(rows)
    by = {r["method"]: r for r in rows if r["config"] == cfg}
    assert abs(by["dpprims-torch"]["ratio_vs_nonprivate"] - 100 / 180) < 1e-12
    assert abs(by["dpprims-torch"]["speedup_vs_opacus-hooks"] - 400 / 180) < 1e-12
    assert abs(by["dpprims-torch"]["noise_update_share"] - 0.1) < 1e-12
    assert abs(by["dpprims-torch"]["ratio_vs_nonprivate_fastest"] - 80 / 144) < 1e-12
    assert abs(by["dpprims-jax"]["speedup_vs_jax-vmap"] - 200 / 90) < 1e-12
    assert "speedup_vs_opacus-hooks" not in by["dpprims-jax"]  # baselines stay within a framework
    assert "ratio_vs_nonprivate" not in by["torch-nonprivate"]
    targets = {(t["config"], t["method"], t["baseline"]): t for t in e2e.cpu_targets(rows)}
    assert targets[(cfg, "dpprims-torch", "torch-nonprivate")]["status"] == "met"  # 0.556 >= 0.5
    assert targets[(cfg, "dpprims-torch", "opacus-hooks")]["status"] == "met"  # 2.22 >= 1.7
    assert targets[(cfg, "dpprims-jax", "jax-nonprivate")]["status"] == "missed"  # 0.556 < 0.6
    assert targets[(cfg, "dpprims-jax", "jax-vmap")]["status"] == "met"
    t = targets[("mlp-784-256-b256", "dpprims-jax", "jax-nonprivate")]
    assert t["status"] == "not measured" and "failed" in t["reason"]
    res = dict(rows=rows, targets=list(targets.values()), machine_line="CPU only (test)",
               machine={"command": "python bench/e2e.py --device cpu"},
               settings=dict(steps=5, warmup=2, configs={cfg: e2e.CPU_CONFIGS[cfg],
                                                         "mlp-784-256-b256": e2e.CPU_CONFIGS["mlp-784-256-b256"]}))
    md = e2e.cpu_markdown(res)
    assert "CPU only (test)" in md and "`python bench/e2e.py --device cpu`" in md
    assert "| dpprims-torch | 180.0 (162.0-198.0) |" in md and "18.0 (10%)" in md
    assert "| 0.56x | 0.56x | 2.22x |" in md
    assert "| dpprims-jax | failed: boom |" in md and "missed" in md


def test_rounds_pool_the_timed_steps_per_method():
    """--rounds: one row per method, its steps pooled over the successful rounds (the median of
    the pool, not of one round), the per-round medians kept; a method that never ran keeps its
    failure."""
    cfg = "mlp-784-256-b256"
    group = [_row(cfg, "torch-nonprivate", 2.0, step_ms_all=[2.0, 2.1, 1.9]),
             _row(cfg, "dpprims-torch", 3.0, step_ms_all=[3.0, 3.3, 2.9]),
             dict(config=cfg, method="opacus-hooks", status="failed", reason="boom"),
             _row(cfg, "torch-nonprivate", 4.0, step_ms_all=[4.0, 4.2, 3.8]),
             _row(cfg, "dpprims-torch", 5.0, step_ms_all=[5.0, 5.5, 4.9]),
             dict(config=cfg, method="opacus-hooks", status="failed", reason="boom again")]
    rows = e2e.merge_rounds(group, ["torch-nonprivate", "opacus-hooks", "dpprims-torch"])
    by = {r["method"]: r for r in rows}
    assert [r["method"] for r in rows] == ["torch-nonprivate", "opacus-hooks", "dpprims-torch"]
    npv, dp = by["torch-nonprivate"], by["dpprims-torch"]
    assert npv["steps"] == 6 and npv["rounds"] == 2 and npv["round_medians_ms"] == [2.0, 4.0]
    assert npv["step_ms_median"] == e2e.quantile([2.0, 2.1, 1.9, 4.0, 4.2, 3.8], 0.5)
    assert abs(dp["examples_per_s"] - 32 / (e2e.quantile([3.0, 3.3, 2.9, 5.0, 5.5, 4.9], 0.5) * 1e-3)) < 1e-9
    assert by["opacus-hooks"]["status"] == "failed" and by["opacus-hooks"]["reason"] == "boom"


def test_cpu_run_of_the_mlp_writes_json_and_markdown(tmp_path):
    """One real CPU worker: dpprims torch on the default job's MLP, plain-torch path, with its
    own noise + fused update timed separately."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(ROOT / "bench" / "e2e.py"), "--device", "cpu", "--configs", "mlp-784-256-b256",
           "--methods", "dpprims-torch", "--steps", "2", "--warmup", "1", "--threads", "1", "--isolation", "fork",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(tmp_path.glob("cpu-*.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").exists()
    res = json.loads(files[0].read_text())
    assert res["kind"] == "e2e-cpu" and res["machine_line"].startswith("CPU only")
    assert "--device cpu" in res["machine"]["command"]
    (row,) = res["rows"]
    assert row["status"] == "ok", row
    assert row["notes"]["noise_update_ms"] > 0 and row["notes"]["num_params"] == 784 * 256 + 256 + 2570
    assert set(row["notes"]["backends"].values()) == {"torch"}
    assert {r["method"] for r in row["notes"]["plan"]} == {"outer"}
    assert len(res["targets"]) == len(e2e.CPU_TARGETS)


def test_interleaved_run_pairs_each_block_with_its_non_private_block(tmp_path, monkeypatch):
    """bench/interleaved.py: every method's steps in one process, block by block; a DP method's
    ratio per block is the non-private block median over its own (the same block), and the
    files carry the machine line and command. A DP method without its baseline is refused."""
    import interleaved

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert interleaved.main(["--methods", "torch-nonprivate,dpprims-torch", "--blocks", "3", "--block-steps", "2",
                             "--block-warmup", "0", "--threads", "1", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("cpu-interleaved-*.json")
    res = json.loads(js.read_text())
    rows = {r["method"]: r for r in res["rows"]}
    np_b, dp_b = rows["torch-nonprivate"]["block_medians_ms"], rows["dpprims-torch"]["block_medians_ms"]
    assert len(np_b) == len(dp_b) == 3
    assert rows["dpprims-torch"]["ratio_per_block"] == [a / b for a, b in zip(np_b, dp_b)]
    assert "Command:" in js.with_suffix(".md").read_text() and res["machine"]["machine_line"]
    with pytest.raises(SystemExit, match="needs torch-nonprivate"):
        interleaved.run("mlp-784-256-b256", ["dpprims-torch"], 1, 1, 0, 1)
