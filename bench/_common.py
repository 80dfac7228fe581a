"""Shared helpers of the dpprims benchmarks (microbenchmarks and end-to-end).

* :func:`ensure_dpprims` makes ``dpprims.kernels`` / ``dpprims.bindings`` importable from a plain
  checkout (the GPU machine gets the tree, not an install): setup.py maps ``kernels/`` and
  ``bindings/`` into the package; without an install the same mapping is made here.
* :func:`machine_info` / :func:`machine_line`: the machine line every result file carries
  (GPU, driver, CUDA, library versions, the exact command).
* :data:`TARGETS` and :func:`target_status`: the targets of issue 6, with met / missed /
  not measured.
* :func:`write_json`: results/<gpu>-<date>[-tag].json.

Nothing here imports torch or jax at import time.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import importlib.util
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------
# imports
# --------------------------------------------------------------------------------------------
def ensure_dpprims() -> str:
    """Import dpprims with its ``kernels``/``bindings`` subpackages; returns how ("installed" or
    "checkout mapping"). From a checkout that is not pip-installed, dpprims.kernels and
    dpprims.bindings are registered from ``<repo>/kernels`` and ``<repo>/bindings`` exactly as
    setup.py's package_dir maps them."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import dpprims

    how = "installed"
    for sub in ("kernels", "bindings"):
        name = f"dpprims.{sub}"
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            init = ROOT / sub / "__init__.py"
            if not init.exists():
                raise
            spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(ROOT / sub)])
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
            setattr(dpprims, sub, mod)
            how = "checkout mapping"
    return how


def try_import(name: str):
    """(module, None) or (None, reason) - a missing piece becomes a 'skipped' row, not a crash."""
    try:
        return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip
        return None, f"not available: import {name} failed ({type(e).__name__}: {e})"


# --------------------------------------------------------------------------------------------
# machine line
# --------------------------------------------------------------------------------------------
def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


