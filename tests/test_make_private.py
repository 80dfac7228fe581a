"""dpprims.torch.make_private: the user's own loop gives the DP-SGD update (checked against a
per-example autograd loop and against the trainer), resumes bit for bit, and refuses misuse."""
import io
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpprims.plan import BudgetExhaustedError
from dpprims.torch import make_private


@pytest.fixture(autouse=True)
def _plain_torch_path(monkeypatch):
    """These tests exercise the loop around the kernels (tested on their own): plain-torch path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _model(seed=0, d=7, h=5, k=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, k))


def _data(n=41, d=7, k=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def _run(dp, max_steps=None):
    model, optimizer, loader = dp
    shapes = set()
    while dp.steps_taken < dp.plan.steps and (max_steps is None or dp.steps_taken < max_steps):
        for x, y, mask in loader:
            shapes.add((tuple(x.shape), tuple(mask.shape)))
            optimizer.zero_grad()
            optimizer.backward(F.cross_entropy(model(x), y, reduction="none"))
            optimizer.step()
            if max_steps is not None and dp.steps_taken >= max_steps:
                break
    return shapes


def _per_example_clipped_sum(model, x, y, C):
    """Independent reference: one autograd backward per example, clip to C, sum."""
    params = [p for p in model.parameters()]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, params)
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        c = min(1.0, C / (norm + 1e-6))
        for t, g in zip(total, grads):
            t += c * g.double()
    return total


def test_one_logical_step_equals_per_example_reference():
    """sigma = 0: the released update is SGD on (sum of clipped per-example grads) / (q N), with
    the sum over exactly the Poisson-sampled examples, accumulated over several physical batches."""
    x, y = _data()
    ref_model = _model()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    ebs, C = 17.0, 0.05
    dp = make_private(model, opt, (x, y), noise_multiplier=0.0, delta=1e-5, steps=1, max_grad_norm=C,
                      expected_batch_size=ebs, physical_batch_size=4, seed=5)
    idx = dp.plan.make_sampler(seed=5).sample()  # the same draw, from an independent sampler
    assert idx.size > 8, "want several physical batches"
    shapes = _run(dp)
    assert shapes == {((4, 7), (4,))}  # fixed physical shape, padding included
    ref = _per_example_clipped_sum(ref_model, x[torch.as_tensor(idx)], y[torch.as_tensor(idx)], C)
    for p_new, p_old, s in zip(model.parameters(), ref_model.parameters(), ref):
        want = p_old.double() - 0.3 * s / ebs
        torch.testing.assert_close(p_new.double(), want, rtol=1e-5, atol=1e-6)
    assert dp.steps_taken == 1 and dp.accountant.steps == 1
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_matches_trainer(optimizer):
    """make_private + torch.optim gives the trainer's run (same plan, seed, batches, noise, update)."""
    from dpprims.data import load_dataset
    from dpprims.models import get_model
    from dpprims.plan import DPPlan
    from dpprims.trainer import TorchBackend, Trainer

    data = load_dataset("synthetic:1,5,5:3:37", seed=2)
    plan = DPPlan.create(num_examples=37, expected_batch_size=9.5, physical_batch_size=4, max_grad_norm=0.7,
                         delta=1e-5, steps=5, noise_multiplier=0.9)

    def model():
        torch.manual_seed(3)
        return get_model("mlp", num_classes=3, in_channels=1, input_size=(5, 5), hidden=(11,))

    lr = 0.2 if optimizer == "sgd" else 0.01
    trainer = Trainer(TorchBackend(model(), plan, optimizer=optimizer, lr=lr, momentum=0.9), plan, data, seed=11,
                      progress=False)
    for _ in range(plan.steps):
        trainer.step()
    m = model()
    opt = (torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(m.parameters(), lr=lr))
    dp = make_private(m, opt, (torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)),
                      noise_multiplier=0.9, delta=1e-5, steps=5, max_grad_norm=0.7, expected_batch_size=9.5,
                      physical_batch_size=4, seed=11)
    _run(dp)
    assert dp.epsilon() == pytest.approx(trainer.accountant.epsilon(), rel=1e-12)
    for (k, a), b in zip(trainer.backend.model.state_dict().items(), m.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6, msg=lambda s: f"{k}: {s}")
    with torch.no_grad():
        moved = sum(float((a - b).abs().sum()) for a, b in zip(model().parameters(), m.parameters()))
    assert moved > 0


