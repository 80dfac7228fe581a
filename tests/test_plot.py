"""`dpprims plot LOG.jsonl` / `dpprims train --plot`: a PNG of loss, accuracy and epsilon; clear
errors for a bad log or a missing matplotlib."""
import json
import sys

import numpy as np
import pytest

from dpprims import cli
from dpprims.plot import PlotError, _last_run, plot_log, read_log

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")


def _log(path, steps=30, evals=(10, 20, 30), start=1, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "a") as f:
        for s in range(start, start + steps):
            f.write(json.dumps(dict(kind="step", step=s, loss=2.3 * np.exp(-s / 20) + 0.1 * rng.random(),
                                    epsilon=0.1 * np.sqrt(s), batch_size=int(rng.integers(5, 15)))) + "\n")
            if s in evals:
                f.write(json.dumps(dict(kind="eval", step=s, test_loss=2.0 * np.exp(-s / 25),
                                        test_accuracy=1 - np.exp(-s / 15), epsilon=0.1 * np.sqrt(s))) + "\n")
    return path


def _panels(png):
    """Per third of the image: the fraction of pixels that are coloured (not white/grey)."""
    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    colourful = (a.max(axis=2) - a.min(axis=2)) > 60
    w = a.shape[1] // 3
    return [colourful[:, i * w:(i + 1) * w].mean() for i in range(3)], a.shape


def test_plot_writes_three_panels(tmp_path):
    out = plot_log(_log(tmp_path / "run.jsonl"), tmp_path / "run.png", title="test")
    frac, shape = _panels(out)
    assert shape == (396, 1320, 3)  # 12 x 3.6 in at 110 dpi
    assert all(f > 0.002 for f in frac), frac  # loss, accuracy and epsilon curves were all drawn


def test_plot_of_log_without_evals_still_draws_loss_and_epsilon(tmp_path):
    out = plot_log(_log(tmp_path / "run.jsonl", evals=()), tmp_path / "run.png")
    frac, _ = _panels(out)
    assert frac[0] > 0.002 and frac[2] > 0.002 and frac[1] < frac[0]


def test_last_run_of_an_appended_log(tmp_path):
    log = _log(tmp_path / "run.jsonl", steps=12, evals=(12,))
    _log(log, steps=7, evals=(7,), seed=1)  # a second run appended: steps restart at 1
    recs = _last_run(read_log(log))
    assert [r["step"] for r in recs if r["kind"] == "step"] == list(range(1, 8))
    # a resumed run continues its steps: kept whole
    log2 = _log(tmp_path / "resumed.jsonl", steps=5, evals=())
    _log(log2, steps=5, evals=(), start=6)
    assert len(_last_run(read_log(log2))) == 10


def test_bad_logs_are_plot_errors(tmp_path):
    with pytest.raises(PlotError, match="no such log file"):
        plot_log(tmp_path / "missing.jsonl", tmp_path / "x.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "step", "step": 1, "loss": 1}\n[1, 2]\n')
    with pytest.raises(PlotError, match=r"bad.jsonl:2: expected a JSON object"):
        plot_log(bad, tmp_path / "x.png")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(PlotError, match="no step records"):
        plot_log(empty, tmp_path / "x.png")


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    log = _log(tmp_path / "run.jsonl")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(PlotError, match="pip install matplotlib"):
        plot_log(log, tmp_path / "x.png")
    assert cli.main(["plot", str(log)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpprims: error: plotting needs matplotlib") and err.count("\n") == 1


def test_cli_plot_and_train_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    log = _log(tmp_path / "run.jsonl")
    assert cli.main(["plot", str(log)]) == 0
    assert (tmp_path / "run.png").is_file()
    assert cli.main(["plot", str(log), "-o", str(tmp_path / "sub" / "other.png")]) == 0
    assert (tmp_path / "sub" / "other.png").is_file()
    png = tmp_path / "train.png"
    rc = cli.main(["train", "--data", "synthetic:1,4,4:3:60", "--sigma", "1", "--epochs", "1",
                   "--expected-batch-size", "20", "--physical-batch-size", "8", "--no-progress", "--plot", str(png)])
    assert rc == 0
    recs = read_log(tmp_path / "train.jsonl")  # --plot without --log keeps the log beside the PNG
    assert sum(r["kind"] == "step" for r in recs) == 3
    frac, _ = _panels(png)
    assert frac[0] > 0.001 and frac[2] > 0.001, frac  # loss and epsilon (one eval: accuracy is a dot)
