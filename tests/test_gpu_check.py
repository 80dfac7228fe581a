"""bench/gpu_check.py, the one-call GPU evidence script, cannot rot between GPU sessions: its CPU
dry run (tiny shapes, the same code path, the device-only parts skipped with their reason) runs
here and must leave exactly what the device tool brings back from $OUT - at most 8 files, no
more than 2 folders deep, names the tool accepts - with the machine line, the command, the
commit, a row for every e2e method and every target marked. bench/readme_table.py must keep the
README's GPU section equal to what bench/results gives (no hand-typed numbers).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402
import readme_table  # noqa: E402

PARTS = {"install", "ceilings", "tests-jax", "tests-torch", "train-torch", "train-jax", "kernels", "e2e-r18", "profile",
         "e2e-r50"}
STATUSES = {"ok", "failed", "skipped", "timeout", "partial"}
E2E_TARGETS = ["torch_vs_nonprivate", "torch_vs_opacus", "torch_memory", "jax_vs_nonprivate", "jax_vs_vmap"]
ALL_TARGETS = set(E2E_TARGETS) | {"norm_pass", "clipped_wgrad", "noisy_update_bw"}


# --------------------------------------------------------------------------------------------
# the dry run, once for the module
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    if os.environ.get("DPPRIMS_TEST_DRY_RUN_DIR"):  # reuse an existing dry run while editing the tests
        out = Path(os.environ["DPPRIMS_TEST_DRY_RUN_DIR"])
        return out, json.loads(next(out.glob("*-gpu-check.json")).read_text()), next(out.glob("*-gpu-check.log")).read_text()
    base = tmp_path_factory.mktemp("gpu_check")
    out = base / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(BENCH / "gpu_check.py"), "--out", str(out), "--work", str(base / "work"),
           "--skip", "e2e-r50", "--budget", "900"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"gpu_check dry run failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-3000:]}"
    summaries = list(out.glob("*-gpu-check.json"))
    assert len(summaries) == 1, summaries
    res = json.loads(summaries[0].read_text())
    res["_test_wall_s"] = time.monotonic() - t0
    return out, res, proc.stdout


def test_dry_run_output_fits_the_device_tool(dry):
    """What comes back from $OUT: <= 8 files, <= 2 folders deep, <= 16 MiB each, plain names; the
    summary's own listing agrees with the folder."""
    out, res, _ = dry
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, files
    for p in files:
        rel = p.relative_to(out)
        assert len(rel.parts) - 1 <= 2, rel
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts), rel
        assert p.stat().st_size <= 16 * 2**20, rel
    assert res["files"]["violations"] == []
    assert sorted(f["path"] for f in res["files"]["files"]) == sorted(str(p.relative_to(out)) for p in files)
    names = {p.name for p in files}
    assert any(n.endswith("-gpu-check.log") for n in names) and any(n.endswith("-kernels.json") for n in names)
    assert any(re.search(r"-e2e(-smoke)?\.json$", n) for n in names)


def test_dry_run_records_machine_command_commit(dry):
    _, res, stdout = dry
    assert res["kind"] == "gpu-check" and res["dry_run"] is True and res["dry_reason"]
    assert "Python" in res["machine_line"] and "torch" in res["machine_line"]
    assert "gpu_check.py" in res["command"] and "--skip e2e-r50" in res["command"]
    if (ROOT / ".git").exists():  # a commit of this repository (HEAD then, or an ancestor of HEAD now)
        assert res["commit_source"] == "git" and re.fullmatch(r"[0-9a-f]{40}", res["git_commit"])
        anc = subprocess.run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", res["git_commit"], "HEAD"])
        assert anc.returncode == 0, res["git_commit"]
    assert res["wall_s"] <= res["budget_s"]
    # the last thing printed is the summary, ending with the targets table
    tail = stdout[stdout.rindex("## dpprims GPU check"):]
    assert "DRY RUN" in tail and "Targets:" in tail
    for name in E2E_TARGETS:
        assert gpu_check.TARGETS[name]["text"] in tail, name


