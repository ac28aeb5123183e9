"""Experiment tracking (ki_model.tracking): with `--wandb PROJECT` and no network, an offline W&B run under the
checkpoint directory holds the run's config, every logged figure (validation ones too) and the plots the run made;
without the flag nothing of wandb is imported."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ki_model.tracking import WANDB_RUN, format_losses, format_metrics, load_metrics

REPO = Path(__file__).resolve().parents[1]
# conftest's trained_checkpoint settings (2 steps of batch 8, EMA, the fast test schedule): its compiled programs
# are reused.
RUN = dict(steps=2, batch_size=8, log_every=1, save_every=2, num_workers=0, progress=False, ema_decay=0.9,
           fast_compile=True, eval_every=2, eval_batches=1)


def wandb_records(run_dir: Path) -> list:
    """The records of an offline run's `run-<id>.wandb` file: W&B's framing of leveldb's log format (a 7-byte file
    header; 32 KiB blocks of records, each a 7-byte header - checksum, length, type - and a piece of one protobuf
    `Record`, whole or first/middle/last), parsed with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos, pieces, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding at the end of the file
            break
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def _config(records: list) -> dict:
    out = {}
    for r in records:
        items = r.run.config.update if r.WhichOneof("record_type") == "run" else \
            r.config.update if r.WhichOneof("record_type") == "config" else []
        for item in items:
            value = json.loads(item.value_json)
            out[item.key] = value.get("value", value) if isinstance(value, dict) else value
    return out


def _history(records: list) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            out.setdefault(int(r.history.step.num), {}).update(row)
    return out


@pytest.fixture(scope="module")
def offline_run(demo_shards, tmp_path_factory) -> Path:
    """Trained with --wandb and WANDB_MODE=offline (wandb's config and cache under the test's directory); at its last
    step the run writes a plot into its directory, as an evaluation would."""
    from ki_model.compile import enable_compilation_cache
    from ki_model.optimizer import OptimizerConfig
    from ki_model.train import TrainConfig, train

    enable_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache")
    base = tmp_path_factory.mktemp("wandb")
    out = base / "ckpt"

    def plot(metrics: dict) -> None:
        if metrics["step"] == RUN["steps"]:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            (out / "eval").mkdir()
            fig = plt.figure()
            plt.plot([0, 1], [metrics["flow_loss"], metrics["fast_loss"]])
            fig.savefig(out / "eval" / "eval_plot.png")
            plt.close(fig)

    optimizer = OptimizerConfig(peak_lr=3e-3, warmup_steps=4, decay_steps=200, decay_lr=3e-4)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": base / "config",
                           "WANDB_CACHE_DIR": base / "cache", "WANDB_DATA_DIR": base / "data"}.items():
            mp.setenv(key, str(value))
        train(TrainConfig(shards=str(demo_shards), checkpoint_dir=str(out), optimizer=optimizer, wandb="ki-tests",
                          **RUN), on_log=plot)
    _wait_for_exit_record(out)
    return out


