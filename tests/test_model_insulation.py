"""The knowledge-insulation properties of docs/DESIGN.md §5 on a tiny random model, with prompts built by ki_data.

1. flow loss alone: every backbone parameter (embedder, vision encoder, layers) has gradient exactly 0;
2. FAST loss alone: every action-expert parameter has gradient exactly 0, and the other two gradients are non-zero;
3. FAST tokens do not change the flow loss; noise and time do not change the FAST loss;
4. the single pass equals the two-pass reference (losses and gradients);
5. the prefix the action expert reads in training equals the inference prefix, token for token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ki_model import Pi05KIConfig, param_group, reference
from ki_bench.synthetic import perturb_params, synthetic_batch, synthetic_tokenizers

H, D = 4, 3


@pytest.fixture(scope="module")
def setup():
    toks = synthetic_tokenizers(H, D)
    # With the demo's step embedding on the action tokens (action_positions): one more action-expert parameter.
    cfg = Pi05KIConfig.tiny(
        action_horizon=H, action_dim=D, vocab_size=toks.vocab_size, max_token_len=40, max_text_len=24,
        action_positions=True,
    )
    model = cfg.create(nnx.Rngs(0))
    perturb_params(model, 1)
    # Row 1 has its wrist camera masked and two padded action steps; prompts are padded to max_token_len.
    batch = synthetic_batch(cfg, toks, 3, seed=2, masked_cameras={"wrist": [True, False, True]}, pad_steps=[0, 2, 0])
    noise = jax.random.normal(jax.random.key(3), batch.actions.shape)
    time = jnp.array([0.9, 0.35, 0.05])
    return cfg, model, batch, noise, time


@nnx.jit
def _forward(model, obs, actions, noise, time, is_pad):
    """Losses, the single training pass, and the inference prefix cache + velocity for the same x_t."""
    x_t = time[:, None, None] * noise + (1 - time[:, None, None]) * actions
    cache = model.prefix_cache(obs)
    return (
        model.losses_given_noise(obs, actions, noise, time, is_pad),
        model.train_forward(obs, x_t[:, None], time[:, None]),  # one action block
        cache,
        model.velocity(cache, x_t, time),
    )


def _losses(model, obs, actions, noise, time, is_pad):
    return _forward(model, obs, actions, noise, time, is_pad)[0]


@nnx.jit
def _gradients(model, obs, actions, noise, time, is_pad):
    """Single pass: d[flow, fast]/d params (leading axis 0 = flow, 1 = fast). Reference: d total/d params.
    Both with their losses."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def single(p):
        out = nnx.merge(graphdef, p, rest).losses_given_noise(obs, actions, noise, time, is_pad)
        return jnp.stack([out["flow"], out["fast"]]), out

    def two_pass(p):
        out = reference.losses_two_pass(nnx.merge(graphdef, p, rest), obs, actions, noise, time, is_pad)
        return out["total"], out

    return jax.jacrev(single, has_aux=True)(params), jax.grad(two_pass, has_aux=True)(params)


@pytest.fixture(scope="module")
def gradients(setup):
    """(per-loss single-pass gradients, two-pass total gradients, single losses, two-pass losses) as numpy."""
    _, model, batch, noise, time = setup
    (jac, single_losses), (grad_two, two_losses) = _gradients(
        model, batch.obs, batch.actions, noise, time, batch.action_is_pad
    )
    flat = lambda s: {path: np.asarray(v) for path, v in nnx.to_flat_state(s)}  # noqa: E731
    return flat(jac), flat(grad_two), single_losses, two_losses


def test_every_parameter_belongs_to_one_side(gradients):
    single = gradients[0]
    groups = {param_group(path) for path in single}
    assert groups == {"backbone", "action_expert"}
    assert {p[0] for p in single if param_group(p) == "backbone"} == {"vision", "backbone"}


