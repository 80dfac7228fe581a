"""Compiled-kernel report: every kernel one DP step launches, compiled for sm_90 and sm_80.

    python bench/kernel_report.py                    # all models, fp32 + bf16, sm_90 + sm_80
    python bench/kernel_report.py --models mlp --dtypes bf16 --archs 90

Drives the real torch bindings (and the JAX binding's launch builder) through one DP step of
each model on shape-only data, compiles each distinct kernel build for the target without a GPU
(dpprims.kernel_report), and writes bench/results/kernel-report-sm{90,80}.{json,md}: per build
registers, spills, shared memory, occupancy, tensor-core vs FMA instructions; per launch counted
flops/bytes and a roofline time at the peak table written next to it; per model the estimated
norm-pass and clipped-GEMM time against the non-private weight gradient at the same peaks.
All times are ESTIMATES FROM COMPILED CODE, NOT MEASUREMENTS.

Must run WITHOUT TRITON_INTERPRET (the kernels must be compiled objects); the script refuses
otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("bench/kernel_report.py compiles kernels for a GPU target: unset TRITON_INTERPRET")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dpprims import kernel_report as kr  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# models (shapes of the issue: ResNet-18-GN CIFAR B=256, ResNet-50-GN 224 B=64, a transformer
# block T=512 d=768 with Embedding and LayerNorm, an MLP with T=1)
# --------------------------------------------------------------------------------------------
class TransformerBlockLM(nn.Module):
    """Token + position Embedding, one pre-LN transformer block (4-head-agnostic attention
    projections q, k, v, o; GELU MLP 4d), final LayerNorm and a vocabulary head: every trainable
    layer is a dpprims-clipped nn.Linear / nn.LayerNorm / nn.Embedding."""

    def __init__(self, vocab: int = 32000, d: int = 768, T: int = 512, heads: int = 12):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        B, T = ids.shape
        pos = torch.arange(T, device=ids.device).expand(B, T)
        h = self.tok(ids) + self.pos(pos)
        x = self.ln1(h)

        def split(t):
            return t.view(B, T, self.heads, -1).transpose(1, 2)

        att = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        h = h + self.o(att.transpose(1, 2).reshape(B, T, -1))
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(self.ln_f(h))


def _models(small: bool = False):
    """name -> (builder, input builder, batch); ``small`` shrinks everything (tests)."""
    from dpprims.models import mlp, resnet18, resnet50

    if small:
        return {
            "resnet18-cifar": (lambda: resnet18(num_classes=10, cifar=True, width=8, num_groups=4),
                               lambda B: torch.empty(B, 3, 16, 16), 4),
            "transformer": (lambda: TransformerBlockLM(vocab=64, d=32, T=16, heads=2),
                            lambda B: torch.empty(B, 16, dtype=torch.long), 2),
            "mlp": (lambda: mlp(48, hidden=(32,), num_classes=10), lambda B: torch.empty(B, 48), 8),
        }
    return {
        "resnet18-cifar": (lambda: resnet18(num_classes=10, cifar=True), lambda B: torch.empty(B, 3, 32, 32), 256),
        "resnet50-224": (lambda: resnet50(num_classes=1000), lambda B: torch.empty(B, 3, 224, 224), 64),
        "transformer": (lambda: TransformerBlockLM(), lambda B: torch.empty(B, 512, dtype=torch.long), 8),
        "mlp": (lambda: mlp(3072, hidden=(1024, 1024), num_classes=10), lambda B: torch.empty(B, 3072), 256),
    }


def capture_torch(builder, make_input, B: int, dtype: torch.dtype, arch: int):
    """Launches of one DP step (forward, engine.backward, clip factors, clipped sums, fused noise +
    SGD-momentum update on fp32 master parameters) on meta tensors, and the engine's layer plan."""
    from dpprims.bindings.torch.update import add_noise_and_step
    from dpprims.torch.engine import DPEngine

    torch.manual_seed(0)
    model = builder().to(device="meta", dtype=dtype)
    x = make_input(B).to("meta")
    if x.is_floating_point():
        x = x.to(dtype)
    y = torch.empty(B, dtype=torch.long, device="meta")
    engine = DPEngine(model, max_grad_norm=1.0)
    for h in engine.handlers:
        for meth in ("sq_norms", "accumulate_clipped"):
            f = getattr(h, meth)

            def wrapped(*a, _f=f, _name=h.name, **k):
                with kr.layer_label(_name):
                    return _f(*a, **k)

            setattr(h, meth, wrapped)
    with kr.record_torch_launches(arch) as launches:
        out = model(x)
        out = out.reshape(B, -1, out.shape[-1])[:, -1] if out.dim() == 3 else out
        loss = F.cross_entropy(out.float(), y, reduction="none")
        with kr.layer_label("<clip factors>"):
            engine.backward(loss)
        plan = engine.plan()
        # the trainer's step: fp32 master parameters, clipped sums in .grad (autocast training)
        masters = []
        for p in model.parameters():
            m = torch.empty(p.shape, dtype=torch.float32, device="meta")
            m.grad = torch.empty(p.shape, dtype=torch.float32, device="meta")
            masters.append(m)
        with kr.layer_label("<noise + update>"):
            add_noise_and_step(masters, state={}, noise_std=1.0, normaliser=float(B), seed=1, step=1,
                               optimizer="sgd", lr=0.1, momentum=0.9)
    return launches, plan


