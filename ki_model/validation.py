"""Validation during training: a few fixed batches of the held-out episodes, scored every `--eval-every` steps.

The figures are `ki_model.scoring`'s, as `pipelines.evaluate` reports them, prefixed `val_` in metrics.jsonl next to
the training losses, so that learning curves of several runs can be compared (`python -m pipelines.compare_runs`):
val_flow_loss, val_fast_loss, val_fast_accuracy, val_flow_loss_shuffled_observation, val_flow_mse,
val_mean_action_baseline_mse and, where state and action are the same quantity, val_hold_still_baseline_mse. One flow
sample per row and no FAST decoding (autoregressive, the slow part): cheap enough to run during training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from flax import nnx

from ki_data.artifacts import DataArtifacts
from ki_model.config import Pi05KIConfig
from ki_model.scoring import Scorer, read_batches


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
        data = DataArtifacts.open(shards_dir)
        self.scorer = Scorer(graphdef, config, data, compiler_options=compiler_options)
        # Shuffled, so that a few batches span several episodes; kept, so that every evaluation scores the same rows.
        self.batches = list(read_batches(shards_dir, "val", data, config.action_dim, batch_size=batch_size, seed=seed,
                                         shuffle=True, limit=batches))
        if not self.batches:
            raise ValueError(f"{shards_dir}: no validation rows to score during training")
        self._key = jax.random.key(seed)

    def __call__(self, params: Any) -> dict[str, float]:
        scores = self.scorer.start()
        for i, batch in enumerate(self.batches):
            # The same noise and flow time at every evaluation: the curves move with the weights only.
            self.scorer.score(params, jax.random.fold_in(self._key, i), batch, scores)
        return {f"val_{k}": v for k, v in scores.figures().items()}
