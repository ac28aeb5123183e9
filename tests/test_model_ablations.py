"""The ablation switches of training (README "What insulation buys"): what reaches the backbone without insulation or
without the FAST loss, on a tiny random model as in test_model_insulation.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ki_model import ObservationShapeError, Pi05KIConfig, losses, param_group, reference
from ki_model.config import ConfigError
from ki_bench.synthetic import perturb_params, synthetic_batch, synthetic_tokenizers

H, D = 4, 3


@pytest.fixture(scope="module")
def setup():
    toks = synthetic_tokenizers(H, D)
    cfg = Pi05KIConfig.tiny(action_horizon=H, action_dim=D, vocab_size=toks.vocab_size, max_token_len=40,
                            max_text_len=24)
    batch = synthetic_batch(cfg, toks, 3, seed=2, pad_steps=[0, 2, 0])
    noise = jax.random.normal(jax.random.key(3), batch.actions.shape)
    time = jnp.array([0.9, 0.35, 0.05])
    return cfg, batch, noise, time


def _gradient(cfg: Pi05KIConfig, batch, noise, time, loss: str) -> dict[tuple, np.ndarray]:
    """d loss / d params of a (perturbed) random model with this config, by parameter path."""
    model = cfg.create(nnx.Rngs(0))
    perturb_params(model, 1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def grad(p):
        out = nnx.merge(graphdef, p, rest).losses_given_noise(batch.obs, batch.actions, noise, time, batch.action_is_pad)
        return out[loss]

    return {path: np.asarray(v) for path, v in nnx.to_flat_state(jax.grad(grad)(params))}


def _nonzero(grads: dict[tuple, np.ndarray], group: str) -> list[tuple]:
    return [p for p, g in grads.items() if param_group(p) == group and np.any(g != 0)]


def test_insulation_off_lets_the_flow_loss_reach_the_backbone(setup):
    cfg, batch, noise, time = setup
    off = _gradient(dataclasses.replace(cfg, insulation=False), batch, noise, time, "flow")
    reached = _nonzero(off, "backbone")
    # The action expert reads the K/V of the image and text tokens in every layer: the vision encoder, the token
    # embeddings and the first backbone layer (whose output makes the second layer's K/V) all get flow gradient.
    assert {p[0] for p in reached} == {"vision", "backbone"}
    assert any(p[:2] == ("backbone", "embedder") for p in reached)
    assert any(p[:2] == ("backbone", "layers") and np.any(off[p][0] != 0) for p in reached)  # [0]: layer 0
    assert all(p in reached for p in off if p[0] == "vision")
    # ...the same flow loss with insulation on gives the backbone exactly nothing (DESIGN §5, property 1).
    on = _gradient(cfg, batch, noise, time, "flow")
    assert _nonzero(on, "backbone") == []
    # The action expert learns either way.
    assert _nonzero(off, "action_expert") and _nonzero(on, "action_expert")


def test_insulation_off_single_pass_equals_the_two_pass_reference(setup):
    cfg, batch, noise, time = setup
    model = dataclasses.replace(cfg, insulation=False).create(nnx.Rngs(0))
    perturb_params(model, 1)
    a = model.losses_given_noise(batch.obs, batch.actions, noise, time, batch.action_is_pad)
    b = reference.losses_two_pass(model, batch.obs, batch.actions, noise, time, batch.action_is_pad)
    for key in ("flow", "fast", "total"):
        np.testing.assert_allclose(float(a[key]), float(b[key]), rtol=1e-5, err_msg=key)


def test_ablation_config_round_trips_and_checks():
    cfg = Pi05KIConfig.tiny(action_horizon=H, action_dim=D, vocab_size=300, insulation=False, fast_loss_weight=0.0)
    again = Pi05KIConfig.from_json(cfg.to_json())
    assert again.insulation is False and again.fast_loss_weight == 0.0
    with pytest.raises(ConfigError, match="fast_loss_weight"):
        Pi05KIConfig.tiny(action_horizon=H, action_dim=D, vocab_size=300, fast_loss_weight=-1.0)


def test_train_command_line_switches():
    from pipelines.train import parse_args

    base = ["--shards", "s", "--checkpoint-dir", "c"]
    defaults = {"remat": False, "flow_samples": 1, "insulation": True, "fast_loss_weight": 1.0, "flow_loss_weight": 1.0,
                "layer_chunks": 1, "flow_target": "velocity"}
    assert parse_args(base)[0].model.fields() == defaults
    cfg, _ = parse_args([*base, "--insulation", "off", "--fast-loss-weight", "0", "--flow-samples", "3"])
    assert cfg.model.fields() == defaults | {"insulation": False, "fast_loss_weight": 0.0, "flow_samples": 3}
    cfg, _ = parse_args([*base, "--flow-loss-weight", "0"])  # the KI recipe's stage 1
    assert cfg.model.fields() == defaults | {"flow_loss_weight": 0.0}
    assert parse_args([*base, "--flow-target", "clean"])[0].model.fields() == defaults | {"flow_target": "clean"}
    assert parse_args([*base, "--action-positions", "off"])[0].model.fields() == defaults | {"action_positions": False}


def test_clean_flow_target_is_the_same_flow_read_from_the_chunk(setup):
    """flow_target "clean": the expert's output is the clean chunk. Its velocity is (x_t - output) / t, its loss the
    output's squared error against the actions; one Euler step from t = 1 lands on the output itself."""
    cfg, batch, noise, time = setup
    clean = dataclasses.replace(cfg, flow_target="clean").create(nnx.Rngs(0))
    perturb_params(clean, 1)
    raw = dataclasses.replace(cfg, flow_target="velocity").create(nnx.Rngs(0))  # same weights, output read as is
    nnx.update(raw, nnx.state(clean, nnx.Param))
    cache = raw.prefix_cache(batch.obs)
    t = time[:, None, None]
    x_t = t * noise + (1 - t) * batch.actions
    out = raw.velocity(cache, x_t, time)
    np.testing.assert_allclose(clean.velocity(cache, x_t, time), (x_t - out) / t, rtol=1e-5, atol=1e-5)
    loss = clean.losses_given_noise(batch.obs, batch.actions, noise, time, batch.action_is_pad)["flow"]
    np.testing.assert_allclose(float(loss), float(losses.flow_matching_loss(out, batch.actions, batch.action_is_pad)),
                               rtol=1e-5)
    two_pass = reference.losses_two_pass(clean, batch.obs, batch.actions, noise, time, batch.action_is_pad)
    np.testing.assert_allclose(float(loss), float(two_pass["flow"]), rtol=1e-5)
    one_step = clean.sample_actions(jax.random.key(0), batch.obs, num_steps=1, noise=noise)
    np.testing.assert_allclose(one_step, raw.velocity(cache, noise, jnp.ones(len(time))), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="flow_target"):
        dataclasses.replace(cfg, flow_target="noise")


