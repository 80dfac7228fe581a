"""``dpprims plot LOG.jsonl``: loss, accuracy and epsilon against steps, as one PNG.

The log is what ``dpprims train --log LOG.jsonl`` (dpprims.trainer.Trainer's ``log_path``)
writes: one JSON object per line, ``kind="step"`` records (step, loss, epsilon, ...) and
``kind="eval"`` records (step, test_loss, test_accuracy, epsilon). A log that holds several runs
appended one after another (the step count starts again) is plotted for its LAST run; a resumed
run continues its step count and is plotted whole.

The training loss of a step is the mean loss of that logical batch's real examples: computed
from the private data and not noised, so it is a diagnostic, not a private release (like every
log line except epsilon). matplotlib draws off-screen (Agg canvas, no pyplot, no display).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["PlotError", "read_log", "plot_log"]


class PlotError(ValueError):
    """A log that cannot be read or plotted, or matplotlib missing; the message says which and why."""


def read_log(path) -> list[dict]:
    """The records of a JSON-lines training log (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise PlotError(f"{path}: no such log file (write one with `dpprims train --log {path}`)")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PlotError(f"{path}:{n}: not a JSON line ({e.msg}); expected a `dpprims train --log` "
                                "file") from None
            if not isinstance(rec, dict):
                raise PlotError(f"{path}:{n}: expected a JSON object per line, got {type(rec).__name__}")
            records.append(rec)
    return records


def _last_run(records: list[dict]) -> list[dict]:
    start, prev = 0, -math.inf
    for i, r in enumerate(records):
        if r.get("kind") == "step" and isinstance(r.get("step"), (int, float)):
            if r["step"] <= prev:
                start = i
            prev = r["step"]
    return records[start:]


def _series(records, kind, key):
    pts = [(r["step"], r[key]) for r in records
           if r.get("kind") == kind and isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))
           and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _moving_average(v, w):
    """Centred mean over a window of w points (shrinking at the ends), so the curve does not lag."""
    c = [0.0]
    for x in v:
        c.append(c[-1] + x)
    h = w // 2
    out = []
    for i in range(len(v)):
        lo, hi = max(0, i - h), min(len(v), i + h + 1)
        out.append((c[hi] - c[lo]) / (hi - lo))
    return out


def plot_log(log, out, *, title: str | None = None, dpi: int = 110) -> Path:
    """Write a PNG (three panels: loss, test accuracy, epsilon, each against the step) of ``log``:
    a path to a JSON-lines log or a list of its records. Returns the output path.
    Raises PlotError when the log has no step records or matplotlib is not installed."""
    records = read_log(log) if isinstance(log, (str, Path)) else list(log)
    name = str(log) if isinstance(log, (str, Path)) else "the records"
    records = _last_run(records)
    s_loss, loss = _series(records, "step", "loss")
    if not s_loss:
        raise PlotError(f"{name}: no step records with a loss (is it a `dpprims train --log` file?)")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("plotting needs matplotlib, which is not installed: pip install matplotlib "
                        "(it comes with pip install -e \".[data]\")") from None
    s_tl, test_loss = _series(records, "eval", "test_loss")
    s_acc, acc = _series(records, "eval", "test_accuracy")
    s_eps, eps = _series(records, "step", "epsilon")

    fig = Figure(figsize=(12, 3.6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_acc, ax_eps = fig.subplots(1, 3)
    ax_loss.plot(s_loss, loss, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
    w = max(1, min(20, len(loss) // 10))
    ax_loss.plot(s_loss, _moving_average(loss, w), color="tab:blue", lw=1.6, label=f"train ({w}-step centred mean)")
    if s_tl:
        ax_loss.plot(s_tl, test_loss, "o-", color="tab:orange", ms=3, lw=1.2, label="test")
    ax_loss.set_title("loss")
    ax_loss.legend(fontsize=8)
    if s_acc:
        ax_acc.plot(s_acc, acc, "o-", color="tab:green", ms=3, lw=1.4)
        ax_acc.set_ylim(0, 1)
        ax_acc.annotate(f"{acc[-1]:.3f}", (s_acc[-1], acc[-1]), textcoords="offset points", xytext=(-28, -14),
                        fontsize=9)
    else:
        ax_acc.text(0.5, 0.5, "no evaluation records", ha="center", va="center", transform=ax_acc.transAxes)
    ax_acc.set_title("test accuracy")
    if s_eps:
        ax_eps.plot(s_eps, eps, color="tab:red", lw=1.6)
        ax_eps.annotate(f"{eps[-1]:.3f}", (s_eps[-1], eps[-1]), textcoords="offset points", xytext=(-34, -14),
                        fontsize=9)
    ax_eps.set_title("epsilon spent")
    for ax in (ax_loss, ax_acc, ax_eps):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    out = Path(out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
