"""Validation during training (--eval-every) and pipelines.compare_runs (learning curves of several runs)."""

from __future__ import annotations

import json

import pytest

from ki_model.learning_curves import RunError, load_run
from ki_model.train import load_metrics


def test_validation_figures_are_logged(trained_checkpoint):
    metrics = load_metrics(trained_checkpoint)
    first, last = metrics[0], metrics[-1]
    assert "val_flow_loss" not in first  # step 1: not a multiple of --eval-every 2
    for key in ("val_flow_loss", "val_flow_loss_shuffled", "val_fast_loss", "val_fast_accuracy", "val_flow_mse",
                "val_mean_action_mse", "val_hold_still_mse"):
        assert last[key] is not None and last[key] >= 0, key
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
