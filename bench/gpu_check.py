"""All of dpprims' GPU evidence in one call: tests, kernel timings, CLI training and the
end-to-end table, inside one wall-clock budget (default 8 minutes), on a bare GPU machine.

    bash bench/gpu_check.sh                         # on the GPU machine (OUT=$OUT set by the device tool)
    python bench/gpu_check.py --out DIR             # the same; on a CPU it is the dry run
    python bench/gpu_check.py --prepare             # here, before the device call: wheels, commit, tree size

Parts, in order (each a child process with its own time cap; a failure or a timeout is
recorded with its reason and the rest goes on):

  install      the carried wheels (.whl/*.whl: jax-triton, opacus, dp-accounting, dm-tree) into a
               site folder outside the tree, on PYTHONPATH of every later part; dpprims itself
               as an editable install (pip -e, offline) so the tests and the `dpprims` CLI import it
  ceilings     the measured device ceilings: device-to-device copy GB/s and a bf16 8192^3 GEMM
  tests-jax    the GPU-marked JAX tests (the jax-triton path has never run: first)      } concurrent:
  tests-torch  the GPU-marked torch tests                                               } correctness
  train-torch  `dpprims train --device cuda --model resnet18-cifar --precision bf16`      } only, no
               on synthetic 32x32 data (~30 s of training)                              } timing
  train-jax    the same with --framework jax                                            } claims
  kernels      microbenchmarks (bench/test_kernels.py) of the conv/linear layers that carry most
               of the weight-gradient flops of ResNet-18-CIFAR and ResNet-50-224, bf16: dpprims
               norm + clipped sum vs the non-private weight gradient vs Opacus' materialising
               path; plus the fused noise + update against a torch copy
  e2e-r18      bench/e2e.py r18-32-b256 bf16, all seven methods, one process and one cap each
  e2e-r50      bench/e2e.py r50-224-b64 bf16, if enough of the budget is left

Everything goes to --out (the device tool's $OUT) in at most 8 files, no folders:
<gpu>-<date>-gpu-check.json (the summary: machine line, exact command, commit, every part with
status / reason / seconds, test outcomes, kernel and e2e summaries, targets, the markdown),
<gpu>-<date>-gpu-check.log (every child's output), <gpu>-<date>-kernels.json,
<gpu>-<date>-e2e.json (+ .png) and <gpu>-<date>-e2e-r50.json (+ .png), the harnesses' own
result files. The summary is rewritten after every part, so a run cut off at the device's hard
limit still leaves what it had. The last thing printed is the summary table against the targets.

Dry run (no CUDA GPU, e.g. CI; or --dry-run): the same code path at tiny shapes - GPU tests
collected and skipped by tests/conftest.py, kernels through Triton's interpreter at smoke size in
fp32, a tiny CLI run on the CPU, e2e --smoke with two torch methods - and the device-only parts
(ceilings, the full-size kernel timings) skipped with the reason stated.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, TARGETS, gpu_slug, machine_info, target_status, targets_markdown, write_json  # noqa: E402

BENCH = ROOT / "bench"
SITE = Path(os.environ.get("DPPRIMS_GPU_SITE", "/tmp/dpprims-gpu-site"))
WHEELS = ROOT / ".whl"
E2E_METHODS = ["torch-nonprivate", "dpprims-torch", "opacus-hooks", "opacus-ghost", "jax-nonprivate",
               "dpprims-jax", "jax-vmap"]  # baselines and dpprims first: a slow comparison cannot starve them
DRY_E2E_METHODS = ["torch-nonprivate", "dpprims-torch"]
KERNEL_MODELS = ("r18-32", "r50-224")
# device tool limits on what comes back from $OUT (/work/.library/device/README.md)
OUT_MAX_FILES = 8
OUT_MAX_DEPTH = 2  # folders below $OUT
OUT_MAX_FILE_BYTES = 16 * 2**20
OUT_MAX_TOTAL_BYTES = 64 * 2**20
OUT_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
LOG_KEEP_BYTES = 400_000  # per child log appended to the main log (head + tail)

# Time caps (seconds) per part: GPU run, dry run. ``need`` is the least a part must be able to
# get to be started at all.
# Dry-run caps are only a safety net (nothing is timed there): generous, for a loaded CI machine.
CAPS = {
    "install": (150, 120), "ceilings": (60, 0), "tests-jax": (100, 300), "tests-torch": (150, 300),
    "train-torch": (110, 300), "train-jax": (140, 300), "kernels": (100, 300), "e2e-r18": (330, 300),
    "profile": (75, 200), "e2e-r50": (240, 200),
}
PROFILE_NEED = (60, 20)  # the profile runs after the e2e table only with this much left
PROFILE_STEPS = 3
E2E_WORKER_CAP = (100, 200)  # per method process
E2E_R18_NEED = (180, 60)  # budget kept for the e2e table by the parts before it
E2E_R50_NEED = (150, 40)  # started only with this much of the budget left
RESERVE_END = 15  # seconds kept for the final summary


# ============================================================================================
# child processes
# ============================================================================================
class Job:
    """One child process in its own process group, output to a log file, killed at its cap:
    SIGINT first where the child writes its results on interrupt (pytest's sessionfinish
    writes the junit XML and the kernel results JSON), SIGKILL after ``grace`` seconds."""

    def __init__(self, name: str, cmd: list[str], cap: float, env: dict, log: Path, *, interrupt_first=False,
                 grace: float = 20.0, cwd: Path = ROOT):
        self.name, self.cmd, self.cap, self.env, self.log = name, cmd, cap, env, log
        self.interrupt_first, self.grace, self.cwd = interrupt_first, grace, cwd
        self.proc = None
        self.rc = None
        self.timed_out = False
        self.t0 = self.t1 = None
        self._sigint_at = None

    def start(self):
        self.t0 = time.monotonic()
        self._fh = open(self.log, "w")
        self._fh.write(f"$ {' '.join(shlex.quote(c) for c in self.cmd)}\n(cap {self.cap:.0f} s)\n")
        self._fh.flush()
        self.proc = subprocess.Popen(self.cmd, cwd=str(self.cwd), env=self.env, stdout=self._fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def _signal(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def poll(self) -> bool:
        """True once finished (or killed)."""
        if self.rc is not None:
            return True
        rc = self.proc.poll()
        now = time.monotonic()
        if rc is None and now - self.t0 > self.cap:
            self.timed_out = True
            if self.interrupt_first and self._sigint_at is None:
                self._sigint_at = now
                self._signal(signal.SIGINT)
            elif self._sigint_at is None or now - self._sigint_at > self.grace:
                self._signal(signal.SIGKILL)
                rc = self.proc.wait()
        if rc is not None:
            self._signal(signal.SIGKILL)  # anything the child left behind in its group
            self.rc = rc
            self.t1 = time.monotonic()
            self._fh.close()
            return True
        return False

    def wait(self):
        while not self.poll():
            time.sleep(0.2)
        return self

    @property
    def seconds(self) -> float:
        return round((self.t1 or time.monotonic()) - (self.t0 or time.monotonic()), 2)

    def record(self) -> dict:
        return dict(cmd=" ".join(shlex.quote(c) for c in self.cmd), cap_s=round(self.cap, 1), returncode=self.rc,
                    timed_out=self.timed_out, seconds=self.seconds)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def run_jobs(jobs: list[Job]) -> list[Job]:
    for j in jobs:
        j.start()
    while not all(j.poll() for j in jobs):
        time.sleep(0.25)
    return jobs


def _tail_line(text: str, n: int = 1) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[:400] if lines else ""


# ============================================================================================
# the check
# ============================================================================================
class Check:
    def __init__(self, args):
        self.args = args
        self.t_start = time.monotonic()
        self.gpu = _has_cuda()
        self.dry = args.dry_run or not self.gpu
        self.mode = 1 if self.dry else 0  # index into CAPS tuples
        self.budget = args.budget if args.budget is not None else (480.0 if not self.dry else 900.0)
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or (Path("/tmp") / f"dpprims-gpu-check-{os.getpid()}"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = self._child_env()
        self.info = machine_info(query_device=False)
        self.info["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        self.info.update(_commit())
        slug = gpu_slug(self.info)
        day = self.info["date"][:10]
        self.stem = f"{slug}-{day}-gpu-check"
        self.summary_path = self.out / f"{self.stem}.json"
        self.log_path = self.out / f"{self.stem}.log"
        self.logf = open(self.log_path, "w")
        self.parts: list[dict] = []
        self.res = dict(kind="gpu-check", version=1, dry_run=self.dry,
                        dry_reason=None if not self.dry else ("--dry-run" if self.gpu else "no CUDA GPU on this machine"),
                        machine_line=self.info["machine_line"], command=self.info["command"],
                        git_commit=self.info.get("git_commit"), git_dirty=self.info.get("git_dirty"),
                        commit_source=self.info.get("commit_source"), machine=self.info, budget_s=self.budget,
                        parts=self.parts, tests={}, train={}, kernels=None, e2e={}, ceilings=None)

    # ---------------------------------------------------------------- plumbing
    def _child_env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several processes share the GPU
        # Never inherited: on a GPU the kernels compile (triton 3.6's interpreter fails with numpy >= 2.4
        # there); on a dry run the pytest parts' conftest files set it themselves and the CLI, e2e
        # and profile children take dpprims' plain-torch / jnp paths (as e2e.py --smoke does) - a
        # parent pytest (tests/conftest.py sets it) must not turn them into interpreter runs.
        env.pop("TRITON_INTERPRET", None)
        env.pop("PYTEST_ADDOPTS", None)
        return env

    def elapsed(self) -> float:
        return time.monotonic() - self.t_start

    def left(self) -> float:
        return self.budget - self.elapsed()

    def say(self, msg: str = "") -> None:
        print(msg, flush=True)
        self.logf.write(msg + "\n")
        self.logf.flush()

    def append_log(self, job: Job) -> None:
        text = job.output()
        if len(text) > LOG_KEEP_BYTES:
            head, tail = LOG_KEEP_BYTES // 5, LOG_KEEP_BYTES - LOG_KEEP_BYTES // 5
            text = text[:head] + f"\n[... {len(text) - head - tail} characters cut ...]\n" + text[-tail:]
        self.logf.write(f"\n{'=' * 30} {job.name} (rc {job.rc}, {job.seconds:.1f} s"
                        f"{', TIMED OUT' if job.timed_out else ''}) {'=' * 30}\n{text}\n")
        self.logf.flush()

    def cap(self, name: str, reserve: float = 0.0) -> float:
        """The part's cap: its own limit, cut to what the budget leaves after ``reserve``."""
        return max(0.0, min(CAPS[name][self.mode], self.left() - reserve - RESERVE_END))

    def part(self, name: str, status: str, reason: str | None = None, **kw) -> dict:
        rec = dict(name=name, status=status, reason=reason, **kw)
        rec.setdefault("seconds", 0.0)
        self.parts.append(rec)
        line = f"[{self.elapsed():6.1f} s] {name:<12} {status:<8} {rec.get('seconds', 0):6.1f} s  {reason or rec.get('result', '')}"
        self.say(line[:300])
        self.save()
        return rec

    def skip(self, name: str, reason: str) -> dict:
        return self.part(name, "skipped", reason)

    def too_late(self, name: str, cap: float, need: float = 20.0) -> bool:
        if cap < need:
            self.skip(name, f"not started: {max(0.0, self.left()):.0f} s of the {self.budget:.0f} s budget left "
                            f"(needs {need:.0f} s)")
            return True
        return False

    def save(self) -> None:
        self.res["wall_s"] = round(self.elapsed(), 1)
        write_json(self.summary_path, self.res)

    def py(self, *args) -> list[str]:
        return [sys.executable, *args]

    # ---------------------------------------------------------------- parts
    def install(self) -> None:
        t0 = time.monotonic()
        wheels = sorted(glob.glob(str(WHEELS / "*.whl")))
        notes = []
        status = "ok"
        if wheels and self.dry:
            notes.append(f"dry run: the {len(wheels)} wheels in .whl/ are for the GPU machine's Python (3.12) and are "
                         "not installed here; packages come from this environment")
        elif wheels:
            cap = self.cap("install")
            cmd = self.py("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                          "--upgrade", "--target", str(SITE), *wheels)
            job = Job("install-wheels", cmd, cap, self.env, self.work / "install-wheels.log").start().wait()
            self.append_log(job)
            if job.rc == 0:
                notes.append(f"{len(wheels)} wheels ({', '.join(Path(w).name.split('-')[0] for w in wheels)}) -> {SITE}")
                self.env["PYTHONPATH"] = os.pathsep.join([str(SITE)] + [p for p in [self.env.get("PYTHONPATH")] if p])
                sys.path.insert(0, str(SITE))
            else:
                status = "failed"
                notes.append(f"pip install of the wheels failed (rc {job.rc}): {_tail_line(job.output(), 2)}")
        else:
            notes.append(f"no wheels in {WHEELS.relative_to(ROOT)}/ (packages come from this environment"
                         + ("; on the GPU machine run ../shared/tools/gpu-wheels.sh here first and carry .whl)"
                            if not self.dry else ")"))
        # dpprims itself: the tests and the `dpprims` console script import the installed package
        probe = subprocess.run(self.py("-c", "import dpprims.kernels, dpprims.bindings, dpprims.cli"),
                               cwd="/", env=self.env, capture_output=True, text=True)
        if probe.returncode == 0:
            notes.append("dpprims already installed")
        else:
            cap = self.cap("install") - (time.monotonic() - t0)
            cmd = self.py("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "-e", str(ROOT))
            job = Job("install-dpprims", cmd, max(cap, 10.0), self.env, self.work / "install-dpprims.log").start().wait()
            self.append_log(job)
            if job.rc == 0:
                notes.append("dpprims installed editable (pip install -e . --no-deps --no-build-isolation)")
            else:
                status = "failed"
                notes.append(f"pip install -e . failed (rc {job.rc}): {_tail_line(job.output(), 2)}; the tests and the "
                             "CLI parts cannot import dpprims.kernels")
        self.cli = shutil.which("dpprims", path=os.pathsep.join([str(Path(sys.executable).parent), str(SITE / "bin"),
                                                                 self.env.get("PATH", "")]))
        notes.append(f"CLI: {self.cli or 'python -m dpprims.cli (no dpprims script on PATH)'}")
        self.part("install", status, None if status == "ok" else "; ".join(notes),
                  result="; ".join(notes), seconds=round(time.monotonic() - t0, 2))

    def ceilings(self) -> None:
        if self.dry:
            return self.skip("ceilings", f"device-only (dry run: {self.res['dry_reason']}): copy bandwidth and bf16 "
                                         "GEMM rate are measured on the GPU")
        cap = self.cap("ceilings")
        if self.too_late("ceilings", cap):
            return
        job = Job("ceilings", self.py("-c", _CEILINGS_SRC), cap, self.env, self.work / "ceilings.log").start().wait()
        self.append_log(job)
        data = _last_json(job.output())
        if job.rc == 0 and data:
            self.res["ceilings"] = data
            self.info.update({k: data[k] for k in ("gpu", "sm_count", "gpu_memory_bytes", "compute_capability")
                              if data.get(k) is not None})
            self.part("ceilings", "ok", result=f"copy {data['copy_gbs']:.0f} GB/s, bf16 GEMM {data['bf16_tflops']:.0f} TFLOP/s",
                      **job.record())
        else:
            self.part("ceilings", "timeout" if job.timed_out else "failed", _fail_reason(job), **job.record())

    def correctness(self) -> None:
        """GPU tests (JAX first in the list, started first) and the CLI training runs, concurrently:
        none of them makes a timing claim."""
        # kept for what follows: most of the kernels' cap and the least the e2e table needs
        reserve = CAPS["kernels"][self.mode] * 0.6 + E2E_R18_NEED[self.mode]
        jobs, meta = [], {}
        jax_files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_jax*.py"))
        torch_files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                             if not p.name.startswith("test_jax") and p.name != "test_gpu_check.py")
        if self.dry:  # the same command on one small file each: collected, GPU tests skipped by conftest
            jax_files = [f for f in jax_files if f.endswith("test_jax_noise.py")] or jax_files[:1]
            torch_files = [f for f in torch_files if f.endswith("test_noise.py")] or torch_files[:1]
        xdist = [] if self.dry or not _importable("xdist", self.env) else ["-n", "4"]
        for name, files in (("tests-jax", jax_files), ("tests-torch", torch_files)):
            cap = self.cap(name, reserve)
            if self.too_late(name, cap):
                continue
            junit = self.work / f"{name}.xml"
            cmd = self.py("-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
                          "--continue-on-collection-errors", f"--junitxml={junit}", *xdist, *files)
            jobs.append(Job(name, cmd, cap, self.env, self.work / f"{name}.log", interrupt_first=True, grace=15))
            meta[name] = junit
        for fw in ("torch", "jax"):
            name = f"train-{fw}"
            if fw == "jax" and self.dry:
                self.skip(name, f"dry run ({self.res['dry_reason']}): the train-torch command with --framework jax; its XLA "
                                "compile on a CPU takes a minute (tests/test_trainer_jax.py covers that path). Command: "
                                + " ".join(shlex.quote(c) for c in self._train_cmd(fw)))
                continue
            cap = self.cap(name, reserve)
            if self.too_late(name, cap):
                continue
            jobs.append(Job(name, self._train_cmd(fw), cap, self.env, self.work / f"{name}.log"))
        run_jobs(jobs)
        for job in jobs:
            self.append_log(job)
            rec = job.record()
            rec["concurrent_with"] = [j.name for j in jobs if j is not job]
            if job.name.startswith("tests-"):
                self._tests_result(job, meta[job.name], rec)
            else:
                self._train_result(job, rec)

    def _train_cmd(self, fw: str) -> list[str]:
        cli = [self.cli] if self.cli else self.py("-m", "dpprims.cli")
        return cli + train_args(fw, self.dry, self.work / f"train-{fw}.jsonl")

    def _tests_result(self, job: Job, junit: Path, rec: dict) -> None:
        res = _parse_junit(junit) if junit.exists() else _parse_pytest_text(job.output())
        res["source"] = "junit xml" if junit.exists() else "pytest output (no junit xml: killed)"
        self.res["tests"][job.name] = res
        counts = f"{res['passed']} passed, {res['failed']} failed, {res['errors']} errors, {res['skipped']} skipped"
        if res["skip_reasons"]:
            top = max(res["skip_reasons"].items(), key=lambda kv: kv[1])
            counts += f" (most skipped: {top[0][:120]!r} x{top[1]})"
        if job.timed_out:
            status, reason = "timeout", f"cap {job.cap:.0f} s reached; so far: {counts}"
        elif res["failed"] or res["errors"]:
            first = (res["failures"] or [{}])[0]
            status, reason = "failed", f"{counts}; first: {first.get('test')}: {first.get('message', '')[:160]}"
        elif job.rc not in (0, 5) and not (res["passed"] + res["skipped"]):
            status, reason = "failed", f"pytest rc {job.rc}: {_tail_line(job.output(), 2)}"
        elif res["passed"] == 0:
            status = "skipped"
            reason = f"{counts}" + (f" (dry run: {self.res['dry_reason']})" if self.dry else "")
        else:
            status, reason = "ok", None
        self.part(job.name, status, reason, result=counts, **rec)

    def _train_result(self, job: Job, rec: dict) -> None:
        fw = job.name.split("-", 1)[1]
        out = _last_json(job.output())
        log = self.work / f"train-{fw}.jsonl"
        if log.exists():
            lines = log.read_text().splitlines()
            rec["log_lines"] = len(lines)
            rec["log_last"] = lines[-1][:2000] if lines else None
        if job.rc == 0 and out:
            self.res["train"][fw] = out
            paths = ", ".join(out.get("kernel_paths") or []) or "n/a"
            result = (f"{out.get('steps')} steps in {out.get('seconds')} s, test accuracy {out.get('test_accuracy', 0):.3f}, "
                      f"epsilon {out.get('epsilon', 0):.2f}; kernels: {paths}")
            warn = None
            want = "jax-triton" if fw == "jax" else "triton"
            if not self.dry and set(out.get("kernel_paths") or []) != {want}:
                warn = f"not all clipping ops ran on the {want} GPU path ({paths}): the run does not show the fused kernels"
            self.part(job.name, "ok" if not warn else "failed", warn, result=result, **rec)
        else:
            self.res["train"][fw] = None
            self.part(job.name, "timeout" if job.timed_out else "failed", _fail_reason(job), **rec)

    def kernels(self) -> None:
        cap = self.cap("kernels", reserve=E2E_R18_NEED[self.mode])
        if self.too_late("kernels", cap, need=30):
            return
        args, sel, mode = kernel_pytest_args(self.dry, self.out)
        cmd = self.py("-m", "pytest", *args)
        before = set(self.out.iterdir())
        job = Job("kernels", cmd, cap, self.env, self.work / "kernels.log", interrupt_first=True, grace=20).start().wait()
        self.append_log(job)
        new = sorted(p for p in set(self.out.iterdir()) - before if p.name.endswith("-kernels.json"))
        rec = job.record()
        if not new:
            return self.part("kernels", "timeout" if job.timed_out else "failed",
                             _fail_reason(job) + "; no kernels result file", selection=sel, **rec)
        data = json.loads(new[-1].read_text())
        summ = summarize_kernels(data, sel, mode)
        summ.update(file=new[-1].name, selection=sel, dry_run_note=(
            f"dry run ({self.res['dry_reason']}): smoke shapes through the interpreter, nothing timed" if self.dry else None))
        self.res["kernels"] = summ
        bad = [r for r in data.get("rows", []) if r.get("status") not in ("ok",)]
        failed = [r for r in bad if r.get("status") == "failed"]
        if job.timed_out:
            status, reason = "timeout", f"cap {job.cap:.0f} s reached: {len(data.get('rows', []))} rows measured"
        elif failed or job.rc not in (0,):
            status = "failed"
            reason = (f"{len(failed)} rows failed, first: {failed[0]['case']} {failed[0]['impl']}: {failed[0].get('reason')}"
                      if failed else f"pytest rc {job.rc}: {_tail_line(job.output(), 2)}")
        elif bad:  # skipped (a missing package) or out of memory: the sums over the layers are incomplete
            status = "partial"
            reason = f"{len(bad)} rows not measured, first: {bad[0]['case']} {bad[0]['impl']}: {bad[0]['status']} " \
                     f"({(bad[0].get('reason') or '')[:160]})"
        elif self.dry:
            status, reason = "ok", f"dry run: smoke shapes, fp32, interpreter, not timed ({self.res['dry_reason']})"
        else:
            status, reason = "ok", None
        self.part("kernels", status, reason, result=f"{len(data.get('rows', []))} rows, "
                  f"{sum(1 for r in data.get('rows', []) if r.get('status') == 'ok')} ok; {summ.get('headline', '')}",
                  **rec)

    def e2e(self, key: str, config: str, tag: str) -> None:
        name = f"e2e-{key}"
        cap = self.cap(name)
        if key == "r50":
            need = E2E_R50_NEED[self.mode]
            if self.too_late(name, cap, need=need):
                return
        elif self.too_late(name, cap, need=60 if not self.dry else 30):
            return
        methods = DRY_E2E_METHODS if self.dry else E2E_METHODS
        if self.dry and key == "r50":
            methods = methods[:1]
        wcap = E2E_WORKER_CAP[self.mode]
        tb = max(10.0, cap - 60)  # the e2e parent stops starting methods after this; the last gets <= wcap
        cmd = self.py(str(BENCH / "e2e.py"), "--configs", config, "--methods", ",".join(methods), "--isolation", "process",
                      "--worker-timeout", f"{wcap:.0f}", "--time-budget", f"{tb:.0f}", "--out", str(self.out), "--tag", tag)
        if self.dry:
            cmd += ["--smoke", "--precisions", "fp32", "--no-max-batch"]
        else:
            cmd += ["--precisions", "bf16"] + (["--no-max-batch"] if key == "r50" else [])
        before = set(self.out.iterdir())
        job = Job(name, cmd, cap + 30, self.env, self.work / f"{name}.log").start().wait()
        self.append_log(job)
        rec = job.record()
        new = sorted(p for p in set(self.out.iterdir()) - before if p.suffix == ".json")
        if not new:
            self.res["e2e"][config] = dict(rows=[], missing=_fail_reason(job))
            return self.part(name, "timeout" if job.timed_out else "failed", _fail_reason(job) + "; no e2e result file", **rec)
        data = json.loads(new[-1].read_text())
        rows = data.get("rows", [])
        all_methods = E2E_METHODS
        have = {r["method"] for r in rows}
        for m in all_methods:  # every method is a row: the ones not run say why
            if m not in have:
                why = (f"dry run ({self.res['dry_reason']}): only {', '.join(methods)} run" if self.dry
                       else "not in this run's method list")
                rows.append(dict(config=config, precision=rows[0]["precision"] if rows else "-", method=m, status="skipped",
                                 reason=why))
        compact = [_compact_row(r) for r in rows]
        self.res["e2e"][config] = dict(file=new[-1].name, rows=compact, settings=data.get("settings"),
                                       targets=[t for t in data.get("targets", []) if TARGETS[t["target"]]["scope"] == "e2e"],
                                       markdown=data.get("markdown"), machine_line=data.get("machine_line"))
        not_ok = [r for r in rows if r.get("status") != "ok"]
        ran = [r for r in rows if r["method"] in methods]
        if job.timed_out:
            status, reason = "timeout", f"cap {job.cap:.0f} s reached"
        elif any(r.get("status") in ("failed", "oom") for r in ran):
            status = "failed"
            reason = "; ".join(f"{r['method']}: {r['status']} ({(r.get('reason') or '')[:120]})" for r in ran
                               if r.get("status") in ("failed", "oom"))
        elif any(r.get("status") != "ok" for r in ran):
            status = "partial"
            reason = "; ".join(f"{r['method']}: {r['status']} ({(r.get('reason') or '')[:120]})" for r in ran
                               if r.get("status") != "ok")
        else:
            status, reason = "ok", None
        warn = [f"{r['method']}: {r['warning']}" for r in rows if r.get("warning")]
        if warn:
            reason = "; ".join(([reason] if reason else []) + ["WARNING " + w for w in warn])
            status = "failed" if status == "ok" else status
        self.part(name, status, reason, result=f"{len(rows) - len(not_ok)}/{len(rows)} methods ok", **rec)

    def profile(self) -> None:
        """torch.profiler over a few r18-32-b256 bf16 steps of torch-nonprivate and dpprims-torch,
        built exactly as e2e.py builds them: where a target is missed, the per-kernel device time
        says where the step's time goes (no second device call needed for it)."""
        cap = self.cap("profile")
        if self.too_late("profile", cap, need=PROFILE_NEED[self.mode]):
            return
        spec = dict(config="r18-32-b256", smoke=self.dry, precision="fp32" if self.dry else "bf16",
                    methods=DRY_E2E_METHODS, steps=PROFILE_STEPS, device="cpu" if self.dry else "cuda")
        spec_path = self.work / "profile-spec.json"
        spec_path.write_text(json.dumps(spec))
        job = Job("profile", self.py(str(Path(__file__).resolve()), "--profile-worker", str(spec_path)), cap, self.env,
                  self.work / "profile.log").start().wait()
        self.append_log(job)
        data = _last_json(job.output())
        rec = job.record()
        if job.rc != 0 or not data:
            return self.part("profile", "timeout" if job.timed_out else "failed", _fail_reason(job), **rec)
        self.res["profile"] = data
        bad = {m: d["error"] for m, d in data["methods"].items() if d.get("error")}
        line = "; ".join(f"{m}: {d['step_ms']:.1f} ms/step ({', '.join(f'{k} {v:.1f}' for k, v in d['by_category'].items())})"
                         for m, d in data["methods"].items() if not d.get("error"))
        note = f"dry run ({self.res['dry_reason']}): CPU op times of a tiny model" if self.dry else None
        self.part("profile", "failed" if bad else "ok", "; ".join(f"{m}: {e}" for m, e in bad.items()) or note,
                  result=line, **rec)

    # ---------------------------------------------------------------- end
    def finish(self) -> int:
        self.res["targets"] = final_targets(self.res)
        self.res["files"] = self.check_out_dir()
        self.res["markdown"] = summary_markdown(self.res)
        self.save()
        self.res["files"] = self.check_out_dir()  # sizes after the last write
        self.save()
        self.say("")
        self.say(self.res["markdown"])
        self.logf.close()
        viol = self.res["files"]["violations"]
        return 0 if not viol else 3

    def check_out_dir(self) -> dict:
        self.logf.flush()
        return out_dir_report(self.out, shrink=self.log_path)


# ============================================================================================
# helpers
# ============================================================================================
_CEILINGS_SRC = r"""
import json, torch
p = torch.cuda.get_device_properties(0)
def timed(fn, n):
    fn(); torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        fn()
    e1.record(); torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n * 1e-3
src = torch.randint(0, 255, (2**31,), dtype=torch.uint8, device="cuda"); dst = torch.empty_like(src)
t_copy = timed(lambda: dst.copy_(src), 10)
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
t_mm = timed(lambda: a @ b, 10)
print(json.dumps(dict(gpu=p.name, sm_count=p.multi_processor_count, gpu_memory_bytes=p.total_memory,
                      compute_capability=f"{p.major}.{p.minor}", copy_gbs=2 * src.numel() / t_copy / 1e9,
                      bf16_tflops=2 * 8192**3 / t_mm / 1e12,
                      how="device-to-device copy of 2 GiB (bytes read + written), 8192^3 bf16 matmul on random data; "
                          "mean of 10 after one warm-up, CUDA events")))
"""


def out_dir_report(out: Path, shrink: Path | None = None) -> dict:
    """The files under ``out`` against the device tool's limits on what comes back from $OUT (at
    most 8 files, at most 2 folders down, 16 MiB each, 64 MiB in all, names of letters, digits,
    '.', '_' and '-', no links). ``shrink``: a log file cut to fit (head + tail) if too big."""
    files, viol = [], []
    out = Path(out)
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if any(not OUT_NAME_RE.match(part) for part in rel.parts):
            viol.append(f"bad name: {rel}")
        if p.is_symlink():
            viol.append(f"link: {rel}")
            continue
        if p.is_dir():
            continue
        if len(rel.parts) - 1 > OUT_MAX_DEPTH:
            viol.append(f"too deep: {rel}")
        size = p.stat().st_size
        if shrink is not None and p == Path(shrink) and size > OUT_MAX_FILE_BYTES:
            _shrink(p, OUT_MAX_FILE_BYTES - 4096)
            size = p.stat().st_size
        if size > OUT_MAX_FILE_BYTES:
            viol.append(f"over 16 MiB: {rel} ({size} bytes)")
        files.append(dict(path=str(rel), bytes=size))
    if len(files) > OUT_MAX_FILES:
        viol.append(f"{len(files)} files (at most {OUT_MAX_FILES} come back)")
    total = sum(f["bytes"] for f in files)
    if total > OUT_MAX_TOTAL_BYTES:
        viol.append(f"{total} bytes in all (at most 64 MiB come back)")
    return dict(dir=str(out), files=files, total_bytes=total, violations=viol)


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def _importable(mod: str, env: dict) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {mod}"], env=env, capture_output=True).returncode == 0


def _commit() -> dict:
    """The commit under test: git where the tree has its .git; else DPPRIMS_GIT_COMMIT; else the
    .whl/COMMIT file that ``--prepare`` writes beside the wheels (the device tool copies the
    working tree, not necessarily its .git)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=20).stdout.strip()
            return dict(git_commit=out.stdout.strip(), git_dirty=bool(dirty), commit_source="git")
    except Exception:  # noqa: BLE001
        pass
    if os.environ.get("DPPRIMS_GIT_COMMIT"):
        return dict(git_commit=os.environ["DPPRIMS_GIT_COMMIT"], git_dirty=None, commit_source="DPPRIMS_GIT_COMMIT")
    f = WHEELS / "COMMIT"
    if f.exists():
        words = f.read_text().split()
        return dict(git_commit=words[0] if words else None, git_dirty=("dirty" in words) if words else None,
                    commit_source=".whl/COMMIT (written by gpu_check.py --prepare)")
    return dict(git_commit=None, git_dirty=None, commit_source="unknown: no .git, DPPRIMS_GIT_COMMIT or .whl/COMMIT")


def _last_json(text: str):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _fail_reason(job: Job) -> str:
    if job.timed_out:
        return f"timeout: killed at its cap of {job.cap:.0f} s; last output: {_tail_line(job.output())[:200]}"
    return f"rc {job.rc}: {_tail_line(job.output(), 2)[:300]}"


def _shrink(path: Path, limit: int) -> None:
    data = path.read_bytes()
    if len(data) <= limit:
        return
    head = limit // 4
    tail = limit - head - 200
    path.write_bytes(data[:head] + f"\n[... {len(data) - head - tail} bytes cut to fit 16 MiB ...]\n".encode()
                     + data[-tail:])


def _parse_junit(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    res = dict(passed=0, failed=0, errors=0, skipped=0, failures=[], skip_reasons={}, passed_tests=[])
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        res["parse_error"] = str(e)
        return res
    for tc in root.iter("testcase"):
        name = f"{tc.get('classname', '')}::{tc.get('name', '')}".strip(":")
        kids = {c.tag: c for c in tc}
        if "failure" in kids or "error" in kids:
            el = kids.get("failure", kids.get("error"))
            key = "failed" if "failure" in kids else "errors"
            res[key] += 1
            res["failures"].append(dict(test=name, kind=key, message=(el.get("message") or "")[:500],
                                        text=(el.text or "")[-1500:]))
        elif "skipped" in kids:
            res["skipped"] += 1
            why = (kids["skipped"].get("message") or "").strip()
            res["skip_reasons"][why] = res["skip_reasons"].get(why, 0) + 1
        else:
            res["passed"] += 1
            res["passed_tests"].append(name)
    return res


def _parse_pytest_text(text: str) -> dict:
    """Fallback when the junit XML is missing (pytest killed): the -rfEs summary lines."""
    res = dict(passed=0, failed=0, errors=0, skipped=0, failures=[], skip_reasons={}, passed_tests=[])
    for line in text.splitlines():
        if line.startswith("FAILED "):
            res["failed"] += 1
            res["failures"].append(dict(test=line[7:].split(" - ")[0], kind="failed", message=line[7:][:300]))
        elif line.startswith("ERROR "):
            res["errors"] += 1
            res["failures"].append(dict(test=line[6:].split(" - ")[0], kind="errors", message=line[6:][:300]))
    m = re.search(r"(\d+) passed", text)
    res["passed"] = int(m.group(1)) if m else 0
    m = re.search(r"(\d+) skipped", text)
    res["skipped"] = int(m.group(1)) if m else 0
    return res


def _compact_row(r: dict) -> dict:
    keep = ("config", "precision", "method", "batch", "status", "reason", "examples_per_s", "step_ms_median",
            "step_ms_p10", "step_ms_p90", "peak_mem_bytes", "ratio_vs_nonprivate", "mem_ratio_vs_nonprivate",
            "speedup_vs_opacus-hooks", "speedup_vs_opacus-ghost", "speedup_vs_jax-vmap", "warning", "max_batch",
            "process_s", "setup_s", "warmup_s")
    out = {k: r.get(k) for k in keep if r.get(k) is not None}
    notes = r.get("notes") or {}
    for k in ("backends", "kernel_paths", "path", "dp_precision", "update"):
        if notes.get(k) is not None:
            out.setdefault("notes", {})[k] = notes[k]
    return out


def train_args(fw: str, dry: bool, log: Path) -> list[str]:
    """`dpprims train` arguments of the train-torch / train-jax parts."""
    if dry:  # tiny: a small CNN on 8x8 inputs, fp32 on the CPU, a few steps
        data, model, prec, dev, epochs, batch = "synthetic:3,8,8:10:72", "cnn", "fp32", "cpu", "1", "32"
    else:  # ResNet-18 (CIFAR stem) on 32x32, bf16: ~100 logical steps of 256, about 30 s of training
        data, model, prec, dev, epochs, batch = "synthetic:3,32,32:10:14000", "resnet18-cifar", "bf16", "cuda", "2", "256"
    cmd = ["train", "--framework", fw, "--model", model, "--precision", prec, "--data", data, "--epochs", epochs,
           "--expected-batch-size", batch, "--physical-batch-size", batch, "--no-progress", "--json", "--log", str(log)]
    if fw == "torch" or dry:  # JAX picks its platform itself (--device names a torch device)
        cmd += ["--device", dev]
    if dry:  # no epsilon calibration: the accountant is not what this checks, and it costs CPU seconds
        cmd += ["--sigma", "1.0"]
    return cmd


def kernel_pytest_args(dry: bool, out: Path) -> tuple[list[str], dict, str]:
    """pytest arguments of the kernels part (after ``python -m pytest``), the layer selection and
    the mode: full size in bf16 on a GPU, smoke size in fp32 (the interpreter) on a dry run."""
    mode = "fp32-ieee" if dry else "bf16"
    size = "smoke" if dry else "full"
    sel = select_kernel_cases(KERNEL_MODELS, smoke=dry, share=0.0 if dry else 0.8, max_per_model=1 if dry else 5)
    expr = " or ".join(f"{c['id_prefix']}-{mode}-" for c in sel["cases"]) + " or update-synthetic"
    args = [str(BENCH / "test_kernels.py"), "-q", "-p", "no:cacheprovider", "--benchmark-disable",
            f"--bench-size={size}", f"--bench-models={','.join(KERNEL_MODELS)}", f"--bench-modes={mode}",
            "--bench-suites=conv,linear,update", "--bench-rep-ms=50", f"--bench-out={out}", "-k", expr]
    return args, sel, mode


def kernel_category(name: str) -> str:
    """Coarse class of a profiled device kernel (or CPU op on a dry run) by its name."""
    n = name.lower()
    if re.match(r"^_\w+_kernel", name):
        return "dpprims-triton"
    if n.startswith("triton_") or "triton" in n:
        return "other-triton"
    if any(k in n for k in ("wgrad", "dgrad", "fprop", "cudnn", "conv", "implicit_convolve", "xmma", "cutlass", "gemm",
                            "sm90", "sm80", "cublas", "ampere", "hopper", "dot")) or re.search(r"(^|[^a-z])b?mm([^a-z]|$)", n):
        return "cudnn/cublas"
    if any(k in n for k in ("norm", "welford")):
        return "norm"
    if any(k in n for k in ("memcpy", "memset", "copy", "fill")):
        return "copy/fill"
    if any(k in n for k in ("elementwise", "vectorized", "reduce", "foreach", "multi_tensor", "unrolled")):
        return "elementwise/reduce"
    return "other"


def profile_worker(spec_path: str) -> int:
    """Child of the profile part: torch.profiler over PROFILE_STEPS steps of each method, after
    3 warm-up steps; prints one JSON line with the top kernels by self device time per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile

    import e2e

    spec0 = json.loads(Path(spec_path).read_text())
    table = e2e.SMOKE_CONFIGS if spec0["smoke"] else e2e.CONFIGS
    cuda = spec0["device"] == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    out = dict(config=spec0["config"], precision=spec0["precision"], steps=spec0["steps"], device=spec0["device"],
               timer="torch.profiler self " + ("device" if cuda else "CPU") + " time per step, after 3 warm-up steps",
               methods={})
    for method in spec0["methods"]:
        spec = dict(table[spec0["config"]], config=spec0["config"], precision=spec0["precision"], method=method,
                    device=spec0["device"])
        spec.pop("search", None)
        try:
            make_step, dev, notes = e2e.torch_method(spec)
            notes.pop("_after", None)
            step = make_step(spec["batch"])
            for _ in range(3):
                step()
            if cuda:
                torch.cuda.synchronize()
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with tprofile(activities=acts) as prof:
                for _ in range(spec0["steps"]):
                    step()
                if cuda:
                    torch.cuda.synchronize()
            evs = prof.key_averages()

            def self_us(e):
                if cuda:
                    return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)
                return float(e.self_cpu_time_total or 0)

            rows = [(e.key, e.count, self_us(e)) for e in evs if self_us(e) > 0]
            total = sum(r[2] for r in rows) / spec0["steps"] / 1e3
            cats: dict = {}
            for key, _, us in rows:
                c = kernel_category(key)
                cats[c] = cats.get(c, 0.0) + us / spec0["steps"] / 1e3
            rows.sort(key=lambda r: -r[2])
            out["methods"][method] = dict(
                step_ms=total, by_category=dict(sorted(cats.items(), key=lambda kv: -kv[1])),
                top=[dict(name=k[:160], calls_per_step=n / spec0["steps"], ms_per_step=us / spec0["steps"] / 1e3,
                          category=kernel_category(k)) for k, n, us in rows[:25]])
            del step, make_step
        except Exception as e:  # noqa: BLE001 - one method's failure is its row
            out["methods"][method] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        if cuda:
            torch.cuda.empty_cache()
    print(json.dumps(out))
    return 0


