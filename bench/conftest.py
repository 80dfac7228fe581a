"""pytest configuration of the kernel microbenchmarks (run explicitly: ``python -m pytest bench``;
pyproject's testpaths keeps them out of the default test run).

Options:
  --bench-size=smoke|full   full: real shapes, timed on the GPU (default when CUDA is present);
                            smoke: tiny shapes, one call each, no timing (default on CPU, where the
                            Triton kernels run through the interpreter).
  --bench-models=LIST       model configs whose layer shapes are benchmarked (r18-32, r18-224,
                            r50-32, r50-224); default all (full) / r18-32 (smoke).
  --bench-modes=LIST        fp32-ieee, fp32-tf32, bf16; default all (full) / fp32-ieee (smoke).
  --bench-suites=LIST       conv, linear, groupnorm, embedding, clip, update; default all.
  --bench-max-shapes=N      at most N shapes per (suite, model); default unlimited (full) / 3 (smoke).
  --bench-rep-ms=MS         timing repetition time per implementation (default 100).
  --bench-no-graphs         time eager calls only (default: CUDA-graph replays, eager beside).
  --bench-out=DIR           write <gpu>-<date>-kernels.json there; default bench/results (full),
                            nothing (smoke).

Without CUDA, TRITON_INTERPRET=1 is set here, before dpprims is imported, so the same kernels run
on CPU (on the GPU machine it must stay unset: triton 3.6's interpreter fails with numpy >= 2.4).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


HAS_CUDA = _cuda_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    torch.set_num_threads(1)  # CPU smoke: tiny ops; OpenMP spin-waiting on a shared machine costs seconds

from _common import BENCH, ensure_dpprims, machine_info, results_path, write_json  # noqa: E402
from _micro import MODES, SMOKE_MODES, Recorder, markdown  # noqa: E402

ALL_SUITES = ("conv", "linear", "groupnorm", "embedding", "clip", "update")


def pytest_addoption(parser):
    g = parser.getgroup("dpprims-bench")
    g.addoption("--bench-size", choices=("smoke", "full"), default=os.environ.get("DPPRIMS_BENCH_SIZE"),
                help="smoke (tiny, untimed; default on CPU) or full (real shapes; default on a GPU)")
    g.addoption("--bench-models", default=None, help="comma list of model configs (r18-32,r18-224,r50-32,r50-224)")
    g.addoption("--bench-modes", default=None, help="comma list of fp32-ieee,fp32-tf32,bf16")
    g.addoption("--bench-suites", default=None, help="comma list of " + ",".join(ALL_SUITES))
    g.addoption("--bench-max-shapes", type=int, default=None, help="at most N shapes per (suite, model)")
    g.addoption("--bench-rep-ms", type=int, default=100, help="do_bench repetition time (ms)")
    g.addoption("--bench-no-graphs", action="store_true", help="time eager calls only (no CUDA-graph replay)")
    g.addoption("--bench-out", default=None, help="directory for the results JSON")


def _split(v):
    return [s.strip() for s in v.split(",") if s.strip()] if v else None


class BenchConfig:
    def __init__(self, config):
        from shapes import MODEL_CONFIGS

        self.size = config.getoption("--bench-size") or ("full" if HAS_CUDA else "smoke")
        full = self.size == "full"
        self.models = _split(config.getoption("--bench-models")) or (list(MODEL_CONFIGS) if full else ["r18-32"])
        self.modes = _split(config.getoption("--bench-modes")) or list(MODES if full else SMOKE_MODES)
        self.suites = _split(config.getoption("--bench-suites")) or list(ALL_SUITES)
        mx = config.getoption("--bench-max-shapes")
        self.max_shapes = mx if mx is not None else (None if full else 3)
        self.rep_ms = config.getoption("--bench-rep-ms")
        self.graphs = not config.getoption("--bench-no-graphs")
        out = config.getoption("--bench-out")
        self.out = out if out is not None else (str(BENCH / "results") if full and HAS_CUDA else None)
        for name, vals, allowed in (("--bench-models", self.models, MODEL_CONFIGS), ("--bench-modes", self.modes, MODES),
                                    ("--bench-suites", self.suites, ALL_SUITES)):
            bad = [v for v in vals if v not in allowed]
            if bad:
                raise pytest.UsageError(f"{name}: unknown {bad}; choose from {list(allowed)}")
        self.device = "cuda" if HAS_CUDA else "cpu"
        self.recorder = Recorder(self.size, HAS_CUDA)


def pytest_configure(config):
    if not hasattr(config, "workerinput"):
        config._dpprims_bench = BenchConfig(config)


def pytest_report_header(config):
    b = config._dpprims_bench
    return (f"dpprims bench: size={b.size} device={b.device} models={','.join(b.models)} modes={','.join(b.modes)} "
            f"suites={','.join(b.suites)} TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} "
            f"out={b.out}")


@pytest.fixture(scope="session")
def bench(request):
    return request.config._dpprims_bench


def pytest_collection_modifyitems(config, items):
    b = config._dpprims_bench
    if b.size == "full" and not HAS_CUDA:
        skip = pytest.mark.skip(reason="--bench-size=full needs a CUDA GPU (use smoke on CPU)")
        for item in items:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    b = getattr(session.config, "_dpprims_bench", None)
    if b is None or not b.recorder.rows:
        return
    summary = b.recorder.summary()
    b.markdown = markdown(summary, b.recorder.rows)
    if b.out:
        ensure_dpprims()
        info = machine_info(["-m", "pytest", *session.config.invocation_params.args])
        path = results_path(b.out, info, "kernels")
        write_json(path, dict(kind="kernels", machine_line=info["machine_line"], machine=info,
                              settings=dict(size=b.size, models=b.models, modes=b.modes, suites=b.suites,
                                            max_shapes=b.max_shapes, rep_ms=b.rep_ms, graphs=b.graphs,
                                            device=b.device),
                              rows=b.recorder.rows, **summary, markdown=b.markdown))
        b.written = str(path)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    b = getattr(config, "_dpprims_bench", None)
    if b is None or not getattr(b, "markdown", None):
        return
    tr = terminalreporter
    tr.section("dpprims kernel benchmarks")
    if b.size != "full" or not HAS_CUDA:
        tr.write_line("smoke run: tiny shapes, every implementation called once, nothing timed")
    tr.write_line(b.markdown)
    if getattr(b, "written", None):
        tr.write_line(f"\nresults: {b.written}")