def test_dry_run_parts_each_have_a_status_and_reason(dry):
    _, res, _ = dry
    parts = {p["name"]: p for p in res["parts"]}
    assert set(parts) == PARTS, set(parts) ^ PARTS
    for p in parts.values():
        assert p["status"] in STATUSES, p
        if p["status"] != "ok":
            assert p.get("reason"), p
    # device-only parts are skipped with the reason stated; the rest ran the same code path
    assert parts["ceilings"]["status"] == "skipped" and "device-only" in parts["ceilings"]["reason"]
    assert parts["train-jax"]["status"] == "skipped" and "dry run" in parts["train-jax"]["reason"]
    assert "--framework jax" in parts["train-jax"]["reason"]  # the command it would run
    assert parts["e2e-r50"]["status"] == "skipped" and parts["e2e-r50"]["reason"] == "--skip"
    assert parts["install"]["status"] == "ok", parts["install"]
    for name in ("train-torch", "kernels", "e2e-r18", "profile"):
        assert parts[name]["status"] == "ok", parts[name]
        assert parts[name]["cmd"] and parts[name]["cap_s"] > 0 and not parts[name]["timed_out"]
    # the GPU tests were collected and skipped by tests/conftest.py, read back from the junit XML
    for name in ("tests-jax", "tests-torch"):
        t = res["tests"][name]
        assert t["source"] == "junit xml" and t["skipped"] >= 1 and t["failed"] == t["errors"] == 0, t
        assert any("CUDA GPU" in why for why in t["skip_reasons"]), t
        assert parts[name]["status"] == "skipped" and parts[name]["concurrent_with"]


def test_dry_run_cli_training_result(dry):
    _, res, _ = dry
    tr = res["train"]["torch"]
    assert tr["framework"] == "torch" and tr["steps"] >= 1
    assert 0 < tr["epsilon"] < float("inf") and 0.0 <= tr["test_accuracy"] <= 1.0


def test_dry_run_kernels_ran_the_selected_layers(dry):
    """Every layer chosen by its flop share was built and checked against the fp64 reference (the
    -k expression matched bench/test_kernels.py's test ids)."""
    out, res, _ = dry
    k = res["kernels"]
    data = json.loads((out / k["file"]).read_text())
    rows = data["rows"]
    for case in k["selection"]["cases"]:
        mine = [r for r in rows if r["model"] == case["model"] and r["layer"] == case["layer"]]
        assert mine, f"no kernel rows for selected layer {case['id_prefix']}"
        assert all(r["status"] == "ok" for r in mine), mine
        checked = [r for r in mine if r["impl"].startswith("dp-")]
        assert checked and all(r.get("check_rel_err") is not None and r["check_rel_err"] < 1e-3 for r in checked)
    assert {r["suite"] for r in rows} >= {"conv", "linear", "update"}
    assert {m["model"] for m in k["models"]} == set(gpu_check.KERNEL_MODELS)


def test_dry_run_e2e_has_a_row_per_method(dry):
    out, res, _ = dry
    e = res["e2e"]["r18-32-b256"]
    assert (out / e["file"]).exists()
    by = {r["method"]: r for r in e["rows"]}
    assert set(by) == set(gpu_check.E2E_METHODS)
    for m, r in by.items():
        if m in gpu_check.DRY_E2E_METHODS:
            assert r["status"] == "ok" and r["examples_per_s"] > 0, r
        else:
            assert r["status"] == "skipped" and "dry run" in r["reason"], r
    assert by["dpprims-torch"]["ratio_vs_nonprivate"] > 0


def test_dry_run_profile_per_method(dry):
    """The profile part built both methods as e2e.py does and broke their step time into named
    kernels (CPU ops on a dry run) whose per-class sums add up to the total."""
    _, res, _ = dry
    prof = res["profile"]
    assert set(prof["methods"]) == set(gpu_check.DRY_E2E_METHODS)
    for m, d in prof["methods"].items():
        assert not d.get("error"), (m, d)
        assert d["step_ms"] > 0 and d["top"]
        assert abs(sum(d["by_category"].values()) - d["step_ms"]) < 1e-6 * max(1.0, d["step_ms"])
    assert any(t["name"].startswith("dpprims::") for t in prof["methods"]["dpprims-torch"]["top"])


def test_kernel_category_names():
    assert gpu_check.kernel_category("_conv2d_norm_direct_kernel") == "dpprims-triton"
    assert gpu_check.kernel_category("sm90_xmma_wgrad_implicit_gemm_bf16") == "cudnn/cublas"
    assert gpu_check.kernel_category("aten::bmm") == "cudnn/cublas"
    assert gpu_check.kernel_category("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>") \
        == "elementwise/reduce"
    assert gpu_check.kernel_category("void at::native::reduce_kernel<512, 1, sum_functor>") == "elementwise/reduce"


def test_dry_run_targets_all_listed_not_measured(dry):
    _, res, _ = dry
    names = {t["target"] for t in res["targets"]}
    assert names == ALL_TARGETS, names ^ ALL_TARGETS
    for t in res["targets"]:  # a dry run measures nothing: no target may read met or missed
        assert t["status"] == "not measured" and t["reason"], t