def test_property1_flow_loss_gives_backbone_exactly_zero_gradient(gradients):
    single = gradients[0]
    backbone = {p: g[0] for p, g in single.items() if param_group(p) == "backbone"}
    assert len(backbone) > 20
    nonzero = [p for p, g in backbone.items() if np.any(g != 0)]
    assert nonzero == [], f"flow-loss gradient reached backbone parameters {nonzero}"


def test_property2_fast_loss_gives_action_expert_exactly_zero_gradient(gradients):
    single = gradients[0]
    expert = {p: g[1] for p, g in single.items() if param_group(p) == "action_expert"}
    assert len(expert) > 10
    nonzero = [p for p, g in expert.items() if np.any(g != 0)]
    assert nonzero == [], f"FAST-loss gradient reached action-expert parameters {nonzero}"


def test_property2_the_other_gradients_are_nonzero(gradients):
    single = gradients[0]
    dead_backbone = [p for p, g in single.items() if param_group(p) == "backbone" and not np.any(g[1] != 0)]
    dead_expert = [p for p, g in single.items() if param_group(p) == "action_expert" and not np.any(g[0] != 0)]
    assert dead_backbone == [], f"FAST loss gives no gradient to backbone parameters {dead_backbone}"
    assert dead_expert == [], f"flow loss gives no gradient to action-expert parameters {dead_expert}"


def test_property3_fast_tokens_do_not_change_flow_loss(setup):
    cfg, model, batch, noise, time = setup
    obs = batch.obs
    fast = np.asarray(obs.tokenized_prompt_mask & obs.token_ar_mask)
    rng = np.random.default_rng(0)
    other = np.where(fast, rng.integers(4, cfg.vocab_size, fast.shape), np.asarray(obs.tokenized_prompt))
    changed = obs.replace(tokenized_prompt=jnp.asarray(other, jnp.int32))
    a = _losses(model, obs, batch.actions, noise, time, batch.action_is_pad)
    b = _losses(model, changed, batch.actions, noise, time, batch.action_is_pad)
    assert float(a["fast"]) != float(b["fast"])  # the change is seen by the FAST loss...
    assert float(a["flow"]) == float(b["flow"])  # ...and not at all by the flow loss


def test_property3_noise_and_time_do_not_change_fast_loss(setup):
    _, model, batch, noise, time = setup
    a = _losses(model, batch.obs, batch.actions, noise, time, batch.action_is_pad)
    b = _losses(model, batch.obs, batch.actions, -2.0 * noise + 0.3, 1.0 - time, batch.action_is_pad)
    assert float(a["flow"]) != float(b["flow"])
    assert float(a["fast"]) == float(b["fast"])
    assert float(a["fast_accuracy"]) == float(b["fast_accuracy"])


def test_property4_single_pass_equals_two_pass_reference(setup, gradients):
    cfg = setup[0]
    jac, grad_two, single_losses, two_losses = gradients
    for key in ("flow", "fast", "total", "fast_accuracy"):
        np.testing.assert_allclose(float(single_losses[key]), float(two_losses[key]), rtol=1e-5, err_msg=key)
    assert jac.keys() == grad_two.keys()
    total = {p: g[0] + cfg.fast_loss_weight * g[1] for p, g in jac.items()}
    # Tolerance relative to the largest gradient entry: some gradients are zero in exact arithmetic (e.g. key
    # biases under softmax) and only float noise in both computations.
    scale = max(float(np.abs(g).max()) for g in grad_two.values())
    for path, g in total.items():
        ref = grad_two[path]
        assert np.all(np.abs(g - ref) <= 1e-5 * scale + 1e-4 * np.abs(ref)), f"{path}: max diff {np.abs(g - ref).max()}"