# --------------------------------------------------------------------------------------------
# JAX: the same step through the JAX binding's launch builder (jax.eval_shape, no arrays)
# --------------------------------------------------------------------------------------------
def _jax_models(small: bool = False):
    from dpprims.models import jax_resnet as jr

    if small:
        return {"resnet18-cifar": (lambda: jr.resnet18(num_classes=10, cifar=True, width=8, num_groups=4),
                                   (4, 16, 16, 3)),
                "mlp": (lambda: jr.mlp(hidden=(32,), num_classes=10), (8, 48))}
    return {"resnet18-cifar": (lambda: jr.resnet18(num_classes=10, cifar=True), (256, 32, 32, 3)),
            "resnet50-224": (lambda: jr.resnet50(num_classes=1000), (64, 224, 224, 3)),
            "mlp": (lambda: jr.mlp(hidden=(1024, 1024), num_classes=10), (256, 3072))}


def capture_jax(builder, x_shape, dtype: str, arch: int):
    import jax
    import jax.numpy as jnp
    import optax

    from dpprims.jax import clipped_grad, make_loss_fn

    model = builder()
    jdt = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    x = jax.ShapeDtypeStruct(x_shape, jdt)
    y = jax.ShapeDtypeStruct((x_shape[0],), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x_shape, jdt)))["params"]
    # compute in the step's dtype, as bench/e2e.py's bf16 JAX step does (it casts the fp32 master
    # params): flax keeps fp32 params, which would promote every layer back to fp32 kernels
    params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, jdt), params)

    def ce(logits, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch[1])

    loss_fn = make_loss_fn(model, ce)
    with kr.record_jax_launches(arch) as launches:
        jax.eval_shape(lambda p, xb, yb: clipped_grad(loss_fn, p, (xb, yb), max_grad_norm=1.0), params, x, y)
    return launches


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
def model_summary(rows: list[dict], plan: list[dict], arch: int, dtype: str) -> dict:
    norm = sum(r["estimate"]["seconds"] for r in rows if "estimate" in r and kr.is_norm_kernel(r["kernel"]))
    clipped = sum(r["estimate"]["seconds"] for r in rows if "estimate" in r and kr.is_clipped_weight_kernel(r["kernel"]))
    other = sum(r["estimate"]["seconds"] for r in rows if "estimate" in r) - norm - clipped
    wgrad = sum(kr.nonprivate_wgrad_s(arch, p.get("weight_grad_flops", 0), p.get("weight_grad_bytes", 0), dtype)
                for p in plan if "weight_grad_flops" in p)
    clipped_builds = [r for r in rows if kr.is_clipped_weight_kernel(r["kernel"]) and "compiled" in r]
    return dict(norm_pass_s=norm, clipped_gemm_s=clipped, other_s=other, nonprivate_weight_grad_s=wgrad,
                clipped_over_nonprivate=clipped / wgrad if wgrad else None,
                norm_over_nonprivate=norm / wgrad if wgrad else None,
                clipped_launches=len([r for r in rows if kr.is_clipped_weight_kernel(r["kernel"])]),
                clipped_on_tensor_cores=sum(1 for r in clipped_builds if r["compiled"]["tensor_cores"]),
                spilling_launches=sum(1 for r in rows if r.get("compiled", {}).get("spills")),
                failed_launches=sum(1 for r in rows if "error" in r),
                norm_useful_flops=sum(p.get("norm_flops", 0) for p in plan),
                weight_grad_flops=sum(p.get("weight_grad_flops", 0) for p in plan))