def test_resume_equals_uninterrupted():
    x, y = _data(n=33)
    kw = dict(noise_multiplier=1.1, delta=1e-5, epochs=3, max_grad_norm=0.5, expected_batch_size=8.0,
              physical_batch_size=3, seed=9)

    def build(init_seed):
        m = _model(init_seed)
        return make_private(m, torch.optim.Adam(m.parameters(), lr=0.05), (x, y), **kw)

    full = build(0)
    _run(full)
    first = build(0)
    _run(first, max_steps=5)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    resumed = build(123)  # a fresh process: other initial weights, restored from the saved state
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    assert resumed.steps_taken == 5 and resumed.accountant.steps == 5
    _run(resumed)
    assert resumed.steps_taken == full.steps_taken == full.plan.steps
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs after resume"
    assert resumed.epsilon() == full.epsilon()


def test_epochs_loop_runs_the_plan_and_stops():
    x, y = _data(n=30)
    m = _model()
    dp = make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), (x, y), noise_multiplier=1.0, delta=1e-5,
                      epochs=2, max_grad_norm=1.0, expected_batch_size=7.0, physical_batch_size=5, seed=0)
    model, optimizer, loader = dp
    assert dp.plan.steps == math.ceil(2 * 30 / 7)
    seen = []
    for epoch in range(2):
        for batch in loader:
            seen.append((batch.step, batch.index, batch.count, int(batch.mask.sum()), batch.batch_size))
            optimizer.zero_grad()
            optimizer.backward(F.cross_entropy(model(batch[0]), batch[1], reduction="none"))
            assert optimizer.step() == batch.is_last
    assert dp.steps_taken == dp.plan.steps
    assert list(loader) == []  # the budget is spent: nothing more is drawn
    # per logical step: the masks sum to K, batches counted 0..count-1
    for t in range(dp.plan.steps):
        rows = [s for s in seen if s[0] == t]
        assert [r[1] for r in rows] == list(range(rows[0][2]))
        assert sum(r[3] for r in rows) == rows[0][4]
    with pytest.raises(BudgetExhaustedError):
        dp.plan.check_budget(dp.steps_taken)


def test_empty_logical_batch_is_a_noised_accounted_step():
    x, y = _data(n=20)
    m = _model()
    before = [p.detach().clone() for p in m.parameters()]
    dp = make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), (x, y), noise_multiplier=1.0, delta=1e-5,
                      steps=40, max_grad_norm=1.0, expected_batch_size=0.2, physical_batch_size=4, seed=3)
    model, optimizer, loader = dp
    batch = next(iter(loader))
    while batch.batch_size != 0:  # advance to an empty draw (P(K = 0) = 0.99^20 ~ 0.82)
        optimizer.zero_grad()
        optimizer.backward(F.cross_entropy(model(batch[0]), batch[1], reduction="none"))
        optimizer.step()
        before = [p.detach().clone() for p in m.parameters()]
        batch = next(iter(loader))
    assert batch.count == 1 and not bool(batch.mask.any())
    steps = dp.steps_taken
    optimizer.backward(F.cross_entropy(model(batch[0]), batch[1], reduction="none"))
    assert optimizer.step()
    assert dp.steps_taken == steps + 1 and dp.accountant.steps == steps + 1
    assert all(not torch.equal(a, b) for a, b in zip(before, m.parameters()))  # noise alone moved them


def test_map_style_dataset_gives_the_same_batches():
    x, y = _data(n=25)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return x[i], y[i]

    out = []
    for data in ((x, y), DS()):
        m = _model()
        dp = make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), data, noise_multiplier=1.0, delta=1e-5,
                          steps=2, max_grad_norm=1.0, expected_batch_size=6.0, physical_batch_size=4, seed=1)
        batches = []
        for b in dp.loader:
            batches.append([t.clone() for t in b])
            dp.optimizer.backward(F.cross_entropy(m(b[0]), b[1], reduction="none"))
            dp.optimizer.step()
        out.append(batches)
    assert len(out[0]) == len(out[1])
    for a, b in zip(*out):
        for ta, tb in zip(a, b):
            assert torch.equal(ta, tb)


