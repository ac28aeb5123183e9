"""Evaluation of a checkpoint on the manifest's validation (or training) episodes: both action heads in the dataset's
units.

- flow head: `sample_actions` (the action expert), unnormalized with norm_stats.json; one sample per frame, and the
  mean of `flow_samples` samples (one sample of a wide distribution scores worse in MSE than its mean);
- FAST head: `sample_fast_tokens` (greedy) -> ki_data FastTokenizer decode -> unnormalized, constrained to the
  FAST grammar and not; the share of rows that decode is the validity rate;
- teacher-forced FAST token accuracy and both losses, as in training;
- a baseline that always predicts the dataset's mean action, to read the errors against;
- a hold-still baseline (the current state repeated over the chunk) where state and action mean the same thing
  (`hold_still_applies`: same dimension and the same recorded feature names, as pusht's agent xy);
- the flow loss with every row given another row's observation (same actions, noise and time): how much the action
  expert reads the observation at all.
Errors cover real action steps only (`action_is_pad` steps are the last action repeated, not data).
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

from ki_data.loader import LoaderConfig, ShardLoader
from ki_model.checkpoint import check_same_data
from ki_model.observation import Observation, pad_action_dim
from ki_model.policy import Policy

REPORT_FILE = "eval_report.json"
PLOT_FILE = "eval_plot.png"


class ErrorSum:
    """Running squared / absolute error over real (non-pad) action values, per dimension."""

    def __init__(self, dim: int):
        self.sq = np.zeros(dim)
        self.abs = np.zeros(dim)
        self.count = np.zeros(dim)

    def add(self, pred: Float[np.ndarray, "b h d"], true: Float[np.ndarray, "b h d"], real: Bool[np.ndarray, "b h"]) -> None:
        w = real[..., None].astype(np.float64)
        err = (pred.astype(np.float64) - true) * w
        self.sq += (err**2).sum((0, 1))
        self.abs += np.abs(err).sum((0, 1))
        self.count += w.sum((0, 1))

    def summary(self) -> dict[str, Any]:
        """Means over the counted values; None where nothing was counted (e.g. no FAST row decoded)."""
        total = self.count.sum()
        per_dim = lambda x: [float(v) if c else None for v, c in zip(x / np.maximum(self.count, 1), self.count)]  # noqa: E731
        return {
            "mse": float(self.sq.sum() / total) if total else None,
            "mae": float(self.abs.sum() / total) if total else None,
            "mse_per_dim": per_dim(self.sq),
            "mae_per_dim": per_dim(self.abs),
            "values": int(total),
        }


def pad_batch(batch: dict[str, np.ndarray], size: int) -> tuple[dict[str, np.ndarray], int]:
    """Repeat the last row up to `size` rows (one compiled shape for every batch); returns the real row count."""
    n = len(batch["actions"])
    if n == size:
        return batch, n
    idx = np.concatenate([np.arange(n), np.full(size - n, n - 1)])
    return {k: v[idx] for k, v in batch.items()}, n


def shuffle_observation(batch: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Each of the first n rows gets the images, prompt and state of the row n // 2 further on (cyclically); actions
    stay. Half a batch apart, so that rows read in file order (consecutive frames) get a distant frame."""
    keep = ("actions", "action_is_pad", "episode_index", "frame_index", "index")
    roll = np.concatenate([np.roll(np.arange(n), -(n // 2)), np.arange(n, len(batch["actions"]))])
    return {k: (v if k in keep else np.asarray(v)[roll]) for k, v in batch.items()}


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

    spec = policy.fast_decode_spec()
    graphdef, params = nnx.split(policy.model, nnx.Param)
    horizon = policy.config.action_horizon

    @functools.partial(jax.jit, static_argnums=(3,), compiler_options=policy.compiler_options)
    def decode_fast(params, rng, obs: Observation, constrained: bool):
        model = nnx.merge(graphdef, params)
        return model.sample_fast_tokens(rng, obs, spec.max_decode_steps, 0.0, constrained, spec=spec).tokens

    @functools.partial(jax.jit, compiler_options=policy.compiler_options)
    def losses(params, rng, obs: Observation, actions, pad):
        return nnx.merge(graphdef, params).compute_loss(rng, obs, actions, pad)

    dim = policy.manifest.action_dim
    heads = ["flow", "fast_constrained", "fast_unconstrained", "mean_action_baseline"]
    hold_still, hold_still_why = policy.manifest.hold_still()
    heads += ["flow_sample_mean"] if flow_samples > 1 else []
    heads += ["hold_still_baseline"] if hold_still else []
    errors = {k: ErrorSum(dim) for k in heads}
    valid = {"fast_constrained": [0, 0], "fast_unconstrained": [0, 0]}
    loss_sums: dict[str, float] = {"flow": 0.0, "fast": 0.0, "fast_accuracy": 0.0, "flow_shuffled": 0.0}
    frames, plots = 0, []
    key = jax.random.key(seed)
    loader = ShardLoader(
        shards_dir,
        split,
        LoaderConfig(batch_size=batch_size, seed=seed, shuffle=shuffle, augment=False, repeat=False),
        process_index=0,
        process_count=1,
    )
    total = -(-loader.num_rows // batch_size)
    total = min(total, batches) if batches else total
    with loader:
        for i, raw in enumerate(tqdm(loader, total=total, desc="evaluate", disable=not progress)):
            if batches is not None and i >= batches:
                break
            batch, n = pad_batch(raw, batch_size)
            obs = Observation.from_batch(batch)
            rng = jax.random.fold_in(key, i)
            true_n = batch["actions"].astype(np.float32)
            real = ~batch["action_is_pad"].astype(bool)
            real[n:] = False  # padding rows of a short last batch
            state = policy.data.unnormalize_state(batch["state"])
            absolute = functools.partial(policy.data.absolute_actions, state=state)  # stored units -> the dataset's
            true = absolute(true_n)
            flow_n = [policy.sample_normalized(obs, jax.random.fold_in(rng, j)) for j in range(flow_samples)]
            flow = absolute(flow_n[0])
            errors["flow"].add(flow, true, real)
            if flow_samples > 1:
                errors["flow_sample_mean"].add(absolute(np.mean(flow_n, axis=0)), true, real)
            errors["mean_action_baseline"].add(policy.data.mean_action_chunks(state, true.shape[1]), true, real)
            if hold_still:
                errors["hold_still_baseline"].add(policy.data.hold_still_chunks(state, true.shape[1]), true, real)
            fast_pred = {}
            for name, constrained in (("fast_constrained", True), ("fast_unconstrained", False)):
                tokens = np.asarray(decode_fast(params, rng, obs, constrained))
                pred, ok = policy.data.prompt.decode_actions(tokens, horizon, dim)
                pred = absolute(pred)
                ok[n:] = False
                valid[name][0] += int(ok.sum())
                valid[name][1] += n
                errors[name].add(np.nan_to_num(pred), true, real & ok[:, None])
                fast_pred[name] = pred
            pad = batch["action_is_pad"].astype(bool)
            padded = pad_action_dim(true_n, policy.config.action_dim)
            m = jax.device_get(losses(params, rng, obs, padded, pad))
            # Same actions, noise and flow time; only the observation is another row's.
            shuffled = Observation.from_batch(shuffle_observation(batch, n))
            m["flow_shuffled"] = jax.device_get(losses(params, rng, shuffled, padded, pad))["flow"]
            for k in loss_sums:
                loss_sums[k] += float(m[k]) * n  # padded rows repeat a real row: a small bias on the last batch only
            frames += n
            for r in range(0, n, max(1, batch_size // 2)):
                if len(plots) < plot_frames:
                    plots.append(
                        {
                            "episode": int(batch["episode_index"][r]),
                            "frame": int(batch["frame_index"][r]),
                            "true": true[r],
                            "real": real[r],
                            "flow": flow[r],
                            "fast": fast_pred["fast_constrained"][r],
                        }
                    )
    if frames == 0:
        raise ValueError(f"{shards_dir}: no {split} frames to evaluate")

    report: dict[str, Any] = {
        "checkpoint": str(checkpoint_dir),
        "shards": str(shards_dir),
        "split": split,
        "frames": frames,
        "units": "dataset (unnormalized with norm_stats.json)",
        "flow": errors["flow"].summary(),
        "fast_constrained": errors["fast_constrained"].summary() | {"validity_rate": valid["fast_constrained"][0] / frames},
        "fast_unconstrained": errors["fast_unconstrained"].summary() | {"validity_rate": valid["fast_unconstrained"][0] / frames},
        "mean_action_baseline": errors["mean_action_baseline"].summary(),
        "hold_still_baseline": errors["hold_still_baseline"].summary() if hold_still else None,
        "hold_still_applies": hold_still,
        "hold_still_note": hold_still_why,
        "token_accuracy": loss_sums["fast_accuracy"] / frames,
        "flow_loss": loss_sums["flow"] / frames,
        "flow_loss_shuffled_observation": loss_sums["flow_shuffled"] / frames,
        "fast_loss": loss_sums["fast"] / frames,
        "num_flow_steps": policy.num_steps,
    }
    if flow_samples > 1:
        report["flow_sample_mean"] = errors["flow_sample_mean"].summary() | {"samples": flow_samples}
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
