"""The JAX trainer backend: resume == uninterrupted, same update as the torch trainer, CLI."""
import json

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
from dpprims.data import load_dataset  # noqa: E402
from dpprims.models import get_model  # noqa: E402
from dpprims.models.convert_jax import flax_to_torch  # noqa: E402
from dpprims.plan import DPPlan  # noqa: E402
from dpprims.trainer import Trainer, TorchBackend  # noqa: E402
from dpprims.trainer.jax_backend import JaxBackend  # noqa: E402


@pytest.fixture(autouse=True)
def _fast_paths(monkeypatch):
    """The loop is under test here, not the kernels: torch's plain path and JAX's jnp path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("DPPRIMS_JAX_BACKEND", raising=False)


def _setup(sigma=0.9, steps=6, n=40):
    data = load_dataset(f"synthetic:1,5,5:3:{n}", seed=2)
    plan = DPPlan.create(num_examples=n, expected_batch_size=10.0, physical_batch_size=4, max_grad_norm=0.7,
                         delta=1e-5, steps=steps, noise_multiplier=sigma)
    return data, plan


def _jax_backend(data, plan, seed=0, **kw):
    return JaxBackend.from_name("mlp", data, plan, seed=seed, lr=0.3, momentum=0.5, **kw)


def test_resume_equals_uninterrupted_jax(tmp_path):
    data, plan = _setup(steps=5)
    full = Trainer(_jax_backend(data, plan), plan, data, seed=5, progress=False)
    full.fit()
    first = Trainer(_jax_backend(data, plan), plan, data, seed=5, progress=False, checkpoint_dir=tmp_path / "ck")
    for _ in range(2):
        first.step()
    first.save_checkpoint()
    resumed = Trainer(_jax_backend(data, plan, seed=99), plan, data, seed=5, progress=False,
                      checkpoint_dir=tmp_path / "ck", resume=True)
    assert resumed.step_count == 2
    resumed.fit()
    a = jax.tree_util.tree_leaves(full.backend.params)
    b = jax.tree_util.tree_leaves(resumed.backend.params)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_torch_and_jax_trainers_agree_with_noise_off():
    """Same weights, same Poisson batches, noise off: the two frameworks' trainers take the same
    steps (clipping, normalisation by q*N, SGD with momentum)."""
    data, plan = _setup(sigma=0.0, steps=4)
    jb = _jax_backend(data, plan)
    torch_model = get_model("mlp", num_classes=3, in_channels=1, input_size=(5, 5))
    torch_model.load_state_dict({k: torch.tensor(np.array(v)) for k, v in flax_to_torch(jb.params).items()})
    tb = TorchBackend(torch_model, plan, lr=0.3, momentum=0.5)
    for backend in (jb, tb):
        t = Trainer(backend, plan, data, seed=8, progress=False)
        t.fit()
    got = flax_to_torch(jb.params)
    for k, v in tb.model.state_dict().items():
        np.testing.assert_allclose(np.asarray(got[k]), v.numpy(), rtol=2e-5, atol=2e-6, err_msg=k)


def test_noise_std_per_step_jax():
    """An empty logical batch: the update is lr * sigma*C*z/(q*N), noise drawn once."""
    data, plan = _setup(sigma=1.3, steps=2, n=40)
    jb = JaxBackend.from_name("mlp", data, plan, seed=0, lr=1.0, momentum=0.0)
    t = Trainer(jb, plan, data, seed=4, progress=False)
    t.sampler.sample = lambda: np.zeros(0, dtype=np.int64)
    before = np.asarray(jb.params["1"]["kernel"]).copy()
    t.step()
    delta = (np.asarray(jb.params["1"]["kernel"]) - before).ravel()
    expected = plan.noise_std / plan.normaliser
    assert delta.size > 1000
    assert abs(delta.std() / expected - 1) < 0.1, (delta.std(), expected)


def test_cli_end_to_end_jax(capsys):
    from dpprims.cli import main

    rc = main(["train", "--framework", "jax", "--data", "synthetic:1,6,6:3:60", "--model", "mlp", "--epochs", "1",
               "--expected-batch-size", "15", "--physical-batch-size", "8", "--epsilon", "5", "--no-progress", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["framework"] == "jax" and out["steps"] == 4 and out["epsilon"] <= 5.0
    assert "jnp" in out["kernel_paths"]


def test_cli_jax_transformer_is_the_torch_models_twin(capsys):
    """--framework jax --model transformer trains the Flax twin of the torch CLI's transformer: the
    same parameter count for the same data and --width, and a run that takes its steps."""
    from dpprims.cli import main

    data, plan = _setup(steps=2, n=40)
    data = load_dataset("synthetic:1,8,8:3:40", seed=2)
    jb = JaxBackend.from_name("transformer", data, plan, seed=0, lr=0.3, momentum=0.5, width=24)
    tm = get_model("transformer", num_classes=3, in_channels=1, input_size=(8, 8), width=24)
    n_jax = sum(int(np.asarray(a).size) for a in jax.tree_util.tree_leaves(jb.params))
    assert n_jax == sum(p.numel() for p in tm.parameters())
    rc = main(["train", "--framework", "jax", "--data", "synthetic:1,8,8:3:60", "--model", "transformer", "--width",
               "16", "--epochs", "1", "--expected-batch-size", "15", "--physical-batch-size", "8", "--epsilon", "5",
               "--no-progress", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["framework"] == "jax" and out["model"] == "transformer" and out["steps"] == 4


def test_bf16_step_is_close_to_fp32():
    """bf16 forward/backward on fp32 master params: the update tracks the fp32 one closely (bf16
    rounding, ~1e-2 relative), the clipped sums and params stay fp32, and bad names fail."""
    data, plan = _setup(sigma=0.0, steps=1)
    outs = {}
    for precision in ("fp32", "bf16"):
        jb = _jax_backend(data, plan, precision=precision)
        before = np.asarray(jb.params["1"]["kernel"]).copy()
        Trainer(jb, plan, data, seed=1, progress=False).fit()
        assert jb.params["1"]["kernel"].dtype == np.float32
        outs[precision] = np.asarray(jb.params["1"]["kernel"]) - before
    scale = np.abs(outs["fp32"]).max()
    assert scale > 0
    assert np.abs(outs["bf16"] - outs["fp32"]).max() <= 3e-2 * scale
    with pytest.raises(ValueError, match="precision"):
        _jax_backend(data, plan, precision="fp8")
