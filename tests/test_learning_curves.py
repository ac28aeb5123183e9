"""Validation during training (--eval-every) and pipelines.compare_runs (learning curves of several runs)."""

from __future__ import annotations

import json

import pytest

from ki_model.learning_curves import RunError, load_run
from ki_model.scoring import LOSSES
from ki_model.train import load_metrics


def test_validation_figures_are_logged(trained_checkpoint):
    metrics = load_metrics(trained_checkpoint)
    first, last = metrics[0], metrics[-1]
    assert "val_flow_loss" not in first  # step 1: not a multiple of --eval-every 2
    # Evaluation's names (ki_model.scoring), prefixed: the losses, and the flow head's and the baselines' MSE.
    names = [*LOSSES, "flow_mse", "mean_action_baseline_mse", "hold_still_baseline_mse"]
    assert {k for k in last if k.startswith("val_")} == {f"val_{k}" for k in names}
    for key in names:
        assert last[f"val_{key}"] >= 0, key  # NaN (a head not scored) fails too
    assert 0.0 <= last["val_fast_accuracy"] <= 1.0


def test_compare_runs_plots_and_tabulates(trained_checkpoint, tmp_path, capsys):
    from pipelines.compare_runs import main

    plot = tmp_path / "curves.png"
    assert main([str(trained_checkpoint), str(trained_checkpoint), "--labels", "first,second", "--output", str(plot)]) == 0
    out = capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = out.splitlines()
    assert lines[1].startswith("first") and lines[2].startswith("second")
    assert "insulation on, FAST weight 1" in out
    run = load_run(trained_checkpoint)
    steps, val = run.series("val_flow_loss")
    assert steps.tolist() == [2] and val[0] == json.loads(
        (trained_checkpoint / "metrics.jsonl").read_text().splitlines()[-1])["val_flow_loss"]


def test_compare_runs_refuses_a_directory_without_metrics(tmp_path, capsys):
    from pipelines.compare_runs import main

    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    with pytest.raises(RunError):
        load_run(tmp_path)


def test_runs_logged_under_the_old_validation_names_still_compare(tmp_path):
    old = {"step": 2, "val_flow_loss": 0.4, "val_flow_loss_shuffled": 0.5, "val_hold_still_mse": 3.0,
           "val_mean_action_mse": 4.0}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(old) + "\n")
    run = load_run(tmp_path)
    for name, value in (("val_flow_loss_shuffled_observation", 0.5), ("val_hold_still_baseline_mse", 3.0),
                        ("val_mean_action_baseline_mse", 4.0), ("val_flow_loss", 0.4)):
        assert run.series(name)[1].tolist() == [value], name