def test_property5_action_expert_reads_the_inference_prefix(setup):
    cfg, model, batch, noise, time = setup
    _, fwd, cache, v_inference = _forward(model, batch.obs, batch.actions, noise, time, batch.action_is_pad)
    n_bb = fwd.layout.mask.shape[1] - H
    a_rows = np.asarray(fwd.layout.mask[:, n_bb:, :])
    train_pos, inf_pos = np.asarray(fwd.layout.positions), np.asarray(attention_positions(cache.valid))
    for r in range(batch.obs.batch_size):
        # Every action query reads the same keys: the real I and T tokens, and the A tokens.
        assert (a_rows[r] == a_rows[r, :1]).all()
        read = np.flatnonzero(a_rows[r, 0, :n_bb])
        real = np.flatnonzero(np.asarray(cache.valid[r]))
        assert len(read) == len(real)
        # Same token ids in the same order at the same positions.
        n_img = fwd.num_image_tokens
        train_ids = np.asarray(batch.obs.tokenized_prompt[r])[read[read >= n_img] - n_img]
        inf_ids = np.asarray(batch.obs.text_prompt[r])[real[real >= n_img] - n_img]
        np.testing.assert_array_equal(train_ids, inf_ids)
        np.testing.assert_array_equal(train_pos[r, read], inf_pos[r, real])
        np.testing.assert_array_equal(train_pos[r, n_bb:], len(real) + np.arange(H))
        # Same keys and values in every layer.
        for t, c in ((fwd.kv[0], cache.kv[0]), (fwd.kv[1], cache.kv[1])):
            np.testing.assert_allclose(np.asarray(t[:, r, read]), np.asarray(c[:, r, real]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(fwd.velocity[:, 0]), np.asarray(v_inference), atol=1e-5, rtol=1e-5)


def attention_positions(valid):
    from ki_model.attention import prefix_layout

    return prefix_layout(valid).positions


def test_losses_finite_with_padding_masked_cameras_and_padded_actions(setup):
    _, model, batch, noise, time = setup
    obs = batch.obs
    assert not bool(obs.image_masks["wrist"][1]) and bool(batch.action_is_pad[1].any())
    assert bool((~obs.tokenized_prompt_mask).any())
    out = _losses(model, obs, batch.actions, noise, time, batch.action_is_pad)
    assert all(np.isfinite(float(v)) for v in out.values())
    all_pad = jnp.ones_like(batch.action_is_pad)
    out = _losses(model, obs, batch.actions, noise, time, all_pad)
    assert float(out["flow"]) == 0.0 and np.isfinite(float(out["total"]))


def test_masked_camera_is_never_read(setup):
    _, model, batch, noise, time = setup
    obs = batch.obs
    wrist = np.asarray(obs.images["wrist"]).copy()
    wrist[1] = 255 - wrist[1]  # row 1's wrist camera is masked
    changed = obs.replace(images={**obs.images, "wrist": jnp.asarray(wrist)})
    a = _losses(model, obs, batch.actions, noise, time, batch.action_is_pad)
    b = _losses(model, changed, batch.actions, noise, time, batch.action_is_pad)
    assert float(a["flow"]) == float(b["flow"]) and float(a["fast"]) == float(b["fast"])
    wrist[0] = 255 - wrist[0]  # row 0's is not
    changed = obs.replace(images={**obs.images, "wrist": jnp.asarray(wrist)})
    c = _losses(model, changed, batch.actions, noise, time, batch.action_is_pad)
    assert float(a["flow"]) != float(c["flow"])


def test_action_is_pad_excludes_padded_steps_from_flow_loss():
    from ki_model.losses import flow_matching_loss

    v = jnp.zeros((2, 3, 2))
    u = jnp.array([[[1.0, 1.0], [2.0, 2.0], [9.0, 9.0]], [[1.0, 3.0], [1.0, 3.0], [1.0, 3.0]]])
    pad = jnp.array([[False, False, True], [False, False, False]])
    # row 0: steps 0, 1 -> (1 + 1 + 4 + 4); row 1: (1 + 9) * 3; over 5 real steps x 2 dims
    expected = (10.0 + 30.0) / 10.0
    assert float(flow_matching_loss(v, u, pad)) == pytest.approx(expected)


# ----------------------------------------------------------------------------------- switches of the same model


def _variant(setup, **changes):
    """The setup's model (same weights) under a config with `changes`."""
    import dataclasses

    cfg, model, *_ = setup
    other = dataclasses.replace(cfg, **changes).create(nnx.Rngs(0))
    nnx.update(other, nnx.state(model, nnx.Param))
    return other


def _side_grads(model, obs, actions, noise, time, is_pad, loss="flow"):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p):
        return nnx.merge(graphdef, p, rest).losses_given_noise(obs, actions, noise, time, is_pad)[loss]

    grads = {path: np.asarray(g) for path, g in nnx.to_flat_state(jax.jit(jax.grad(f))(params))}
    return {side: [p for p, g in grads.items() if param_group(p) == side and np.any(g != 0)]
            for side in ("backbone", "action_expert")}