def _wait_for_exit_record(out: Path, timeout_s: float = 120.0) -> None:
    """wandb's service process writes the run file on its own schedule: `finish()` can return before the file is
    flushed (once in a fresh-clone CI run the config test read a file without its run record). The file is complete
    once its last record, the run's exit, can be read; every record before it was written before it."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout_s
    while True:
        files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
        try:
            kinds = [r.WhichOneof("record_type") for r in wandb_records(files[0].parent)] if files else []
        except (AssertionError, DecodeError):  # not yet its header, or a record half written
            kinds = []
        if kinds and kinds[-1] == "exit":
            return
        assert time.monotonic() < deadline, f"no exit record in the offline W&B run after {timeout_s:.0f} s: {kinds}"
        time.sleep(0.5)


def test_the_offline_run_holds_the_config(offline_run):
    (run_dir,) = (offline_run / "wandb").glob("offline-run-*")
    saved = json.loads((offline_run / WANDB_RUN).read_text())
    assert run_dir.name.endswith(saved["id"]) and saved["project"] == "ki-tests"
    config = _config(wandb_records(run_dir))
    assert config["train"] == json.loads((offline_run / "train_config.json").read_text())
    assert config["train"]["wandb"] == "ki-tests" and config["train"]["steps"] == RUN["steps"]
    assert config["model"] == json.loads((offline_run / "model_config.json").read_text())


def test_the_offline_run_holds_every_logged_figure(offline_run):
    (run_dir,) = (offline_run / "wandb").glob("offline-run-*")
    history = _history(wandb_records(run_dir))
    metrics = load_metrics(offline_run)
    assert sorted(history) == [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        row = history[m["step"]]
        for key in ("flow_loss", "fast_loss", "fast_accuracy", "grad_norm", "learning_rate"):
            assert row[f"train/{key}"] == pytest.approx(m[key]), (m["step"], key)
    val = {k: v for k, v in metrics[-1].items() if k.startswith("val_") and v is not None}
    assert len(val) >= 4 and "val_flow_loss" in val  # the validation figures of --eval-every
    for key, value in val.items():
        assert history[2][f"val/{key[4:]}"] == pytest.approx(value), key


def test_the_offline_run_holds_the_plots_the_run_made(offline_run):
    (run_dir,) = (offline_run / "wandb").glob("offline-run-*")
    row = _history(wandb_records(run_dir))[RUN["steps"]]
    assert row["plots/eval/eval_plot/_type"] == "image-file"  # the image's fields, flattened by W&B
    (image,) = (run_dir / "files" / "media" / "images" / "plots" / "eval").glob("eval_plot_*.png")
    assert image.read_bytes() == (offline_run / "eval" / "eval_plot.png").read_bytes()


NO_WANDB = """
import json, sys
from ki_model.compile import enable_compilation_cache
enable_compilation_cache(sys.argv[3])
from pipelines.train import main
rc = main(["--shards", sys.argv[1], "--checkpoint-dir", sys.argv[2], "--steps", "2", "--batch-size", "8",
           "--log-every", "1", "--save-every", "2", "--workers", "0", "--no-progress", "--ema-decay", "0.9",
           "--fast-compile", "--eval-every", "2", "--eval-batches", "1",
           "--peak-lr", "3e-3", "--warmup-steps", "4", "--decay-steps", "200", "--decay-lr", "3e-4"])
print(json.dumps({"rc": rc, "wandb": sorted(m for m in sys.modules if m.split(".")[0] == "wandb")}))
"""


@pytest.mark.slow  # 25 s: a whole training run in a subprocess
def test_a_run_without_the_flag_imports_nothing_of_wandb(demo_shards, tmp_path, tmp_path_factory):
    out = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", NO_WANDB, str(demo_shards), str(out),
                           str(tmp_path_factory.getbasetemp() / "jax_cache")],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "wandb": []}
    assert [m["step"] for m in load_metrics(out)] == [1, 2]  # it did train and log
    assert not (out / "wandb").exists() and not (out / WANDB_RUN).exists()


def test_the_terminal_lines_leave_out_a_head_that_is_not_trained():
    nan = float("nan")
    step = {"step": 500, "flow_loss": nan, "fast_loss": 3.7212, "fast_accuracy": 0.361, "grad_norm_backbone": 0.5,
            "grad_norm_action_expert": 0.0, "learning_rate": 3e-4, "steps_per_s": 9.0, "samples_per_s": 288.0}
    assert format_losses(step) == "fast 3.7212, acc 0.361"  # stage 1 of the demo: FAST only
    assert "flow" not in format_metrics(step) and "fast 3.7212  acc 0.361" in format_metrics(step)
    flow_only = step | {"flow_loss": 0.0659, "fast_loss": nan, "fast_accuracy": nan}
    assert format_losses(flow_only) == "flow 0.0659"
    assert format_losses(flow_only | {"fast_loss": 3.5, "fast_accuracy": 0.4}) == "flow 0.0659, fast 3.5000, acc 0.400"