def test_action_positions_tell_the_chunk_steps_apart(setup):
    """Without action_positions (π0.5) a fresh expert, whose adaRMS gates start at 0, gives every step of a chunk of
    equal noisy actions the same output: it knows a token's step only once its attention has learned to read RoPE.
    With them each step's token differs from the start, in every one of K action blocks alike, and the embedding
    belongs to the action expert's side of the cut."""
    cfg, batch, noise, time = setup
    x_t = jnp.broadcast_to(noise[:, :1], noise.shape)  # every step the same
    outputs = {}
    for on in (False, True):
        model = dataclasses.replace(cfg, action_positions=on).create(nnx.Rngs(0))
        out = np.asarray(model.velocity(model.prefix_cache(batch.obs), x_t, time))  # [b, H, D]
        outputs[on] = out
        fwd = model.train_forward(batch.obs, jnp.stack([x_t, x_t], axis=1), jnp.stack([time, time], axis=1))
        np.testing.assert_allclose(fwd.velocity[:, 0], fwd.velocity[:, 1], rtol=1e-5, atol=1e-6)  # K blocks alike
    assert np.ptp(outputs[False], axis=1).max() < 1e-5
    assert np.ptp(outputs[True], axis=1).min() > 1e-3
    model = dataclasses.replace(cfg, action_positions=True).create(nnx.Rngs(0))
    (shape,) = [v.shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if p[0] == "action_positions"]
    assert shape == (H, cfg.expert.width) and param_group(("action_positions",)) == "action_expert"


def test_noisy_actions_that_are_not_whole_chunks_are_refused(setup):
    """The action tokens are K whole chunks, one flow time each: a partial chunk, or a count of chunks that is not the
    count of times, is refused by name (with action_positions the step rows would otherwise be tiled short)."""
    cfg, batch, noise, time = setup
    model = dataclasses.replace(cfg, action_positions=True).create(nnx.Rngs(0))
    tokens, cond = model.embed_actions(jnp.concatenate([noise, noise], 1), jnp.stack([time, time], 1))
    assert tokens.shape == (len(time), 2 * H, cfg.expert.width) and cond.shape == (len(time), 2, cfg.expert.width)
    with pytest.raises(ObservationShapeError, match=rf"noisy actions \(\d+, {H - 1}, \d+\) with 1 flow time"):
        model.embed_actions(noise[:, 1:], time[:, None])
    with pytest.raises(ObservationShapeError, match=rf"expected \[batch, 1 x horizon {H}"):
        model.embed_actions(jnp.concatenate([noise, noise], 1), time[:, None])
