"""Data-parallel DP training (dpprims.distributed): noise drawn once whatever the world size.

World sizes 2 and 3 run as real gloo process groups spawned with torch.multiprocessing (a free
port on localhost); world size 1 runs a one-process gloo group inside the test process. Every
world runs the same scenarios once (module-level cache) and the tests check their results
against single-process runs of the same logical batches:

* noise off: the update equals the single-process update (up to summation order);
* noise on: the same, and the noise itself is bit-identical to the single-process noise;
* an all-padding logical batch: the parameter change has std sigma*C/(q*N) for W = 1, 2, 3
  (8% bounds on 2,000 weights reject the sqrt(W) of noise added on every rank before the
  all-reduce - which a control run on the same ranks demonstrates);
* no example is processed by two ranks, none is dropped; the replicas stay bit-identical;
* secure mode broadcasts rank 0's batch and seed; resume on all ranks equals an uninterrupted run;
* the all-reduce is launched during the last physical batch (overlap), and the bytes it moves per
  step are measured (MLP exactly; ResNet-18/50 for docs/DISTRIBUTED.md);
* the CLI under a torchrun environment, and ``dpprims train --nproc 2`` (--runslow);
* JAX: shard_map over 1-3 host-platform devices (psum once, noise once).

The workers run the plain-torch path of the ops (TRITON_INTERPRET=0): the kernels are tested on
their own, here the subject is the communication.
"""
import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dpprims.distributed import physical_batches_per_rank, ring_allreduce_bytes, shard_logical_batch, spawn
from dpprims.sampling import PoissonSampler

REPO = Path(__file__).resolve().parents[1]
SIGMA, C, EBS = 1.7, 0.9, 10.0  # the all-padding noise step


@pytest.fixture(autouse=True)
def _plain_torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # inherited by the spawned workers


# ----------------------------------------------------------------------------- sharding (no processes)
@pytest.mark.parametrize("K", [0, 1, 2, 5, 7, 23, 24])
@pytest.mark.parametrize("W", [1, 2, 3, 4])
@pytest.mark.parametrize("P", [1, 3, 5])
def test_shard_logical_batch_is_a_disjoint_cover_with_one_batch_count(K, W, P):
    sampler = PoissonSampler(50, 0.2, P, seed=0)
    indices = np.sort(np.random.default_rng(K).choice(50, size=K, replace=False))
    seen, counts = [], set()
    for r in range(W):
        local, batches = shard_logical_batch(sampler, indices, r, W)
        counts.add(len(batches))
        real = np.concatenate([idx[m] for idx, m in batches])
        np.testing.assert_array_equal(real, local)
        assert all(idx.shape == (P,) and m.shape == (P,) for idx, m in batches)
        seen.append(real)
    assert counts == {physical_batches_per_rank(K, W, P)}, "every rank must run the same number of batches"
    allseen = np.concatenate(seen)
    assert len(allseen) == len(set(allseen.tolist())) == K
    np.testing.assert_array_equal(np.sort(allseen), indices)
    assert max(map(len, seen)) - min(map(len, seen)) <= 1


def test_ring_allreduce_bytes():
    assert ring_allreduce_bytes(100, 1) == 0
    assert ring_allreduce_bytes(100, 2) == 100
    assert ring_allreduce_bytes(100, 4) == 150


# ----------------------------------------------------------------------------- scenarios (run on every rank)
def _data(n=48):
    from dpprims.data import load_dataset

    return load_dataset(f"synthetic:1,5,5:3:{n}", seed=1)


def _plan(data, *, sigma, steps=4, ebs=12.0, pbs=5, C=1.0):
    from dpprims.plan import DPPlan

    return DPPlan.create(num_examples=len(data.x_train), expected_batch_size=ebs, physical_batch_size=pbs,
                         max_grad_norm=C, delta=1e-5, steps=steps, noise_multiplier=sigma)


def _params(backend):
    return {k: v.detach().clone() for k, v in backend.model.state_dict().items()}