def machine_line() -> str:
    import triton

    return (f"{platform.node()} ({platform.machine()}, no GPU: compiled with triton.compile for the target), "
            f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}")


def _fmt_s(s: float) -> str:
    return f"{s * 1e6:.1f}" if s is not None else "-"


def write_md(path: str, report: dict) -> None:
    from dpprims.kernels import linear as kl

    arch = report["arch"]
    pk = kr.PEAKS[arch]
    L = [f"# Compiled-kernel report, sm_{arch}", "",
         f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ", f"Generated: {report['generated']}", "",
         f"**Times are an {kr.ESTIMATE_LABEL}.** Roofline at the peaks below: executed MMA flops (padded tiles) "
         "at the tensor-core peak of the MMA operand type in the PTX (CUDA-core FMA peak when the build has no "
         "MMA), plus design (a)'s per-example scaling pass (acc += c_i * W_i: one fp32 FMA per tile element "
         "per example) at the CUDA-core FMA peak, not overlapped with the MMAs (conservative), bytes = every "
         "buffer argument once (a lower bound), plus, in a split-K clipped sum, the last slice's read of the "
         "slices' fp32 partials (the in-kernel ordered reduction), counted as DRAM traffic. Compute time divided "
         "by the busy fraction of the GPU: CTAs spread evenly over the SMs, the busiest SM running its CTAs "
         f"CTAs/SM (occupancy) at a time, each SM at min(1, resident warps / {kl.SATURATING_WARPS}) of its peak "
         f"(assumption); memory time at the DRAM bandwidth times min(1, SMs in use x {kl.SM_DRAM_SHARE:g} / SMs) "
         "(assumption: one SM draws at most that multiple of its fair share). Non-private weight gradient: "
         "2*B*T*d*p flops at the bf16 tensor-core peak (bf16) or the fp32 FMA peak (fp32), and its operand "
         "bytes with an fp32 gradient, at the full peaks (no under-fill: the baseline is flattered).", "",
         "| peak table | value |", "|---|---|",
         f"| GPU | {pk['gpu']}, {pk['sms']} SMs |",
         f"| bf16/fp16 tensor core (dense) | {pk['tc_bf16'] / 1e12:.1f} TFLOP/s |",
         f"| tf32 tensor core (dense) | {pk['tc_tf32'] / 1e12:.1f} TFLOP/s |",
         f"| fp32 FMA (CUDA cores) | {pk['fma_fp32'] / 1e12:.1f} TFLOP/s |",
         f"| DRAM bandwidth | {pk['dram_bps'] / 1e12:.2f} TB/s |",
         f"| per SM | {pk['regs_per_sm']} registers, {pk['smem_per_sm'] // 1024} KiB shared, "
         f"{pk['max_warps_per_sm']} warps, {pk['max_ctas_per_sm']} CTAs |",
         f"| assumed: warps an SM needs for its peak | {kl.SATURATING_WARPS} |",
         f"| assumed: most DRAM bandwidth one SM draws | {kl.SM_DRAM_SHARE:g} x 1/{pk['sms']} |", "",
         "## Per model (one DP step)", "",
         "| model | dtype | B | launches | norm pass us | clipped GEMM us | other us | non-private wgrad us | "
         "clipped / non-private | norm / non-private | clipped on tensor cores | spills | failed |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        s = m["summary"]
        if "clipped_over_nonprivate" not in s:  # JAX: only its launches that differ from torch's
            continue
        ratio = f"{s['clipped_over_nonprivate']:.2f}x" if s["clipped_over_nonprivate"] else "-"
        nratio = f"{s['norm_over_nonprivate']:.2f}x" if s["norm_over_nonprivate"] else "-"
        L.append(f"| {m['model']} | {m['dtype']} | {m['batch']} | {len(m['launches'])} | {_fmt_s(s['norm_pass_s'])} | "
                 f"{_fmt_s(s['clipped_gemm_s'])} | {_fmt_s(s['other_s'])} | {_fmt_s(s['nonprivate_weight_grad_s'])} | "
                 f"{ratio} | {nratio} | {s['clipped_on_tensor_cores']}/{s['clipped_launches']} | "
                 f"{s['spilling_launches']} | {s['failed_launches']} |")
    jax = [m for m in report["models"] if m["framework"] == "jax"]
    if jax:
        L += ["", "JAX binding (jax.eval_shape of the same step through `dpprims.jax.clipped_grad`): launches whose "
              "build differs from every torch build of the same model and dtype: " +
              ", ".join(f"{m['model']} {m['dtype']}: {len(m['launches'])}" for m in jax) + " (listed below)."]
    L += ["", "## Distinct builds", "",
          "| kernel | dtypes | constexprs | warps | regs | spill B (st/ld) | stack B | smem KiB | CTAs/SM (limit) | "
          "wgmma | mma | fma.f32 | HGMMA | HMMA | FFMA | launches |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in report["builds"]:
        if "error" in b:
            L.append(f"| {b['kernel']} | {b['pointers']} | {b['constexprs']} | {b['num_warps']} | "
                     f"**does not compile**: {b['error']} |  |  |  |  |  |  |  |  |  |  | {b['launches']} |")
            continue
        c = b["compiled"]
        o = c["occupancy"]
        L.append(f"| {b['kernel']} | {b['pointers']} | {b['constexprs']} | {b['num_warps']} | {c['registers']} | "
                 f"{c['spill_store_bytes']}/{c['spill_load_bytes']} | {c['stack_bytes']} | {c['shared_bytes'] / 1024:.1f} | "
                 f"{o['ctas_per_sm']} ({o['limited_by']}) | {c['ptx']['wgmma']} | {c['ptx']['mma_sync']} | "
                 f"{c['ptx']['fma_f32']} | {c['sass']['HGMMA']} | {c['sass']['HMMA']} | {c['sass']['FFMA']} | "
                 f"{b['launches']} |")
    L += ["", "## Launches (per model and dtype)", ""]
    for m in report["models"]:
        L += [f"### {m['model']} {m['dtype']} (B = {m['batch']}, {m['framework']})", "",
              "| layer | kernel | grid | spec | regs | CTAs/SM | unit | GFLOP (MMA) | MB | est. us | bound |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["launches"]:
            spec = " ".join(f"{k}={v}" for k, v in r["constexprs"].items())
            if "error" in r:
                L.append(f"| {r['layer']} | {r['kernel']} | {r['grid']} | {spec} w{r['num_warps']} | "
                         f"does not compile |  |  |  |  |  |  |")
                continue
            c, e = r["compiled"], r["estimate"]
            fl = f"{r['mma_flops'] / 1e9:.3f}" if r["mma_flops"] is not None else "?"
            L.append(f"| {r['layer']} | {r['kernel']} | {r['grid']} | {spec} w{r['num_warps']} | {c['registers']} | "
                     f"{c['occupancy']['ctas_per_sm']} | {r['unit']} | {fl} | {r['bytes'] / 1e6:.2f} | "
                     f"{e['seconds'] * 1e6:.1f} | {e['bound']} |")
        L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def run(models: list[str], dtypes: list[str], archs: list[int], *, small: bool = False, jax_too: bool = True,
        jobs: int = 2, out_dir: str = RESULTS, command: str = "", quiet: bool = False) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    reports = {}
    for arch in archs:
        cache: dict = {}
        entries = []
        counts: dict = {}
        torch_models = _models(small)
        for name in models:
            if name not in torch_models:
                raise SystemExit(f"unknown model {name!r}; choose from {sorted(torch_models)}")
            builder, make_input, B = torch_models[name]
            for dt in dtypes:
                t0 = time.time()
                launches, plan = capture_torch(builder, make_input, B, DTYPES[dt], arch)
                entries.append((name, dt, B, "torch", launches, plan))
                if not quiet:
                    print(f"sm_{arch} {name} {dt}: {len(launches)} launches captured in {time.time() - t0:.1f}s",
                          flush=True)
        if jax_too:
            jm = _jax_models(small)
            for name in models:
                if name not in jm:
                    continue
                builder, shape = jm[name]
                for dt in dtypes:
                    try:
                        launches = capture_jax(builder, shape, dt, arch)
                    except Exception as e:  # the JAX builder is reported, never allowed to hide the torch one
                        print(f"sm_{arch} {name} {dt} jax: capture failed: {type(e).__name__}: {e}", flush=True)
                        continue
                    entries.append((name, dt, shape[0], "jax", launches, []))
        all_launches = [ln for e in entries for ln in e[4]]
        t0 = time.time()

        def prog(i, n, b):
            if not quiet and (i % 10 == 0 or i == n):
                print(f"sm_{arch}: compiled {i}/{n} distinct builds ({time.time() - t0:.0f}s)", flush=True)

        rows_all, cache = kr.compile_all(all_launches, arch, cache=cache, jobs=jobs, progress=prog)
        by_launch = {id(ln): b for ln, b in rows_all}
        for ln, b in rows_all:
            counts[b] = counts.get(b, 0) + 1
        model_reports = []
        for name, dt, B, fw, launches, plan in entries:
            rows = kr.summarise([(ln, by_launch[id(ln)]) for ln in launches], cache, arch)
            if fw == "jax":
                # JAX launches: only where the build differs from a torch build of the same model
                torch_builds = {by_launch[id(ln)] for e in entries if e[0] == name and e[1] == dt and e[3] == "torch"
                                for ln in e[4]}
                rows = [r for r, ln in zip(rows, launches) if by_launch[id(ln)] not in torch_builds]
            model_reports.append(dict(model=name, dtype=dt, batch=B, framework=fw, launches=rows,
                                      summary=model_summary(rows, plan, arch, dt) if fw == "torch" else
                                      dict(differing_launches=len(rows)), plan=plan))
        builds = []
        for b, info in cache.items():
            d = dict(kernel=b.kernel_name, pointers=",".join(v[1:] for _, v in b.signature if v.startswith("*")),
                     constexprs=" ".join(f"{k}={v}" for k, v in b.constexprs if not k.startswith("stride")),
                     num_warps=b.num_warps, num_stages=b.num_stages, signature=dict(b.signature),
                     attrs=dict(b.attrs), launches=counts.get(b, 0), half_operands=kr.multiplies_half(b))
            d.update({"error": info["error"]} if "error" in info else {"compiled": info})
            builds.append(d)
        builds.sort(key=lambda d: (d["kernel"], d["pointers"], d["constexprs"]))
        report = dict(arch=arch, peaks=kr.PEAKS[arch], label=kr.ESTIMATE_LABEL, command=command,
                      machine=machine_line(), generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      models=[m for m in model_reports if m["framework"] == "torch"] +
                      [m for m in model_reports if m["framework"] == "jax" and m["launches"]],
                      builds=builds)
        base = os.path.join(out_dir, f"kernel-report-sm{arch}")
        with open(base + ".json", "w") as f:
            json.dump(report, f, indent=1, default=str)
        write_md(base + ".md", report)
        if not quiet:
            print(f"wrote {base}.json and .md ({len(builds)} distinct builds)", flush=True)
            for m in report["models"]:
                s = m["summary"]
                if "clipped_over_nonprivate" in s:
                    print(f"  {m['model']:<16}{m['dtype']:<6} norm {s['norm_pass_s'] * 1e3:8.3f} ms  clipped "
                          f"{s['clipped_gemm_s'] * 1e3:8.3f} ms  non-private wgrad {s['nonprivate_weight_grad_s'] * 1e3:8.3f} ms"
                          f"  clipped/non-private {s['clipped_over_nonprivate'] or 0:6.2f}x  tensor-core clipped "
                          f"{s['clipped_on_tensor_cores']}/{s['clipped_launches']}  spills {s['spilling_launches']}"
                          f"  failed {s['failed_launches']}")
        reports[arch] = report
    return reports


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet18-cifar", "resnet50-224", "transformer", "mlp"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--archs", nargs="+", type=int, default=[90, 80], choices=sorted(kr.PEAKS))
    ap.add_argument("--small", action="store_true", help="tiny shapes (tests)")
    ap.add_argument("--no-jax", action="store_true", help="skip the JAX binding's launch builder")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=RESULTS)
    a = ap.parse_args(argv)
    cmd = "python bench/kernel_report.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    run(a.models, a.dtypes, a.archs, small=a.small, jax_too=not a.no_jax, jobs=a.jobs, out_dir=a.out, command=cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