def select_kernel_cases(models, *, smoke: bool, share: float, max_per_model: int) -> dict:
    """Per model config, the conv / linear layer shapes (read off the model by bench/shapes.py)
    in decreasing order of their weight-gradient flops (count x 2*B*T*d*p), taken until they
    carry ``share`` of the model's total or ``max_per_model`` are taken. Returns the cases with
    the pytest id prefix of bench/test_kernels.py (``{suite}-{model}-{layer}-{label}``)."""
    from shapes import layer_shapes

    cases, totals = [], {}
    for model in models:
        sh = layer_shapes(model, smoke=smoke)
        rows = []
        for suite in ("conv", "linear"):
            for layer, s, count in sh[suite]:
                T, d, p = s.T, s.D, s.P
                g = getattr(s, "groups", 1)
                rows.append(dict(model=model, suite=suite, layer=layer, label=s.label(), count=count, T=T, d=d, p=p,
                                 flops=count * 2 * s.B * T * d * p * g))
        total = sum(r["flops"] for r in rows)
        totals[model] = total
        rows.sort(key=lambda r: -r["flops"])
        acc = 0.0
        for r in rows:
            if len([c for c in cases if c["model"] == model]) >= max(1, max_per_model):
                break
            r["flop_share"] = r["flops"] / total
            r["id_prefix"] = f"{r['suite']}-{model}-{r['layer']}-{r['label']}"
            cases.append(r)
            acc += r["flop_share"]
            if acc >= share:
                break
    return dict(cases=cases, total_flops=totals, share=share, max_per_model=max_per_model,
                rule="layers in decreasing order of count x 2*B*T*d*p until their share of the model's conv+linear "
                     "weight-gradient flops reaches `share` or `max_per_model` are taken")