def _cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info(argv: list[str] | None = None, *, query_device: bool = True) -> dict:
    """GPU, driver, CUDA, library versions, git state and the exact command line.

    Queries the GPU through nvidia-smi and, with ``query_device``, through torch (which sets up
    CUDA in this process: a parent that only launches workers passes False)."""
    argv = list(sys.argv if argv is None else argv)
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "command": "python " + " ".join(shlex.quote(a) for a in argv),
        "cwd": os.getcwd(),
        "gpu": None,
        "gpu_count": 0,
        "driver": None,
        "cuda": None,
        "env": {k: os.environ[k] for k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                          "JAX_PLATFORMS", "DPPRIMS_JAX_BACKEND") if k in os.environ},
    }
    for pkg in ("torch", "triton", "jax", "jaxlib", "jax-triton", "flax", "optax", "opacus", "numpy", "dp-accounting",
                "pytest-benchmark", "dpprims"):
        info[pkg.replace("-", "_")] = _version(pkg)
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if query_device and torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = p.name
            info["gpu_count"] = torch.cuda.device_count()
            info["gpu_memory_bytes"] = int(p.total_memory)
            info["sm_count"] = int(p.multi_processor_count)
            info["compute_capability"] = f"{p.major}.{p.minor}"
    except Exception as e:  # noqa: BLE001
        info["torch_error"] = f"{type(e).__name__}: {e}"
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem", "--format=csv,noheader"])
    if smi:
        first = smi.splitlines()[0].split(", ")
        info["gpu"] = info["gpu"] or first[0]
        if len(first) > 1:
            info["driver"] = first[1]
        if len(first) > 3:
            info["max_clocks_mhz"] = {"sm": first[2], "mem": first[3]}
    head = _run(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    if head:
        info["git_commit"] = head
        info["git_dirty"] = bool(_run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"]))
    info["machine_line"] = machine_line(info)
    return info


def machine_line(info: dict) -> str:
    cpu = info.get("cpu_model") or info.get("cpu")
    parts = [info.get("gpu") or f"CPU only ({cpu}, {info.get('cpu_count')} cores)"]
    if info.get("driver"):
        parts.append(f"driver {info['driver']}")
    if info.get("cuda"):
        parts.append(f"CUDA {info['cuda']}")
    for k in ("torch", "triton", "jax", "jax_triton", "flax", "opacus"):
        if info.get(k):
            parts.append(f"{k.replace('_', '-')} {info[k]}")
    parts.append(f"Python {info.get('python')}")
    return " | ".join(parts)


def gpu_slug(info: dict) -> str:
    name = info.get("gpu") or "cpu"
    name = re.sub(r"^NVIDIA\s+", "", name)
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "gpu"


def results_path(out_dir: str | os.PathLike, info: dict, tag: str) -> Path:
    """<out>/<gpu>-<date>-<tag>.json (date = UTC day; a later run the same day gets -2, -3, ...)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    day = info["date"][:10]
    base = f"{gpu_slug(info)}-{day}-{tag}"
    path = out / f"{base}.json"
    n = 2
    while path.exists():
        path = out / f"{base}-{n}.json"
        n += 1
    return path


def write_json(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(obj, indent=1, sort_keys=False, default=_json_default) + "\n")
    return path


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    return str(o)


# --------------------------------------------------------------------------------------------
# targets (issue 6)
# --------------------------------------------------------------------------------------------
# kind "min": value must be >= threshold; "max": value must be <= threshold.
TARGETS = {
    "torch_vs_nonprivate": dict(kind="min", threshold=0.85, scope="e2e",
                                text="dpprims torch examples/s >= 0.85x non-private torch"),
    "torch_vs_opacus": dict(kind="min", threshold=3.0, scope="e2e",
                            text="dpprims torch examples/s >= 3x Opacus (hooks)"),
    "torch_memory": dict(kind="max", threshold=1.3, scope="e2e",
                         text="dpprims torch peak memory <= 1.3x non-private torch at the same batch"),
    "jax_vs_nonprivate": dict(kind="min", threshold=0.85, scope="e2e",
                              text="dpprims JAX examples/s >= 0.85x non-private JAX"),
    "jax_vs_vmap": dict(kind="min", threshold=2.0, scope="e2e",
                        text="dpprims JAX examples/s >= 2x JAX vmap-of-grad DP-SGD"),
    "norm_pass": dict(kind="max", threshold=0.5, scope="kernels",
                      text="norm pass <= 0.5x the weight-gradient GEMMs, summed over ResNet-18's layers"),
    "clipped_wgrad": dict(kind="max", threshold=1.15, scope="kernels",
                          text="clipped weight-gradient kernel <= 1.15x cuBLAS/cuDNN weight gradient (summed over the model's layers)"),
    "noisy_update_bw": dict(kind="min", threshold=0.70, scope="kernels",
                            text="fused noise+update achieved bandwidth >= 70% of torch copy bandwidth"),
}


def target_status(name: str, value, where: str, *, reason: str | None = None, smoke: bool = False) -> dict:
    """One target entry: met / missed / not measured (value None, or a smoke run: CPU numbers
    say nothing about the GPU targets)."""
    t = TARGETS[name]
    entry = dict(target=name, text=t["text"], kind=t["kind"], threshold=t["threshold"], where=where,
                 value=None if value is None else float(value))
    if smoke:
        entry["status"] = "not measured"
        entry["reason"] = "smoke run (tiny shapes, untimed or CPU): not a measurement"
    elif value is None:
        entry["status"] = "not measured"
        entry["reason"] = reason or "no measurement"
    else:
        ok = value >= t["threshold"] if t["kind"] == "min" else value <= t["threshold"]
        entry["status"] = "met" if ok else "missed"
    return entry


def not_measured_targets(scope: str, reason: str) -> list[dict]:
    """Entries for every target of ``scope`` that a run does not measure (so each result file
    lists every target)."""
    return [target_status(n, None, "-", reason=reason) for n, t in TARGETS.items() if t["scope"] == scope]


def targets_markdown(entries: list[dict]) -> str:
    lines = ["| target | where | value | threshold | status |", "| --- | --- | --- | --- | --- |"]
    for e in entries:
        v = "-" if e.get("value") is None else f"{e['value']:.3g}"
        op = ">=" if e["kind"] == "min" else "<="
        status = e["status"] + (f" ({e['reason']})" if e.get("reason") and e["status"] == "not measured" else "")
        lines.append(f"| {e['text']} | {e['where']} | {v} | {op} {e['threshold']} | {status} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
def quantile(xs, q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize_ms(times_ms) -> dict:
    times_ms = list(times_ms)
    return dict(median_ms=quantile(times_ms, 0.5), p20_ms=quantile(times_ms, 0.2), p80_ms=quantile(times_ms, 0.8),
                min_ms=min(times_ms) if times_ms else float("nan"), n=len(times_ms))


def is_oom(exc: BaseException) -> bool:
    """True for device out-of-memory errors of torch, cuBLAS/cuDNN and XLA."""
    name = type(exc).__name__
    msg = str(exc)
    return ("OutOfMemory" in name or "out of memory" in msg.lower() or "RESOURCE_EXHAUSTED" in msg
            or "ALLOC_FAILED" in msg or "CUBLAS_STATUS_ALLOC" in msg)