# --------------------------------------------------------------------------------------------
# pieces, without the dry run
# --------------------------------------------------------------------------------------------
def test_job_cap_kills_a_hang_and_interrupt_lets_pytest_style_children_write(tmp_path):
    """One hang cannot eat the budget: a child past its cap is killed (SIGKILL), and with
    interrupt_first it gets SIGINT first, so a child that writes its results on interrupt (as
    pytest writes junit XML and the kernel results) leaves them."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    hang = gpu_check.Job("hang", [sys.executable, "-c", "import time; time.sleep(120)"], 1.0, env, tmp_path / "a.log")
    t0 = time.monotonic()
    hang.start().wait()
    assert hang.timed_out and hang.rc == -signal.SIGKILL and time.monotonic() - t0 < 30

    marker = tmp_path / "written"
    src = ("import signal, sys, time, pathlib\n"
           "def h(*a):\n"
           f"    pathlib.Path({str(marker)!r}).write_text('results'); sys.exit(2)\n"
           "signal.signal(signal.SIGINT, h)\n"
           "print('ready', flush=True)\n"
           "time.sleep(120)\n")
    polite = gpu_check.Job("polite", [sys.executable, "-c", src], 1.5, env, tmp_path / "b.log", interrupt_first=True,
                           grace=20)
    polite.start().wait()
    assert polite.timed_out and polite.rc == 2 and marker.read_text() == "results"
    assert "ready" in polite.output() and polite.record()["timed_out"] is True


def test_out_dir_report_flags_what_would_not_come_back(tmp_path):
    out = tmp_path / "out"
    (out / "a" / "b" / "c").mkdir(parents=True)
    (out / "a" / "b" / "ok.json").write_text("{}")
    (out / "a" / "b" / "c" / "deep.txt").write_text("x")
    (out / "bad name.txt").write_text("x")
    for i in range(7):
        (out / f"f{i}.json").write_text("{}")
    rep = gpu_check.out_dir_report(out)
    v = " ".join(rep["violations"])
    assert "too deep: a/b/c/deep.txt" in v and "bad name: bad name.txt" in v and "10 files" in v
    assert "ok.json" not in v
    good = tmp_path / "good"
    good.mkdir()
    (good / "x-gpu-check.json").write_text("{}")
    assert gpu_check.out_dir_report(good)["violations"] == []


def test_junit_parse_counts_each_outcome(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2">tb</failure></testcase>'
        '<testcase classname="tests.test_b" name="test_skip"><skipped message="needs a CUDA GPU"/></testcase>'
        '<testcase classname="tests.test_b" name="test_skip2"><skipped message="needs a CUDA GPU"/></testcase>'
        '<testcase classname="" name="tests.test_c"><error message="collection failure">ImportError</error></testcase>'
        '</testsuite></testsuites>')
    r = gpu_check._parse_junit(xml)
    assert (r["passed"], r["failed"], r["errors"], r["skipped"]) == (1, 1, 1, 2)
    assert r["skip_reasons"] == {"needs a CUDA GPU": 2}
    assert {f["test"] for f in r["failures"]} == {"tests.test_a::test_bad", "tests.test_c"}


def test_kernel_selection_takes_the_largest_flop_layers():
    """Checked against the layer list of bench/shapes.py recomputed here: decreasing flops,
    stopping at the share or the cap, shares summing to what the layers carry."""
    from shapes import layer_shapes

    sel = gpu_check.select_kernel_cases(["r18-32"], smoke=False, share=0.8, max_per_model=5)
    sh = layer_shapes("r18-32")
    flops = {}
    for suite in ("conv", "linear"):
        for layer, s, count in sh[suite]:
            flops[layer] = count * 2 * s.B * s.T * s.D * s.P * getattr(s, "groups", 1)
    total = sum(flops.values())
    ranked = sorted(flops, key=lambda k: -flops[k])
    picked = [c["layer"] for c in sel["cases"]]
    assert picked == ranked[: len(picked)]
    shares = [flops[k] / total for k in picked]
    assert sum(shares) >= 0.8 or len(picked) == 5
    assert sum(shares[:-1]) < 0.8  # stopped as soon as the share was reached
    for c, s in zip(sel["cases"], shares):
        assert abs(c["flop_share"] - s) < 1e-12
        assert c["id_prefix"].startswith(f"{c['suite']}-r18-32-{c['layer']}-")


def _fake_gpu_summary(tmp_path: Path, eps_np: float, eps_dp: float) -> Path:
    """A GPU-run summary as gpu_check writes it, with numbers drawn here (the table must carry
    them, formatted, and nothing else)."""
    rows = [dict(config="r18-32-b256", precision="bf16", method="torch-nonprivate", status="ok", examples_per_s=eps_np,
                 ratio_vs_nonprivate=1.0, peak_mem_bytes=3 * 2**30, mem_ratio_vs_nonprivate=1.0),
            dict(config="r18-32-b256", precision="bf16", method="dpprims-torch", status="ok", examples_per_s=eps_dp,
                 ratio_vs_nonprivate=eps_dp / eps_np, peak_mem_bytes=4 * 2**30, mem_ratio_vs_nonprivate=4 / 3),
            dict(config="r18-32-b256", precision="bf16", method="jax-vmap", status="failed", reason="timeout after 100 s")]
    t = gpu_check.target_status("torch_vs_nonprivate", eps_dp / eps_np, "r18-32-b256 bf16")
    res = dict(kind="gpu-check", dry_run=False, machine_line="NVIDIA H200 | driver 1 | Python 3.12", command="python x",
               git_commit="0123456789abcdef", git_dirty=False, machine={"date": "2031-01-02T03:04:05+00:00"},
               e2e={"r18-32-b256": dict(rows=rows)}, targets=[t],
               parts=[dict(name="tests-jax", status="failed", reason="1 failed")])
    p = tmp_path / "h200-2031-01-02-gpu-check.json"
    p.write_text(json.dumps(res))
    dry = dict(res, dry_run=True, dry_reason="no CUDA GPU", machine={"date": "2032-01-01T00:00:00+00:00"})
    (tmp_path / "cpu-2032-01-01-gpu-check.json").write_text(json.dumps(dry))  # newer, but a dry run: never used
    return p


def test_readme_table_rewrites_the_marked_section_from_the_files(tmp_path):
    import random

    eps_np, eps_dp = random.uniform(5000, 20000), random.uniform(1000, 5000)
    src = _fake_gpu_summary(tmp_path, eps_np, eps_dp)
    assert readme_table.find_results(tmp_path) == src
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n\n<!-- gpu-bench:begin -->\nstale 123\n<!-- gpu-bench:end -->\n\nafter\n")
    assert readme_table.main(["--results", str(tmp_path), "--readme", str(readme), "--check"]) == 1
    assert readme_table.main(["--results", str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n\n") and text.endswith("<!-- gpu-bench:end -->\n\nafter\n")
    assert "stale 123" not in text and "DRY RUN" not in text
    assert f"| {eps_np:.0f} |" in text and f"| {eps_dp:.0f} |" in text and f"| {eps_dp / eps_np:.2f} |" in text
    assert "NVIDIA H200" in text and "`0123456789ab`" in text and "timeout after 100 s" in text
    assert "tests-jax failed (1 failed)" in text
    assert ("met" if eps_dp / eps_np >= 0.85 else "missed") in text
    assert readme_table.main(["--results", str(tmp_path), "--readme", str(readme), "--check"]) == 0  # idempotent
    with pytest.raises(SystemExit, match="dry run"):
        readme_table.main(["--file", str(tmp_path / "cpu-2032-01-01-gpu-check.json"), "--readme", str(readme)])


def test_readme_gpu_section_matches_bench_results():
    """The README's GPU table is exactly what bench/results gives (run bench/readme_table.py
    after copying a GPU run's files there)."""
    assert readme_table.main(["--check"]) == 0


