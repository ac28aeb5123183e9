"""ki_model.evaluate / pipelines.evaluate: both heads on the validation episodes, in the dataset's units."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ki_data.normalize import load_norm_stats, unnormalize
from ki_data.manifest import Manifest
from ki_data.schema import read_rows
from ki_model.evaluate import evaluate
from ki_model.scoring import LOSSES
from ki_model.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def report(trained_checkpoint, demo_shards, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("evaluate") / "report"
    return evaluate(trained_checkpoint, demo_shards, output_dir=out, batches=1, batch_size=8, progress=False,
                    fast_compile=True)


def test_report_and_plot_are_written(report):
    saved = json.loads(Path(report["report_path"]).read_text())
    assert saved["frames"] == report["frames"] == 8
    assert Path(report["plot_path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_are_consistent(report, demo_shards):
    m = Manifest.load(demo_shards)
    for head in ("flow", "fast_constrained", "mean_action_baseline"):
        e = report[head]
        assert e["mse"] >= e["mae"] ** 2 - 1e-9 and e["mae"] > 0  # Jensen: a wrong MSE/MAE pairing would break it
        assert len(e["mae_per_dim"]) == m.action_dim
    # Constrained decoding always yields horizon x dim coefficients, so every row decodes.
    assert report["fast_constrained"]["validity_rate"] == 1.0
    assert 0.0 <= report["fast_unconstrained"]["validity_rate"] <= 1.0
    assert 0.0 <= report["fast_accuracy"] <= 1.0 and report["flow_loss"] > 0 and report["fast_loss"] > 0
    # The names of ki_model.scoring, which validation during training logs with a `val_` prefix.
    assert set(LOSSES) <= set(report) and "token_accuracy" not in report


def test_errors_are_in_the_datasets_units(report, demo_shards):
    """The baseline error recomputed by hand from the first 8 validation rows, unnormalized with norm_stats.json."""
    m = Manifest.load(demo_shards)
    rows = read_rows(Manifest.load(demo_shards).shard_paths(demo_shards, "val")[0])
    stats = load_norm_stats(demo_shards / "norm_stats.json")["actions"]
    true = unnormalize(rows["actions"][:8], stats, mode=m.norm_mode)
    real = ~rows["action_is_pad"][:8]
    err = (stats.mean - true)[real]
    assert report["mean_action_baseline"]["mse"] == pytest.approx(float(np.mean(err**2)), rel=1e-5)
    assert report["mean_action_baseline"]["mae"] == pytest.approx(float(np.mean(np.abs(err))), rel=1e-5)
    assert report["mean_action_baseline"]["values"] == real.sum() * m.action_dim


def test_shards_of_another_layout_are_refused(trained_checkpoint, demo_shards, tmp_path, capsys):
    from pipelines.evaluate import main

    other = tmp_path / "shards"
    shutil.copytree(demo_shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["max_text_len"] += 1
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="cannot evaluate: .*max_text_len"):
        evaluate(trained_checkpoint, other, output_dir=tmp_path / "r", progress=False)
    assert main(["--checkpoint", str(trained_checkpoint), "--shards", str(other)]) == 2
    assert "max_text_len" in capsys.readouterr().err


def test_hold_still_baseline_is_the_state_repeated(report, demo_shards):
    """By hand on the same 8 validation rows: the state (unnormalized) as every action of the chunk."""
    m = Manifest.load(demo_shards)
    rows = read_rows(m.shard_paths(demo_shards, "val")[0])
    stats = load_norm_stats(demo_shards / "norm_stats.json")
    true = unnormalize(rows["actions"][:8], stats["actions"], mode=m.norm_mode)
    state = unnormalize(rows["state"][:8], stats["state"], mode=m.norm_mode)
    real = ~rows["action_is_pad"][:8]
    err = (state[:, None, :] - true)[real]
    assert report["hold_still_applies"] is True and "x, y" in report["hold_still_note"]
    assert report["hold_still_baseline"]["mse"] == pytest.approx(float(np.mean(err**2)), rel=1e-5)
    assert report["hold_still_baseline"]["mae"] == pytest.approx(float(np.mean(np.abs(err))), rel=1e-5)
    assert report["hold_still_baseline"]["values"] == real.sum() * m.action_dim


def test_flow_sample_mean_and_shuffled_observation_are_reported(report):
    assert report["flow_sample_mean"]["samples"] == 8 and report["flow_sample_mean"]["values"] == report["flow"]["values"]
    assert report["flow_sample_mean"]["mse"] > 0 and report["flow_loss_shuffled_observation"] > 0
    assert report["split"] == "val"


def test_hold_still_applies_only_to_the_same_quantity(demo_shards):
    import dataclasses

    pusht = Manifest.load(demo_shards)
    assert pusht.state_names == pusht.action_names == ("x", "y") and pusht.hold_still()[0]
    assert not dataclasses.replace(pusht, action_dim=3).hold_still()[0]
    no, why = dataclasses.replace(pusht, state_names=None).hold_still()
    assert not no and "no feature names" in why
    no, why = dataclasses.replace(pusht, action_names=("vx", "vy")).hold_still()
    assert not no and "differ" in why


def test_training_split_and_command_line(trained_checkpoint, demo_shards, tmp_path, capsys):
    from pipelines.evaluate import main

    code = main(["--checkpoint", str(trained_checkpoint), "--shards", str(demo_shards), "--split", "train",
                 "--batches", "1", "--batch-size", "8", "--flow-samples", "2", "--output", str(tmp_path),
                 "--fast-compile"])
    assert code == 0
    out = capsys.readouterr().out
    assert "8 training frames" in out and "hold-still baseline" in out and "mean of 2" in out
    saved = json.loads((tmp_path / "eval_report.json").read_text())
    assert saved["split"] == "train" and saved["flow_sample_mean"]["samples"] == 2
