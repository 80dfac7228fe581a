"""End-to-end DP-SGD training-step benchmark: examples/s and peak GPU memory per step.

    python bench/e2e.py --out bench/results                     # GPU: the full matrix
    python bench/e2e.py --smoke --out /tmp/e2e                  # CPU: tiny, proves the harness
    python bench/e2e.py --configs r18-32-b256 --precisions bf16 --out bench/results
    python bench/e2e.py --device cpu --out bench/results       # CPU: 2-core-sized configs (CPU_CONFIGS)
    python bench/e2e.py --device cpu --rounds 3 --out bench/results   # the same, methods round-robin 3 times

Configs: ResNet-18-GN (CIFAR stem) at 32x32 with physical batch 256 and 1024, ResNet-50-GN at
224x224 with batch 64 (dpprims.models / dpprims.models.jax_resnet: the same networks in torch
and Flax). Precisions: bf16 (torch autocast; JAX computes with bf16 params and inputs, fp32
master weights), fp32 (TF32 off everywhere, dpprims dot precision "ieee"), tf32 (optional: TF32
on everywhere, dpprims "tf32").

Methods (each in its own process: memory, OOM and compile caches are isolated):

  torch-nonprivate  plain SGD step (momentum 0.9), mean cross-entropy
  opacus-hooks      Opacus PrivacyEngine.make_private(grad_sample_mode="hooks"): GradSampleModule
                    materialises per-example gradients, DPOptimizer clips, sums, adds noise, steps
  opacus-ghost      make_private(grad_sample_mode="ghost"): GradSampleModuleFastGradientClipping,
                    DPOptimizerFastGradientClipping and DPLossFastGradientClipping (two backward
                    passes: norms, then the re-weighted loss)
  dpprims-torch     DPEngine.backward (fused norms + clipped sums) and the fused noise + SGD
                    update (dpprims.bindings.torch.update.add_noise_and_step)
  jax-nonprivate    jax.grad of the mean loss, optax SGD (momentum 0.9), jit
  jax-vmap          DP-SGD as in Beltran et al. 2024 / dp-imagenet: jax.vmap(jax.grad) per-example
                    gradients, per-example clip, sum, Gaussian noise, SGD; jit
  dpprims-jax       dpprims.jax.clipped_grad (fused kernels through jax-triton), noise, SGD; jit

Each run: warm-up steps (compilation included), then the median (and 10/90% quantiles) of
--steps synchronised step times; examples/s = batch / median. Peak memory: torch's
max_memory_allocated over the timed steps; JAX's peak_bytes_in_use (XLA_PYTHON_CLIENT_PREALLOCATE
is set to false). The largest physical batch per method (doubling from the largest configured
batch of each model until OOM, a cap, or --max-batch-time) is searched in the same process.

--device cpu (the default without a GPU unless --smoke) runs CPU_CONFIGS in fp32: ResNet-18-GN
(CIFAR stem, width 64, B = 32), the default `dpprims train` job's MLP 784-256-10 (B = 256) and the
small transformer (torch and its Flax twin, dpprims.models.jax_transformer), with median and quantiles of --steps
(default 5) after --warmup (default 2) steps; dpprims' rows then run the plain-torch / jnp paths
and their step includes dpprims' own certified-tails noise and fused update, whose share of the
step is measured separately (``noise_update_ms``). It writes <out>/cpu-<date>.json and
<out>/cpu-<date>.md (machine line with the CPU model, exact command, table, ratios, issue-12
targets).

Writes <out>/<gpu>-<date>-e2e.json (machine line, command, settings, rows, targets, markdown) and
a PNG beside it, and prints the markdown table (including the rows where dpprims loses).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (ROOT, TARGETS, ensure_dpprims, is_oom, machine_info, not_measured_targets, quantile,  # noqa: E402
                     results_path, target_status, try_import, write_json)

CONFIGS = {
    "r18-32-b256": dict(model="resnet18", cifar=True, image=32, batch=256, num_classes=10),
    "r18-32-b1024": dict(model="resnet18", cifar=True, image=32, batch=1024, num_classes=10, search=True),
    "r50-224-b64": dict(model="resnet50", cifar=False, image=224, batch=64, num_classes=1000, search=True),
}
# smoke: the same model code at tiny width, depth (one block per stage), input and batch; the
# ImageNet stem is kept for the ResNet-50 config. Proves the harness, measures nothing.
SMOKE_CONFIGS = {
    "r18-32-b256": dict(model="resnet18", cifar=True, image=8, batch=4, num_classes=10, width=4, num_groups=2,
                        layers=[1, 1, 1, 1], search=True),
    "r50-224-b64": dict(model="resnet50", cifar=False, image=32, batch=2, num_classes=10, width=4, num_groups=2,
                        layers=[1, 1, 1, 1]),
}
# CPU (--device cpu): sized for a 2-core machine (issue 12); fp32 only. steps_mult: this config
# runs --steps x steps_mult timed steps and --warmup x steps_mult warm-up steps (the MLP's step is
# ~100x shorter than the ResNet's: its median then covers a comparable stretch of time)
CPU_CONFIGS = {
    "r18-cifar-w64-b32": dict(model="resnet18", cifar=True, image=32, batch=32, num_classes=10, width=64),
    "mlp-784-256-b256": dict(model="mlp", in_features=784, hidden=[256], image=None, batch=256, num_classes=10,
                             steps_mult=40),
    "transformer-28-b64": dict(model="transformer", image=28, channels=1, batch=64, num_classes=10, steps_mult=4),
}
# smoke on CPU: XLA's LLVM optimisation off (compile time dominates a 2-step CPU run)
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
METHODS = ["torch-nonprivate", "opacus-hooks", "opacus-ghost", "dpprims-torch", "jax-nonprivate", "jax-vmap",
           "dpprims-jax"]
PRECISIONS = ("bf16", "fp32", "tf32")
CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0
LR = 0.1
MOMENTUM = 0.9


# ============================================================================================
# worker: one (config, precision, method) in its own process
# ============================================================================================
def _sync_torch(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def _torch_setup(spec):
    import torch

    dev = torch.device(spec["device"])
    prec = spec["precision"]
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
        torch.backends.cudnn.allow_tf32 = prec == "tf32"
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    return dev


def _torch_model(spec, dev):
    ensure_dpprims()
    if spec["model"] == "mlp":
        from dpprims.models import mlp

        return mlp(spec["in_features"], hidden=tuple(spec["hidden"]), num_classes=spec["num_classes"]).to(dev)
    if spec["model"] == "transformer":
        from dpprims.models import small_transformer

        return small_transformer(spec["num_classes"], in_channels=spec["channels"],
                                 input_size=spec["image"]).to(dev)
    kw = {k: spec[k] for k in ("width", "num_groups") if k in spec}
    if spec.get("layers"):  # smoke: fewer blocks per stage, same ResNet code
        from dpprims.models.torch_resnet import BasicBlock, Bottleneck, ResNet

        block = BasicBlock if spec["model"] == "resnet18" else Bottleneck
        return ResNet(block, spec["layers"], num_classes=spec["num_classes"], cifar=spec["cifar"], **kw).to(dev)
    from dpprims.models import get_model

    name = spec["model"] + ("-cifar" if spec["cifar"] else "")
    return get_model(name, num_classes=spec["num_classes"], **kw).to(dev)


def _torch_data(spec, dev, batch):
    import torch

    g = torch.Generator(device=dev).manual_seed(batch)
    if spec["model"] == "mlp":
        shape = (batch, spec["in_features"])
    else:
        shape = (batch, spec.get("channels", 3), spec["image"], spec["image"])
    x = torch.randn(*shape, device=dev, generator=g)
    y = torch.randint(0, spec["num_classes"], (batch,), device=dev, generator=g)
    return x, y


def _autocast(spec, dev):
    import torch

    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16")


def torch_method(spec):
    """Returns (make_step(batch) -> step(), dev, notes)."""
    import torch
    import torch.nn.functional as F

    dev = _torch_setup(spec)
    method = spec["method"]
    model = _torch_model(spec, dev)
    notes = {}
    B0 = spec["batch"]

    if method == "torch-nonprivate":
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

        def make_step(batch):
            x, y = _torch_data(spec, dev, batch)

            def step():
                opt.zero_grad(set_to_none=True)
                with _autocast(spec, dev):
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
            return step
        return make_step, dev, notes

    if method in ("opacus-hooks", "opacus-ghost"):
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        # make_private needs a data loader (it sets expected_batch_size from it); the timed steps
        # feed device tensors directly, as a training loop over that loader would.
        ds = TensorDataset(torch.zeros(B0, 3, 1, 1), torch.zeros(B0, dtype=torch.long))
        dl = DataLoader(ds, batch_size=B0)
        pe = PrivacyEngine()
        mode = "hooks" if method == "opacus-hooks" else "ghost"
        kw = dict(module=model, optimizer=opt, data_loader=dl, noise_multiplier=NOISE_MULTIPLIER,
                  max_grad_norm=CLIP_NORM, poisson_sampling=False, grad_sample_mode=mode)
        if mode == "ghost":
            kw["criterion"] = torch.nn.CrossEntropyLoss()
            gsm, dpopt, criterion, _ = pe.make_private(**kw)
        else:
            gsm, dpopt, _ = pe.make_private(**kw)
            criterion = torch.nn.CrossEntropyLoss()
        notes.update(opacus_module=type(gsm).__name__, opacus_optimizer=type(dpopt).__name__,
                     opacus_criterion=type(criterion).__name__)

        def make_step(batch):
            x, y = _torch_data(spec, dev, batch)

            def step():
                dpopt.zero_grad(set_to_none=True)
                with _autocast(spec, dev):
                    out = gsm(x)
                loss = criterion(out.float(), y)
                loss.backward()
                dpopt.step()
            return step
        return make_step, dev, notes

    if method == "dpprims-torch":
        ensure_dpprims()
        from dpprims.torch import DPEngine

        if spec["precision"] == "tf32":
            try:  # the fastest TF32 mode the engine accepts
                engine, prec = DPEngine(model, max_grad_norm=CLIP_NORM, precision="tf32"), "tf32"
            except ValueError:
                engine, prec = DPEngine(model, max_grad_norm=CLIP_NORM, precision="tf32x3"), "tf32x3"
        else:
            engine, prec = DPEngine(model, max_grad_norm=CLIP_NORM, precision="ieee"), "ieee"
        notes["dp_precision"] = prec
        params = [p for p in model.parameters() if p.requires_grad]
        upd, why = try_import("dpprims.bindings.torch.update")
        state: dict = {}
        counter = [0]
        if upd is not None and hasattr(upd, "add_noise_and_step"):
            notes["update"] = "dpprims.bindings.torch.update.add_noise_and_step (fused noise + SGD momentum)"

            def noisy_step(batch):
                counter[0] += 1
                upd.add_noise_and_step(params, state=state, noise_std=NOISE_MULTIPLIER * CLIP_NORM,
                                       normaliser=float(batch), seed=1234, step=counter[0], optimizer="sgd",
                                       lr=LR, momentum=MOMENTUM)
        else:
            notes["update"] = f"torch.randn + torch.optim.SGD (fused update op {why})"
            opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)

            def noisy_step(batch):
                with torch.no_grad():
                    for p in params:
                        p.grad.add_(torch.randn_like(p), alpha=NOISE_MULTIPLIER * CLIP_NORM).div_(batch)
                opt.step()

        def make_step(batch):
            x, y = _torch_data(spec, dev, batch)

            def step():
                for p in params:
                    p.grad = None
                with _autocast(spec, dev):
                    losses = F.cross_entropy(model(x), y, reduction="none")
                engine.backward(losses)
                noisy_step(batch)
            return step

        def after():
            # the noise + fused update alone (the grads of the last timed step are in place):
            # its share of the step is the cost of drawing noise for every parameter
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                noisy_step(B0)
                _sync_torch(dev)
                times.append((time.perf_counter() - t0) * 1e3)
            notes["noise_update_ms"] = quantile(times, 0.5)
            notes["num_params"] = sum(p.numel() for p in params)
            notes["backends"] = dict(engine.last_stats.get("backends", {}))
            try:
                notes["plan"] = [{k: r.get(k) for k in ("layer", "kind", "T", "d", "p", "method")} for r in engine.plan()]
            except Exception:  # noqa: BLE001 - the plan is informative only
                pass
        notes["_after"] = after
        return make_step, dev, notes

    raise ValueError(f"unknown torch method {method!r}")


def jax_method(spec):
    """Returns (make_step(batch) -> step(), sync(), notes)."""
    import jax
    import jax.numpy as jnp
    import optax

    ensure_dpprims()
    from dpprims.models import jax_resnet

    method = spec["method"]
    prec = spec["precision"]
    if prec != "bf16":  # fp32: true fp32 dots and convs (as torch with TF32 off); tf32: TF32
        jax.config.update("jax_default_matmul_precision", "tensorfloat32" if prec == "tf32" else "highest")
    kw = {k: spec[k] for k in ("width", "num_groups") if k in spec}
    if spec["model"] == "transformer":
        # the Flax twin of the torch small_transformer (same defaults and patch rule; NHWC)
        from dpprims.models.jax_transformer import small_transformer as jax_small_transformer

        model = jax_small_transformer(spec["num_classes"], input_size=spec["image"])
    elif spec["model"] == "mlp":
        model = jax_resnet.mlp(hidden=tuple(spec["hidden"]), num_classes=spec["num_classes"])
    elif spec.get("layers"):  # smoke: fewer blocks per stage, same ResNet code
        block = jax_resnet.BasicBlock if spec["model"] == "resnet18" else jax_resnet.Bottleneck
        model = jax_resnet.ResNet(block, tuple(spec["layers"]), spec["num_classes"], spec["cifar"], **kw)
    else:
        name = spec["model"] + ("-cifar" if spec["cifar"] else "")
        model = jax_resnet.get_jax_model(name, num_classes=spec["num_classes"], **kw)
    S = spec["image"]
    xshape = (spec["in_features"],) if spec["model"] == "mlp" else (S, S, spec.get("channels", 3))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1,) + xshape, jnp.float32))["params"]
    cdt = jnp.bfloat16 if prec == "bf16" else jnp.float32

    def cast(p):
        return jax.tree_util.tree_map(lambda a: a.astype(cdt), p)

    def ce(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)

    tx = optax.sgd(LR, momentum=MOMENTUM)
    opt_state = tx.init(params)
    notes = {"jax_backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}
    std = NOISE_MULTIPLIER * CLIP_NORM

    def add_noise(grads, key, batch):
        leaves, tdef = jax.tree_util.tree_flatten(grads)
        keys = jax.random.split(key, len(leaves))
        noisy = [(g + std * jax.random.normal(k, g.shape, jnp.float32)) / batch for g, k in zip(leaves, keys)]
        return jax.tree_util.tree_unflatten(tdef, noisy)

    if method == "jax-nonprivate":
        def grads_fn(p, x, y, key):
            def loss(p):
                return jnp.mean(ce(model.apply({"params": cast(p)}, x.astype(cdt)), y))
            return jax.grad(loss)(p)

    elif method == "jax-vmap":
        def grads_fn(p, x, y, key):
            def loss_one(p, xi, yi):
                logits = model.apply({"params": cast(p)}, xi[None].astype(cdt))
                return ce(logits, yi[None])[0]
            g = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(p, x, y)
            sq = sum(jnp.sum(jnp.square(l.astype(jnp.float32)).reshape(l.shape[0], -1), axis=1)
                     for l in jax.tree_util.tree_leaves(g))
            c = jnp.minimum(1.0, CLIP_NORM / (jnp.sqrt(sq) + 1e-6))
            summed = jax.tree_util.tree_map(lambda l: jnp.einsum("b,b...->...", c, l.astype(jnp.float32)), g)
            return add_noise(summed, key, x.shape[0])

    elif method == "dpprims-jax":
        dpj, why = try_import("dpprims.jax")
        if dpj is None or not hasattr(dpj, "clipped_grad"):
            raise _Skip(why or "dpprims.jax has no clipped_grad")
        base = dpj.make_loss_fn(model, lambda logits, batch: ce(logits, batch[1]))
        if prec == "tf32":
            from dpprims.bindings.jax import linear as _jl

            dprec = "tf32" if "tf32" in getattr(_jl, "DOT_PRECISIONS", ("tf32",)) else "tf32x3"
        else:
            dprec = "ieee"
        notes["dp_precision"] = dprec

        if prec == "bf16":
            # compute in bf16 with fp32 master weights: the loss casts the params (the returned
            # clipped sums keep the fp32 params' dtype)
            def loss_fn(p, perts, batch, rngs=None):
                return base(cast(p), perts, batch)
            loss_fn.init_perturbations = lambda p, batch: base.init_perturbations(cast(p), batch)
        else:
            loss_fn = base

        def grads_fn(p, x, y, key):
            """The clipped sums only: dpprims' own noise is added by noisy_update below."""
            batch = (x.astype(cdt), y)
            grads, _ = dpj.clipped_grad(loss_fn, p, batch, max_grad_norm=CLIP_NORM, precision=dprec)
            return jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grads)

        notes["path"] = str(dpj.which_path()) if hasattr(dpj, "which_path") else None
    else:
        raise ValueError(f"unknown jax method {method!r}")

    def train_step(p, s, key, x, y):
        key, k = jax.random.split(key)
        g = grads_fn(p, x, y, k)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, key

    key0 = jax.random.PRNGKey(1)
    if method == "dpprims-jax":
        # as dpprims' trainer runs it: the clipped sums, then dpprims' certified-tails noise and
        # the fused SGD-momentum update (bindings/jax/update.noisy_update); the "key" slot of
        # the state carries the 1-based step, which is also the noise stream
        from dpprims.bindings.jax.update import init_opt_state, noisy_update

        opt_state = init_opt_state(params, "sgd", momentum=MOMENTUM)
        notes["update"] = "dpprims.bindings.jax.update.noisy_update (certified-tails noise + fused SGD momentum)"

        def dp_update(p, sums, s, step, batch):
            return noisy_update(p, sums, s, noise_std=std, normaliser=float(batch), seed=1234, step=step,
                                optimizer="sgd", lr=LR, momentum=MOMENTUM)

        def train_step(p, s, step, x, y):  # noqa: F811 - dpprims' own step
            step = step + 1
            p, s = dp_update(p, grads_fn(p, x, y, None), s, step, x.shape[0])
            return p, s, step

        key0 = jnp.zeros((1,), jnp.int32)

    # params, optimizer state and key are donated: updated in place, as torch does
    jitted = jax.jit(train_step, donate_argnums=(0, 1, 2))
    state = {"p": params, "s": opt_state, "key": key0}
    notes["xla_memory"] = {}

    def make_step(batch):
        kx, ky = jax.random.split(jax.random.PRNGKey(batch))
        x = jax.random.normal(kx, (batch,) + xshape, jnp.float32)
        y = jax.random.randint(ky, (batch,), 0, spec["num_classes"])
        # Steps run through the jitted function, as dpprims' trainer runs them (jit's C++
        # dispatch). An ahead-of-time Compiled object has no C++ fast path when its executable
        # holds a host callback (jax's create_cpp_call returns None then), and dpprims' CPU noise
        # is one: its Python dispatch cost dpprims-jax ~0.4 ms a step on the MLP (2.26 vs 1.85
        # ms), a cost of the harness that no user pays. The first call compiles; lower().compile()
        # afterwards returns that executable from jit's cache (no second compilation) for XLA's
        # own account of the step's memory.
        def step():
            state["p"], state["s"], state["key"] = jitted(state["p"], state["s"], state["key"], x, y)

        step()
        compiled = jitted.lower(state["p"], state["s"], state["key"], x, y).compile()
        notes["xla_memory"][str(batch)] = _xla_memory(compiled)
        return step

    def sync():
        jax.block_until_ready(state["p"])

    def after():
        if method == "dpprims-jax":
            # the noise + fused update alone, on zero sums (its share of the step)
            upd = jax.jit(lambda p, sums, s, st: dp_update(p, sums, s, st, spec["batch"]))
            zeros = jax.tree_util.tree_map(jnp.zeros_like, state["p"])
            st = jnp.full((1,), 10 ** 6, jnp.int32)
            jax.block_until_ready(upd(state["p"], zeros, state["s"], st))
            times = []
            for i in range(5):
                t0 = time.perf_counter()
                jax.block_until_ready(upd(state["p"], zeros, state["s"], st + i + 1))
                times.append((time.perf_counter() - t0) * 1e3)
            notes["noise_update_ms"] = quantile(times, 0.5)
            notes["num_params"] = sum(int(l.size) for l in jax.tree_util.tree_leaves(state["p"]))
            try:
                from dpprims.bindings.jax import LAST_PATH

                notes["kernel_paths"] = dict(LAST_PATH)
            except Exception:  # noqa: BLE001
                pass
    notes["_after"] = after
    return make_step, sync, notes


