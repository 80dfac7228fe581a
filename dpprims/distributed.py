"""Data-parallel DP-SGD: several processes (GPUs, hosts) share one Poisson logical batch, and the
Gaussian noise is still drawn exactly ONCE per step (docs/DISTRIBUTED.md).

One step on W ranks (torch.distributed; NCCL on GPUs, gloo on CPU; launched by torchrun, by
``dpprims train --nproc N`` or by :func:`spawn`):

1. The logical batch is sampled GLOBALLY. Seeded mode: every rank runs the same seeded Poisson
   sampler and gets the same indices with no communication (the seeds are checked equal on all
   ranks once, when the trainer is built, and the sampled indices are compared every
   ``check_every`` steps). Secure mode: OS entropy differs per rank, so rank 0 samples and
   broadcasts the indices (K int64 per step, noise seed once).
2. :func:`shard_logical_batch` splits the K indices into W contiguous, disjoint chunks (sizes
   differ by at most one; no example is processed by two ranks) and each chunk into
   :func:`physical_batches_per_rank` physical batches of the fixed size P, padded with
   all-padding batches so that every rank runs the SAME number of forward/backward passes
   (collectives must match).
3. Each rank accumulates its clipped per-example gradient sums (DPEngine) into flat fp32
   buckets that back the parameters' ``.grad``. During the LAST physical batch a bucket's
   all-reduce (SUM, async) is launched as soon as the DPEngine has written the clipped sums of
   every layer in it, so communication overlaps the clipped weight-gradient GEMMs of the layers
   that follow (:class:`GradBucketReducer`). Buckets are always launched in the same order on
   every rank, whatever the data.
4. After the all-reduce every rank holds the same sum_i c_i g_i over the whole logical batch
   and adds the SAME noise: dpprims' counter-based Philox noise keyed by (seed, step, parameter
   range, stream 0) - exactly the noise a single process would add - fused with /(q*N) and the
   optimizer update. The total noise variance is sigma^2 C^2 whatever W, and the parameters stay
   bit-identical on all ranks without a broadcast (checked every ``check_every`` steps).
5. The accountant's epsilon, the logs, the progress bar and the checkpoints live on rank 0; a
   resumed run loads the checkpoint on every rank (shared filesystem across hosts).

Why "same noise on every rank after the reduce" and not "rank 0 adds noise before the reduce":
the fused noise + normalise + update kernel reads the reduced sum once and writes the
parameters once, so the noise costs no extra pass and no extra communication, and every rank
ends the step with identical parameters. Failure modes, and what guards them: (a) ranks with
different noise seeds would drift apart and each rank's model would carry its own noise - the
seed is broadcast from rank 0 (secure / unseeded) or checked equal (seeded) at start-up, and the
parameter fingerprints are compared every ``check_every`` steps; (b) an all-reduce that
returned different sums on different ranks (never seen with NCCL/gloo, whose ring and tree
algorithms broadcast the reduced chunks) is caught by the same fingerprint check; (c) every rank
knows the noise (same trust domain as the gradients, which every rank sees anyway).
Adding sigma/sqrt(W) of its own stream on every rank before the SUM would also be private with
the right variance, but a different draw for every W (no reproducing or resuming a run on
another number of GPUs); adding full-variance noise on every rank before the SUM (the classic
mistake) multiplies the noise std by sqrt(W), which the tests reject.

Host-side collectives go through a small communicator (:class:`TorchComm`) with a
framework-neutral interface (broadcast of ints / indices, sum of float64 scalars, gather of
ints, barrier), which :class:`dpprims.trainer.Trainer` uses. It counts the bytes every
collective moves (``comm.traffic``), which is how the per-step communication volume in
docs/DISTRIBUTED.md was measured.

JAX: :func:`make_sharded_clipped_sum` and :func:`noisy_gradient` are the same design with
``shard_map`` over a 1-D device Mesh (psum of the per-device clipped sums, then the same
stream-0 Philox noise on every device after the psum); :func:`jax_initialize` wraps
``jax.distributed.initialize`` for several hosts.

This module imports torch and jax lazily: the numpy-only helpers (sharding arithmetic) are used
by the framework-neutral trainer loop.
"""
from __future__ import annotations

import os
import socket
import sys
from contextlib import closing
from dataclasses import dataclass

import numpy as np