def summarize_kernels(data: dict, sel: dict, mode: str) -> dict:
    """Per selected layer: norm (engine's auto method) + clipped sum vs the non-private weight
    gradient vs Opacus; per model the same summed over the selected layers (weighted by layer
    count), with the share of the model's weight-gradient flops they carry."""
    cases = {(c.get("model"), c.get("layer"), c.get("mode")): c for c in data.get("cases", [])
             if c.get("suite") in ("conv", "linear")}
    layers, models = [], {}
    for s in sel["cases"]:
        c = cases.get((s["model"], s["layer"], mode)) or {}
        row = dict(model=s["model"], layer=s["layer"], label=s["label"], count=s["count"], flop_share=s["flop_share"],
                   T=s["T"], d=s["d"], p=s["p"])
        for k in ("auto_method", "best_norm_method", "norm_ms", "clipped_ms", "nonprivate_ms", "opacus_ms",
                  "dp_total_over_nonprivate", "norm_over_nonprivate", "clipped_over_nonprivate", "speedup_vs_opacus",
                  "norm_tflops", "clipped_tflops", "nonprivate_tflops"):
            row[k] = c.get(k)
        layers.append(row)
        m = models.setdefault(s["model"], dict(model=s["model"], mode=mode, layers=0, flop_share=0.0, norm_ms=0.0,
                                               clipped_ms=0.0, nonprivate_ms=0.0, opacus_ms=0.0, complete=True))
        m["layers"] += s["count"]
        m["flop_share"] += s["flop_share"]
        for k in ("norm_ms", "clipped_ms", "nonprivate_ms", "opacus_ms"):
            if row[k] is None:
                m["complete"] = False
            else:
                m[k] += s["count"] * row[k]
    for m in models.values():
        ok = m["complete"] and m["nonprivate_ms"] > 0
        m["norm_over_nonprivate"] = m["norm_ms"] / m["nonprivate_ms"] if ok else None
        m["clipped_over_nonprivate"] = m["clipped_ms"] / m["nonprivate_ms"] if ok else None
        m["dp_over_nonprivate"] = (m["norm_ms"] + m["clipped_ms"]) / m["nonprivate_ms"] if ok else None
        tot = m["norm_ms"] + m["clipped_ms"]
        m["speedup_vs_opacus"] = m["opacus_ms"] / tot if ok and tot > 0 else None
    update = [c for c in data.get("cases", []) if c.get("suite") == "update"]
    upd_targets = [t for t in data.get("targets", []) if t["target"] == "noisy_update_bw"]
    heads = [f"{m['model']}: (norm+clipped)/non-private {m['dp_over_nonprivate']:.2f}, {m['speedup_vs_opacus']:.2f}x Opacus"
             for m in models.values() if m["dp_over_nonprivate"] is not None]
    return dict(mode=mode, layers=layers, models=list(models.values()), update=update, update_targets=upd_targets,
                headline="; ".join(heads) or "not timed", machine_line=data.get("machine_line"),
                worst_check_rel_err=max((r.get("check_rel_err") or 0.0 for r in data.get("rows", [])), default=None))