def test_misuse_is_refused():
    x, y = _data(n=30)
    m = _model()
    dp = make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), (x, y), noise_multiplier=1.0, delta=1e-5,
                      steps=3, max_grad_norm=1.0, expected_batch_size=12.0, physical_batch_size=4, seed=0)
    model, optimizer, loader = dp
    it = iter(loader)
    b = next(it)
    loss = F.cross_entropy(model(b[0]), b[1], reduction="none")
    loss.sum().backward()  # plain autograd: the DP layers give no weight gradient
    with pytest.raises(RuntimeError, match="optimizer.backward"):
        optimizer.step()
    with pytest.raises(ValueError, match="rows"):
        optimizer.backward(torch.zeros(3, requires_grad=True))
    optimizer.backward(F.cross_entropy(model(b[0]), b[1], reduction="none"))
    with pytest.raises(RuntimeError, match="twice"):
        optimizer.backward(F.cross_entropy(model(b[0]), b[1], reduction="none"))
    with pytest.raises(RuntimeError, match="still open"):
        dp.state_dict()
    # walk to the last physical batch of the logical step without calling step() on it
    while not b.is_last:
        optimizer.step()
        b = next(it)
        optimizer.backward(F.cross_entropy(model(b[0]), b[1], reduction="none"))
    with pytest.raises(RuntimeError, match="still open"):
        next(it)  # the next logical batch would be drawn before this one got its noise

    other = nn.Linear(7, 3)
    m2 = _model()
    with pytest.raises(ValueError, match="not trainable parameters of the model"):
        make_private(m2, torch.optim.SGD(list(m2.parameters()) + list(other.parameters()), lr=0.1), (x, y),
                     noise_multiplier=1.0, delta=1e-5, steps=3, max_grad_norm=1.0, expected_batch_size=12.0,
                     physical_batch_size=4)
    m3 = _model()
    with pytest.raises(ValueError, match="different lengths"):
        make_private(m3, torch.optim.SGD(m3.parameters(), lr=0.1), (x, y[:-1]), noise_multiplier=1.0, delta=1e-5,
                     steps=3, max_grad_norm=1.0, expected_batch_size=12.0, physical_batch_size=4)


def test_state_is_refused_for_another_plan():
    x, y = _data(n=30)
    kw = dict(noise_multiplier=1.0, delta=1e-5, steps=3, max_grad_norm=1.0, physical_batch_size=4, seed=0)
    m = _model()
    a = make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), (x, y), expected_batch_size=12.0, **kw)
    m = _model()
    b = make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), (x, y), expected_batch_size=10.0, **kw)
    with pytest.raises(ValueError, match="different DP plan"):
        b.load_state_dict(a.state_dict())


def test_target_epsilon_is_met():
    x, y = _data(n=200)
    m = _model()
    dp = make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), (x, y), target_epsilon=2.0, delta=1e-5,
                      epochs=1, max_grad_norm=1.0, expected_batch_size=40.0, physical_batch_size=16, seed=0)
    _run(dp)
    assert dp.steps_taken == dp.plan.steps == 5
    assert dp.epsilon() <= 2.0 and dp.epsilon() == pytest.approx(2.0, rel=1e-3)
    assert dp.epsilon(1e-5) == dp.epsilon()
    assert dp.epsilon(1e-2) < dp.epsilon() < dp.epsilon(1e-9)  # the same run at another delta
    assert np.isfinite(dp.plan.noise_multiplier) and dp.plan.noise_multiplier > 0


def test_unsupported_layer_is_named():
    x, y = _data(n=30)
    m = nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\).*convert_batchnorm_to_groupnorm"):
        make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), (x, y), noise_multiplier=1.0, delta=1e-5, steps=3,
                     max_grad_norm=1.0, expected_batch_size=12.0, physical_batch_size=4)