__all__ = [
    "TorchComm", "GradBucketReducer", "env_world", "in_distributed_env", "shard_logical_batch",
    "physical_batches_per_rank", "spawn", "free_port", "ring_allreduce_bytes", "broadcast_module_",
    "tensor_fingerprint",
    "jax_initialize", "data_mesh", "make_sharded_clipped_sum", "noisy_gradient",
]


# ============================================================================ numpy-only helpers
def physical_batches_per_rank(batch_size: int, world_size: int, physical_batch_size: int) -> int:
    """ceil(ceil(K / W) / P), at least 1: the number of physical batches EVERY rank runs for a
    logical batch of K examples (the largest chunk decides; smaller chunks are padded with
    all-padding batches). K = 0 still gives one all-padding batch per rank: the step happens."""
    if world_size < 1 or physical_batch_size < 1 or batch_size < 0:
        raise ValueError(f"need K >= 0, W >= 1, P >= 1; got K={batch_size}, W={world_size}, "
                         f"P={physical_batch_size}")
    per_rank = -(-int(batch_size) // int(world_size))
    return max(1, -(-per_rank // int(physical_batch_size)))


def shard_logical_batch(sampler, indices: np.ndarray, rank: int, world_size: int):
    """This rank's physical batches of a GLOBAL logical batch.

    The K indices are split into W contiguous chunks (``np.array_split``: sizes differ by at most
    one, chunks are disjoint and cover the batch: no example is processed by two ranks, none is
    dropped). Rank r's chunk is cut into physical batches of ``sampler.physical_batch_size`` rows
    with a mask and padded to :func:`physical_batches_per_rank` batches, the same count on every
    rank. Returns ``(local_indices, [(idx [P], mask [P]), ...])``.

    Edge cases: K = 0 or K < W (some chunks empty) - those ranks run all-padding batches, which
    contribute exactly nothing but keep the collectives matched.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    indices = np.asarray(indices, dtype=np.int64)
    local = np.array_split(indices, world_size)[rank]
    n = physical_batches_per_rank(indices.size, world_size, sampler.physical_batch_size)
    return local, sampler.physical_batches(local, num_batches=n)


def ring_allreduce_bytes(nbytes: int, world_size: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of ``nbytes``:
    2 (W - 1) / W * nbytes (reduce-scatter + all-gather)."""
    return 0.0 if world_size <= 1 else 2.0 * (world_size - 1) / world_size * nbytes


def env_world() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) from the environment torchrun sets (defaults 0, 1, 0)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent distributed environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


def in_distributed_env() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1 and MASTER_ADDR)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def free_port() -> int:
    """A free TCP port on localhost (for a local rendezvous)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return int(s.getsockname()[1])


# ============================================================================ torch: communicator
class TorchComm:
    """Host-side collectives of data-parallel training over torch.distributed.

    Build with :meth:`from_env` (torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
    MASTER_PORT); it initialises the default process group if needed: ``backend="auto"`` is NCCL
    when CUDA is available (and sets this process's GPU to ``cuda:LOCAL_RANK``), gloo otherwise.

    Attributes: ``rank``, ``world_size``, ``local_rank``, ``is_main`` (rank 0), ``device`` (where
    collective tensors live: ``cuda:LOCAL_RANK`` for NCCL, cpu for gloo), ``traffic``
    ({kind: bytes this rank passed to collectives of that kind}) and ``calls`` ({kind: count}).
    """

    def __init__(self, group=None, device=None) -> None:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("TorchComm needs an initialised process group (use TorchComm.from_env())")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank)))
        self.backend = dist.get_backend(group)
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if self.backend == "nccl" else "cpu"
        self.device = torch.device(device)
        self.traffic: dict = {}
        self.calls: dict = {}

    @classmethod
    def from_env(cls, backend: str = "auto", timeout_s: float = 1800.0) -> "TorchComm":
        import datetime

        import torch
        import torch.distributed as dist

        rank, world, local = env_world()
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            if local >= torch.cuda.device_count():
                raise RuntimeError(f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPU(s): "
                                   "NCCL needs one GPU per process (fewer processes, or --dist-backend gloo)")
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            if "MASTER_PORT" not in os.environ:
                if world > 1:
                    raise RuntimeError("MASTER_PORT is not set: launch with torchrun or dpprims train --nproc")
                os.environ["MASTER_PORT"] = str(free_port())
            dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _count(self, kind: str, t) -> None:
        self.traffic[kind] = self.traffic.get(kind, 0) + t.numel() * t.element_size()
        self.calls[kind] = self.calls.get(kind, 0) + 1

    # -- tensor collectives (used by the torch backend) ------------------------------------
    def all_reduce_(self, t, async_op: bool = False):
        """In-place SUM over ranks; returns the Work handle when async_op."""
        import torch.distributed as dist

        self._count("all_reduce", t)
        return dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=async_op)

    def broadcast_(self, t, src: int = 0) -> None:
        import torch.distributed as dist

        self._count("broadcast", t)
        dist.broadcast(t, src=src, group=self.group)

    # -- host values (framework-neutral interface used by the Trainer) ----------------------
    def broadcast_ints(self, values) -> list:
        """Rank 0's list of int64 values, on every rank (other ranks pass a list of the same length)."""
        import torch

        t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=self.device)
        self.broadcast_(t)
        return [int(v) for v in t.cpu().tolist()]

    def broadcast_indices(self, indices) -> np.ndarray:
        """Rank 0's int64 index array, on every rank (other ranks may pass None)."""
        import torch

        n = self.broadcast_ints([0 if indices is None else len(indices)])[0]
        if self.is_main:
            t = torch.as_tensor(np.asarray(indices, dtype=np.int64)).to(self.device)
        else:
            t = torch.empty(n, dtype=torch.int64, device=self.device)
        if n:
            self.broadcast_(t)
        return t.cpu().numpy().astype(np.int64, copy=False)

    def all_reduce_sum(self, values) -> np.ndarray:
        """Element-wise sum over ranks of a float64 vector (step statistics, evaluation)."""
        import torch

        t = torch.tensor(np.asarray(values, dtype=np.float64), device=self.device)
        self.all_reduce_(t)
        return t.cpu().numpy()

    def all_gather_ints(self, values) -> list:
        """Every rank's list of int64 values (same length on all ranks), indexed by rank."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=self.device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        self._count("all_gather", t)
        dist.all_gather(out, t, group=self.group)
        return [[int(v) for v in o.cpu().tolist()] for o in out]

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(group=self.group, device_ids=[self.device.index])
        else:
            dist.barrier(group=self.group)

    def destroy(self) -> None:
        """Tear the group down together: a barrier first, because gloo aborts a process
        ('terminate called without an active exception') when it destroys its group while a
        peer is still closing its connections."""
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                if dist.get_world_size() > 1:
                    dist.barrier()
            finally:
                dist.destroy_process_group()


# ============================================================================ torch: gradient all-reduce
@dataclass
class _Bucket:
    params: list
    handlers: set
    buffer: object  # flat tensor
    views: list
    work: object = None


class GradBucketReducer:
    """Sums the clipped gradient sums over ranks, overlapping the all-reduce with the DPEngine's
    clipped weight-gradient GEMMs.

    The parameters are grouped, in the DPEngine's handler order (the order in which it writes the
    clipped sums), into buckets of about ``bucket_cap_mb`` (the first one ``first_bucket_mb``, so
    that communication starts early); a handler's parameters never straddle two buckets. Each
    bucket is one flat tensor and the parameters' ``.grad`` are views into it (the engine adds
    into ``.grad`` in place), so the all-reduce needs no copy.

    ``arm()`` before the last physical batch of a step: while that batch's clipped sums are
    written, a bucket's async all-reduce is launched as soon as all its layers are done (and all
    earlier buckets are launched: the launch ORDER is the same on every rank, whatever layers a
    batch reaches, so the collectives always match). ``finish()`` launches what is left and waits
    for all of them: then every ``.grad`` holds the sum over ranks. ``zero_()`` clears the
    buckets for the next step.

    Robustness: if a ``.grad`` stopped being a bucket view (someone set it to None or to a new
    tensor), ``finish`` copies it back into the bucket before reducing (``.grad`` is the truth;
    None counts as zero), then restores the view.
    """

    def __init__(self, comm: TorchComm, params, engine=None, *, bucket_cap_mb: float = 25.0,
                 first_bucket_mb: float = 1.0) -> None:
        import torch

        self.comm = comm
        params = list(params)
        ids = {id(p) for p in params}
        order, owner = [], {}
        for h in (engine.handlers if engine is not None else []):
            for p in h.module.parameters(recurse=False):
                if id(p) in ids and id(p) not in owner:
                    owner[id(p)] = h
                    order.append(p)
        order += [p for p in params if id(p) not in owner]  # not owned by a handler: last bucket(s)
        groups, cur, cur_bytes, cur_key, last_owner = [], [], 0, None, object()
        cap = min(first_bucket_mb, bucket_cap_mb) * 2**20
        for p in order:
            key = (p.device, p.dtype)
            h = owner.get(id(p))
            same_layer = h is not None and h is last_owner
            if cur and not same_layer and (cur_bytes >= cap or key != cur_key):
                groups.append(cur)
                cur, cur_bytes = [], 0
                cap = bucket_cap_mb * 2**20
            cur.append(p)
            cur_bytes += p.numel() * p.element_size()
            cur_key, last_owner = key, h
        if cur:
            groups.append(cur)
        self.buckets: list = []
        self._bucket_of_handler: dict = {}
        for gi, g in enumerate(groups):
            buf = torch.zeros(sum(p.numel() for p in g), dtype=g[0].dtype, device=g[0].device)
            views, off = [], 0
            for p in g:
                views.append(buf[off:off + p.numel()].view(p.shape))
                off += p.numel()
            hs = {owner[id(p)] for p in g if id(p) in owner}
            self.buckets.append(_Bucket(params=g, handlers=hs, buffer=buf, views=views))
            for h in hs:
                self._bucket_of_handler[id(h)] = gi
        self._armed = False
        self._done: set = set()
        self._next = 0
        if engine is not None:
            for h in engine.handlers:
                if id(h) in self._bucket_of_handler:
                    self._wrap(h)
        self.zero_()

    @property
    def num_bytes(self) -> int:
        """Bytes all-reduced per step (all buckets)."""
        return sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets)

    def _wrap(self, handler) -> None:
        original = handler.accumulate_clipped
        reducer = self

        def accumulate_clipped(c):
            out = original(c)
            reducer._layer_done(handler)
            return out

        handler.accumulate_clipped = accumulate_clipped  # instance attribute shadows the method

    def arm(self) -> None:
        self._armed = True

    def _layer_done(self, handler) -> None:
        if not self._armed:
            return
        self._done.add(id(handler))
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
            if not all(id(h) in self._done for h in b.handlers):
                break
            self._launch(b)

    def _launch(self, b: _Bucket) -> None:
        for p, v in zip(b.params, b.views):
            g = p.grad
            if g is None or g.data_ptr() != v.data_ptr() or g.shape != v.shape:
                if g is None:
                    v.zero_()
                else:
                    v.copy_(g)
                p.grad = v
        b.work = self.comm.all_reduce_(b.buffer, async_op=True)
        self._next += 1

    def finish(self) -> None:
        """Launch the remaining buckets (in order), then wait for every all-reduce."""
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
                b.work = None
        self._armed = False

    def zero_(self) -> None:
        for b in self.buckets:
            if b.work is not None:
                raise RuntimeError("GradBucketReducer.zero_ while an all-reduce is in flight")
            b.buffer.zero_()
            for p, v in zip(b.params, b.views):
                p.grad = v
        self._armed = False
        self._done = set()
        self._next = 0


def broadcast_module_(comm: TorchComm, module) -> None:
    """Copy rank 0's parameters and buffers into every rank's module (once, at start-up)."""
    import torch

    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_contiguous():
                comm.broadcast_(t.data)
            else:
                buf = t.data.contiguous()
                comm.broadcast_(buf)
                t.data.copy_(buf)


def tensor_fingerprint(tensors) -> int:
    """An exact int64 checksum of the BITS of a list of tensors (position-weighted, wrapping):
    equal on two ranks iff (with overwhelming probability) the tensors are bit-identical.
    Integer arithmetic, so the result does not depend on the reduction order."""
    import torch

    acc = None
    for i, t in enumerate(tensors):
        t = t.detach().contiguous().reshape(-1)
        view = {4: torch.int32, 2: torch.int16, 8: torch.int64, 1: torch.uint8}[t.element_size()]
        bits = t.view(view).to(torch.int64)
        w = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device) * (2 * i + 1)
        s = (bits * w).sum()
        acc = s if acc is None else acc + s
    return 0 if acc is None else int(acc)


# ============================================================================ launching
def _spawn_entry(local_rank: int, fn, args, world_size: int, port: int, env: dict) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "OMP_NUM_THREADS" in env and "torch" in sys.modules:  # torch may already be imported: apply it
        sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))
    fn(*args)


def spawn(fn, nproc: int, args: tuple = (), *, env: dict | None = None, join: bool = True):
    """Run ``fn(*args)`` in ``nproc`` fresh local processes with torchrun's environment
    (RANK = LOCAL_RANK = 0..nproc-1, WORLD_SIZE, MASTER_ADDR = 127.0.0.1, a free MASTER_PORT, and
    OMP_NUM_THREADS = 1 unless set, like torchrun),
    started with the 'spawn' method (CUDA-safe). ``fn`` must be importable (module level) and
    typically calls ``TorchComm.from_env()``. Raises if any process fails."""
    import torch.multiprocessing as mp

    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    port = free_port()
    env = dict(env or {})
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does: N processes x all cores oversubscribes
    return mp.start_processes(_spawn_entry, args=(fn, tuple(args), nproc, port, env), nprocs=nproc,
                              join=join, start_method="spawn")


# ============================================================================ JAX
def jax_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None, **kwargs) -> None:
    """``jax.distributed.initialize`` for multi-host JAX (one process per host, or per GPU).

    Without arguments it reads JAX's own variables or, failing those, torchrun-style ones:
    ``MASTER_ADDR:MASTER_PORT`` (coordinator), ``WORLD_SIZE`` (processes), ``RANK`` (this
    process). Every process then runs the same program; :func:`data_mesh` spans all devices of
    all processes and each process feeds its share of the global batch."""
    import jax

    if coordinator_address is None and "MASTER_ADDR" in os.environ and "JAX_COORDINATOR_ADDRESS" not in os.environ:
        coordinator_address = f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '1234')}"
        num_processes = int(os.environ.get("WORLD_SIZE", "1")) if num_processes is None else num_processes
        process_id = int(os.environ.get("RANK", "0")) if process_id is None else process_id
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **kwargs)


def data_mesh(devices=None, axis: str = "data"):
    """A 1-D Mesh over ``devices`` (default: every device of every process) named ``axis``."""
    import jax
    from jax.sharding import Mesh

    devs = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devs.reshape(-1), (axis,))


def _shard_map(f, mesh, in_specs, out_specs):
    """shard_map WITHOUT the varying-manual-axes check, on purpose.

    With the check on (jax's default), a value created inside the body without depending on the
    sharded inputs - such as the zero "perturbations" that dpprims.jax.clipped_grad differentiates
    against to obtain the per-example output gradients - is typed as device-INVARIANT, and the
    transpose of its implicit broadcast to the device-varying loss is a psum: jax.grad would
    return, on every device, row i's output gradient SUMMED OVER DEVICES. The per-example norms
    and clip factors would then mix examples of different devices (wrong, and not private).
    Without the check the body is plain per-device SPMD code and the only collective is the
    explicit psum below. (tests/test_distributed.py compares every device's sums with an
    unsharded run, which catches this.)"""
    import jax

    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # older jax

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def make_sharded_clipped_sum(loss_fn, mesh, *, max_grad_norm, clipping: str = "flat", axis: str | None = None,
                             **clip_kwargs):
    """A jitted ``f(params, batches, masks) -> (clipped_sum, stats)`` over a data-parallel Mesh:
    the clipped gradient sum of one whole logical batch, summed over devices ONCE.

    ``batches``: a pytree of arrays [nb, W * P, ...] (nb physical batches per device, W devices,
    P rows each) and ``masks`` [nb, W * P], both sharded along ``axis`` on their second dimension
    (device d gets rows d*P .. (d+1)*P - 1 of every physical batch: no row is processed twice);
    ``params`` are replicated. Inside ``shard_map`` every device runs
    :func:`dpprims.jax.clipped_grad` (the fused kernels) on its nb physical batches (a
    ``lax.scan``, summing locally), then ONE ``lax.psum`` over ``axis`` gives every device
    sum_i c_i g_i over all nb * W * P rows. No noise here: call :func:`noisy_gradient` once.
    Each distinct nb compiles once; pad to a fixed nb (``physical_batches(..., num_batches=)``)
    to compile once.

    ``stats``: replicated scalars ``loss_sum`` (over valid rows), ``valid``, ``nonfinite``,
    ``clipped``. Multi-host (after :func:`jax_initialize`): build the global arrays with
    ``jax.make_array_from_process_local_data(NamedSharding(mesh, P(None, axis)), local)`` from
    each process's share; they are used as given.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dpprims.jax import clipped_grad

    axis = axis or mesh.axis_names[0]

    def one(params, batch, mask):
        g, _, aux = clipped_grad(loss_fn, params, batch, max_grad_norm=max_grad_norm, mask=mask,
                                 clipping=clipping, return_aux=True, **clip_kwargs)
        valid = mask != 0
        stats = dict(loss_sum=jnp.sum(jnp.where(valid, aux["losses"], 0.0)).astype(jnp.float32),
                     valid=jnp.sum(valid).astype(jnp.int32), nonfinite=aux["nonfinite"].astype(jnp.int32),
                     clipped=aux["clipped"].astype(jnp.int32))
        return g, stats

    def local(params, batches, masks):
        def body(acc, xs):
            g, st = one(params, *xs)
            return jax.tree_util.tree_map(jnp.add, acc, (g, st)), None

        first = jax.tree_util.tree_map(lambda x: x[0], (batches, masks))
        rest = jax.tree_util.tree_map(lambda x: x[1:], (batches, masks))
        acc, _ = jax.lax.scan(body, one(params, *first), rest)
        return jax.lax.psum(acc, axis)  # the only collective of the step

    sm = _shard_map(local, mesh, in_specs=(P(), P(None, axis), P(None, axis)), out_specs=(P(), P()))
    rep = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(None, axis))
    jitted = jax.jit(sm, out_shardings=(rep, rep))

    def f(params, batches, masks):
        batches = jax.tree_util.tree_map(lambda x: x if _placed(x, data) else jax.device_put(x, data), batches)
        masks = masks if _placed(masks, data) else jax.device_put(masks, data)
        return jitted(params, batches, masks)

    f.jitted = jitted
    return f