def _trainer(dist, *, sigma, optimizer="sgd", init_seed=0, seed=3, secure=False, ckpt=None, resume=False,
             bucket_cap_mb=25.0):
    from dpprims.models import get_model
    from dpprims.trainer import Trainer, TorchBackend

    data = _data()
    plan = _plan(data, sigma=sigma)
    torch.manual_seed(init_seed)  # ranks may start from different weights: rank 0's are broadcast
    model = get_model("mlp", num_classes=3, in_channels=1, input_size=(5, 5), hidden=(16,))
    kw = {} if dist is None else dict(dist=dist, bucket_cap_mb=bucket_cap_mb)
    backend = TorchBackend(model, plan, optimizer=optimizer, lr=0.5, **kw)
    return Trainer(backend, plan, data, seed=None if secure else seed, secure=secure, progress=False, dist=dist,
                   check_every=1, checkpoint_dir=ckpt, resume=resume)


def _run(t, steps, dist=None):
    sampled, local, volume = [], [], []
    sample = t._sample

    def recording_sample():
        idx = sample()
        sampled.append(idx.copy())
        return idx

    t._sample = recording_sample
    for _ in range(steps):
        before = dist.traffic.get("all_reduce", 0) if dist is not None else 0
        t.step()
        local.append(t.last_local_indices.copy())
        volume.append((dist.traffic.get("all_reduce", 0) - before) if dist is not None else 0)
    return dict(params=_params(t.backend), sampled=sampled, local=local, volume=volume,
                fingerprint=t.backend.fingerprint(), noise_seed=t.noise_seed,
                n_params=sum(p.numel() for p in t.backend.params))


def _noise_step(dist):
    """One step on an all-padding logical batch: the update is lr * sigma*C*z/(q*N)."""
    from dpprims.plan import DPPlan
    from dpprims.trainer import Trainer, TorchBackend

    data = _data(40)
    plan = DPPlan.create(num_examples=40, expected_batch_size=EBS, physical_batch_size=3, max_grad_norm=C,
                         delta=1e-5, steps=3, noise_multiplier=SIGMA)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(25, 80), torch.nn.Linear(80, 3))
    backend = TorchBackend(model, plan, optimizer="sgd", lr=1.0, momentum=0.0,
                           **({} if dist is None else dict(dist=dist)))
    t = Trainer(backend, plan, data, seed=11, progress=False, dist=dist, check_every=1)
    before = _params(backend)
    t.sampler.sample = lambda: np.zeros(0, dtype=np.int64)  # an empty logical batch (a real step)
    t.step()
    return (_params(backend)["1.weight"] - before["1.weight"]).flatten().double()


def _scenarios(comm, out_dir: Path) -> dict:
    from dpprims.bindings.torch.noise import gaussian_noise

    r = comm.rank
    res = dict(rank=r, world_size=comm.world_size)
    res["noise_off"] = _run(_trainer(comm, sigma=0.0, init_seed=r), 4, comm)
    res["noise_on"] = _run(_trainer(comm, sigma=0.8, init_seed=r), 4, comm)
    res["adam"] = _run(_trainer(comm, sigma=0.8, optimizer="adam", init_seed=r), 3, comm)
    res["noise_step"] = _noise_step(comm)
    # the classic mistake, as a control: full-variance noise on every rank's stream, then SUM
    z = gaussian_noise(torch.zeros(2000), std=SIGMA * C, seed=11, step=1, rank=r)
    comm.all_reduce_(z)
    res["naive_noise"] = (z / EBS).double()
    res["secure"] = _run(_trainer(comm, sigma=0.8, secure=True), 2, comm)
    # resume: rank 0 writes the checkpoint after 2 steps, every rank loads it and continues
    ck = out_dir / f"ck{comm.world_size}"
    first = _trainer(comm, sigma=0.8, init_seed=r, ckpt=ck)
    _run(first, 2, comm)
    first.save_checkpoint()
    resumed = _trainer(comm, sigma=0.8, init_seed=100 + r, ckpt=ck, resume=True)
    res["resumed_from"] = resumed.step_count
    res["resumed"] = _run(resumed, 2, comm)
    # overlap: with one bucket per layer, every all-reduce is launched during the LAST physical
    # batch's clipped-sum pass, none during the first, all before noisy_step
    t = _trainer(comm, sigma=0.8, init_seed=r, bucket_cap_mb=1e-9)
    b, data = t.backend, t.data
    calls = [comm.calls.get("all_reduce", 0)]
    b.set_noise_seed(5)
    b.start_step(2)
    for j in range(2):
        b.accumulate(data.x_train[5 * j:5 * j + 5], data.y_train[5 * j:5 * j + 5], np.ones(5, bool))
        calls.append(comm.calls.get("all_reduce", 0))
    res["overlap"] = dict(calls=calls, buckets=len(b.reducer.buckets), launched=b.reducer._next)
    b.noisy_step(0)
    res["overlap"]["fingerprint"] = b.fingerprint()
    # ranks with different seeds are refused (on every rank, after comparing)
    try:
        _trainer(comm, sigma=0.8, seed=r)
        res["seed_mismatch"] = None
    except RuntimeError as e:
        res["seed_mismatch"] = str(e)
    return res


