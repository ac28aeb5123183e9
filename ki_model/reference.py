"""Straightforward reference computations that the model's efficient paths are tested (and benchmarked) against.

Nothing here is used for training or inference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ki_model import attention, gemma
from ki_model.losses import flow_matching_loss
from ki_model.observation import Observation
from ki_model.pi05_ki import Pi05KI


def fast_cross_entropy_full_logits(
    prompt_out: Float[Array, "b l w"],
    table: Float[Array, "v w"],
    tokens: Int[Array, "b l"],
    loss_mask: Bool[Array, "b l"],
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """`ki_model.losses.fast_cross_entropy` with the whole [b, l-1, vocab] logits array in float32."""
    logits = jnp.einsum("blw,vw->blv", prompt_out[:, :-1], table.astype(prompt_out.dtype),
                        preferred_element_type=jnp.float32)
    targets = tokens[:, 1:]
    weight = loss_mask[:, 1:].astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    count = jnp.maximum(jnp.sum(weight), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * weight) / count, jnp.sum(correct * weight) / count


def losses_two_pass(
    model: Pi05KI,
    obs: Observation,
    actions: Float[Array, "b h d"],
    noise: Float[Array, "b h d"],
    time: Float[Array, " b"],
    action_is_pad: Bool[Array, "b h"] | None = None,
) -> dict[str, Array]:
    """`Pi05KI.losses_given_noise` computed the straightforward way, in two backbone passes (docs/DESIGN.md §5 property 4).

    Pass 1: backbone over [I | tokenized_prompt] with big_vision's cumulative prefix-LM mask -> FAST CE with full
    logits. Pass 2: backbone over [I | text part] into a cache, stop_gradient on the whole cache, action expert on A.
    """
    model._check_train(obs, actions)
    img, img_valid = model.embed_images(obs)
    tokens = jnp.concatenate([img, model.embed_text(obs.tokenized_prompt)], axis=1)
    prompt_mask, ar = obs.tokenized_prompt_mask.astype(bool), obs.token_ar_mask.astype(bool)
    experts, remat = [model.backbone, model.action_expert], model.config.remat

    lm = attention.cumulative_ar_layout(
        jnp.concatenate([img_valid, prompt_mask], axis=1), jnp.concatenate([jnp.zeros_like(img_valid), ar], axis=1)
    )
    (out, _), _ = gemma.forward(experts, [tokens, None], positions=lm.positions, mask=lm.mask, remat=remat)
    table = model.backbone.embedder.input_embedding[...]
    fast, acc = fast_cross_entropy_full_logits(out[:, img.shape[1] :], table, obs.tokenized_prompt,
                                               obs.token_loss_mask.astype(bool))

    prefix_valid = jnp.concatenate([img_valid, prompt_mask & ~ar], axis=1)
    pre = attention.prefix_layout(prefix_valid)
    _, kv = gemma.forward(experts, [tokens, None], positions=pre.positions, mask=pre.mask, remat=remat)
    t = time[:, None, None]
    x_t = t * noise + (1.0 - t) * actions
    kv = jax.lax.stop_gradient(kv) if model.config.insulation else kv  # insulation off: the ablation
    out = model._expert_out(kv, prefix_valid, x_t, time, insulated=False, remat=remat)
    return model._losses(flow_matching_loss(out, model.flow_target(noise, actions), action_is_pad), fast, acc)


def velocity_no_cache(
    model: Pi05KI, obs: Observation, x_t: Float[Array, "b h d"], time: Float[Array, " b"]
) -> Float[Array, "b h d"]:
    """`Pi05KI.velocity` recomputing the prefix jointly with the action tokens (no KV cache)."""
    tokens, valid = model.embed_prefix(obs)
    n_img = valid.shape[1] - obs.text_prompt.shape[1]
    act, cond = model.embed_actions(x_t, time[:, None])
    no_fast = jnp.zeros_like(obs.text_prompt_mask, dtype=bool)
    layout = attention.training_layout(valid[:, :n_img], valid[:, n_img:], no_fast, model.config.action_horizon)
    (_, out), _ = gemma.forward(
        [model.backbone, model.action_expert],
        [tokens, act],
        positions=layout.positions,
        mask=layout.mask,
        conds=[None, cond],
        insulated=[False, True],
    )
    return model.action_out_proj(out, jnp.float32)


def sample_actions_no_cache(
    model: Pi05KI, obs: Observation, noise: Float[Array, "b h d"], num_steps: int
) -> Float[Array, "b h d"]:
    """`Pi05KI.sample_actions` with the prefix recomputed at every flow step."""
    b = obs.batch_size

    def step(i: Int[Array, ""], x: Float[Array, "b h d"]) -> Float[Array, "b h d"]:
        t = 1.0 - i.astype(jnp.float32) / num_steps
        return x - velocity_no_cache(model, obs, x, jnp.full((b,), t)) / num_steps

    return jax.lax.fori_loop(0, num_steps, step, noise)


def prompt_logits(model: Pi05KI, obs: Observation) -> Float[Array, "b _ vocab"]:  # [b, prompt length - 1, vocab]
    """Teacher-forced next-token logits over the tokenized_prompt (the backbone part of the training pass): entry j
    predicts prompt token j + 1."""
    img, img_valid = model.embed_images(obs)
    layout = attention.training_layout(
        img_valid, obs.tokenized_prompt_mask.astype(bool), obs.token_ar_mask.astype(bool), horizon=0
    )
    (out, _), _ = gemma.forward(
        [model.backbone, model.action_expert],
        [jnp.concatenate([img, model.embed_text(obs.tokenized_prompt)], axis=1), None],
        positions=layout.positions,
        mask=layout.mask,
    )
    return model.backbone.embedder.decode(out[:, img.shape[1] : -1])


def compute_loss_two_pass(
    model: Pi05KI,
    rng: jax.Array,
    obs: Observation,
    actions: Float[Array, "b h d"],
    action_is_pad: Bool[Array, "b h"] | None = None,
) -> dict[str, Array]:
    """`Pi05KI.compute_loss` (the same noise and time for the same rng) through the two-pass reference."""
    noise, time = model._draw_noise_time(rng, actions)  # [b, 1, h, d], [b, 1]: the reference takes one draw
    return losses_two_pass(model, obs, actions, noise[:, 0], time[:, 0], action_is_pad)