class _Skip(Exception):
    pass


def _xla_memory(compiled) -> dict | None:
    """Bytes a compiled JAX step needs on the device: arguments + outputs - aliased (donated)
    + temporaries (activations, gradients, workspace), from XLA's memory analysis."""
    try:
        m = compiled.memory_analysis()
        if m is None:
            return None
        d = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                                               "temp_size_in_bytes") if hasattr(m, k)}
        d["total_bytes"] = (d.get("argument_size_in_bytes", 0) + d.get("output_size_in_bytes", 0)
                            - d.get("alias_size_in_bytes", 0) + d.get("temp_size_in_bytes", 0))
        return d
    except Exception as e:  # noqa: BLE001 - informative only
        return {"error": f"{type(e).__name__}: {e}"}


def _peak_reset(framework, dev):
    if framework == "torch" and dev is not None and dev.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def _peak(framework, dev, notes=None, batch=None):
    """(bytes, source) of the peak device memory of a step, or (None, reason).

    torch: max_memory_allocated over the timed steps (reset after the warm-up). JAX: XLA's
    memory analysis of the compiled step (arguments + outputs - donated + temporaries); the
    process-wide peak_bytes_in_use is kept beside it (it also counts what compilation and
    autotuning allocated, so it is only an upper bound)."""
    if framework == "torch":
        if dev is not None and dev.type == "cuda":
            import torch

            return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated (timed steps)"
        return None, "not measured on CPU"
    import jax

    if jax.default_backend() == "cpu":
        return None, "not measured on CPU"
    stats = jax.local_devices()[0].memory_stats() or {}
    if notes is not None and "peak_bytes_in_use" in stats:
        notes["jax_process_peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
    xm = (notes or {}).get("xla_memory", {}).get(str(batch)) or {}
    if xm.get("total_bytes"):
        return int(xm["total_bytes"]), "XLA memory_analysis of the compiled step (args + outputs - donated + temps)"
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "jax memory_stats peak_bytes_in_use (process, upper bound)"
    return None, "no memory statistics from this JAX backend"


def _free(framework):
    import gc

    gc.collect()
    if framework == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    else:
        import jax

        jax.clear_caches()


def run_worker(spec: dict) -> dict:
    """Time one method; returns the result row (never raises: errors become the row's status)."""
    row = {k: spec[k] for k in ("config", "precision", "method", "batch", "model", "image")}
    row.update(status="ok", framework="jax" if spec["method"].startswith(("jax", "dpprims-jax")) else "torch")
    fw = row["framework"]
    t_start = time.perf_counter()
    try:
        if spec.get("interpret"):
            os.environ["TRITON_INTERPRET"] = "1"
        if spec.get("cpu_threads"):
            # CPU smoke on a shared machine: OpenMP spin-waiting across busy cores made 10 ms
            # steps take seconds; one thread keeps the smoke run predictable
            import torch

            torch.set_num_threads(spec["cpu_threads"])
        if fw == "torch":
            missing = "opacus" if spec["method"].startswith("opacus") else None
            if missing:
                mod, why = try_import(missing)
                if mod is None:
                    raise _Skip(why)
            make_step, dev, notes = torch_method(spec)

            def sync():
                _sync_torch(dev)
        else:
            for mod_name in ("jax", "flax", "optax"):
                mod, why = try_import(mod_name)
                if mod is None:
                    raise _Skip(why)
            mod, why = try_import("dpprims.models.jax_resnet")
            if mod is None:
                raise _Skip(why)
            dev = None
            make_step, sync, notes = jax_method(spec)
        after = notes.pop("_after", None)
        B = spec["batch"]
        t0 = time.perf_counter()
        step = make_step(B)
        row["setup_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(spec["warmup"]):
            step()
        sync()
        row["warmup_s"] = time.perf_counter() - t0
        _peak_reset(fw, dev)
        times = []
        for _ in range(spec["steps"]):
            t0 = time.perf_counter()
            step()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        med = quantile(times, 0.5)
        row.update(step_ms_median=med, step_ms_p10=quantile(times, 0.1), step_ms_p90=quantile(times, 0.9),
                   step_ms_all=times, steps=len(times), warmup=spec["warmup"], examples_per_s=B / (med * 1e-3))
        row["peak_mem_bytes"], row["peak_mem_source"] = _peak(fw, dev, notes, B)
        if after:
            after()
        row["notes"] = notes
        row["warning"] = _path_warning(spec, notes)
        del step
        if spec.get("search"):
            row["max_batch"] = _search(spec, make_step, sync, fw)
        elif spec.get("search_skipped"):
            row["max_batch"] = dict(largest_ok=None, stopped=spec["search_skipped"])
    except _Skip as e:
        row.update(status="skipped", reason=str(e))
    except Exception as e:  # noqa: BLE001
        if is_oom(e):
            row.update(status="oom", reason=f"out of memory at batch {spec['batch']}")
        else:
            row.update(status="failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400],
                       traceback=traceback.format_exc()[-4000:])
    row["worker_s"] = time.perf_counter() - t_start
    if hasattr(os, "getloadavg"):  # a shared CPU machine: how busy it was while this row ran
        row["loadavg_1_5_15"] = list(os.getloadavg())
    return row


def _search(spec, make_step, sync, fw) -> dict:
    """Doubling search of the largest physical batch that runs a training step (2 steps: the
    first compiles), in this process, from the configured batch; stops at the first OOM, at
    ``search_cap`` or when ``search_time`` seconds are spent."""
    b = spec["batch"]
    res = dict(largest_ok=b, first_oom=None, stopped=None, probes=[])
    t0 = time.perf_counter()
    while True:
        b *= 2
        if b > spec["search_cap"]:
            res["stopped"] = f"cap {spec['search_cap']}"
            break
        if time.perf_counter() - t0 > spec["search_time"]:
            res["stopped"] = f"time limit {spec['search_time']:.0f} s"
            break
        _free(fw)
        try:
            step = make_step(b)
            step()
            step()
            sync()
            res["largest_ok"] = b
            res["probes"].append([b, "ok"])
            del step
        except Exception as e:  # noqa: BLE001
            if is_oom(e):
                res["first_oom"] = b
                res["stopped"] = "oom"
                res["probes"].append([b, "oom"])
            else:
                res["stopped"] = f"error {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                res["probes"].append([b, "error"])
            break
    res["seconds"] = time.perf_counter() - t0
    _free(fw)
    return res


def _path_warning(spec, notes) -> str | None:
    """On a GPU, dpprims rows must have run the compiled kernels: a plain-torch / jnp fallback
    would be a different (and misleading) measurement, so it is flagged in the table."""
    if spec["device"] != "cuda":
        return None
    if spec["method"] == "dpprims-torch":
        other = {op: b for op, b in (notes.get("backends") or {}).items() if b != "triton"}
        return f"ops not on the Triton GPU path: {other}" if other else None
    if spec["method"] == "dpprims-jax":
        other = {op: p for op, p in (notes.get("kernel_paths") or {}).items() if p != "jax-triton"}
        if other or notes.get("path") != "jax-triton":
            return f"dpprims JAX ops not on the jax-triton path (path {notes.get('path')}): {other}"
    return None


def _worker_main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    row = run_worker(spec)
    Path(out_path).write_text(json.dumps(row, default=str))


# ============================================================================================
# parent: the matrix, isolation, results
# ============================================================================================
def _run_isolated(spec: dict, isolation: str, timeout: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="dpprims-e2e-"))
    spec_path, out_path = tmp / "spec.json", tmp / "row.json"
    spec_path.write_text(json.dumps(spec))
    base = {k: spec[k] for k in ("config", "precision", "method", "batch", "model", "image")}
    t0 = time.perf_counter()
    log = ""
    if isolation == "fork":
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                _worker_main(str(spec_path), str(out_path))
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return dict(base, status="failed", reason=f"timeout after {timeout:.0f} s")
    else:
        env = dict(os.environ)
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        env["PYTHONUNBUFFERED"] = "1"
        if spec.get("interpret"):
            env["TRITON_INTERPRET"] = "1"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path), str(out_path)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
            log = (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired:
            return dict(base, status="failed", reason=f"timeout after {timeout:.0f} s")
    if not out_path.exists():
        return dict(base, status="failed", reason="worker died without a result (crash or killed)", log=log)
    row = json.loads(out_path.read_text())
    row["process_s"] = time.perf_counter() - t0
    if log and row.get("status") != "ok":
        row["log"] = log
    return row


def evaluate_targets(rows: list[dict], *, smoke: bool) -> list[dict]:
    """The end-to-end targets of issue 6 per (config, precision); kernel targets are listed as
    not measured here (they come from the microbenchmarks)."""
    from plot import add_ratios

    add_ratios(rows)
    out = []
    by = {}
    for r in rows:
        by.setdefault((r["config"], r["precision"]), {})[r["method"]] = r
    for (cfg, prec), ms in sorted(by.items()):
        where = f"{cfg} {prec}"

        def val(method, key):
            r = ms.get(method)
            return None if r is None else r.get(key)

        def why(*methods):
            bad = [f"{m}: {ms[m]['status']}" if m in ms else f"{m}: not run" for m in methods
                   if m not in ms or ms[m].get("status") != "ok"]
            return "; ".join(bad) or None

        if "dpprims-torch" in ms:
            out.append(target_status("torch_vs_nonprivate", val("dpprims-torch", "ratio_vs_nonprivate"), where,
                                     reason=why("dpprims-torch", "torch-nonprivate"), smoke=smoke))
            out.append(target_status("torch_vs_opacus", val("dpprims-torch", "speedup_vs_opacus-hooks"), where,
                                     reason=why("dpprims-torch", "opacus-hooks"), smoke=smoke))
            mem = val("dpprims-torch", "mem_ratio_vs_nonprivate")
            out.append(target_status("torch_memory", mem, where, smoke=smoke,
                                     reason=why("dpprims-torch", "torch-nonprivate") or (None if mem is not None else
                                                                                        "peak memory not measured (CPU)")))
        if "dpprims-jax" in ms:
            out.append(target_status("jax_vs_nonprivate", val("dpprims-jax", "ratio_vs_nonprivate"), where,
                                     reason=why("dpprims-jax", "jax-nonprivate"), smoke=smoke))
            out.append(target_status("jax_vs_vmap", val("dpprims-jax", "speedup_vs_jax-vmap"), where,
                                     reason=why("dpprims-jax", "jax-vmap"), smoke=smoke))
    have = {t["target"] for t in out}
    for name, t in TARGETS.items():
        if t["scope"] == "e2e" and name not in have:
            out.append(target_status(name, None, "-", reason="no run of this target's methods was selected"))
    out += not_measured_targets("kernels", "kernel target: see the microbenchmarks (python -m pytest bench)")
    return out


# ============================================================================================
# CPU results (issue 12)
# ============================================================================================
CPU_TARGETS = [
    # (config, method, baseline, minimum ratio of examples/s)
    ("r18-cifar-w64-b32", "dpprims-torch", "torch-nonprivate", 0.5),
    ("r18-cifar-w64-b32", "dpprims-torch", "opacus-hooks", 1.7),
    ("r18-cifar-w64-b32", "dpprims-jax", "jax-nonprivate", 0.6),
    ("r18-cifar-w64-b32", "dpprims-jax", "jax-vmap", 2.0),
    ("mlp-784-256-b256", "dpprims-torch", "torch-nonprivate", 0.6),
    ("mlp-784-256-b256", "dpprims-jax", "jax-nonprivate", 0.6),
]
_NONPRIVATE = {"torch": "torch-nonprivate", "jax": "jax-nonprivate"}


def cpu_ratios(rows: list[dict]) -> None:
    """Adds ratio_vs_nonprivate (examples/s over the same framework's non-private row of the
    same config) and speedup_vs_<baseline> for the DP rows, in place."""
    by = {}
    for r in rows:
        by.setdefault(r["config"], {})[r["method"]] = r
    for cfg, ms in by.items():
        for r in ms.values():
            eps = r.get("examples_per_s")
            if not eps or r["method"] in _NONPRIVATE.values():
                continue
            base = ms.get(_NONPRIVATE[r.get("framework", "torch")])
            if base and base.get("examples_per_s") and base is not r:
                r["ratio_vs_nonprivate"] = eps / base["examples_per_s"]
                if r.get("step_ms_all") and base.get("step_ms_all"):
                    # fastest step over fastest step: on a shared machine other jobs only ever add
                    # time, so this is the less load-dependent estimate (reported beside the median)
                    r["ratio_vs_nonprivate_fastest"] = min(base["step_ms_all"]) / min(r["step_ms_all"])
            for other in ("opacus-hooks", "opacus-ghost", "jax-vmap"):
                o = ms.get(other)
                if (o and o is not r and o.get("examples_per_s") and o.get("framework") == r.get("framework")
                        and r["method"].startswith("dpprims")):
                    r[f"speedup_vs_{other}"] = eps / o["examples_per_s"]
            nu = (r.get("notes") or {}).get("noise_update_ms")
            if nu is not None and r.get("step_ms_median"):
                r["noise_update_share"] = nu / r["step_ms_median"]


def cpu_targets(rows: list[dict]) -> list[dict]:
    idx = {(r["config"], r["method"]): r for r in rows}
    out = []
    for cfg, method, base, need in CPU_TARGETS:
        r, b = idx.get((cfg, method)), idx.get((cfg, base))
        t = dict(config=cfg, method=method, baseline=base, need=need)
        if not r or not b or not r.get("examples_per_s") or not b.get("examples_per_s"):
            why = [f"{m}: {x.get('status') if x else 'not run'}" for m, x in ((method, r), (base, b))
                   if not x or not x.get("examples_per_s")]
            t.update(status="not measured", reason="; ".join(why))
        else:
            v = r["examples_per_s"] / b["examples_per_s"]
            t.update(value=v, status="met" if v >= need else "missed")
        out.append(t)
    return out


def cpu_markdown(res: dict) -> str:
    st = res["settings"]
    rounds = int(st.get("rounds", 1))
    lines = [f"CPU end-to-end DP-SGD step, fp32, median of {st['steps']} steps after {st['warmup']} warm-up steps "
             "(times the config's steps_mult), each method in its own process, "
             + ("one run." if rounds == 1 else f"{rounds} rounds round-robin with the timed steps pooled per method."),
             "", f"Machine: {res['machine_line']}", "", f"Command: `{res['machine']['command']}`", ""]
    loads = [r["loadavg_1_5_15"][0] for r in res["rows"] if r.get("loadavg_1_5_15")]
    if loads:
        lines += [f"Load average (1 min) at the end of each method: {min(loads):.1f}-{max(loads):.1f} on "
                  f"{res['machine'].get('cpu_count')} cores (a shared machine: timings are noisy).", ""]
    by = {}
    for r in res["rows"]:
        by.setdefault(r["config"], []).append(r)
    for cfg, rows in by.items():
        c = res["settings"]["configs"][cfg]
        mult = int(c.get("steps_mult", 1))
        lines += [f"### {cfg} ({c['model']}, batch {c['batch']}, {st['steps'] * mult} timed steps"
                  + (f" per round, {rounds} rounds)" if rounds > 1 else ")"), "",
                  "| method | step ms (median, p10-p90) | examples/s | vs non-private | vs non-private (fastest "
                  "steps) | vs Opacus hooks / vmap | noise + update ms (share of step) |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.get("status") != "ok":
                lines.append(f"| {r['method']} | {r.get('status')}: {str(r.get('reason', ''))[:90]} | | | | | |")
                continue
            vs = r.get("speedup_vs_opacus-hooks", r.get("speedup_vs_jax-vmap"))
            nu = (r.get("notes") or {}).get("noise_update_ms")
            lines.append(
                f"| {r['method']} | {r['step_ms_median']:.1f} ({r['step_ms_p10']:.1f}-{r['step_ms_p90']:.1f}) "
                f"| {r['examples_per_s']:.1f} | "
                + (f"{r['ratio_vs_nonprivate']:.2f}x" if r.get("ratio_vs_nonprivate") else "-") + " | "
                + (f"{r['ratio_vs_nonprivate_fastest']:.2f}x" if r.get("ratio_vs_nonprivate_fastest") else "-") + " | "
                + (f"{vs:.2f}x" if vs else "-") + " | "
                + (f"{nu:.1f} ({100 * r['noise_update_share']:.0f}%)" if nu is not None else "-") + " |")
        lines.append("")
    lines += ["Targets (issue 12, ratios of examples/s from this run):", "",
              "| config | method | vs | need | measured | status |", "|---|---|---|---|---|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['config']} | {t['method']} | {t['baseline']} | >= {t['need']}x | "
                     + (f"{t['value']:.2f}x" if "value" in t else "-") + f" | {t['status']}"
                     + (f" ({t['reason']})" if t.get("reason") else "") + " |")
    return "\n".join(lines) + "\n"


def _finish_cpu(args, info, rows, settings, t_run) -> int:
    """Writes <out>/cpu-<date>.json and .md (the CPU benchmark) and prints the table."""
    try:
        import jax

        info["jax_backend"] = jax.default_backend()
    except Exception:  # noqa: BLE001
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg_1_5_15_at_end"] = list(os.getloadavg())
    cpu_ratios(rows)
    settings.update(clip_norm=CLIP_NORM, noise_multiplier=NOISE_MULTIPLIER, lr=LR, momentum=MOMENTUM,
                    optimizer="SGD momentum", wall_s=time.perf_counter() - t_run,
                    dpprims_step="DPEngine.backward / dpprims.jax.clipped_grad + dpprims' certified-tails noise and "
                                 "fused SGD update (add_noise_and_step / noisy_update), as the trainer runs it")
    res = dict(kind="e2e-cpu", machine_line=info["machine_line"], machine=info, settings=settings, rows=rows,
               targets=cpu_targets(rows))
    res["markdown"] = cpu_markdown(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    day = info["date"][:10]
    path, n = out / f"cpu-{day}.json", 2
    while path.exists():
        path, n = out / f"cpu-{day}-{n}.json", n + 1
    write_json(path, res)
    path.with_suffix(".md").write_text(res["markdown"])
    print()
    print(res["markdown"])
    print(f"results: {path}\nmarkdown: {path.with_suffix('.md')}\nwall time: {time.perf_counter() - t_run:.1f} s")
    return 0


def _split(v, allowed, name):
    vals = [s.strip() for s in v.split(",") if s.strip()]
    bad = [s for s in vals if s not in allowed]
    if bad:
        raise SystemExit(f"{name}: unknown {bad}; choose from {list(allowed)}")
    return vals


def merge_rounds(group: list, methods: list) -> list:
    """One row per method from the rounds of ``--rounds``: the first successful round's row with
    the timed steps of every successful round pooled (median and 10/90% quantiles recomputed,
    examples/s from the pooled median) and the per-round medians in ``round_medians_ms``; a
    method that never succeeded keeps its first row (its status and reason)."""
    out = []
    for m in methods:
        rs = [r for r in group if r.get("method") == m]
        ok = [r for r in rs if r.get("status") == "ok" and r.get("step_ms_all")]
        if not ok:
            out.append(rs[0])
            continue
        row = dict(ok[0])
        times = [t for r in ok for t in r["step_ms_all"]]
        med = quantile(times, 0.5)
        row.update(step_ms_all=times, steps=len(times), step_ms_median=med, step_ms_p10=quantile(times, 0.1),
                   step_ms_p90=quantile(times, 0.9), examples_per_s=row["batch"] / (med * 1e-3),
                   rounds=len(ok), round_medians_ms=[r["step_ms_median"] for r in ok])
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for the JSON and the PNG")
    ap.add_argument("--smoke", action="store_true", help="tiny models and batches, 2 timed steps (CPU proof of the harness)")
    ap.add_argument("--interpret", action="store_true",
                    help="set TRITON_INTERPRET=1 in the workers (CPU: dpprims' Triton kernels through the interpreter)")
    ap.add_argument("--configs", default=None, help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--precisions", default=None, help="comma list of bf16,fp32,tf32 (default bf16,fp32; smoke: fp32)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of methods")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps, compilation included (default 3; smoke 1)")
    ap.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch search")
    ap.add_argument("--max-batch-time", type=float, default=None, help="seconds per method for the search (default 120)")
    ap.add_argument("--max-batch-cap", type=int, default=None, help="largest batch tried (default 65536; smoke 2x batch)")
    ap.add_argument("--worker-timeout", type=float, default=None, help="seconds per method process (default 900)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds for the whole run; methods not started in time are recorded as skipped")
    ap.add_argument("--isolation", choices=("process", "fork"), default=None,
                    help="process: a fresh interpreter per method (default); fork: fork a pre-loaded parent "
                         "(default with --smoke on CPU: saves the imports)")
    ap.add_argument("--tag", default="e2e", help="file name tag: <gpu>-<date>-<tag>.json")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: cuda when a GPU is present, else cpu. cpu (without --smoke) runs CPU_CONFIGS "
                         "in fp32 and writes <out>/cpu-<date>.json and .md")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads per worker for torch (default: all cores; smoke: 1)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run each config's methods this many times, round-robin (a fresh process each time), "
                         "and pool their timed steps: on a shared machine whose speed drifts, every method then "
                         "samples the same stretches of time (default 1)")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        ensure_dpprims()
        _worker_main(*args.worker)
        return 0

    t_run = time.perf_counter()
    smoke = args.smoke

    import torch  # the parent needs torch only for the device name

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch")
    device = args.device if args.device != "auto" else ("cuda" if cuda else "cpu")
    cuda = device == "cuda"
    cpu_full = device == "cpu" and not smoke  # the CPU benchmark (issue 12)
    table = SMOKE_CONFIGS if smoke else (CPU_CONFIGS if cpu_full else CONFIGS)
    configs = _split(args.configs, table, "--configs") if args.configs else list(table)
    precisions = _split(args.precisions, PRECISIONS, "--precisions") if args.precisions else (
        ["fp32"] if smoke or cpu_full else ["bf16", "fp32"])
    methods = _split(args.methods, METHODS, "--methods")
    steps = args.steps or (2 if smoke else 5 if cpu_full else 20)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 2 if cpu_full else 3)
    search_time = args.max_batch_time or (30.0 if smoke else 120.0)
    timeout = args.worker_timeout or (300.0 if smoke else 900.0)
    if cpu_full:
        print("note: CPU run (no GPU used): dpprims runs its plain-torch / jnp paths; the numbers say "
              "nothing about GPU speed", file=sys.stderr)
    isolation = args.isolation or ("fork" if smoke and not cuda and hasattr(os, "fork") else "process")
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not cuda:
        os.environ.pop("TRITON_INTERPRET", None)  # CPU smoke: dpprims' plain-torch / jnp paths
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if smoke and not cuda:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + SMOKE_XLA_FLAGS).strip()
    if isolation == "fork":
        # load the heavy modules once; each forked worker starts with them imported (no
        # framework state is created in the parent: no device is touched before the fork)
        ensure_dpprims()
        for name in ("torch._dynamo", "opacus", "jax", "flax.linen", "optax", "dpprims.torch", "dpprims.jax",
                     "dpprims.models.jax_resnet", "dpprims.models.torch_resnet", "dpprims.bindings.torch.update"):
            try_import(name)

    # no CUDA context in the parent while the workers run (it would hold device memory)
    info = machine_info(query_device=False)
    print(f"machine: {info['machine_line']}\ncommand: {info['command']}\nisolation: {isolation}", flush=True)
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    rows = []
    for cfg in configs:
        base = dict(table[cfg])
        for prec in precisions:
            group = []
            for _ in range(args.rounds):
                for method in methods:
                    mult = int(base.get("steps_mult", 1))
                    spec = dict(config=cfg, precision=prec, method=method, device=device, steps=steps * mult,
                                warmup=warmup * mult, interpret=bool(args.interpret),
                                **{k: v for k, v in base.items() if k not in ("search", "steps_mult")})
                    spec["search"] = bool(base.get("search")) and not args.no_max_batch
                    if smoke and method.startswith(("jax", "dpprims-jax")) and not args.max_batch_cap:
                        spec["search"] = False  # each probe recompiles: only with an explicit --max-batch-cap
                        spec["search_skipped"] = "smoke: JAX probes recompile; pass --max-batch-cap to search"
                    spec["search_cap"] = args.max_batch_cap or (2 * base["batch"] if smoke else 65536)
                    spec["search_time"] = search_time
                    if smoke and not cuda:
                        spec["cpu_threads"] = args.threads or 1
                    elif not cuda:
                        spec["cpu_threads"] = args.threads or os.cpu_count() or 1
                    elapsed = time.perf_counter() - t_run
                    if args.time_budget is not None and elapsed > args.time_budget:
                        row = {k: spec[k] for k in ("config", "precision", "method", "batch", "model", "image")}
                        row.update(status="skipped",
                                   reason=f"time budget {args.time_budget:.0f} s spent before it started")
                    else:
                        left = (timeout if args.time_budget is None
                                else max(30.0, min(timeout, args.time_budget - elapsed + 30)))
                        row = _run_isolated(spec, isolation, left)
                    group.append(row)
                    eps = row.get("examples_per_s")
                    print(f"  {cfg:<14} {prec:<5} {method:<17} {row['status']:<8} "
                          + (f"{eps:10.1f} ex/s  step {row['step_ms_median']:.1f} ms" if eps else row.get("reason", ""))
                          + (f"  ({row.get('process_s', 0):.1f} s)" if row.get("process_s") else ""), flush=True)
            rows.extend(merge_rounds(group, methods) if args.rounds > 1 else group)

    info = machine_info(query_device=True)
    if cpu_full:
        return _finish_cpu(args, info, rows, dict(configs={c: table[c] for c in configs}, precisions=precisions,
                                                  methods=methods, steps=steps, warmup=warmup, isolation=isolation,
                                                  device=device, threads=args.threads or os.cpu_count(),
                                                  rounds=args.rounds), t_run)
    targets = evaluate_targets(rows, smoke=smoke)
    settings = dict(smoke=smoke, configs={c: table[c] for c in configs}, precisions=precisions, methods=methods,
                    steps=steps, warmup=warmup, isolation=isolation, device=device, interpret=bool(args.interpret),
                    max_batch=not args.no_max_batch, max_batch_time=search_time, clip_norm=CLIP_NORM,
                    noise_multiplier=NOISE_MULTIPLIER, lr=LR, momentum=MOMENTUM, optimizer="SGD momentum",
                    torch_fp32="TF32 off (cuBLAS and cuDNN)", jax_fp32="jax_default_matmul_precision=highest",
                    wall_s=time.perf_counter() - t_run)
    res = dict(kind="e2e", machine_line=info["machine_line"], machine=info, settings=settings, rows=rows, targets=targets)
    from plot import full_markdown, plot

    res["markdown"] = full_markdown(res)
    path = results_path(args.out, info, args.tag + ("-smoke" if smoke else ""))
    png = path.with_suffix(".png")
    try:
        plot(res, png)
        res["plot"] = png.name
    except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the numbers
        res["plot_error"] = f"{type(e).__name__}: {e}"
    write_json(path, res)
    print()
    print(res["markdown"])
    print(f"\nresults: {path}" + (f"\nplot: {png}" if res.get("plot") else f"\nplot failed: {res.get('plot_error')}"))
    print(f"wall time: {time.perf_counter() - t_run:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
