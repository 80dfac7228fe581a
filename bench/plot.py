"""Tables and plots of end-to-end results (bench/e2e.py), and merging of split runs.

    python bench/plot.py bench/results/h100-2026-11-20-e2e.json            # table + PNG beside it
    python bench/plot.py a.json b.json --merge bench/results/merged.json   # one file from split runs

The markdown table has one row per (config, precision, method), the losing rows included:
examples/s, median step time with its 10-90% spread, the ratio against the non-private run of
the same framework, peak memory and its ratio, and the largest physical batch that fit.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import targets_markdown  # noqa: E402

METHOD_ORDER = ["torch-nonprivate", "opacus-hooks", "opacus-ghost", "dpprims-torch",
                "jax-nonprivate", "jax-vmap", "dpprims-jax"]
FRAMEWORK = {"torch-nonprivate": "torch", "opacus-hooks": "torch", "opacus-ghost": "torch", "dpprims-torch": "torch",
             "jax-nonprivate": "jax", "jax-vmap": "jax", "dpprims-jax": "jax"}
BASELINE = {"torch": "torch-nonprivate", "jax": "jax-nonprivate"}


def _gib(b):
    return None if b is None else b / 2**30


def _fmt(v, f="{:.2f}"):
    return "-" if v is None else f.format(v)


def add_ratios(rows: list[dict]) -> list[dict]:
    """Ratios against the non-private run of the same framework, config and precision (only
    between rows measured in the same result file: ``run`` must match)."""
    index = {(r.get("run"), r["config"], r["precision"], r["method"]): r for r in rows}
    for r in rows:
        base = index.get((r.get("run"), r["config"], r["precision"], BASELINE[FRAMEWORK[r["method"]]]))
        ok = r.get("status") == "ok" and base is not None and base.get("status") == "ok"
        r["ratio_vs_nonprivate"] = r["examples_per_s"] / base["examples_per_s"] if ok else None
        pm, bm = r.get("peak_mem_bytes"), (base or {}).get("peak_mem_bytes")
        r["mem_ratio_vs_nonprivate"] = pm / bm if ok and pm and bm else None
    for r in rows:
        for method, ref in (("dpprims-torch", "opacus-hooks"), ("dpprims-torch", "opacus-ghost"),
                            ("dpprims-jax", "jax-vmap")):
            if r["method"] != method:
                continue
            o = index.get((r.get("run"), r["config"], r["precision"], ref))
            ok = r.get("status") == "ok" and o is not None and o.get("status") == "ok"
            r[f"speedup_vs_{ref}"] = r["examples_per_s"] / o["examples_per_s"] if ok else None
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| config | precision | method | examples/s | step ms (p10-p90) | vs non-private | peak GiB | mem vs non-private "
             "| max batch | status |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in sort_rows(rows):
        step = "-" if r.get("step_ms_median") is None else \
            f"{r['step_ms_median']:.1f} ({r['step_ms_p10']:.1f}-{r['step_ms_p90']:.1f})"
        mb = r.get("max_batch") or {}
        if mb.get("largest_ok"):
            mbs = f"{mb['largest_ok']}" + (f" (OOM {mb['first_oom']})" if mb.get("first_oom") else f" ({mb.get('stopped')})")
        else:
            mbs = "-"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
        extra = []
        for ref in ("opacus-hooks", "opacus-ghost", "jax-vmap"):
            v = r.get(f"speedup_vs_{ref}")
            if v is not None:
                extra.append(f"{v:.2f}x {ref}")
        if extra and r["status"] == "ok":
            status += " (" + ", ".join(extra) + ")"
        if r.get("warning"):
            status += f" WARNING: {r['warning']}"
        lines.append(f"| {r['config']} | {r['precision']} | {r['method']} | {_fmt(r.get('examples_per_s'), '{:.0f}')} | {step} "
                     f"| {_fmt(r.get('ratio_vs_nonprivate'))} | {_fmt(_gib(r.get('peak_mem_bytes')))} "
                     f"| {_fmt(r.get('mem_ratio_vs_nonprivate'))} | {mbs} | {status} |")
    return "\n".join(lines)


def sort_rows(rows):
    def key(r):
        m = METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else 99
        return (r["config"], r["precision"], m)

    return sorted(rows, key=key)


def full_markdown(res: dict) -> str:
    m = res.get("machine", {})
    cmds = [f"`{x.get('command')}`" for x in res.get("merged_from", [])] or [f"`{m.get('command', '-')}`"]
    lines = {x.get("machine_line") for x in res.get("merged_from", [])} - {res.get("machine_line")}
    parts = [f"Machine: {res.get('machine_line', '-')}" + (f" (also: {'; '.join(sorted(lines))})" if lines else ""),
             "Command: " + "; ".join(cmds), "",
             markdown_table(res["rows"]), "", "Targets:", "", targets_markdown(res.get("targets", []))]
    return "\n".join(parts)


def plot(res: dict, path: str | Path) -> Path:
    """Bars of examples/s per (config, precision), one bar per method, labelled with the ratio
    against the framework's non-private run; a second panel with peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sort_rows(res["rows"])
    groups = list(dict.fromkeys((r["config"], r["precision"]) for r in rows))
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
    methods += sorted({r["method"] for r in rows} - set(methods))
    index = {(r["config"], r["precision"], r["method"]): r for r in rows}
    width = 0.8 / max(1, len(methods))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(groups) * max(1, len(methods)) / 3), 9))
    colors = plt.get_cmap("tab10")
    for k, method in enumerate(methods):
        xs, eps, mem, labels = [], [], [], []
        for g, (cfg, prec) in enumerate(groups):
            r = index.get((cfg, prec, method))
            xs.append(g + (k - (len(methods) - 1) / 2) * width)
            ok = r is not None and r.get("status") == "ok"
            eps.append(r["examples_per_s"] if ok else 0.0)
            mem.append(_gib(r.get("peak_mem_bytes")) or 0.0 if ok else 0.0)
            if r is None:
                labels.append("")
            elif not ok:
                labels.append(r["status"])
            else:
                labels.append(_fmt(r.get("ratio_vs_nonprivate"), "{:.2f}x"))
        b = axes[0].bar(xs, eps, width, label=method, color=colors(k % 10))
        for rect, lab in zip(b, labels):
            axes[0].annotate(lab, (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center", va="bottom",
                             fontsize=6, rotation=90, xytext=(0, 2), textcoords="offset points")
        axes[1].bar(xs, mem, width, label=method, color=colors(k % 10))
    for ax in axes:
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{c}\n{p}" for c, p in groups], fontsize=8)
    axes[0].set_ylabel("examples / s (label: ratio vs non-private)")
    title = res.get("machine_line", "")
    if res.get("settings", {}).get("smoke"):
        title = "SMOKE RUN (tiny models): checks the harness, measures nothing\n" + title
    axes[0].set_title(title, fontsize=7)
    axes[1].set_ylabel("peak memory per step (GiB)")
    axes[1].set_ylim(bottom=0)
    if not any(r.get("peak_mem_bytes") for r in rows):
        axes[1].text(0.5, 0.5, "peak memory not measured (no GPU)", ha="center", va="center", transform=axes[1].transAxes)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def merge(files: list[str]) -> dict:
    """One result from several e2e JSON files (split runs): rows keep their file's ``run`` id, so
    ratios are only taken within a file; targets are re-evaluated from the merged rows."""
    from e2e import evaluate_targets

    out = None
    rows = []
    for i, f in enumerate(files):
        res = json.loads(Path(f).read_text())
        if out is None:
            out = {k: v for k, v in res.items() if k not in ("rows", "targets", "markdown")}
            out["merged_from"] = []
        out["merged_from"].append(dict(file=str(f), machine_line=res.get("machine_line"),
                                       command=res.get("machine", {}).get("command")))
        for r in res["rows"]:
            r = dict(r)
            r["run"] = r.get("run") or f"{i}"
            rows.append(r)
    out["rows"] = add_ratios(rows)
    out["targets"] = evaluate_targets(out["rows"], smoke=bool(out.get("settings", {}).get("smoke")))
    out["markdown"] = full_markdown(out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="e2e result JSON files")
    ap.add_argument("--merge", help="write the merged result JSON here (and its PNG beside it)")
    ap.add_argument("--png", help="PNG path (default: beside the JSON)")
    args = ap.parse_args(argv)
    if args.merge or len(args.files) > 1:
        res = merge(args.files)
        target = Path(args.merge or "merged-e2e.json")
        target.write_text(json.dumps(res, indent=1) + "\n")
    else:
        target = Path(args.files[0])
        res = json.loads(target.read_text())
    png = plot(res, args.png or target.with_suffix(".png"))
    print(full_markdown(res))
    print(f"\nplot: {png}")


if __name__ == "__main__":
    main()
