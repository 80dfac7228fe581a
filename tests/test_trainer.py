"""The DP trainer: resume == uninterrupted, padding invariance, noise once per step, budget, CLI."""
import json

import numpy as np
import pytest
import torch

from dpprims.data import load_dataset
from dpprims.models import get_model
from dpprims.plan import BudgetExhaustedError, DPPlan
from dpprims.trainer import Trainer, TorchBackend


@pytest.fixture(autouse=True)
def _plain_torch_path(monkeypatch):
    """Trainer tests exercise the loop, not the kernels (tested on their own): run the ops'
    plain-torch path, which is what a CPU user without TRITON_INTERPRET gets."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _data(n=48, classes=3, seed=1):
    return load_dataset(f"synthetic:1,5,5:{classes}:{n}", seed=seed)


def _plan(data, *, steps=6, sigma=0.8, ebs=12.0, pbs=5, C=1.0):
    return DPPlan.create(num_examples=len(data.x_train), expected_batch_size=ebs, physical_batch_size=pbs,
                         max_grad_norm=C, delta=1e-5, steps=steps, noise_multiplier=sigma)


def _backend(data, plan, seed=0, optimizer="sgd", **kw):
    torch.manual_seed(seed)
    model = get_model("mlp", num_classes=data.num_classes, in_channels=1, input_size=(5, 5), hidden=(16,))
    return TorchBackend(model, plan, optimizer=optimizer, lr=0.5, **kw)


def _params(backend):
    return {k: v.detach().clone() for k, v in backend.model.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_equals_uninterrupted(tmp_path, optimizer):
    data = _data()
    plan = _plan(data, steps=8)
    full = Trainer(_backend(data, plan, optimizer=optimizer), plan, data, seed=7, progress=False)
    full.fit()

    first = Trainer(_backend(data, plan, optimizer=optimizer), plan, data, seed=7, progress=False,
                    checkpoint_dir=tmp_path / "ck")
    for _ in range(3):
        first.step()
    first.save_checkpoint()
    # a fresh process: new model init (different seed), new trainer, resumed from disk
    resumed = Trainer(_backend(data, plan, seed=123, optimizer=optimizer), plan, data, seed=7, progress=False,
                      checkpoint_dir=tmp_path / "ck", resume=True)
    assert resumed.step_count == 3 and resumed.accountant.steps == 3
    resumed.fit()
    assert resumed.accountant.steps == full.accountant.steps == 8
    for k, v in _params(full.backend).items():
        assert torch.equal(v, _params(resumed.backend)[k]), f"{k} differs after resume"


def test_resume_with_another_plan_is_refused(tmp_path):
    data = _data()
    plan = _plan(data)
    t = Trainer(_backend(data, plan), plan, data, seed=0, progress=False, checkpoint_dir=tmp_path / "ck")
    t.step()
    t.save_checkpoint()
    other = _plan(data, sigma=0.5)
    with pytest.raises(ValueError, match="different DP plan"):
        Trainer(_backend(data, other), other, data, seed=0, progress=False, checkpoint_dir=tmp_path / "ck", resume=True)


@pytest.mark.parametrize("pbs", [1, 4, 7, 64])
def test_update_is_independent_of_the_physical_split(pbs):
    """Noise off: the same logical batches give the same update whatever the physical size."""
    data = _data()
    ref_plan = _plan(data, sigma=0.0, pbs=3)
    ref = Trainer(_backend(data, ref_plan), ref_plan, data, seed=3, progress=False)
    for _ in range(4):
        ref.step()
    plan = _plan(data, sigma=0.0, pbs=pbs)
    t = Trainer(_backend(data, plan), plan, data, seed=3, progress=False)
    for _ in range(4):
        t.step()
    for k, v in _params(ref.backend).items():
        torch.testing.assert_close(_params(t.backend)[k], v, rtol=1e-5, atol=1e-6)


def test_noise_is_added_once_per_logical_step_with_std_sigma_C_over_expected_batch():
    """One step on a logical batch of padding only: the update is lr * sigma*C*z/(q*N) exactly
    once. The measured std over ~2,000 weights must match sigma*C/(q*N) and reject the sqrt(2)
    of noise drawn twice (or the 1/sqrt(P) of noise per physical batch divided by more)."""
    data = _data(n=40)
    sigma, C, ebs = 1.7, 0.9, 10.0
    plan = DPPlan.create(num_examples=40, expected_batch_size=ebs, physical_batch_size=3, max_grad_norm=C,
                         delta=1e-5, steps=3, noise_multiplier=sigma)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(25, 80), torch.nn.Linear(80, 3))
    backend = TorchBackend(model, plan, optimizer="sgd", lr=1.0, momentum=0.0)
    t = Trainer(backend, plan, data, seed=11, progress=False)
    before = _params(backend)
    t.sampler.sample = lambda: np.zeros(0, dtype=np.int64)  # an empty logical batch (a real step)
    t.step()
    assert t.accountant.steps == 1
    delta = (_params(backend)["1.weight"] - before["1.weight"]).flatten().double()
    expected = sigma * C / ebs
    measured = float(delta.std())
    # 2,000 samples: the std estimate has relative sd ~1.6%; 8% bounds are > 5 sd either way
    assert abs(measured / expected - 1) < 0.08, f"noise std {measured} vs sigma*C/(qN) = {expected}"
    assert abs(float(delta.mean())) < 5 * expected / np.sqrt(delta.numel())


def test_noise_differs_across_steps_and_seeds():
    data = _data()
    plan = _plan(data, sigma=1.0)
    draws = []
    for seed in (1, 2):
        t = Trainer(_backend(data, plan, optimizer="sgd", momentum=0.0), plan, data, seed=seed, progress=False)
        t.sampler.sample = lambda: np.zeros(0, dtype=np.int64)
        w = t.backend.model[1].weight
        for _ in range(2):
            before = w.detach().clone()
            t.step()
            draws.append((w.detach() - before).flatten().numpy())
    for i in range(len(draws)):
        for j in range(i):
            r = np.corrcoef(draws[i], draws[j])[0, 1]
            assert abs(r) < 0.25, f"noise draws {i} and {j} are correlated (r={r:.2f})"


def test_budget_is_enforced():
    data = _data()
    plan = _plan(data, steps=2)
    t = Trainer(_backend(data, plan), plan, data, seed=0, progress=False)
    t.fit()
    assert t.step_count == 2
    with pytest.raises(BudgetExhaustedError):
        t.step()


def test_log_and_result(tmp_path):
    data = _data()
    plan = _plan(data, steps=5)
    log = tmp_path / "log.jsonl"
    t = Trainer(_backend(data, plan), plan, data, seed=0, progress=False, log_path=log)
    res = t.fit()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(steps) == 5 and evals, records
    assert res.epsilon == pytest.approx(plan.epsilon_at(5))
    assert steps[-1]["epsilon"] == pytest.approx(res.epsilon)
    assert 0.0 <= res.test_accuracy <= 1.0


def test_dataset_size_must_match_plan():
    data = _data()
    plan = DPPlan.create(num_examples=len(data.x_train) + 1, expected_batch_size=8, physical_batch_size=4,
                         max_grad_norm=1.0, delta=1e-5, steps=2, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="sampling rate"):
        Trainer(_backend(data, plan), plan, data, seed=0, progress=False)


def test_secure_mode_refuses_checkpoints(tmp_path):
    data = _data()
    plan = _plan(data)
    with pytest.raises(ValueError, match="secure"):
        Trainer(_backend(data, plan), plan, data, seed=None, secure=True, progress=False, checkpoint_dir=tmp_path)
    t = Trainer(_backend(data, plan), plan, data, seed=None, secure=True, progress=False)
    t.step()
    with pytest.raises(ValueError, match="OS entropy"):
        Trainer(_backend(data, plan), plan, data, seed=3, secure=True, progress=False)


def test_cli_end_to_end_torch(tmp_path, capsys):
    from dpprims.cli import main

    rc = main(["train", "--data", "synthetic:1,6,6:3:60", "--model", "mlp", "--epochs", "1",
               "--expected-batch-size", "15", "--physical-batch-size", "8", "--epsilon", "5",
               "--no-progress", "--json", "--checkpoint", str(tmp_path / "ck"), "--log", str(tmp_path / "l.jsonl")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 4 and out["epsilon"] <= 5.0 and out["kernel_paths"] == ["torch"]
    assert (tmp_path / "ck" / "state.json").exists()
    # resuming a finished run takes no further step (and so spends no more budget)
    rc = main(["train", "--data", "synthetic:1,6,6:3:60", "--model", "mlp", "--epochs", "1",
               "--expected-batch-size", "15", "--physical-batch-size", "8", "--epsilon", "5",
               "--no-progress", "--json", "--checkpoint", str(tmp_path / "ck"), "--resume"])
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and again["steps"] == 4 and again["epsilon"] == out["epsilon"]


def test_cli_runs_are_reproducible_from_the_seed(capsys):
    """--seed fixes sampling, noise AND the initial weights: two runs agree exactly."""
    from dpprims.cli import main

    args = ["train", "--data", "synthetic:1,6,6:3:60", "--model", "mlp", "--epochs", "1",
            "--expected-batch-size", "15", "--physical-batch-size", "8", "--sigma", "1.0", "--seed", "4",
            "--no-progress", "--json"]
    outs = []
    for _ in range(2):
        assert main(args) == 0
        outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert outs[0]["test_loss"] == outs[1]["test_loss"]
