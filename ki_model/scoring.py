"""Scoring a model on shard rows: the one code behind evaluation (`ki_model.evaluate`, `python -m pipelines.evaluate`)
and validation during training (`ki_model.validation`, the `val_*` figures of metrics.jsonl).

The figures, under one set of names (validation logs each with a `val_` prefix):

- flow_loss, fast_loss, fast_accuracy: the training losses on the rows (noise and flow time drawn from the batch's key);
- flow_loss_shuffled_observation: the flow loss with every row given another row's observation (same actions, noise
  and time); equal to flow_loss when the action expert reads nothing of the observation;
- each head's action errors in the dataset's units (`ErrorSum`; flat, `<head>_mse`): `flow` (one sample),
  `flow_sample_mean` (the mean of several samples: one sample of a wide distribution scores worse in MSE than its
  mean), `fast_constrained` / `fast_unconstrained` (greedy FAST tokens decoded, constrained to the FAST grammar or
  not, with `validity_rate`: the share of rows that decode), and two baselines to read them against:
  `mean_action_baseline` (the dataset's mean action) and `hold_still_baseline` (the current state repeated over the
  chunk, where state and action are the same quantity: `Manifest.hold_still`).

Only real rows and real action steps count: a short last batch is padded to the compiled size with copies of its last
row, and those rows are masked out of the losses and the errors alike (`prepare_batch`). A head the model does not
train (flow_loss_weight or fast_loss_weight 0) is not scored: its weights are their initialisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jaxtyping import Bool, Float, Int

from ki_data.artifacts import DataArtifacts
from ki_data.loader import LoaderConfig, ShardLoader
from ki_model.config import Pi05KIConfig
from ki_model.decoding import FastDecodeSpec
from ki_model.observation import Observation, pad_action_dim

LOSSES = ("flow_loss", "fast_loss", "fast_accuracy", "flow_loss_shuffled_observation")
FLOW_HEADS = ("flow", "flow_sample_mean")
FAST_HEADS = ("fast_constrained", "fast_unconstrained")
BASELINES = ("mean_action_baseline", "hold_still_baseline")


class ErrorSum:
    """Running squared / absolute error over real (non-pad) action values, per dimension."""

    def __init__(self, dim: int):
        self.sq = np.zeros(dim)
        self.abs = np.zeros(dim)
        self.count = np.zeros(dim)

    def add(
        self, pred: Float[np.ndarray, "b h d"], true: Float[np.ndarray, "b h d"], real: Bool[np.ndarray, "b h"]
    ) -> None:
        w = real[..., None]
        # where, not a product: a chunk that did not decode is NaN, and NaN * 0 is NaN
        err = np.where(w, pred.astype(np.float64) - true, 0.0)
        self.sq += (err**2).sum((0, 1))
        self.abs += np.abs(err).sum((0, 1))
        self.count += np.broadcast_to(w, err.shape).sum((0, 1))

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


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch ready to score: `size` rows, of which the first `rows` are real."""

    rows: int
    obs: Observation
    shuffled: Observation  # each real row with another real row's observation
    actions: Float[np.ndarray, "b h m"]  # as stored, zero-padded to the model's action dimension: the loss target
    action_is_pad: Bool[np.ndarray, "b h"]  # also True on every step of a padding row
    truth: Float[np.ndarray, "b h d"]  # absolute, in the dataset's units
    state: Float[np.ndarray, "b s"]  # unnormalized
    episode: Int[np.ndarray, " b"]
    frame: Int[np.ndarray, " b"]

    @property
    def real(self) -> Bool[np.ndarray, "b h"]:
        return ~self.action_is_pad


