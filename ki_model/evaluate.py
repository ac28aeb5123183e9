"""Evaluation of a checkpoint on the manifest's validation (or training) episodes: both action heads in the dataset's
units, against the mean-action and hold-still baselines, with the figures and names of `ki_model.scoring` (the flow
head's mean of `flow_samples` samples, both FAST decodings and their validity rate, the losses and the flow loss with
another row's observation).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jaxtyping import Bool, Float
from tqdm import tqdm

from ki_data.manifest import Manifest
from ki_model.checkpoint import check_same_data
from ki_model.observation import Observation
from ki_model.policy import Policy
from ki_model.scoring import Scorer, read_batches

REPORT_FILE = "eval_report.json"
PLOT_FILE = "eval_plot.png"


def evaluate(
    checkpoint_dir: str | Path,
    shards_dir: str | Path,
    *,
    output_dir: str | Path | None = None,
    batches: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    plot_frames: int = 4,
    progress: bool = True,
    fast_compile: bool = False,
    split: str = "val",
    flow_samples: int = 8,
    shuffle: bool = False,
) -> dict[str, Any]:
    """Writes `eval_report.json` and `eval_plot.png` into `output_dir` (default `<checkpoint_dir>/eval`).

    split: the manifest's "val" (held-out episodes) or "train" episodes (memorising vs learning).
    flow_samples: flow samples averaged per frame for `flow_sample_mean` (1: not reported).
    shuffle: read the split in the training loader's shuffled order (a fixed seed), so that `batches` spans
    episodes; default in file order.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if flow_samples < 1:
        raise ValueError(f"flow_samples must be at least 1, got {flow_samples}")
    policy = Policy.load(checkpoint_dir, seed=seed, fast_compile=fast_compile)
    check_same_data(checkpoint_dir, shards_dir, doing="evaluate")
    out = Path(output_dir) if output_dir is not None else Path(checkpoint_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)

    graphdef, params = nnx.split(policy.model, nnx.Param)
    scorer = Scorer(graphdef, policy.config, policy.data, flow_samples=flow_samples, fast=True,
                    compiler_options=policy.compiler_options)
    scores = scorer.start()
    plots: list[dict[str, Any]] = []
    key = jax.random.key(seed)
    total = -(-sum(e.rows for e in Manifest.load(shards_dir).shard_entries(split)) // batch_size)
    total = min(total, batches) if batches else total
    stream = read_batches(shards_dir, split, policy.data, policy.config.action_dim, batch_size=batch_size, seed=seed,
                          shuffle=shuffle, limit=batches)
    for i, batch in enumerate(tqdm(stream, total=total, desc="evaluate", disable=not progress)):
        preds = scorer.score(params, jax.random.fold_in(key, i), batch, scores)
        missing = np.full_like(batch.truth, np.nan)  # a head that was not scored is left out of the plot
        for r in range(0, batch.rows, max(1, batch_size // 2)):
            if len(plots) < plot_frames:
                plots.append({"episode": int(batch.episode[r]), "frame": int(batch.frame[r]), "true": batch.truth[r],
                              "real": batch.real[r], "flow": preds.get("flow", missing)[r],
                              "fast": preds.get("fast_constrained", missing)[r]})
    if scores.rows == 0:
        raise ValueError(f"{shards_dir}: no {split} frames to evaluate")

    hold_still, hold_still_why = policy.manifest.hold_still()
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint_dir),
        "shards": str(shards_dir),
        "split": split,
        "frames": scores.rows,
        "units": "dataset (unnormalized with norm_stats.json)",
        "hold_still_baseline": None,
        "hold_still_applies": hold_still,
        "hold_still_note": hold_still_why,
        "num_flow_steps": policy.config.num_flow_steps,
    } | scores.report()
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    plot_chunks(plots, out / PLOT_FILE)
    report["report_path"] = str(out / REPORT_FILE)
    report["plot_path"] = str(out / PLOT_FILE)
    return report


@dataclasses.dataclass(frozen=True)
class Predictions:
    """A trained model's two action heads on one row, in the dataset's units, next to the stored chunk."""

    truth: Float[np.ndarray, "h d"]
    flow: Float[np.ndarray, "h d"]
    fast: Float[np.ndarray, "h d"] | None  # None when the sampled FAST tokens did not decode
    fast_ids: list[int]
    fast_error: str | None
    action_is_pad: Bool[np.ndarray, " h"]

    def errors(self) -> dict[str, float | None]:
        """Mean absolute error of each head over the steps that are not padding."""
        keep = ~self.action_is_pad

        def mae(x):
            return None if x is None else float(np.abs(x[keep] - self.truth[keep]).mean())

        return {"flow_mae": mae(self.flow), "fast_mae": mae(self.fast)}


def predict_row(policy: Policy, batch: dict[str, np.ndarray], *, seed: int = 0, constrained: bool = True) -> Predictions:
    """The flow head's actions and the backbone's greedy FAST tokens (decoded) for a shard row given as a batch of
    one (decoded images, the six token columns, `actions`, `action_is_pad`)."""
    obs = Observation.from_batch(batch)
    rng = jax.random.key(seed)
    horizon, dim = policy.config.action_horizon, policy.manifest.action_dim
    flow = policy.sample_normalized(obs, rng)[0]
    spec = policy.fast_decode_spec()
    tokens = np.asarray(policy.model.sample_fast_tokens(rng, obs, spec.max_decode_steps, 0.0, constrained, spec=spec).tokens)[0]
    prompt = policy.data.prompt
    state = policy.data.unnormalize_state(np.asarray(batch["state"], np.float32))[0]
    absolute = functools.partial(policy.data.absolute_actions, state=state)  # stored units -> the dataset's
    reading = prompt.read_postfix(tokens, horizon, dim)
    fast = None if reading.actions is None else absolute(reading.actions)
    return Predictions(
        truth=absolute(np.asarray(batch["actions"][0], np.float32)),
        flow=absolute(flow),
        fast=fast,
        fast_ids=reading.fast_ids,
        fast_error=reading.error,
        action_is_pad=np.asarray(batch["action_is_pad"][0], bool),
    )


def plot_chunks(frames: list[dict[str, Any]], path: Path) -> None:
    """One row per frame, one column per action dimension: true chunk, flow head, FAST head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dim = frames[0]["true"].shape[-1]
    fig, axes = plt.subplots(len(frames), dim, figsize=(3.2 * dim, 2.2 * len(frames)), squeeze=False)
    for r, f in enumerate(frames):
        t = np.arange(len(f["true"]))
        for d in range(dim):
            ax = axes[r, d]
            ax.plot(t, f["true"][:, d], "k-", lw=2, label="true")
            if np.all(np.isfinite(f["flow"][:, d])):
                ax.plot(t, f["flow"][:, d], "C0--", label="flow")
            if np.all(np.isfinite(f["fast"][:, d])):
                ax.plot(t, f["fast"][:, d], "C1:", lw=2, label="FAST")
            pad = np.flatnonzero(~f["real"])
            if len(pad):
                ax.axvspan(pad[0] - 0.5, t[-1] + 0.5, color="0.9", zorder=0)
            ax.set_title(f"ep {f['episode']} frame {f['frame']}  dim {d}", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
