"""dpprims' certified-tails noise on a CPU against each framework's own normal sampler (issue 12, item 4).

Per element, in ONE run with each framework's methods interleaved round by round (so load on a shared
machine hits all of them alike; torch's methods first, then JAX's, so XLA's spinning worker threads
never share the cores with a torch call), median and quartiles over the rounds, each sample the mean
of enough calls to last ``--sample-ms``:

* torch: ``torch.randn(n)`` (baseline); ``dpprims.noise_cpu.gaussian_noise`` (the generator alone);
  the torch op ``gaussian_noise(n, std=...)`` on the plain path (generator + scale); the plain int64
  torch generator without numba (``DPPRIMS_NOISE_CPU=0``, the path before; only up to
  ``--plain-max`` elements, it is slow); and ``add_noise_and_step`` on the default job's MLP
  parameters (784-256-10, SGD with momentum; the whole fused DP update per logical batch).
* JAX (jitted): ``jax.random.normal`` (baseline); ``dpprims.bindings.jax.noise.gaussian_noise`` on
  the jnp path as CPU runs it now (one host callback into dpprims.noise_cpu); the jnp path before
  (XLA Philox + numpy libm callback, ``DPPRIMS_NOISE_CPU=0``); and the pure-XLA path (LIBM = xla).

Wall time suffers from other processes on a shared machine (a call longer than a scheduler slice
waits for the next one); the process CPU time of each call is recorded beside it.
Every dpprims method draws the same numbers (bit for bit; tests/test_noise.py, test_jax_noise.py).
Writes bench/results/cpu-noise-<date>.json (machine line, exact command, all samples) and prints a
markdown table. Example: ``python bench/noise_cpu.py --sizes 203530 11000000 --rounds 15``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH, ensure_dpprims, machine_info, write_json  # noqa: E402

MLP_SHAPES = [(256, 784), (256,), (10, 256), (10,)]  # the default job's model (203,530 parameters)


def _env(var, value):
    """Context manager setting an environment variable for the duration of a call."""
    class _C:
        def __enter__(self):
            self.old = os.environ.get(var)
            os.environ[var] = value

        def __exit__(self, *exc):
            if self.old is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = self.old
    return _C()


def build_methods(n: int, args) -> list[tuple[str, str, str, callable]]:
    """(framework, method, baseline-method, fn) for size n; fn() runs one call to completion."""
    import numpy as np
    import torch

    from dpprims import noise as nz
    from dpprims import noise_cpu as ncpu
    from dpprims.bindings.torch import noise as TN
    from dpprims.bindings.torch import update as TU

    methods = []
    word3 = nz.stream_word(0)
    methods.append(("torch", "torch.randn", None, lambda: torch.randn(n)))
    if ncpu.available():
        methods.append(("torch", "dpprims noise_cpu generator (numba)", "torch.randn",  # allocates, as randn
                        lambda: ncpu.gaussian_noise(n, 0x1234, 0x5678, 3, word3, 0)))
        methods.append(("torch", "dpprims torch op gaussian_noise (plain path)", "torch.randn",
                        lambda: TN.gaussian_noise(n, std=1.3, seed=0x5678_0000_1234, step=3)))
    if n <= args.plain_max:
        def plain():
            with _env("DPPRIMS_NOISE_CPU", "0"):
                return TN.gaussian_noise(n, std=1.3, seed=0x5678_0000_1234, step=3)
        methods.append(("torch", "dpprims torch op, plain int64 torch (no numba: before)", "torch.randn", plain))
    if n == sum(int(np.prod(s)) for s in MLP_SHAPES):
        params = [torch.nn.Parameter(torch.randn(s)) for s in MLP_SHAPES]
        for p in params:
            p.grad = torch.randn_like(p)

        def stepper(env):
            state, k = {}, [0]

            def fn():
                k[0] += 1
                with _env("DPPRIMS_NOISE_CPU", env):
                    TU.add_noise_and_step(params, state=state, noise_std=1.0, normaliser=256.0, seed=7, step=k[0],
                                          optimizer="sgd", lr=0.1, momentum=0.9)
            return fn
        methods.append(("torch", "add_noise_and_step, MLP params, SGD momentum (fused)", "torch.randn", stepper("1")))
        methods.append(("torch", "add_noise_and_step, MLP params, no numba (before)", "torch.randn", stepper("0")))
    return methods


def _jax_methods(n: int, args):
    import jax
    import jax.numpy as jnp

    from dpprims.bindings.jax import noise as JN

    key = jax.random.key(0)
    normal = jax.jit(lambda k: jax.random.normal(k, (n,), jnp.float32))
    seed = JN.as_seed_array(0x5678_0000_1234)
    step = jnp.asarray([3], jnp.int32)
    out = [("jax", "jax.random.normal", None, lambda: normal(key).block_until_ready())]

    def ours(libm, env):
        # traced (and compiled) under the given LIBM / DPPRIMS_NOISE_CPU; the jit cache keys on the
        # resolved libm, so each variant is its own executable
        JN.LIBM = libm
        with _env("DPPRIMS_NOISE_CPU", env):
            f = jax.jit(lambda s, t: JN.gaussian_noise(n, std=1.3, seed=s, step=t))
            f(seed, step).block_until_ready()
        JN.LIBM = "auto"
        return lambda: f(seed, step).block_until_ready()

    out.append(("jax", "dpprims jax gaussian_noise, jnp path (host callback, numba)", "jax.random.normal",
                ours("numpy", "1")))
    if n <= args.jax_old_max:
        out.append(("jax", "dpprims jax, XLA Philox + numpy libm (before)", "jax.random.normal", ours("numpy", "0")))
        out.append(("jax", "dpprims jax, pure XLA (LIBM=xla)", "jax.random.normal", ours("xla", "0")))
    return out


def _measure(methods, n: int, args) -> list:
    """Rows of one phase: its methods interleaved round by round (so load on a shared machine
    hits all of them alike); a sample is the mean of enough calls to last >= --sample-ms (one
    call of a small draw is ~1 ms, near the timer's and the scheduler's granularity)."""
    reps = {}
    for _, m, _, fn in methods:  # warm-up: compiles, caches, first-touch allocations
        fn()
        t0 = time.perf_counter()
        fn()
        reps[m] = max(1, math.ceil(args.sample_ms * 1e-3 / max(time.perf_counter() - t0, 1e-9)))
    samples = {m: [] for _, m, _, _ in methods}
    cpu = {m: [] for _, m, _, _ in methods}
    for _ in range(args.rounds):
        for _, m, _, fn in methods:
            k = reps[m]
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(k):
                fn()
            samples[m].append((time.perf_counter() - t0) / k)
            cpu[m].append((time.process_time() - c0) / k)
    med = {m: statistics.median(v) for m, v in samples.items()}
    cmed = {m: statistics.median(v) for m, v in cpu.items()}
    rows = []
    for fw, m, base, _ in methods:
        v = sorted(samples[m])
        q1, q3 = v[len(v) // 4], v[(3 * len(v)) // 4]
        row = dict(framework=fw, method=m, n=n, median_s=med[m], q1_s=q1, q3_s=q3, min_s=v[0],
                   ns_per_element=med[m] / n * 1e9, min_ns_per_element=v[0] / n * 1e9,
                   cpu_median_s=cmed[m], cpu_ns_per_element=cmed[m] / n * 1e9, baseline=base,
                   ratio_vs_baseline=(med[m] / med[base]) if base else 1.0,
                   min_ratio_vs_baseline=(v[0] / min(samples[base])) if base else 1.0,
                   cpu_ratio_vs_baseline=(cmed[m] / cmed[base]) if base else 1.0,
                   calls_per_sample=reps[m], samples_s=samples[m], cpu_samples_s=cpu[m])
        rows.append(row)
        print(f"{fw:5s} n={n:>9d}  {m:62s} wall {row['ns_per_element']:8.2f} ns/el "
              f"(q1 {q1 / n * 1e9:.2f}, q3 {q3 / n * 1e9:.2f}, min {row['min_ns_per_element']:.2f}) "
              f"x{row['ratio_vs_baseline']:.2f} (min/min x{row['min_ratio_vs_baseline']:.2f}) | process CPU "
              f"{row['cpu_ns_per_element']:.2f} ns/el x{row['cpu_ratio_vs_baseline']:.2f}  vs {base or '-'}",
              flush=True)
    return rows


def run(args) -> dict:
    ensure_dpprims()
    import torch

    torch.set_num_threads(args.torch_threads)
    info = machine_info(query_device=False)
    try:
        import numba

        info["numba"] = numba.__version__
    except ImportError:
        info["numba"] = None
    rows = []
    # One framework at a time: all torch rounds first, then (JAX built only then) all JAX rounds.
    # Interleaving the two in one process let XLA's worker threads, still spinning after a JAX
    # call, take the second core from the torch call that followed (203k elements: the torch op
    # at 2.0x torch.randn with JAX interleaved, 1.3x without, same minutes).
    phases = [build_methods] + ([] if args.no_jax else [_jax_methods])
    for n in args.sizes:
        for build in phases:
            rows += _measure(build(n, args), n, args)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return dict(kind="cpu-noise", machine_line=info["machine_line"] + f" | numba {info['numba']}", machine=info,
                settings=dict(sizes=args.sizes, rounds=args.rounds, sample_ms=args.sample_ms,
                              torch_threads=args.torch_threads,
                              plain_max=args.plain_max, jax_old_max=args.jax_old_max, loadavg_at_end=load),
                rows=rows)


def markdown(res: dict) -> str:
    lines = [f"Machine: {res['machine_line']}", "", f"Command: `{res['machine']['command']}`", "",
             "Wall: median over interleaved rounds, one framework at a time, each sample a per-call mean over "
             ">= sample-ms (min/min in brackets); process CPU time: median (excludes time the shared machine's "
             "scheduler kept the process waiting).", "",
             "| framework | n | method | wall ns / element | wall vs sampler | CPU ns / element | CPU vs sampler |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['framework']} | {r['n']} | {r['method']} | {r['ns_per_element']:.2f} | "
                     f"{r['ratio_vs_baseline']:.2f}x ({r['min_ratio_vs_baseline']:.2f}x) | "
                     f"{r['cpu_ns_per_element']:.2f} | {r['cpu_ratio_vs_baseline']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[203530, 11_000_000])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--sample-ms", type=float, default=20.0, help="each sample: the mean of calls lasting >= this")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--plain-max", type=int, default=2_000_000, help="largest n for the slow no-numba torch path")
    ap.add_argument("--jax-old-max", type=int, default=20_000_000, help="largest n for the JAX 'before' paths")
    ap.add_argument("--no-jax", action="store_true")
    ap.add_argument("--out", default=str(BENCH / "results"))
    args = ap.parse_args(argv)
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    day = _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    path, k = out / f"cpu-noise-{day}.json", 2
    while path.exists():
        path, k = out / f"cpu-noise-{day}-{k}.json", k + 1
    write_json(path, res)
    md = markdown(res)
    print("\n" + md + f"\n\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