def prepare_batch(
    raw: dict[str, np.ndarray], size: int, data: DataArtifacts, model_action_dim: int, *, real_rows: int | None = None
) -> Batch:
    """Shard columns (a loader batch, possibly short) -> a `Batch` of `size` rows. real_rows: how many leading rows
    of `raw` count (default all); the others are padding, as the copies that fill a short batch are."""
    batch, n = pad_batch(raw, size)
    n = n if real_rows is None else real_rows
    pad = batch["action_is_pad"].astype(bool)  # a copy: the loader's arrays stay as they were
    pad[n:] = True
    loss_mask = np.array(batch["token_loss_mask"])
    loss_mask[n:] = False  # no FAST targets in padding rows either
    batch = batch | {"action_is_pad": pad, "token_loss_mask": loss_mask}
    stored = batch["actions"].astype(np.float32)
    state = data.unnormalize_state(batch["state"])
    return Batch(
        rows=n,
        obs=Observation.from_batch(batch),
        shuffled=Observation.from_batch(shuffle_observation(batch, n)),
        actions=pad_action_dim(stored, model_action_dim),
        action_is_pad=pad,
        truth=data.absolute_actions(stored, state),
        state=state,
        episode=np.asarray(batch["episode_index"]),
        frame=np.asarray(batch["frame_index"]),
    )


def read_batches(
    shards_dir: str | Path,
    split: str,
    data: DataArtifacts,
    model_action_dim: int,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = False,
    limit: int | None = None,
) -> Iterator[Batch]:
    """The split's rows as scoring batches, in file order or the training loader's shuffled order (fixed by
    `seed`); at most `limit` batches."""
    loader = ShardLoader(
        shards_dir,
        split,
        LoaderConfig(batch_size=batch_size, seed=seed, shuffle=shuffle, augment=False, repeat=False),
        process_index=0,
        process_count=1,
    )
    with loader:
        for i, raw in enumerate(loader):
            if limit is not None and i >= limit:
                return
            yield prepare_batch(raw, batch_size, data, model_action_dim)


class Scores:
    """Running sums of every figure over the batches scored so far."""

    def __init__(self, heads: list[str], unscored: list[str], dim: int, flow_samples: int):
        self.errors = {h: ErrorSum(dim) for h in heads}
        self.unscored = unscored  # heads the model does not train
        self.decoded = {h: 0 for h in heads if h in FAST_HEADS}
        self.loss_sums = dict.fromkeys(LOSSES, 0.0)
        self.flow_samples = flow_samples
        self.rows = 0

    def add_losses(self, losses: dict[str, float | Float[np.ndarray, ""]], rows: int) -> None:
        # A batch's losses are means over its real steps and FAST targets; weighted by its rows, short ones count less
        for k in LOSSES:
            self.loss_sums[k] += float(losses[k]) * rows
        self.rows += rows

    def add_errors(
        self, head: str, pred: Float[np.ndarray, "b h d"], batch: Batch, decoded: Bool[np.ndarray, " b"] | None = None
    ) -> None:
        real = batch.real
        if decoded is not None:
            decoded = decoded & (np.arange(len(decoded)) < batch.rows)
            self.decoded[head] += int(decoded.sum())
            real = real & decoded[:, None]
        self.errors[head].add(pred, batch.truth, real)

    def figures(self) -> dict[str, float]:
        """The losses and each head's MSE (`<head>_mse`), flat; NaN for what was not scored."""
        out = {k: v / self.rows for k, v in self.loss_sums.items()}
        for head in [*self.errors, *self.unscored]:
            mse = self.errors[head].summary()["mse"] if head in self.errors else None
            out[f"{head}_mse"] = float("nan") if mse is None else mse
        return out

    def report(self) -> dict[str, Any]:
        """The losses, and each head's error summary (None for a head not scored)."""
        out: dict[str, Any] = {k: v / self.rows for k, v in self.loss_sums.items()}
        out |= {head: None for head in self.unscored}
        for head, errors in self.errors.items():
            out[head] = errors.summary()
            if head in self.decoded:
                out[head]["validity_rate"] = self.decoded[head] / self.rows
        if "flow_sample_mean" in out and out["flow_sample_mean"] is not None:
            out["flow_sample_mean"]["samples"] = self.flow_samples
        return out


