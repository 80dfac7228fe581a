"""The README's examples run as written (issue 2: 'a user can run the torch example')."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_torch_example_runs(capsys):
    block = next(b for b in _blocks("python") if "dpprims.torch import DPEngine" in b)
    scope: dict = {}
    exec(compile(block, "README.md[torch example]", "exec"), scope)
    norms, model = scope["norms"], scope["model"]
    assert norms.shape == (64,)
    assert all(p.grad is not None for p in model.parameters())
    assert "linear" in capsys.readouterr().out  # the printed plan


def test_jax_example_runs(capsys):
    """The JAX example imports only public modules and trains end to end (dp_noise + PoissonBatches)."""
    pytest.importorskip("optax")
    block = next(b for b in _blocks("python") if "import dpprims.jax as dpj" in b)
    assert "dpprims.bindings" not in block and "dpprims.reference" not in block  # public API only
    # the README's model is a full-width ResNet-18 on 1000 images (slow on a CPU): run the same
    # code on a reduced-width one and fewer, smaller images, everything else verbatim
    for old, new in (("resnet18(num_classes=10, cifar=True)", "resnet18(num_classes=10, cifar=True, width=4)"),
                     ("jnp.zeros((1, 32, 32, 3))", "jnp.zeros((1, 8, 8, 3))"),
                     ("np.random.rand(1000, 32, 32, 3)", "np.random.rand(200, 8, 8, 3)"),
                     ("np.random.randint(0, 10, 1000)", "np.random.randint(0, 10, 200)")):
        assert block.count(old) == 1, old
        block = block.replace(old, new)
    scope: dict = {}
    exec(compile(block, "README.md[jax example]", "exec"), scope)
    jax, jnp, plan = scope["jax"], scope["jnp"], scope["plan"]
    assert int(scope["opt_state"][0].count) == plan.steps  # one noisy update per logical batch
    leaves = jax.tree_util.tree_leaves(scope["params"])
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in leaves)
    assert f"after {plan.steps} steps" in capsys.readouterr().out


def test_make_private_example_runs(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the loop is under test here, not the kernels
    block = next(b for b in _blocks("python") if "from dpprims.torch import make_private" in b and "784" in b)
    assert block.count("4000") == 2
    block = block.replace("4000", "600")  # fewer examples on a CPU; the code is verbatim otherwise
    scope: dict = {}
    exec(compile(block, "README.md[make_private example]", "exec"), scope)
    dp = scope["dp"]
    assert dp.steps_taken == dp.plan.steps > 0
    eps = float(capsys.readouterr().out.split()[-1])
    assert 2.9 < eps <= 3.0


def _accuracy(model, x, y):
    import torch

    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_opacus_and_dpprims_scripts_run_side_by_side(capsys, monkeypatch):
    """'Coming from Opacus': both scripts run as written and both learn the task at epsilon 3."""
    pytest.importorskip("opacus")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    import warnings

    blocks = _blocks("python")
    opacus_block = next(b for b in blocks if b.startswith("# Opacus\n"))
    dpprims_block = next(b for b in blocks if b.startswith("# dpprims\n"))
    results = {}
    for name, block in (("opacus", opacus_block), ("dpprims", dpprims_block)):
        scope: dict = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about its secure-RNG default
            exec(compile(block, f"README.md[{name} script]", "exec"), scope)
        eps = float(capsys.readouterr().out.split()[-1])
        results[name] = (eps, _accuracy(scope["model"], scope["x"], scope["y"]))
    for name, (eps, acc) in results.items():
        assert 2.5 < eps <= 3.01, (name, eps)
        assert acc > 0.75, (name, acc)  # chance is 0.5
    # the two scripts differ by a few lines only (code, not comments)
    import difflib

    def code(b):
        return [ln.split("  #")[0].rstrip() for ln in b.splitlines()[1:] if ln.strip()]

    changed = [d for d in difflib.unified_diff(code(opacus_block), code(dpprims_block), lineterm="", n=0)
               if d[:1] in "+-" and d[:3] not in ("+++", "---")]
    assert len([d for d in changed if d.startswith("+")]) <= 8, changed
