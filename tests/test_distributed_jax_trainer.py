"""The JAX trainer data-parallel over several (host-platform) devices: the same update as one
device with noise off, noise drawn once (std sigma*C/(q*N) for any device count), and the CLI.

Each case runs in a subprocess: XLA_FLAGS=--xla_force_host_platform_device_count must be set
before jax is imported.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")

SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    import jax
    from dpprims.data import load_dataset
    from dpprims.plan import DPPlan
    from dpprims.trainer import Trainer
    from dpprims.trainer.jax_backend import JaxBackend

    W = int(sys.argv[1])
    assert len(jax.devices()) >= 3, jax.devices()
    data = load_dataset("synthetic:1,5,5:3:48", seed=2)
    out = {}
    for sigma in (0.0, 1.3):
        plan = DPPlan.create(num_examples=48, expected_batch_size=12.0, physical_batch_size=6, max_grad_norm=0.7,
                             delta=1e-5, steps=3, noise_multiplier=sigma)
        jb = JaxBackend.from_name("mlp", data, plan, seed=0, lr=0.5, momentum=0.0, devices=W)
        t = Trainer(jb, plan, data, seed=9, progress=False)
        if sigma > 0:  # empty logical batches: the update is pure noise, lr * sigma*C*z/(q*N)
            t.sampler.sample = lambda: np.zeros(0, dtype=np.int64)
        before = np.asarray(jb.params["1"]["kernel"]).copy()
        for _ in range(3):
            t.step()
        out[str(sigma)] = (np.asarray(jb.params["1"]["kernel"]) - before).ravel().tolist()
    out["expected_std"] = 1.3 * 0.7 / 12.0 * 0.5
    print("RESULT " + json.dumps(out))
''')


def _run(W):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3", TRITON_INTERPRET="0",
               JAX_PLATFORMS="cpu")
    env.pop("DPPRIMS_JAX_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(W)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def results():
    return {W: _run(W) for W in (1, 2, 3)}


@pytest.mark.parametrize("W", [2, 3])
def test_same_update_as_one_device_with_noise_off(results, W):
    import numpy as np

    np.testing.assert_allclose(results[W]["0.0"], results[1]["0.0"], rtol=1e-5, atol=1e-7)
    assert np.abs(results[1]["0.0"]).max() > 0


@pytest.mark.parametrize("W", [1, 2, 3])
def test_noise_std_independent_of_device_count(results, W):
    """Three steps of pure noise on ~2,000 weights: std = sqrt(3) * lr*sigma*C/(q*N) within 8%,
    which rejects noise drawn per device (sqrt(W) too large) for W >= 2."""
    import numpy as np

    delta = np.asarray(results[W]["1.3"])
    expected = results[W]["expected_std"] * np.sqrt(3)
    assert delta.size > 1000
    assert abs(delta.std() / expected - 1) < 0.08, (W, delta.std(), expected)
    np.testing.assert_allclose(delta, results[1]["1.3"], rtol=1e-5, atol=1e-7)


def test_cli_jax_nproc(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "dpprims.cli", "train", "--framework", "jax", "--nproc", "2",
                           "--data", "synthetic:1,6,6:3:60", "--model", "mlp", "--epochs", "1",
                           "--expected-batch-size", "15", "--physical-batch-size", "8", "--epsilon", "5",
                           "--no-progress", "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["framework"] == "jax" and out["steps"] == 4 and out["epsilon"] <= 5.0