def _resnet_volume(comm) -> dict:
    """Bytes the gradient all-reduce moves per step for ResNet-18/50 (ImageNet heads, 1000
    classes), measured on the instrumented communicator (the all-reduce of finish(); no compute:
    the CPU noise path of a 25M-parameter model takes tens of seconds)."""
    from dpprims.models import get_model
    from dpprims.plan import DPPlan
    from dpprims.trainer import TorchBackend

    out = {}
    plan = DPPlan.create(num_examples=100, expected_batch_size=10.0, physical_batch_size=1, max_grad_norm=1.0,
                         delta=1e-5, steps=2, noise_multiplier=1.0)
    for name, classes in (("resnet18", 1000), ("resnet50", 1000), ("resnet18-cifar", 10), ("resnet50-cifar", 10)):
        b = TorchBackend(get_model(name, num_classes=classes, in_channels=3), plan, dist=comm)
        before, calls = comm.traffic.get("all_reduce", 0), comm.calls.get("all_reduce", 0)
        t0 = time.perf_counter()
        b.reducer.arm()
        b.reducer.finish()
        dt = time.perf_counter() - t0
        out[name] = dict(params=sum(p.numel() for p in b.params), bytes=comm.traffic["all_reduce"] - before,
                         collectives=comm.calls["all_reduce"] - calls, buckets=len(b.reducer.buckets),
                         gloo_cpu_seconds=dt)
        b.reducer.zero_()
        del b
    return out


def _cli(comm, out_dir: Path) -> dict:
    """dpprims train under a torchrun-style environment (the worker's env); rank 0 prints."""
    from dpprims import cli

    log = out_dir / "cli_log.jsonl"
    argv = ["train", "--model", "mlp", "--data", "synthetic:1,5,5:3:64", "--epochs", "1", "--expected-batch-size",
            "16", "--physical-batch-size", "8", "--sigma", "1.0", "--device", "cpu", "--no-progress", "--json",
            "--log", str(log), "--checkpoint", str(out_dir / "cli_ck")]
    buf_out, buf_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        result = cli.train(cli._parser().parse_args(argv))  # destroys the process group at the end
    return dict(result=result, stdout=buf_out.getvalue(), stderr=buf_err.getvalue(), log=str(log),
                checkpoint=str(out_dir / "cli_ck"))


def _world_worker(out_dir: str, with_extras: bool) -> None:
    from dpprims.distributed import TorchComm

    out = Path(out_dir)
    torch.set_num_threads(1)  # tiny ops, 2-3 processes on a shared CPU: threads only contend
    comm = TorchComm.from_env("gloo", timeout_s=120)
    try:
        res = _scenarios(comm, out)
        if with_extras:
            res["resnet"] = _resnet_volume(comm)
            res["cli"] = _cli(comm, out)
        with open(out / f"rank{comm.rank}.pkl", "wb") as f:
            pickle.dump(res, f)
    finally:
        comm.destroy()


_WORLDS: dict = {}


