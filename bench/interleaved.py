"""CPU ratios measured in ONE process, the methods' steps interleaved in short blocks.

    python bench/interleaved.py --out bench/results                  # the default job's MLP
    python bench/interleaved.py --config transformer-28-b64 --blocks 10 --out bench/results

bench/e2e.py runs each method in its own process, one after the other. On a shared 2-core VM
whose speed drifts by 30-50% within minutes, a few-millisecond step (the default job's MLP)
then compares two methods measured in different stretches of the drift: its per-round ratios
ranged 0.36-0.98x for the same code. Here every method (the same step code: bench/e2e.py's
torch_method / jax_method) is built once in one process, and --blocks times each method runs
--block-steps timed steps in turn (the order reversed on every other block, the first
--block-warmup steps of each block untimed: they pay for the other framework's threads going to
sleep). A DP method's ratio is taken per block against the non-private method of its framework
in the same block (seconds apart), and reported as the median over blocks with its 10-90%
range, beside the ratio of the pooled medians.

Writes <out>/cpu-interleaved-<date>.json and .md (machine line, exact command, table).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402  (bench/e2e.py: the same step code)
from _common import machine_info, quantile  # noqa: E402

PAIRS = {"dpprims-torch": "torch-nonprivate", "opacus-hooks": "torch-nonprivate", "opacus-ghost": "torch-nonprivate",
         "dpprims-jax": "jax-nonprivate", "jax-vmap": "jax-nonprivate"}
DEFAULT_METHODS = ["torch-nonprivate", "dpprims-torch", "jax-nonprivate", "dpprims-jax"]


def build(config: str, method: str, threads: int):
    """(step, sync) of one method, warmed up (compiled) once."""
    base = dict(e2e.CPU_CONFIGS[config])
    base.pop("steps_mult", None)
    spec = dict(config=config, precision="fp32", method=method, device="cpu", steps=0, warmup=0, interpret=False,
                cpu_threads=threads, **base)
    if method.startswith(("jax", "dpprims-jax")):
        make_step, sync, _ = e2e.jax_method(spec)
    else:
        import torch

        torch.set_num_threads(threads)
        make_step, dev, _ = e2e.torch_method(spec)

        def sync():
            e2e._sync_torch(dev)
    step = make_step(spec["batch"])
    for _ in range(3):
        step()
    sync()
    return step, sync


def run(config: str, methods: list, blocks: int, block_steps: int, block_warmup: int, threads: int) -> dict:
    for m in methods:
        if m in PAIRS and PAIRS[m] not in methods:
            raise SystemExit(f"{m} needs {PAIRS[m]} among --methods (its ratio is taken against it)")
    built = {m: build(config, m, threads) for m in methods}
    times = {m: [] for m in methods}  # per block: the timed steps (ms)
    for b in range(blocks):
        for m in (methods if b % 2 == 0 else methods[::-1]):
            step, sync = built[m]
            ts = []
            for i in range(block_warmup + block_steps):
                t0 = time.perf_counter()
                step()
                sync()
                if i >= block_warmup:
                    ts.append((time.perf_counter() - t0) * 1e3)
            times[m].append(ts)
    batch = e2e.CPU_CONFIGS[config]["batch"]
    rows = []
    for m in methods:
        pooled = [t for blk in times[m] for t in blk]
        med = quantile(pooled, 0.5)
        row = dict(method=m, step_ms_median=med, step_ms_p10=quantile(pooled, 0.1), step_ms_p90=quantile(pooled, 0.9),
                   examples_per_s=batch / (med * 1e-3), block_medians_ms=[quantile(blk, 0.5) for blk in times[m]])
        ref = PAIRS.get(m)
        if ref:
            per_block = [quantile(r, 0.5) / quantile(t, 0.5) for r, t in zip(times[ref], times[m])]
            row.update(vs=ref, ratio_pooled=quantile([t for blk in times[ref] for t in blk], 0.5) / med,
                       ratio_block_median=quantile(per_block, 0.5), ratio_block_p10=quantile(per_block, 0.1),
                       ratio_block_p90=quantile(per_block, 0.9), ratio_per_block=per_block)
        rows.append(row)
    return dict(config=config, methods=methods, blocks=blocks, block_steps=block_steps, block_warmup=block_warmup,
                threads=threads, rows=rows)


def markdown(res: dict, info: dict) -> str:
    out = [f"CPU step times in one process, {res['blocks']} blocks of {res['block_steps']} timed steps per method "
           f"(after {res['block_warmup']} untimed), methods interleaved (order reversed every other block); "
           f"ratios of examples/s against the same framework's non-private step of the same block.", "",
           f"Machine: {info['machine_line']}", "", f"Command: `{info['command']}`", "",
           f"### {res['config']}", "",
           "| method | step ms (median, p10-p90) | examples/s | vs non-private (median of blocks, p10-p90) "
           "| vs non-private (pooled medians) |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        blk = (f"{r['ratio_block_median']:.2f}x ({r['ratio_block_p10']:.2f}-{r['ratio_block_p90']:.2f})"
               if "vs" in r else "-")
        pooled = f"{r['ratio_pooled']:.2f}x" if "vs" in r else "-"
        out.append(f"| {r['method']} | {r['step_ms_median']:.2f} ({r['step_ms_p10']:.2f}-{r['step_ms_p90']:.2f}) | "
                   f"{r['examples_per_s']:.1f} | {blk} | {pooled} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mlp-784-256-b256", choices=sorted(e2e.CPU_CONFIGS))
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma list of bench/e2e.py methods")
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--block-steps", type=int, default=50)
    ap.add_argument("--block-warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=None, help="directory for cpu-interleaved-<date>.json / .md")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in e2e.METHODS]
    if unknown or args.blocks < 1 or args.block_steps < 1 or args.block_warmup < 0:
        raise SystemExit(f"bad arguments: unknown methods {unknown}" if unknown
                         else "--blocks and --block-steps must be >= 1, --block-warmup >= 0")
    e2e.ensure_dpprims()
    res = run(args.config, methods, args.blocks, args.block_steps, args.block_warmup, args.threads)
    info = machine_info(query_device=False)
    md = markdown(res, info)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"cpu-interleaved-{datetime.date.today().isoformat()}"
        stem.with_suffix(".json").write_text(json.dumps(dict(res, machine=info, markdown=md), indent=1))
        stem.with_suffix(".md").write_text(md)
        print(f"results: {stem}.json\nmarkdown: {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