def final_targets(res: dict) -> list[dict]:
    """Every target of issue 6 once per place it was measured: the end-to-end ones from each e2e
    run, the kernel ones from the selected layers (partial sums: flagged with their flop share)."""
    out = []
    smoke = bool(res.get("dry_run"))
    for cfg, e in res.get("e2e", {}).items():
        for t in e.get("targets") or []:
            if t.get("where") != "-":
                out.append(dict(t))
    have = {t["target"] for t in out}
    parts = {p["name"]: p for p in res.get("parts", [])}
    for name, t in TARGETS.items():
        if t["scope"] == "e2e" and name not in have:
            method = "dpprims-jax" if name.startswith("jax") else "dpprims-torch"
            rows = [r for e in res.get("e2e", {}).values() for r in e.get("rows", []) if r["method"] == method]
            p = parts.get("e2e-r18")
            if rows:
                why = "; ".join(f"{r['config']} {method}: {r['status']} ({r.get('reason') or ''})" for r in rows)
            else:
                why = f"e2e-r18 {p['status']}: {p.get('reason')}" if p else "e2e-r18 not run"
            out.append(target_status(name, None, "-", reason=why))
    k = res.get("kernels")
    for tname, key in (("norm_pass", "norm_over_nonprivate"), ("clipped_wgrad", "clipped_over_nonprivate")):
        rows = [m for m in (k or {}).get("models", []) if tname != "norm_pass" or m["model"].startswith("r18")]
        if not rows:
            p = parts.get("kernels")
            out.append(target_status(tname, None, "-", reason=f"kernels {p['status']}: {p.get('reason')}" if p
                                     else "kernels part not run"))
        for m in rows:
            where = f"{m['model']} {m['mode']}, {m['layers']} layers = {100 * m['flop_share']:.0f}% of the wgrad flops"
            e = target_status(tname, m.get(key), where, smoke=smoke,
                              reason=None if m.get(key) is not None else "a selected layer was not timed")
            out.append(e)
    upd = (k or {}).get("update_targets") or []
    if upd:
        out += [dict(t) for t in upd]
    else:
        out.append(target_status("noisy_update_bw", None, "-", reason="update suite not measured"))
    return out


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def e2e_status_cell(r: dict, width: int = 140) -> str:
    """The status cell of one e2e row: "ok" or "<status>: <reason>", the speedups against the
    DP baselines, and any warning (reason and warning cut at ``width`` characters). Shared by
    this summary and bench/readme_table.py."""
    st = r["status"] if r["status"] == "ok" else f"{r['status']}: {(r.get('reason') or '')[:width]}"
    extra = [f"{r[k]:.2f}x {k[len('speedup_vs_'):]}" for k in ("speedup_vs_opacus-hooks", "speedup_vs_opacus-ghost",
                                                              "speedup_vs_jax-vmap") if r.get(k) is not None]
    if extra:
        st += " (" + ", ".join(extra) + ")"
    if r.get("warning"):
        st += f" WARNING: {r['warning'][:width]}"
    return st