def _world(W: int, tmp_path_factory) -> list:
    """Every rank's scenario results for world size W (computed once per test session)."""
    if W not in _WORLDS:
        out = tmp_path_factory.mktemp(f"world{W}")
        if W == 1:  # a one-process gloo group inside the test process
            from dpprims.distributed import TorchComm, free_port

            env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                comm = TorchComm.from_env("gloo", timeout_s=60)
                try:
                    _WORLDS[1] = [_scenarios(comm, out)]
                finally:
                    comm.destroy()
            finally:
                torch.set_num_threads(threads)
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        else:
            spawn(_world_worker, W, (str(out), W == 2))
            _WORLDS[W] = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(W)]
    return _WORLDS[W]


_SINGLE: dict = {}


def _single(key: str):
    """The same scenario in one process without any communicator (the reference)."""
    if key not in _SINGLE:
        if key == "noise_step":
            _SINGLE[key] = _noise_step(None)
        else:
            sigma, opt, steps = dict(noise_off=(0.0, "sgd", 4), noise_on=(0.8, "sgd", 4), adam=(0.8, "adam", 3))[key]
            _SINGLE[key] = _run(_trainer(None, sigma=sigma, optimizer=opt), steps)
    return _SINGLE[key]


WORLD_SIZES = [1, 2, 3]


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("W", WORLD_SIZES)
@pytest.mark.parametrize("key", ["noise_off", "noise_on", "adam"])
def test_update_equals_single_process_update(W, key, tmp_path_factory):
    """Same seed, same logical batches: W ranks give the single-process parameters (up to the
    order of the floating-point sum over ranks). With noise on this also shows the noise is the
    single-process noise, not W draws or a draw scaled by W."""
    ranks = _world(W, tmp_path_factory)
    ref = _single(key)
    for r in ranks:
        for a, b in zip(r[key]["sampled"], ref["sampled"]):
            np.testing.assert_array_equal(a, b)
        for k, v in ref["params"].items():
            torch.testing.assert_close(r[key]["params"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key} {k}: {m}")


@pytest.mark.parametrize("W", WORLD_SIZES)
def test_noise_std_is_sigma_C_over_expected_batch_whatever_the_world_size(W, tmp_path_factory):
    """All-padding logical batch: the parameter change is lr * sigma*C*z/(q*N), z drawn once.
    2,000 weights: the std estimate has relative sd ~1.6%, so 8% bounds (5 sd) reject sqrt(2)
    and sqrt(3) - as the control (every rank adds full noise before the SUM) shows."""
    expected = SIGMA * C / EBS
    ref = _single("noise_step")
    for r in _world(W, tmp_path_factory):
        delta = r["noise_step"]
        assert delta.numel() == 2000
        measured = float(delta.std())
        assert abs(measured / expected - 1) < 0.08, f"W={W} rank {r['rank']}: std {measured} vs {expected}"
        assert abs(float(delta.mean())) < 5 * expected / np.sqrt(delta.numel())
        # with zero clipped sums the update IS the noise: the single-process draw, bit for bit
        assert torch.equal(delta, ref), "the noise differs from the single-process noise"
        naive = float(r["naive_noise"].std())
        if W > 1:
            assert abs(naive / expected - 1) > 0.08, "the control should fail the test's criterion"
            assert abs(naive / (expected * np.sqrt(W)) - 1) < 0.08


@pytest.mark.parametrize("W", WORLD_SIZES)
@pytest.mark.parametrize("key", ["noise_off", "noise_on", "secure"])
def test_no_example_is_processed_twice_and_none_is_dropped(W, key, tmp_path_factory):
    ranks = _world(W, tmp_path_factory)
    steps = len(ranks[0][key]["sampled"])
    for s in range(steps):
        batch = ranks[0][key]["sampled"][s]
        for r in ranks:  # the logical batch is global: every rank drew / received the same one
            np.testing.assert_array_equal(r[key]["sampled"][s], batch)
        seen = np.concatenate([r[key]["local"][s] for r in ranks])
        assert len(seen) == len(set(seen.tolist())), f"step {s}: an example was processed by two ranks"
        np.testing.assert_array_equal(np.sort(seen), batch)


@pytest.mark.parametrize("W", WORLD_SIZES)
def test_replicas_stay_bit_identical(W, tmp_path_factory):
    ranks = _world(W, tmp_path_factory)
    for key in ("noise_off", "noise_on", "adam", "secure", "resumed"):
        fps = {r[key]["fingerprint"] for r in ranks}
        assert len(fps) == 1, f"{key}: fingerprints differ across ranks"
        for r in ranks[1:]:
            for k, v in ranks[0][key]["params"].items():
                assert torch.equal(r[key]["params"][k], v), f"{key}: rank {r['rank']} {k} differs from rank 0"
    assert len({r["overlap"]["fingerprint"] for r in ranks}) == 1


@pytest.mark.parametrize("W", [2, 3])
def test_secure_mode_uses_rank0_batch_and_seed(W, tmp_path_factory):
    ranks = _world(W, tmp_path_factory)
    assert len({r["secure"]["noise_seed"] for r in ranks}) == 1
    assert ranks[0]["secure"]["noise_seed"] != 3  # drawn from OS entropy, not the test's seed


@pytest.mark.parametrize("W", WORLD_SIZES)
def test_resume_on_every_rank_equals_uninterrupted(W, tmp_path_factory):
    for r in _world(W, tmp_path_factory):
        assert r["resumed_from"] == 2
        for k, v in r["noise_on"]["params"].items():
            assert torch.equal(r["resumed"]["params"][k], v), f"rank {r['rank']}: {k} differs after resume"


@pytest.mark.parametrize("W", WORLD_SIZES)
def test_allreduce_is_launched_during_the_last_physical_batch(W, tmp_path_factory):
    for r in _world(W, tmp_path_factory):
        ov = r["overlap"]
        assert ov["buckets"] == 2  # one per Linear layer (weight + bias together)
        c0, c1, c2 = ov["calls"]
        assert c1 == c0, "nothing may be reduced before the last physical batch"
        assert c2 - c0 == ov["buckets"] == ov["launched"], "every bucket launched during the last batch"


@pytest.mark.parametrize("W", WORLD_SIZES)
def test_allreduce_volume_per_step_is_4_bytes_per_parameter_plus_scalars(W, tmp_path_factory):
    for r in _world(W, tmp_path_factory):
        for key in ("noise_off", "noise_on", "adam"):
            n = r[key]["n_params"]
            # gradients (fp32) + the step statistics (loss sum, valid count, non-finite count: 3 x f64)
            assert r[key]["volume"] == [4 * n + 3 * 8] * len(r[key]["volume"])


@pytest.mark.parametrize("W", [2, 3])
def test_ranks_with_different_seeds_are_refused(W, tmp_path_factory):
    for r in _world(W, tmp_path_factory):
        assert r["seed_mismatch"] is not None and "disagree" in r["seed_mismatch"]
        assert "noise_seed" in r["seed_mismatch"]


def test_resnet_allreduce_volume(tmp_path_factory):
    """The measured bytes all-reduced per step for ResNet-18/50 (docs/DISTRIBUTED.md): exactly
    4 bytes per trainable parameter (fp32 clipped sums), in a few buckets."""
    ranks = _world(2, tmp_path_factory)
    vol = ranks[0]["resnet"]
    for name, n in (("resnet18", 11_689_512), ("resnet50", 25_557_032), ("resnet18-cifar", 11_173_962),
                    ("resnet50-cifar", 23_520_842)):
        assert vol[name]["params"] == n
        assert vol[name]["bytes"] == 4 * n
        assert ranks[1]["resnet"][name]["bytes"] == 4 * n
    print(json.dumps(vol, indent=1))


def test_cli_under_torchrun_env_prints_and_logs_on_rank0_only(tmp_path_factory):
    ranks = _world(2, tmp_path_factory)
    r0, r1 = ranks[0]["cli"], ranks[1]["cli"]
    out = json.loads(r0["stdout"].strip())
    assert out["world_size"] == 2 and out["steps"] == 4 and np.isfinite(out["epsilon"])
    assert r1["stdout"] == "" and r1["stderr"] == ""
    assert r1["result"]["epsilon"] == out["epsilon"]  # rank 0's epsilon, on every rank
    assert r1["result"]["test_accuracy"] == out["test_accuracy"]  # sharded evaluation, summed
    lines = [json.loads(x) for x in Path(r0["log"]).read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "step"] == [1, 2, 3, 4]  # once, not once per rank
    assert (Path(r0["checkpoint"]) / "state.json").exists()


@pytest.mark.slow  # ~30 s of process start-up on a shared 2-core CPU; --runslow runs it
def test_cli_nproc_spawns_a_gloo_world():
    """``dpprims train --nproc 2`` end to end (the in-process CLI test above covers train()
    under a torchrun environment; this one covers the spawning)."""
    cmd = [sys.executable, "-m", "dpprims.cli", "train", "--nproc", "2", "--model", "mlp", "--data",
           "synthetic:1,5,5:3:64", "--epochs", "0.5", "--expected-batch-size", "16", "--physical-batch-size", "8",
           "--sigma", "1.0", "--device", "cpu", "--no-progress", "--json"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1, p.stdout  # rank 0 only
    assert json.loads(lines[0])["world_size"] == 2


# ----------------------------------------------------------------------------- JAX (host-platform devices)
def _jax_worker(out_path: str) -> None:
    """Runs in a subprocess with 3 host-platform devices; meshes over the first W = 1, 2, 3."""
    import re

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as PS

    import dpprims.jax as dpj
    from dpprims import noise as nz
    from dpprims.bindings.torch.noise import gaussian_noise as torch_noise
    from dpprims.distributed import _shard_map, data_mesh, make_sharded_clipped_sum, noisy_gradient

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(dpj.Dense(80, name="fc1")(x))  # 25 x 80 = 2,000 weights
            x = dpj.LayerNorm(name="ln")(x)
            return dpj.Dense(3, name="fc2")(x)

    def loss(out, batch):
        return -jnp.take_along_axis(jax.nn.log_softmax(out), batch[1][:, None], axis=1)[:, 0]

    model = MLP()
    loss_fn = dpj.make_loss_fn(model, loss)
    Pb, nb = 4, 2
    rng = np.random.default_rng(0)
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 25), np.float32))["params"]
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    res = dict(n_params=n_params, worlds={})
    @jax.jit
    def unsharded(params, x, y, m):  # the whole W*P rows of each physical batch on one device
        ref = jax.tree.map(jnp.zeros_like, params)
        for j in range(nb):
            gj, _ = dpj.clipped_grad(loss_fn, params, (x[j], y[j]), max_grad_norm=1.0, mask=m[j])
            ref = jax.tree.map(jnp.add, ref, gj)
        return ref

    noisy_fn = jax.jit(lambda z: noisy_gradient(z, noise_std=SIGMA * C, normaliser=EBS, seed=11, step=1))
    # what a single torch process draws for this leaf (same seed, step, pair range, stream 0)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    k = [jax.tree_util.keystr(pth) for pth, _ in leaves].index("['fc1']['kernel']")
    off = nz.pair_offsets([int(np.prod(a.shape)) for _, a in leaves])[0][k]
    res["torch_noise"] = torch_noise(torch.zeros(25 * 80), std=SIGMA * C, seed=11, step=1, pair_offset=off,
                                     normaliser=EBS).double().tolist()
    sizes = {"f32": 4, "s32": 4, "f64": 8, "bf16": 2, "s64": 8}
    for W in (1, 2, 3):
        mesh = data_mesh(jax.devices()[:W])
        f = make_sharded_clipped_sum(loss_fn, mesh, max_grad_norm=1.0)
        dat = NamedSharding(mesh, PS(None, "data"))
        # numpy inputs and checks: every eager jnp op would compile (slow on a shared CPU)
        x = (rng.standard_normal((nb, W * Pb, 25)) * 3).astype(np.float32)
        y = rng.integers(0, 3, (nb, W * Pb)).astype(np.int32)
        m = rng.random((nb, W * Pb)) < 0.75
        xs, ms = jax.device_put((x, y), dat), jax.device_put(m, dat)
        compiled = f.jitted.lower(params, xs, ms).compile()  # f's own program, compiled once
        g, st = compiled(params, xs, ms)
        ref = unsharded(params, x, y, m)
        err = max(float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))
                  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)))
        # noise once: an all-padding logical batch, then noisy_gradient on the replicated sum
        z0, _ = compiled(params, xs, jax.device_put(np.zeros_like(m), dat))
        w = noisy_fn(z0)["fc1"]["kernel"]
        shards = [np.asarray(s.data) for s in w.addressable_shards]
        # the control: every device adds full-variance noise of its own, then psum
        naive = jax.jit(_shard_map(lambda a: jax.lax.psum(
            a + SIGMA * C * jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(11), jax.lax.axis_index("data")),
                                              a.shape), "data") / EBS, mesh, (PS(),), PS()))(z0["fc1"]["kernel"])
        # the collectives of the compiled step: bytes of every all-reduce result
        nbytes, ncoll = 0, 0
        for line in compiled.as_text().splitlines():
            mt = re.match(r"\s*(ROOT )?%?[\w.-]+ = (.*?) all-reduce(-start)?\(", line)
            if mt:
                ncoll += 1
                for dt, dims in re.findall(r"(f32|s32|f64|bf16|s64)\[([\d,]*)\]", mt.group(2)):
                    nbytes += sizes[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        res["worlds"][W] = dict(err=err, valid=int(st["valid"]), mask_sum=int(m.sum()),
                                noise=np.asarray(w).ravel().tolist(), shards_equal=all(
                                    np.array_equal(s, shards[0]) for s in shards),
                                naive=np.asarray(naive).ravel().tolist(), allreduce_bytes=nbytes,
                                allreduce_ops=ncoll)
    Path(out_path).write_text(json.dumps(res))


@pytest.fixture(scope="module")
def jax_results(tmp_path_factory):
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    out = tmp_path_factory.mktemp("jax") / "res.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3 --xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu",
               TRITON_INTERPRET="0", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import test_distributed as t; t._jax_worker({str(out)!r})")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("W", [1, 2, 3])
def test_jax_sharded_clipped_sum_equals_unsharded(W, jax_results):
    r = jax_results["worlds"][str(W)]
    assert r["err"] < 1e-5, f"sharded clipped sum differs from the unsharded one by {r['err']:.2e}"
    assert r["valid"] == r["mask_sum"]


@pytest.mark.parametrize("W", [1, 2, 3])
def test_jax_noise_once_whatever_the_device_count(W, jax_results):
    r = jax_results["worlds"][str(W)]
    z = np.asarray(r["noise"])
    assert z.size == 2000 and r["shards_equal"], "every device must hold the same noisy gradient"
    expected = SIGMA * C / EBS
    assert abs(z.std() / expected - 1) < 0.08
    np.testing.assert_array_equal(z, np.asarray(jax_results["worlds"]["1"]["noise"]))  # independent of W
    # dpprims' Philox noise: the numbers a single torch process adds (bit for bit on the CPU paths)
    np.testing.assert_allclose(z, np.asarray(jax_results["torch_noise"]), rtol=1e-6, atol=0)
    naive = np.asarray(r["naive"]).std()
    if W > 1:
        assert abs(naive / expected - 1) > 0.08 and abs(naive / (expected * np.sqrt(W)) - 1) < 0.08


@pytest.mark.parametrize("W", [2, 3])
def test_jax_step_all_reduces_the_gradient_once(W, jax_results):
    r = jax_results["worlds"][str(W)]
    # gradients (fp32) + loss_sum (f32) + valid, nonfinite, clipped (s32); XLA may split the psum
    # into a few tuple all-reduces, but the bytes are the gradient's once
    assert r["allreduce_bytes"] == 4 * jax_results["n_params"] + 4 * 4
    assert 1 <= r["allreduce_ops"] <= 3