def test_gpu_mode_kernel_selection_matches_the_benchmark_ids(tmp_path):
    """The GPU run's -k expression (full size, bf16) selects exactly the chosen layers' five
    implementations and the update cases of bench/test_kernels.py (collected here, not run)."""
    args, sel, mode = gpu_check.kernel_pytest_args(False, tmp_path)
    assert mode == "bf16" and "--bench-size=full" in args
    proc = subprocess.run([sys.executable, "-m", "pytest", *args, "--collect-only"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    ids = re.findall(r"test_kernel\[(.*?)\]$", proc.stdout, flags=re.M)
    assert ids, proc.stdout[-3000:] + proc.stderr[-3000:]
    for case in sel["cases"]:
        mine = [i for i in ids if i.startswith(case["id_prefix"] + "-bf16-")]
        assert len(mine) == 5, (case["id_prefix"], mine)
    update = [i for i in ids if i.startswith("update-synthetic")]
    assert len(update) == 4 * len(gpu_check.KERNEL_MODELS)
    assert len(ids) == 5 * len(sel["cases"]) + len(update)
    assert {c["model"] for c in sel["cases"]} == set(gpu_check.KERNEL_MODELS)


@pytest.mark.parametrize("fw", ["torch", "jax"])
@pytest.mark.parametrize("dry", [False, True], ids=["gpu", "dry"])
def test_train_commands_parse_with_the_cli(fw, dry, tmp_path):
    """The CLI runs' arguments (GPU and dry run) are accepted by `dpprims train`'s parser."""
    from dpprims.cli import _parser

    argv = gpu_check.train_args(fw, dry, tmp_path / "log.jsonl")
    a = _parser().parse_args(argv)
    assert a.command == "train" and a.framework == fw and a.json
    if not dry:
        assert (a.model, a.precision) == ("resnet18-cifar", "bf16")
        assert a.data.startswith("synthetic:3,32,32:") and a.physical_batch_size == 256
        if fw == "torch":
            assert a.device == "cuda"


def test_ceilings_snippet_compiles():
    compile(gpu_check._CEILINGS_SRC, "gpu_check ceilings", "exec")
