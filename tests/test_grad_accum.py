"""Gradient accumulation: N micro-batches give the step of one N-times larger batch (per-side clipping included)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ki_bench.synthetic import synthetic_batch, synthetic_tokenizers
from ki_model import Pi05KIConfig
from ki_model.optimizer import OptimizerConfig, make_optimizer, make_schedule
from ki_model.train import TrainConfig, TrainError, _init_fn, _train_step, abstract_model, step_key, train

H, D = 4, 3


def _step(cfg, opt, state, batch, grad_accum):
    graphdef, _ = abstract_model(cfg)
    fn = functools.partial(_train_step, graphdef, make_optimizer(opt), make_schedule(opt), None, step_key(0),
                           grad_accum=grad_accum)
    return jax.jit(fn)(state, batch.obs, batch.actions, batch.action_is_pad)


@pytest.mark.slow  # 48 s: two whole compiled train steps
def test_accumulated_step_equals_one_step_on_the_whole_batch():
    toks = synthetic_tokenizers(H, D)
    cfg = Pi05KIConfig.tiny(action_horizon=H, action_dim=D, vocab_size=toks.vocab_size, max_token_len=40,
                            max_text_len=24)
    two = synthetic_batch(cfg, toks, 2, seed=5, pad_steps=[0, 2])
    # Rows [r0, r1, r1, r0]: the strided micro-batches of 2 are (r0, r1) and (r1, r0), so each holds as many FAST
    # targets and real action steps as the other (each loss is a mean over those).
    mirror = lambda x: jnp.concatenate([x, x[::-1]], axis=0)  # noqa: E731
    batch = type(two)(jax.tree.map(mirror, two.obs), mirror(two.actions), mirror(two.action_is_pad))
    # A clip far below the gradient norms: both steps clip, each side on its own accumulated gradients.
    opt = OptimizerConfig(peak_lr=1e-2, warmup_steps=0, clip_norm=1e-3)
    state = _init_fn(cfg, make_optimizer(opt), 0, False)()
    whole, m1 = _step(cfg, opt, state, batch, 1)
    accum, m2 = _step(cfg, opt, state, batch, 2)
    for k in ("flow_loss", "fast_loss", "total_loss", "grad_norm", "grad_norm_backbone", "grad_norm_action_expert"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, err_msg=k)
    assert float(m1["grad_norm_backbone"]) > 1e-2 and float(m1["grad_norm_action_expert"]) > 1e-2  # clipped
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(jax.tree.leaves(whole.params),
                                                                          jax.tree.leaves(state.params))]
    assert max(moved) > 1e-3
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(accum.params), strict=True):
        # Adam divides by sqrt(v): a gradient near 0 turns float rounding into ~1e-6 of a 1e-2 step.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_grad_accum_must_split_the_batch(demo_shards, tmp_path):
    cfg = TrainConfig(shards=str(demo_shards), checkpoint_dir=str(tmp_path / "run"), steps=1, batch_size=6,
                      grad_accum=4, progress=False, num_workers=0)
    with pytest.raises(TrainError, match="--grad-accum 4: --batch-size 6 must split"):
        train(cfg)