def e2e_markdown(rows: list[dict]) -> str:
    lines = ["| config | precision | method | examples/s | step ms (p10-p90) | vs non-private | peak GiB | mem vs non-private "
             "| status |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        step = "-" if r.get("step_ms_median") is None else \
            f"{r['step_ms_median']:.1f} ({r.get('step_ms_p10', 0):.1f}-{r.get('step_ms_p90', 0):.1f})"
        st = e2e_status_cell(r)
        gib = None if not r.get("peak_mem_bytes") else r["peak_mem_bytes"] / 2**30
        lines.append(f"| {r['config']} | {r['precision']} | {r['method']} | {_f(r.get('examples_per_s'), '{:.0f}')} | {step} "
                     f"| {_f(r.get('ratio_vs_nonprivate'))} | {_f(gib)} | {_f(r.get('mem_ratio_vs_nonprivate'))} | {st} |")
    return "\n".join(lines)


def kernels_markdown(k: dict) -> str:
    lines = [f"Kernels ({k['mode']}; times in ms; layers chosen by their share of the model's weight-gradient flops):", "",
             "| model | layer (x count) | flop share | T / d / p | norm method (auto / best) | dp norm | dp clipped "
             "| non-private wgrad | Opacus | (norm+clipped) / non-private | speedup vs Opacus |",
             "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in k["layers"]:
        lines.append(f"| {r['model']} | {r['layer']} (x{r['count']}) | {100 * r['flop_share']:.0f}% | {r['T']} / {r['d']} / {r['p']} "
                     f"| {r.get('auto_method') or '-'} / {r.get('best_norm_method') or '-'} | {_f(r['norm_ms'], '{:.3f}')} "
                     f"| {_f(r['clipped_ms'], '{:.3f}')} | {_f(r['nonprivate_ms'], '{:.3f}')} | {_f(r['opacus_ms'], '{:.3f}')} "
                     f"| {_f(r['dp_total_over_nonprivate'])} | {_f(r['speedup_vs_opacus'], '{:.2f}x')} |")
    for m in k["models"]:
        lines.append(f"| **{m['model']}** | sum of {m['layers']} layers | {100 * m['flop_share']:.0f}% | | "
                     f"| {_f(m['norm_ms'] if m['complete'] else None, '{:.3f}')} "
                     f"| {_f(m['clipped_ms'] if m['complete'] else None, '{:.3f}')} "
                     f"| {_f(m['nonprivate_ms'] if m['complete'] else None, '{:.3f}')} "
                     f"| {_f(m['opacus_ms'] if m['complete'] else None, '{:.3f}')} | {_f(m['dp_over_nonprivate'])} "
                     f"| {_f(m['speedup_vs_opacus'], '{:.2f}x')} |")
    if k.get("worst_check_rel_err"):
        lines.append(f"\nLargest relative error of a dp op against the fp64 reference: {k['worst_check_rel_err']:.2e}.")
    return "\n".join(lines)


def summary_markdown(res: dict) -> str:
    out = ["## dpprims GPU check" + (f" - DRY RUN ({res['dry_reason']}): the numbers measure nothing" if res["dry_run"] else ""),
           "", f"Machine: {res['machine_line']}", f"Command: `{res['command']}`",
           f"Commit: {res.get('git_commit') or 'unknown'}" + (" (working tree dirty)" if res.get("git_dirty") else "")
           + f" [{res.get('commit_source')}]", f"Wall time: {res.get('wall_s', 0):.0f} s of a {res['budget_s']:.0f} s budget"]
    c = res.get("ceilings")
    if c:
        out.append(f"Ceilings: copy {c['copy_gbs']:.0f} GB/s, bf16 GEMM {c['bf16_tflops']:.0f} TFLOP/s ({c['how']})")
    out += ["", "| part | status | s | result / reason |", "| --- | --- | ---: | --- |"]
    for p in res["parts"]:
        txt = p.get("reason") or p.get("result") or ""
        if p.get("reason") and p.get("result") and p["status"] != "skipped":
            txt = f"{p['result']} - {p['reason']}"
        out.append(f"| {p['name']} | {p['status']} | {p.get('seconds', 0):.0f} | {txt[:260].replace('|', '/')} |")
    for cfg, e in res.get("e2e", {}).items():
        if e.get("rows"):
            out += ["", f"End to end, {cfg}:", "", e2e_markdown(e["rows"])]
    if res.get("kernels"):
        out += ["", kernels_markdown(res["kernels"])]
    prof = res.get("profile")
    if prof:
        out += ["", f"Profile, {prof['config']} {prof['precision']} ({prof['timer']}), ms per step by kernel class:", ""]
        for m, d in prof["methods"].items():
            out.append(f"- {m}: " + (d["error"] if d.get("error") else f"{d['step_ms']:.2f} total; " + ", ".join(
                f"{k} {v:.2f}" for k, v in d["by_category"].items())))
    out += ["", "Targets:", "", targets_markdown(res.get("targets", []))]
    viol = (res.get("files") or {}).get("violations")
    if viol:
        out += ["", "WARNING: output folder over the device tool's limits: " + "; ".join(viol)]
    return "\n".join(out)


# ============================================================================================
# --prepare (run here, before the device call)
# ============================================================================================
REQUIRED_WHEELS = ("jax_triton", "opacus", "dp_accounting", "dm_tree")


def prepare() -> int:
    """Fetch the wheels if missing (../shared/tools/gpu-wheels.sh), write .whl/COMMIT, check
    the tree that travels is under 64 MiB, and print the device call."""
    have = {Path(w).name.split("-")[0].lower() for w in glob.glob(str(WHEELS / "*.whl"))}
    missing = [w for w in REQUIRED_WHEELS if w not in have]
    if missing:
        script = ROOT.parent / "shared" / "tools" / "gpu-wheels.sh"
        if not script.exists():
            print(f"missing wheels {missing} and no {script}: fetch them into .whl/ (bench/README.md)", file=sys.stderr)
            return 2
        print(f"fetching wheels ({missing} missing): {script}")
        if subprocess.run(["bash", str(script)], cwd=str(ROOT)).returncode != 0:
            return 2
    info = _commit()
    (WHEELS / "COMMIT").write_text(f"{info['git_commit']}{' dirty' if info.get('git_dirty') else ''}\n")
    ls = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True)
    size = sum((ROOT / f).stat().st_size for f in ls.stdout.decode().split("\0") if f and (ROOT / f).is_file())
    size += sum(p.stat().st_size for p in WHEELS.iterdir() if p.is_file())
    print(f"commit {info['git_commit']}{' (dirty: commit first, the results name this commit)' if info.get('git_dirty') else ''}")
    print(f"tree that travels (tracked + untracked-not-ignored + .whl): {size / 2**20:.1f} MiB (limit 64 MiB)")
    print("device call: run(command='bash bench/gpu_check.sh', carry=['.whl'], timeout_s=570)")
    return 0 if size < 64 * 2**20 else 2


# ============================================================================================
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(BENCH / "results"),
                    help="output folder (default $OUT, else bench/results)")
    ap.add_argument("--budget", type=float, default=None, help="wall-clock seconds for everything (default 480; dry run 900)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes even on a GPU (the default without one)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: install, ceilings, tests (the GPU tests and the CLI runs), kernels, e2e-r18, "
                         "profile, e2e-r50")
    ap.add_argument("--work", default=None, help="scratch folder for junit XML, child logs (default /tmp/dpprims-gpu-check-PID)")
    ap.add_argument("--prepare", action="store_true", help="here, before the device call: wheels, .whl/COMMIT, tree size")
    ap.add_argument("--profile-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.prepare:
        return prepare()
    if args.profile_worker:
        return profile_worker(args.profile_worker)
    chk = Check(args)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    chk.say(f"dpprims GPU check{' (DRY RUN: ' + chk.res['dry_reason'] + ')' if chk.dry else ''}")
    chk.say(f"machine: {chk.info['machine_line']}\ncommand: {chk.info['command']}\n"
            f"commit: {chk.info.get('git_commit')} ({chk.info.get('commit_source')})\nbudget: {chk.budget:.0f} s, out: {chk.out}")
    chk.save()
    steps = [("install", chk.install), ("ceilings", chk.ceilings), ("tests", chk.correctness), ("kernels", chk.kernels),
             ("e2e-r18", lambda: chk.e2e("r18", "r18-32-b256", "e2e")), ("profile", chk.profile),
             ("e2e-r50", lambda: chk.e2e("r50", "r50-224-b64", "e2e-r50"))]
    for name, fn in steps:
        if name in skip:
            chk.skip(name, "--skip")
            if name == "install":
                chk.cli = shutil.which("dpprims")
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one part's crash is recorded, the rest goes on
            chk.part(name, "failed", f"gpu_check crashed in this part: {type(e).__name__}: {e}",
                     traceback=traceback.format_exc()[-3000:])
            if name == "install" and not hasattr(chk, "cli"):
                chk.cli = shutil.which("dpprims")
    return chk.finish()


if __name__ == "__main__":
    sys.exit(main())
