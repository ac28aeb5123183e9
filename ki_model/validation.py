"""Validation during training: a few fixed batches of the held-out episodes, scored every `--eval-every` steps.

The figures land in metrics.jsonl next to the training losses (`val_*` keys), so that learning curves of several runs
can be compared (`python -m pipelines.compare_runs`):

- val_flow_loss, val_fast_loss, val_fast_accuracy: the training losses on held-out rows (fixed noise and time);
- val_flow_loss_shuffled: the flow loss with every row given another row's observation; equal to val_flow_loss when
  the action expert reads nothing of the observation;
- val_flow_mse: one flow sample against the true chunk in the dataset's units (real steps), beside the constant
  val_mean_action_mse and, where state and action are the same quantity, val_hold_still_mse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from ki_data.artifacts import DataArtifacts
from ki_data.loader import LoaderConfig, ShardLoader
from ki_model.config import Pi05KIConfig
from ki_model.evaluate import ErrorSum, pad_batch, shuffle_observation
from ki_model.observation import Observation, pad_action_dim


class Validator:
    """Holds `batches` validation batches (decoded once) and scores parameters on them."""

    def __init__(
        self,
        shards_dir: str | Path,
        config: Pi05KIConfig,
        graphdef: nnx.GraphDef,
        *,
        batches: int = 2,
        batch_size: int = 32,
        seed: int = 0,
        compiler_options: dict[str, Any] | None = None,
    ):
        self.config = config
        self.data = data = DataArtifacts.open(shards_dir)
        loader = ShardLoader(
            shards_dir,
            "val",
            LoaderConfig(batch_size=batch_size, seed=seed, shuffle=True, augment=False, repeat=False),
            process_index=0,
            process_count=1,
        )
        # (obs, shuffled obs, model actions, pad, real steps, true absolute chunk, raw state) per batch
        self.batches: list[tuple[Observation, Observation, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        dim = data.manifest.action_dim
        fixed = {"mean_action": ErrorSum(dim)}
        hold_still, _ = data.manifest.hold_still()
        if hold_still:
            fixed["hold_still"] = ErrorSum(dim)
        with loader:
            for i, raw in enumerate(loader):
                if i >= batches:
                    break
                batch, n = pad_batch(raw, batch_size)
                real = ~batch["action_is_pad"].astype(bool)
                real[n:] = False
                actions = batch["actions"].astype(np.float32)
                state = data.unnormalize_state(batch["state"])
                true = data.absolute_actions(actions, state)
                actions = pad_action_dim(actions, config.action_dim)  # what the model trains on
                obs = Observation.from_batch(batch)
                shuffled = Observation.from_batch(shuffle_observation(batch, n))
                self.batches.append((obs, shuffled, actions, batch["action_is_pad"].astype(bool), real, true, state))
                preds = {"mean_action": data.mean_action_chunks(state, true.shape[1])}
                if hold_still:
                    preds["hold_still"] = data.hold_still_chunks(state, true.shape[1])
                for k, pred in preds.items():
                    fixed[k].add(pred, true, real)
        if not self.batches:
            raise ValueError(f"{shards_dir}: no validation rows to score during training")
        self.fixed = {f"val_{k}_mse": errors.summary()["mse"] or 0.0 for k, errors in fixed.items()}
        self._key = jax.random.key(seed)

        def losses(params, rng, obs, actions, pad):
            return nnx.merge(graphdef, params).compute_loss(rng, obs, actions, pad)

        def sample(params, rng, obs):
            return nnx.merge(graphdef, params).sample_actions(rng, obs)

        self._losses = jax.jit(losses, compiler_options=compiler_options)
        self._sample = jax.jit(sample, compiler_options=compiler_options)

    def __call__(self, params: Any) -> dict[str, float]:
        sums = {"val_flow_loss": 0.0, "val_fast_loss": 0.0, "val_fast_accuracy": 0.0, "val_flow_loss_shuffled": 0.0}
        flow = ErrorSum(self.data.manifest.action_dim)
        for i, (obs, shuffled, actions, pad, real, true, state) in enumerate(self.batches):
            rng = jax.random.fold_in(self._key, i)  # the same noise and time at every evaluation
            m = jax.device_get(self._losses(params, rng, obs, actions, pad))
            sums["val_flow_loss"] += float(m["flow"])
            sums["val_fast_loss"] += float(m["fast"])
            sums["val_fast_accuracy"] += float(m["fast_accuracy"])
            if not self.config.flow_loss_weight:  # FAST-only training: the action expert is untrained, not scored
                sums["val_flow_loss_shuffled"] = float("nan")
                continue
            sums["val_flow_loss_shuffled"] += float(jax.device_get(self._losses(params, rng, shuffled, actions, pad))["flow"])
            pred = np.asarray(self._sample(params, rng, obs))[..., : self.data.manifest.action_dim]
            flow.add(self.data.absolute_actions(pred, state), true, real)
        out = {k: v / len(self.batches) for k, v in sums.items()}
        out["val_flow_mse"] = (flow.summary()["mse"] or 0.0) if self.config.flow_loss_weight else float("nan")
        return out | self.fixed