def _placed(x, sharding) -> bool:
    """Already where ``f`` wants it: a global (multi-host) array the caller built, or an array
    with exactly ``sharding``."""
    s = getattr(x, "sharding", None)
    if s is None:
        return False
    if not getattr(x, "is_fully_addressable", True):
        return True
    return s == sharding


def noisy_gradient(clipped_sum, *, noise_std, normaliser, seed, step):
    """g = (clipped_sum + noise_std * z) / normaliser with z drawn ONCE for the logical batch.

    ``clipped_sum``: the replicated psum from :func:`make_sharded_clipped_sum` (a pytree).
    z is dpprims' Philox noise (dpprims.bindings.jax.noise.gaussian_noise: 128-bit uniforms,
    |z| <= 13.32) on stream 0, leaf k on the pair range ``dpprims.noise.pair_offsets`` gives it
    in ``tree_leaves`` order - the numbers a single process (torch's add_noise_and_step or JAX's
    noisy_update on the same leaves) would draw. It depends only on (seed, step), so every device
    and host computes the same g: the noise variance is noise_std^2 whatever the number of
    devices, and replicated parameters stay identical (all processes must share the seed:
    broadcast it from process 0 in secure mode). ``normaliser`` is q * N (never the sampled
    size); ``step`` as in noisy_update (never reuse one with the same seed).

    To noise AND step the optimizer in one fused pass, call
    ``dpprims.bindings.jax.update.noisy_update(params, clipped_sum, opt_state, rank=0, ...)`` on
    the replicated sum instead: the same noise. Works under jit.
    """
    import jax

    from dpprims import noise as _nz
    from dpprims.bindings.jax.noise import gaussian_noise

    leaves, treedef = jax.tree_util.tree_flatten(clipped_sum)
    offsets, _ = _nz.pair_offsets([int(np.prod(np.shape(x))) for x in leaves])
    out = [gaussian_noise(x, std=noise_std, seed=seed, step=step, pair_offset=off, rank=0, normaliser=normaliser,
                          x=x) for x, off in zip(leaves, offsets)]
    return jax.tree_util.tree_unflatten(treedef, out)
