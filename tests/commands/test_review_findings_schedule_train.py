"""Bugs found in review of ``fastdiff train`` and ``python -m fastdiff.training.plot``: each test
names what was wrong."""

from __future__ import annotations

import json

import pytest

from fastdiff.cli import main


@pytest.fixture
def no_training(monkeypatch):
    """These tests must never start the shipped config's training (hours on a CPU)."""

    def refuse(config):
        raise AssertionError(f"training started with output_dir {config.output_dir!r}")

    monkeypatch.setattr("fastdiff.training.run.run_training", refuse)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--output-dir", "--output-dir must name a folder, got an empty string"),
        ("--config", "--config must name a JSON file, got an empty string"),
        ("--stages", "--stages must be a comma-separated subset of classifier,vae,unet"),
    ],
)
def test_train_refuses_an_empty_option_instead_of_ignoring_it(option, message, capsys, no_training):
    """`--output-dir ""` (e.g. `--output-dir "$DIR"` with DIR unset) was taken as "not given":
    the run trained into, and resumed from, the config's runs/shapes instead of failing; likewise
    `--config ""` silently trained the shipped config and `--stages ""` every stage. Each empty
    value is now refused by name with exit code 2 (--print-config showed the silent fallback)."""
    assert main(["train", "--print-config", option, ""]) == 2
    captured = capsys.readouterr()
    assert message in captured.err, captured.err
    assert captured.out == ""  # no config printed: nothing resolved from a value not given


def test_train_stages_names_the_option_and_allowed_values(capsys, no_training):
    """An unknown or empty stage list is refused naming --stages and the allowed stage names
    (the comma-only list "," used to reach the config check as "stages ... got []"); a good list
    still resolves, spaces allowed."""
    for value in (",", "vae,vea"):
        assert main(["train", "--print-config", "--stages", value]) == 2
        error = capsys.readouterr().err
        assert "--stages must be a comma-separated subset of classifier,vae,unet" in error, error
        assert repr(value) in error
    assert main(["train", "--print-config", "--stages", " vae , unet "]) == 0
    assert json.loads(capsys.readouterr().out)["stages"] == ["vae", "unet"]


def test_loss_plot_labels_count_steps_when_the_log_skips_steps(tmp_path, monkeypatch):
    """With log_every = 10 the log holds every 10th step's loss, but the plot labelled that curve
    "per step" and its moving average over 2 rows (20 steps) "mean of 2 steps"."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from fastdiff.training.plot import plot_losses

    figures = []
    real_close = plt.close

    def keep_figure(figure=None):
        figures.append(figure)
        real_close(figure)

    monkeypatch.setattr(plt, "close", keep_figure)
    rows = "\n".join(f"{step},{10.0 / step:.6f},0.001,0.0" for step in range(10, 1001, 10))
    (tmp_path / "vae_log.csv").write_text("step,loss,learning_rate,seconds\n" + rows + "\n")
    assert plot_losses(tmp_path, tmp_path / "loss.png", overwrite=False) == ["vae"]
    (figure,) = figures
    (axis,) = figure.axes
    labels = [line.get_label() for line in axis.get_lines()]
    assert labels == ["every 10 steps", "mean of 2 logged losses (20 steps)"], labels
    assert list(axis.get_lines()[0].get_xdata())[:2] == [10, 20]  # x is still the step

    # A log_every = 1 log keeps the plain labels.
    figures.clear()
    rows = "\n".join(f"{step},{1.0 / step:.6f},0.001,0.0" for step in range(1, 101))
    (tmp_path / "vae_log.csv").write_text("step,loss,learning_rate,seconds\n" + rows + "\n")
    plot_losses(tmp_path, tmp_path / "loss.png", overwrite=True)
    labels = [line.get_label() for line in figures[0].axes[0].get_lines()]
    assert labels == ["per step", "mean of 2 steps"], labels
