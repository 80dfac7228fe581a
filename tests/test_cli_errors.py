"""`dpprims` answers bad input with ONE line `dpprims: error: ...` and exit status 2, no traceback;
real bugs keep their traceback."""
import os
import subprocess
import sys

import pytest

from dpprims import cli

SYN = "synthetic:1,4,4:3:300"  # tiny, instant data for the cases that get past parsing


@pytest.fixture(autouse=True)
def _plain_torch_path(monkeypatch):
    """The cases that reach training run the ops' plain-torch path (the kernels are tested elsewhere)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.err


CASES = [
    # (argv, substrings the one line must contain)
    (["train", "--lr", "nan"], ["--lr", "'nan'", "> 0"]),
    (["train", "--lr", "inf"], ["--lr", "'inf'"]),
    (["train", "--lr", "-0.1"], ["--lr", "'-0.1'"]),
    (["train", "--lr", "fast"], ["--lr", "expected a number", "'fast'"]),
    (["train", "--epsilon", "0"], ["--epsilon", "'0'", "> 0"]),
    (["train", "--epsilon", "-3"], ["--epsilon", "'-3'"]),
    (["train", "--epsilon", "nan"], ["--epsilon", "'nan'"]),
    (["train", "--sigma", "inf"], ["--sigma", "'inf'", ">= 0"]),
    (["train", "--delta", "0"], ["--delta", "'0'", "< 1"]),
    (["train", "--delta", "1.5"], ["--delta", "'1.5'"]),
    (["train", "--delta", "nan"], ["--delta", "'nan'"]),
    (["train", "--epochs", "0"], ["--epochs", "'0'"]),
    (["train", "--epochs", "inf"], ["--epochs", "'inf'"]),
    (["train", "--expected-batch-size", "-5"], ["--expected-batch-size", "'-5'"]),
    (["train", "--physical-batch-size", "0"], ["--physical-batch-size", "'0'", ">= 1"]),
    (["train", "--physical-batch-size", "12.5"], ["--physical-batch-size", "expected an integer", "'12.5'"]),
    (["train", "--max-batch-size", "0"], ["--max-batch-size", "'0'"]),
    (["train", "--max-grad-norm", "0"], ["--max-grad-norm", "'0'"]),
    (["train", "--max-grad-norm", "nan"], ["--max-grad-norm", "'nan'"]),
    (["train", "--momentum", "-1"], ["--momentum", "'-1'"]),
    (["train", "--weight-decay", "nan"], ["--weight-decay", "'nan'"]),
    (["train", "--seed", "-1"], ["--seed", "'-1'"]),
    (["train", "--nproc", "0"], ["--nproc", "'0'"]),
    (["train", "--optimizer", "lbfgs"], ["--optimizer", "'lbfgs'"]),
    (["train", "--epsilon", "3", "--sigma", "1"], ["--sigma", "--epsilon"]),
    (["train", "--no-such-flag"], ["--no-such-flag"]),
    (["train", "--resume"], ["--resume", "--checkpoint"]),
    (["train", "--data", "/no/such/dir"], ["--data", "/no/such/dir"]),
    (["train", "--data", "cifar10:/no/such/dir"], ["--data", "/no/such/dir", "not a directory"]),
    (["train", "--data", "npz:/no/such/file.npz"], ["/no/such/file.npz"]),
    (["train", "--data", "synthetic:1,4:3"], ["synthetic"]),
    (["train", "--data", SYN, "--sigma", "1", "--model", "gpt5"], ["--model", "'gpt5'", "mlp"]),
    (["train", "--data", SYN, "--expected-batch-size", "5000"], ["--expected-batch-size", "300", "5000"]),
    (["train", "--data", SYN, "--sigma", "1", "--physical-batch-size", "4", "--secure", "--checkpoint", "CK"],
     ["--secure", "--checkpoint"]),
    (["train", "--checkpoint", "afile"], ["--checkpoint afile", "not a directory"]),
    (["train", "--log", "."], ["--log .", "directory"]),
    (["train", "--model", "mlp", "--width", "8"], ["--width 8", "mlp"]),
    (["train", "--framework", "jax", "--nproc", "3"], ["--physical-batch-size 128", "--nproc 3"]),
    (["plot", "/no/such/log.jsonl"], ["/no/such/log.jsonl", "--log"]),
    (["plot"], ["log"]),
]


@pytest.mark.parametrize("argv,needles", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_user_error_is_one_line_exit_2(capsys, tmp_path, monkeypatch, argv, needles):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    rc, err = _run(capsys, *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dpprims: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def test_device_cuda_without_gpu(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc, err = _run(capsys, "train", "--data", SYN, "--device", "cuda")
    assert rc == 2 and err.count("\n") == 1 and "--device cuda" in err and "--device cpu" in err


def test_bad_log_lines(capsys, tmp_path):
    log = tmp_path / "run.jsonl"
    log.write_text('{"kind": "step", "step": 1, "loss": 1.0}\nnot json\n')
    rc, err = _run(capsys, "plot", str(log))
    assert rc == 2 and f"{log}:2" in err and err.count("\n") == 1
    log.write_text('{"kind": "eval", "step": 1}\n')
    rc, err = _run(capsys, "plot", str(log))
    assert rc == 2 and "no step records" in err


def test_real_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr(cli, "train", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["train", "--data", SYN])


def test_console_script_prints_no_traceback(tmp_path):
    """The installed entry point, as a user runs it: one stderr line, status 2."""
    env = dict(os.environ)
    p = subprocess.run([sys.executable, "-m", "dpprims.cli", "train", "--lr", "nan"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "dpprims: error: argument --lr: must be a finite number > 0, got 'nan' (see `dpprims train --help`)"]
    assert p.stdout == ""


def test_valid_flags_still_train(capsys, tmp_path):
    """The validation does not refuse what is valid: a tiny run on the edge values trains."""
    rc = cli.main(["train", "--data", SYN, "--epochs", "0.05", "--expected-batch-size", "30", "--physical-batch-size",
                   "16", "--sigma", "0", "--delta", "1e-9", "--momentum", "0", "--seed", "0", "--no-progress",
                   "--json", "--log", str(tmp_path / "l.jsonl")])
    assert rc == 0
    out = capsys.readouterr().out
    assert '"steps": 1' in out