class Scorer:
    """The jitted programs behind every figure, for one model graph; the parameters come with each call, so that
    training scores its current weights with the programs compiled once.

    flow_samples: flow samples per row (`flow_sample_mean` above 1); fast: decode the FAST heads (autoregressive:
    the slow part, left out of validation during training)."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        config: Pi05KIConfig,
        data: DataArtifacts,
        *,
        flow_samples: int = 1,
        fast: bool = False,
        compiler_options: dict[str, Any] | None = None,
    ):
        if flow_samples < 1:
            raise ValueError(f"flow_samples must be at least 1, got {flow_samples}")
        self.config, self.data = config, data
        self.flow_samples = flow_samples
        self.hold_still = data.manifest.hold_still()[0]
        self.trains_flow, self.trains_fast = config.flow_loss_weight != 0, config.fast_loss_weight != 0
        heads = ["flow", *(["flow_sample_mean"] if flow_samples > 1 else []), *(FAST_HEADS if fast else [])]
        trained = {h: self.trains_flow if h in FLOW_HEADS else self.trains_fast for h in heads}
        self.heads = [h for h in heads if trained[h]] + ["mean_action_baseline"]
        self.heads += ["hold_still_baseline"] if self.hold_still else []
        self.unscored = [h for h in heads if not trained[h]]

        def losses(params: Any, rng: jax.Array, obs: Observation, actions: Float[jax.Array, "b h m"],
                   pad: Bool[jax.Array, "b h"]) -> dict[str, jax.Array]:
            return nnx.merge(graphdef, params).compute_loss(rng, obs, actions, pad)

        def sample(params: Any, rng: jax.Array, obs: Observation) -> Float[jax.Array, "b h m"]:
            return nnx.merge(graphdef, params).sample_actions(rng, obs)

        self._losses = jax.jit(losses, compiler_options=compiler_options)
        self._sample = jax.jit(sample, compiler_options=compiler_options)
        if fast:
            # The FAST tokens cover the dataset's own action dimensions, whatever the model's.
            spec = FastDecodeSpec.from_grammar(data.prompt.grammar(), config.action_horizon, data.manifest.action_dim)

            def decode_fast(params: Any, rng: jax.Array, obs: Observation, constrained: bool) -> Int[jax.Array, "b t"]:
                model = nnx.merge(graphdef, params)
                return model.sample_fast_tokens(rng, obs, spec.max_decode_steps, 0.0, constrained, spec=spec).tokens

            self._decode_fast = jax.jit(decode_fast, static_argnums=(3,), compiler_options=compiler_options)

    def start(self) -> Scores:
        return Scores(self.heads, self.unscored, self.data.manifest.action_dim, self.flow_samples)

    def score(self, params: Any, rng: jax.Array, batch: Batch, scores: Scores) -> dict[str, Float[np.ndarray, "b h d"]]:
        """Adds one batch to `scores`; returns each scored head's chunks (absolute, in the dataset's units)."""
        def losses(obs: Observation) -> dict[str, np.ndarray]:
            return jax.device_get(self._losses(params, rng, obs, batch.actions, batch.action_is_pad))

        m = losses(batch.obs)
        # Same actions, noise and flow time; only the observation is another row's.
        shuffled = losses(batch.shuffled)["flow"] if self.trains_flow else float("nan")
        scores.add_losses({"flow_loss": m["flow"], "fast_loss": m["fast"], "fast_accuracy": m["fast_accuracy"],
                           "flow_loss_shuffled_observation": shuffled}, batch.rows)
        dim, horizon = self.data.manifest.action_dim, self.config.action_horizon
        absolute = lambda chunks: self.data.absolute_actions(chunks, batch.state)  # noqa: E731
        preds = {"mean_action_baseline": self.data.mean_action_chunks(batch.state, horizon)}
        if self.hold_still:
            preds["hold_still_baseline"] = self.data.hold_still_chunks(batch.state, horizon)
        if "flow" in self.heads:
            draws = [np.asarray(self._sample(params, jax.random.fold_in(rng, j), batch.obs))[..., :dim]
                     for j in range(self.flow_samples)]
            preds["flow"] = absolute(draws[0])
            if self.flow_samples > 1:
                preds["flow_sample_mean"] = absolute(np.mean(draws, axis=0))
        for head, pred in preds.items():
            scores.add_errors(head, pred, batch)
        for head in FAST_HEADS:
            if head in self.heads:
                tokens = np.asarray(self._decode_fast(params, rng, batch.obs, head == "fast_constrained"))
                chunks, decoded = self.data.prompt.decode_actions(tokens, horizon, dim)
                preds[head] = absolute(chunks)
                scores.add_errors(head, preds[head], batch, decoded)
        return preds