def test_k_flow_samples_in_one_pass_equal_k_single_draw_passes(setup):
    """K (noise, time) draws share one backbone pass; each action block reads I, T and itself only, so the losses
    and gradients equal K separate single-draw computations (flow loss: their mean)."""
    k = 3
    _, _, batch, _, _ = setup
    model_k = _variant(setup, flow_samples=k)
    noise = jax.random.normal(jax.random.key(8), (3, k, H, D))
    time = jnp.array([[0.9, 0.2, 0.6], [0.35, 0.99, 0.01], [0.05, 0.5, 0.7]])
    obs, actions, pad = batch.obs, batch.actions, batch.action_is_pad
    graphdef, params, rest = nnx.split(model_k, nnx.Param, ...)

    @jax.jit
    def both(p):
        def one_pass(p):
            out = nnx.merge(graphdef, p, rest).losses_given_noise(obs, actions, noise, time, pad)
            return out["total"], out

        def separately(p):
            m = nnx.merge(graphdef, p, rest)
            outs = [m.losses_given_noise(obs, actions, noise[:, j], time[:, j], pad) for j in range(k)]
            flow = sum(o["flow"] for o in outs) / k
            return flow + outs[0]["fast"], {"flow": flow, "fast": outs[0]["fast"]}

        return jax.grad(one_pass, has_aux=True)(p), jax.grad(separately, has_aux=True)(p)

    (g1, l1), (g2, l2) = both(params)
    assert abs(float(l1["flow"]) - float(l2["flow"])) <= 1e-6 * abs(float(l2["flow"]))
    assert float(l1["fast"]) == pytest.approx(float(l2["fast"]), rel=1e-6)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g1), nnx.to_flat_state(g2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6, err_msg=str(path))
    # The draws are not all alike: a block reading another block would change the result.
    singles = [float(_losses(setup[1], obs, actions, noise[:, j], time[:, j], pad)["flow"]) for j in range(k)]
    assert max(singles) - min(singles) > 1e-3


def test_flow_only_training_feeds_no_fast_tokens_and_trains_only_the_expert(setup):
    _, _, batch, noise, time = setup
    flow_only = _variant(setup, fast_loss_weight=0.0)
    obs = batch.obs
    out = _losses(flow_only, obs, batch.actions, noise, time, batch.action_is_pad)
    assert np.isnan(float(out["fast"])) and float(out["total"]) == float(out["flow"])
    # The FAST tokens (the whole tokenized prompt) are not read at all.
    scrambled = obs.replace(tokenized_prompt=jnp.zeros_like(obs.tokenized_prompt), token_ar_mask=jnp.ones_like(obs.token_ar_mask))
    again = _losses(flow_only, scrambled, batch.actions, noise, time, batch.action_is_pad)
    assert float(again["flow"]) == float(out["flow"])
    args = (obs, batch.actions, noise, time, batch.action_is_pad)
    grads = _side_grads(flow_only, *args, loss="total")
    assert grads["backbone"] == [] and len(grads["action_expert"]) > 10  # insulated and no FAST loss: backbone frozen
    assert len(_side_grads(_variant(setup, fast_loss_weight=0.0, insulation=False), *args, loss="total")["backbone"]) > 20
