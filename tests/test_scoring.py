"""ki_model.scoring: the one scoring code behind evaluation (pipelines.evaluate) and validation during training."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from ki_data.artifacts import DataArtifacts
from ki_data.loader import LoaderConfig, ShardLoader
from ki_model.checkpoint import load_model_config
from ki_model.policy import Policy
from ki_model.scoring import LOSSES, ErrorSum, Scorer, prepare_batch


def test_error_sum_counts_real_steps_only():
    errors = ErrorSum(2)
    pred = np.array([[[1.0, 2.0], [np.nan, np.nan]]])  # step 2: padding, or a chunk that did not decode
    errors.add(pred, np.zeros((1, 2, 2)), np.array([[True, False]]))
    s = errors.summary()
    assert s["mse"] == 2.5 and s["mae"] == 1.5 and s["values"] == 2
    assert s["mse_per_dim"] == [1.0, 4.0] and s["mae_per_dim"] == [1.0, 2.0]


def test_padding_rows_are_out_of_every_figure(trained_checkpoint, demo_shards):
    """Five real rows in a batch of 8: the figures are the same whether the other three rows are copies of the fifth
    (a short last batch) or three other frames, so no padding row reaches a loss, an error or a baseline."""
    policy = Policy.load(trained_checkpoint, fast_compile=True)
    graphdef, params = nnx.split(policy.model, nnx.Param)
    scorer = Scorer(graphdef, policy.config, policy.data, flow_samples=2, compiler_options=policy.compiler_options)
    config = LoaderConfig(batch_size=8, shuffle=False, augment=False, repeat=False)
    with ShardLoader(demo_shards, "val", config, process_index=0, process_count=1) as loader:
        raw = next(loader)
    short = prepare_batch({k: v[:5] for k, v in raw.items()}, 8, policy.data, policy.config.action_dim)
    other = prepare_batch(raw, 8, policy.data, policy.config.action_dim, real_rows=5)
    assert short.rows == other.rows == 5 and other.action_is_pad[5:].all()
    assert not np.array_equal(short.actions[5:], other.actions[5:])  # the padding rows do differ
    figures = []
    for batch in (short, other):
        scores = scorer.start()
        scorer.score(params, jax.random.key(3), batch, scores)
        figures.append(scores.figures())
        real_values = int(batch.real.sum()) * policy.manifest.action_dim
        assert scores.rows == 5 and scores.errors["flow"].summary()["values"] == real_values
    assert figures[0].keys() == figures[1].keys() == {*LOSSES, "flow_mse", "flow_sample_mean_mse",
                                                      "mean_action_baseline_mse", "hold_still_baseline_mse"}
    for k, v in figures[0].items():
        np.testing.assert_allclose(figures[1][k], v, rtol=1e-5, err_msg=k)
        assert np.isfinite(v) and v >= 0, k


def test_a_head_the_model_does_not_train_is_not_scored(trained_checkpoint):
    """A FAST-only model (the KI recipe's stage 1): its action expert is its initialisation, so no flow figure."""
    config = dataclasses.replace(load_model_config(trained_checkpoint), flow_loss_weight=0.0)
    graphdef = nnx.split(nnx.eval_shape(lambda: config.create(nnx.Rngs(0))), nnx.Param)[0]
    scorer = Scorer(graphdef, config, DataArtifacts.open(trained_checkpoint), flow_samples=4, fast=True)
    assert scorer.heads == ["fast_constrained", "fast_unconstrained", "mean_action_baseline", "hold_still_baseline"]
    scores = scorer.start()
    scores.add_losses(dict.fromkeys(LOSSES, 1.0), rows=4)
    figures, report = scores.figures(), scores.report()
    assert np.isnan(figures["flow_mse"]) and np.isnan(figures["flow_sample_mean_mse"])
    assert report["flow"] is None and report["flow_sample_mean"] is None
    assert report["fast_constrained"]["values"] == 0 and report["fast_constrained"]["validity_rate"] == 0.0
