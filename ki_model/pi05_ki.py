"""π0.5 with knowledge insulation: SigLIP + Gemma backbone (FAST tokens) and a Gemma action expert (flow matching).

Training is ONE forward pass over [I | tokenized_prompt | A] with the table of `ki_model.attention` (DESIGN §5): the
backbone learns FAST tokens by cross-entropy, the action expert learns the flow, and in every layer the action
expert reads the backbone's keys/values through stop_gradient, so no flow gradient reaches any backbone weight.
Inference fills a KV cache with [I | text_prompt] once; the action expert integrates the flow reading it, and
`sample_fast_tokens` decodes FAST tokens from the same cache. `config.insulation = False` (an ablation) lifts the
stop_gradient: the flow gradient then reaches the backbone, as in π0 / π0.5 trained without KI.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from ki_model import attention, decoding, gemma
from ki_model.config import Pi05KIConfig
from ki_model.nn import Dense, compute_dtype
from ki_model.observation import Observation
from ki_model.siglip import Siglip

# Top-level modules by side of the insulation cut.
BACKBONE_MODULES = ("vision", "backbone")
ACTION_EXPERT_MODULES = ("action_expert", "action_in_proj", "time_mlp_in", "time_mlp_out", "action_out_proj")
_BACKBONE, _EXPERT = 0, 1


class ObservationShapeError(ValueError):
    """Observation/actions whose shapes do not match the model config."""


def param_group(path: tuple) -> str:
    """'backbone' or 'action_expert' for a parameter path of a Pi05KI state (e.g. from nnx.to_flat_state)."""
    head = str(path[0])
    if head in BACKBONE_MODULES:
        return "backbone"
    if head in ACTION_EXPERT_MODULES:
        return "action_expert"
    raise KeyError(f"parameter path {path} belongs to no known module")


def posemb_sincos(
    t: Float[Array, " b"], dim: int, min_period: float = 4e-3, max_period: float = 4.0
) -> Float[Array, "b d"]:
    """Sine-cosine embedding of the flow time with periods spread geometrically in [min_period, max_period]."""
    period = min_period * (max_period / min_period) ** jnp.linspace(0.0, 1.0, dim // 2)
    angle = t.astype(jnp.float32)[:, None] * (2 * jnp.pi / period)[None, :]
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


class PrefixCache(NamedTuple):
    kv: gemma.KVCache  # [depth, b, n, k, h] keys (after RoPE) and values of the prefix tokens
    valid: Bool[Array, "b n"]  # real prefix tokens
    out: Float[Array, "b n w"]  # the backbone's final-normed outputs on the prefix


class TrainForward(NamedTuple):
    prompt_out: Float[Array, "b l w"]  # backbone outputs on the tokenized_prompt block
    velocity: Float[Array, "b h d"]  # action expert's flow prediction (float32)
    kv: gemma.KVCache  # K/V of every token of the pass, [depth, b, N, k, h]
    layout: attention.Layout
    num_image_tokens: int


class Pi05KI(nnx.Module):
    def __init__(self, config: Pi05KIConfig, *, rngs: nnx.Rngs):
        self.config = config
        bb, ex = config.backbone, config.expert
        self.vision = Siglip(config.vision, config.image_size, bb.width, rngs=rngs, remat=config.remat)
        self.backbone = gemma.Gemma(bb, vocab_size=config.vocab_size, cond_dim=None, rngs=rngs)
        self.action_expert = gemma.Gemma(ex, vocab_size=None, cond_dim=ex.width, rngs=rngs)
        self.action_in_proj = Dense(config.action_dim, ex.width, axes=(None, "embed"), rngs=rngs)
        self.time_mlp_in = Dense(ex.width, ex.width, axes=("embed", "embed_out"), rngs=rngs)
        self.time_mlp_out = Dense(ex.width, ex.width, axes=("embed", "embed_out"), rngs=rngs)
        self.action_out_proj = Dense(ex.width, config.action_dim, axes=("embed", None), rngs=rngs)

    # ------------------------------------------------------------------ embeddings

    @property
    def dtype(self) -> jnp.dtype:
        return compute_dtype(self.config.dtype)

    def camera_order(self, obs: Observation) -> list[str]:
        cams = list(self.config.cameras) or sorted(obs.images)
        missing = [c for c in cams if c not in obs.images or c not in obs.image_masks]
        if missing:
            raise ObservationShapeError(f"cameras {missing} missing from the observation (has {sorted(obs.images)})")
        return cams

    def embed_images(self, obs: Observation) -> tuple[Float[Array, "b i w"], Bool[Array, "b i"]]:
        """All cameras through SigLIP in one batch; camera c's tokens are valid where image_masks[c]."""
        cams = self.camera_order(obs)
        b = obs.batch_size
        stacked = jnp.concatenate([obs.images[c] for c in cams], axis=0)  # [c*b, S, S, 3]
        tokens = self.vision(stacked, self.dtype)
        n, w = tokens.shape[1:]
        tokens = tokens.reshape(len(cams), b, n, w).transpose(1, 0, 2, 3).reshape(b, len(cams) * n, w)
        valid = jnp.stack([obs.image_masks[c] for c in cams], axis=1).astype(bool)  # [b, c]
        return tokens, jnp.repeat(valid, n, axis=1)

    def embed_text(self, ids: Int[Array, "b l"]) -> Float[Array, "b l w"]:
        return self.backbone.embedder.encode(ids, self.dtype)

    def embed_prefix(self, obs: Observation) -> tuple[Float[Array, "b n w"], Bool[Array, "b n"]]:
        """The inference prefix [I | text_prompt]: images and `text_prompt` only."""
        self._check_text(obs)
        img, img_valid = self.embed_images(obs)
        return jnp.concatenate([img, self.embed_text(obs.text_prompt)], axis=1), jnp.concatenate(
            [img_valid, obs.text_prompt_mask.astype(bool)], axis=1
        )

    def embed_actions(
        self, x_t: Float[Array, "b h d"], time: Float[Array, " b"]
    ) -> tuple[Float[Array, "b h e"], Float[Array, "b e"]]:
        """Action tokens (a linear map of the noisy actions) and the adaRMS conditioning from the flow time."""
        width = self.config.expert.width
        tokens = self.action_in_proj(x_t, self.dtype)
        cond = nnx.swish(self.time_mlp_in(posemb_sincos(time, width), jnp.float32))
        cond = nnx.swish(self.time_mlp_out(cond, jnp.float32))
        return tokens, cond

    # ------------------------------------------------------------------ training

    def _check_text(self, obs: Observation) -> None:
        c = self.config
        if obs.text_prompt.shape[1] != c.max_text_len:
            raise ObservationShapeError(
                f"text_prompt length {obs.text_prompt.shape[1]} != max_text_len {c.max_text_len}"
            )

    def _check_train(self, obs: Observation, actions: Float[Array, "b h d"]) -> None:
        c = self.config
        if obs.tokenized_prompt.shape[1] != c.max_token_len:
            raise ObservationShapeError(
                f"tokenized_prompt length {obs.tokenized_prompt.shape[1]} != max_token_len {c.max_token_len}"
            )
        if actions.shape != (obs.batch_size, c.action_horizon, c.action_dim):
            raise ObservationShapeError(
                f"actions {actions.shape} != [batch {obs.batch_size}, horizon {c.action_horizon}, dim {c.action_dim}]"
            )

    def train_forward(self, obs: Observation, x_t: Float[Array, "b h d"], time: Float[Array, " b"]) -> TrainForward:
        """The single pass over [I | tokenized_prompt | A] (backbone on I and the prompt, action expert on A)."""
        img, img_valid = self.embed_images(obs)
        prompt = self.embed_text(obs.tokenized_prompt)
        act, cond = self.embed_actions(x_t, time)
        prompt_mask, prompt_ar = obs.tokenized_prompt_mask.astype(bool), obs.token_ar_mask.astype(bool)
        layout = attention.training_layout(img_valid, prompt_mask, prompt_ar, self.config.action_horizon)
        (bb_out, act_out), kv = gemma.forward(
            [self.backbone, self.action_expert],
            [jnp.concatenate([img, prompt], axis=1), act],
            positions=layout.positions,
            mask=layout.mask,
            conds=[None, cond],
            insulated=[False, self.config.insulation],
            remat=self.config.remat,
        )
        n_img = img.shape[1]
        return TrainForward(bb_out[:, n_img:], self.action_out_proj(act_out, jnp.float32), kv, layout, n_img)

    def prompt_logits(self, obs: Observation) -> Float[Array, "b l-1 vocab"]:
        """Teacher-forced next-token logits over the tokenized_prompt (the backbone part of the training pass):
        entry j predicts prompt token j + 1."""
        img, img_valid = self.embed_images(obs)
        layout = attention.training_layout(
            img_valid, obs.tokenized_prompt_mask.astype(bool), obs.token_ar_mask.astype(bool), horizon=0
        )
        (out, _), _ = gemma.forward(
            [self.backbone, self.action_expert],
            [jnp.concatenate([img, self.embed_text(obs.tokenized_prompt)], axis=1), None],
            positions=layout.positions,
            mask=layout.mask,
        )
        return self.backbone.embedder.decode(out[:, img.shape[1] : -1])

    def _fast_loss(
        self, prompt_out: Float[Array, "b l w"], obs: Observation
    ) -> tuple[Float[Array, ""], Float[Array, ""]]:
        """Next-token CE on the targets: the output at prompt index j-1 predicts token j where token_loss_mask[j]."""
        logits = self.backbone.embedder.decode(prompt_out[:, :-1])  # [b, l-1, vocab] float32
        targets = obs.tokenized_prompt[:, 1:]
        weight = obs.token_loss_mask[:, 1:].astype(jnp.float32)
        # logsumexp - target logit: no second [b, l, vocab] array (the vocabulary is 257k for PaliGemma).
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        count = jnp.maximum(jnp.sum(weight), 1.0)
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        return jnp.sum(nll * weight) / count, jnp.sum(correct * weight) / count

    @staticmethod
    def _flow_loss(
        velocity: Float[Array, "b h d"], target: Float[Array, "b h d"], action_is_pad: Bool[Array, "b h"] | None
    ) -> Float[Array, ""]:
        """MSE over the real (non-pad) steps and all dims."""
        err = jnp.square(velocity - target.astype(jnp.float32))
        if action_is_pad is None:
            return jnp.mean(err)
        keep = (~action_is_pad.astype(bool)).astype(jnp.float32)[..., None]
        return jnp.sum(err * keep) / jnp.maximum(jnp.sum(keep) * err.shape[-1], 1.0)

    def _draw_noise_time(
        self, rng: jax.Array, actions: Float[Array, "b h d"]
    ) -> tuple[Float[Array, "b h d"], Float[Array, " b"]]:
        noise_rng, time_rng = jax.random.split(rng)
        noise = jax.random.normal(noise_rng, actions.shape, jnp.float32)
        time = jax.random.beta(time_rng, 1.5, 1.0, (actions.shape[0],)) * 0.999 + 0.001  # π0: (0.001, 1]
        return noise, time

    def _losses(self, flow: Float[Array, ""], fast: Float[Array, ""], acc: Float[Array, ""]) -> dict[str, Array]:
        return {"flow": flow, "fast": fast, "total": flow + self.config.fast_loss_weight * fast, "fast_accuracy": acc}

    def losses_given_noise(
        self,
        obs: Observation,
        actions: Float[Array, "b h d"],
        noise: Float[Array, "b h d"],
        time: Float[Array, " b"],
        action_is_pad: Bool[Array, "b h"] | None = None,
    ) -> dict[str, Array]:
        """compute_loss with the noise and flow time given (deterministic; the tests vary them)."""
        self._check_train(obs, actions)
        t = time[:, None, None]
        x_t = t * noise + (1.0 - t) * actions
        fwd = self.train_forward(obs, x_t, time)
        fast, acc = self._fast_loss(fwd.prompt_out, obs)
        return self._losses(self._flow_loss(fwd.velocity, noise - actions, action_is_pad), fast, acc)

    def compute_loss(
        self,
        rng: jax.Array,
        obs: Observation,
        actions: Float[Array, "b h d"],
        action_is_pad: Bool[Array, "b h"] | None = None,
        train: bool = True,
    ) -> dict[str, Array]:
        """{'flow', 'fast', 'total', 'fast_accuracy'} (scalars) from ONE forward pass.

        `train` is accepted for API symmetry; the model has no dropout and does no augmentation.
        """
        noise, time = self._draw_noise_time(rng, actions)
        return self.losses_given_noise(obs, actions, noise, time, action_is_pad)

    # ------------------------------------------------------------------ two-pass reference

    def losses_given_noise_two_pass(
        self,
        obs: Observation,
        actions: Float[Array, "b h d"],
        noise: Float[Array, "b h d"],
        time: Float[Array, " b"],
        action_is_pad: Bool[Array, "b h"] | None = None,
    ) -> dict[str, Array]:
        """Reference: pass 1 = backbone over [I | tokenized_prompt] with big_vision's prefix-LM mask -> FAST CE;
        pass 2 = backbone over [I | text part] into a cache, stop_gradient on the whole cache, action expert on A."""
        self._check_train(obs, actions)
        img, img_valid = self.embed_images(obs)
        prompt = self.embed_text(obs.tokenized_prompt)
        tokens = jnp.concatenate([img, prompt], axis=1)
        prompt_mask, ar = obs.tokenized_prompt_mask.astype(bool), obs.token_ar_mask.astype(bool)

        lm = attention.cumulative_ar_layout(
            jnp.concatenate([img_valid, prompt_mask], axis=1), jnp.concatenate([jnp.zeros_like(img_valid), ar], axis=1)
        )
        experts = [self.backbone, self.action_expert]
        remat = self.config.remat
        (out, _), _ = gemma.forward(experts, [tokens, None], positions=lm.positions, mask=lm.mask, remat=remat)
        fast, acc = self._fast_loss(out[:, img.shape[1] :], obs)

        prefix_valid = jnp.concatenate([img_valid, prompt_mask & ~ar], axis=1)
        pre = attention.prefix_layout(prefix_valid)
        _, kv = gemma.forward(experts, [tokens, None], positions=pre.positions, mask=pre.mask, remat=remat)
        t = time[:, None, None]
        x_t = t * noise + (1.0 - t) * actions
        kv = jax.lax.stop_gradient(kv) if self.config.insulation else kv
        velocity = self._velocity_from_cache(kv, prefix_valid, x_t, time, insulated=False, remat=remat)
        return self._losses(self._flow_loss(velocity, noise - actions, action_is_pad), fast, acc)

    def compute_loss_two_pass(
        self,
        rng: jax.Array,
        obs: Observation,
        actions: Float[Array, "b h d"],
        action_is_pad: Bool[Array, "b h"] | None = None,
        train: bool = True,
    ) -> dict[str, Array]:
        """Same losses (same noise/time for the same rng) through the two-pass reference; tests and benchmarks."""
        noise, time = self._draw_noise_time(rng, actions)
        return self.losses_given_noise_two_pass(obs, actions, noise, time, action_is_pad)

    # ------------------------------------------------------------------ inference

    def prefix_cache(self, obs: Observation) -> PrefixCache:
        """Run the backbone once over [I | text_prompt]."""
        tokens, valid = self.embed_prefix(obs)
        layout = attention.prefix_layout(valid)
        (out, _), kv = gemma.forward(
            [self.backbone, self.action_expert], [tokens, None], positions=layout.positions, mask=layout.mask
        )
        return PrefixCache(kv, valid, out)

    def _velocity_from_cache(
        self,
        kv: gemma.KVCache,
        prefix_valid: Bool[Array, "b n"],
        x_t: Float[Array, "b h d"],
        time: Float[Array, " b"],
        *,
        insulated: bool = True,
        remat: bool = False,
    ) -> Float[Array, "b h d"]:
        act, cond = self.embed_actions(x_t, time)
        layout = attention.suffix_layout(prefix_valid, self.config.action_horizon)
        (_, out), _ = gemma.forward(
            [self.backbone, self.action_expert],
            [None, act],
            positions=layout.positions,
            mask=layout.mask,
            conds=[None, cond],
            cache=kv,
            insulated=[False, insulated],
            remat=remat,
        )
        return self.action_out_proj(out, jnp.float32)

    def velocity(
        self, cache: PrefixCache, x_t: Float[Array, "b h d"], time: Float[Array, " b"]
    ) -> Float[Array, "b h d"]:
        """The action expert's flow prediction from a filled prefix cache."""
        return self._velocity_from_cache(cache.kv, cache.valid, x_t, time)

    def velocity_no_cache(
        self, obs: Observation, x_t: Float[Array, "b h d"], time: Float[Array, " b"]
    ) -> Float[Array, "b h d"]:
        """Same prediction recomputing the prefix jointly with the action tokens (no cache)."""
        tokens, valid = self.embed_prefix(obs)
        n_img = valid.shape[1] - obs.text_prompt.shape[1]
        act, cond = self.embed_actions(x_t, time)
        no_fast = jnp.zeros_like(obs.text_prompt_mask, dtype=bool)
        layout = attention.training_layout(valid[:, :n_img], valid[:, n_img:], no_fast, self.config.action_horizon)
        (_, out), _ = gemma.forward(
            [self.backbone, self.action_expert],
            [tokens, act],
            positions=layout.positions,
            mask=layout.mask,
            conds=[None, cond],
            insulated=[False, True],
        )
        return self.action_out_proj(out, jnp.float32)

    def sample_actions(
        self,
        rng: jax.Array,
        obs: Observation,
        num_steps: int | None = None,
        *,
        noise: Float[Array, "b h d"] | None = None,
        use_cache: bool = True,
    ) -> Float[Array, "b h d"]:
        """Normalized actions: Euler integration of the flow from noise (t = 1) to data (t = 0).

        num_steps defaults to config.num_flow_steps. use_cache=False recomputes the prefix at every step (tests).
        """
        c = self.config
        steps = num_steps or c.num_flow_steps
        b = obs.batch_size
        if noise is None:
            noise = jax.random.normal(rng, (b, c.action_horizon, c.action_dim), jnp.float32)
        if use_cache:
            cache = self.prefix_cache(obs)
            velocity = lambda x, t: self.velocity(cache, x, t)  # noqa: E731
        else:
            velocity = lambda x, t: self.velocity_no_cache(obs, x, t)  # noqa: E731

        def step(i: Int[Array, ""], x: Float[Array, "b h d"]) -> Float[Array, "b h d"]:
            t = 1.0 - i.astype(jnp.float32) / steps
            return x - velocity(x, jnp.full((b,), t)) / steps

        return jax.lax.fori_loop(0, steps, step, noise)

    def sample_fast_tokens(
        self,
        rng: jax.Array,
        obs: Observation,
        max_steps: int,
        temperature: float = 0.0,
        constrained: bool = True,
        *,
        spec: decoding.FastDecodeSpec,
    ) -> decoding.FastDecodeResult:
        """Autoregressive decoding of `Action: ` FAST.. `|` EOS after the [I | text_prompt] prefix.

        A fixed-size cache (prefix + max_steps slots) and a while_loop keep it jit-friendly; the loop stops when every
        row is done. Constrained: only grammar-keeping tokens, so rows decode to horizon × dim coefficients (given
        max_steps >= spec.max_decode_steps). Unconstrained: rows that break the grammar stop and get valid=False.
        """
        if spec.coeffs_per_model_id.shape[0] != self.config.vocab_size:
            raise ValueError(f"spec vocabulary {spec.coeffs_per_model_id.shape[0]} != model {self.config.vocab_size}")
        if (spec.horizon, spec.action_dim) != (self.config.action_horizon, self.config.action_dim):
            raise ValueError(f"spec is for {spec.horizon}x{spec.action_dim} actions, model for "
                             f"{self.config.action_horizon}x{self.config.action_dim}")
        b = obs.batch_size
        cache = self.prefix_cache(obs)
        n_prefix = cache.valid.shape[1]
        pad = ((0, 0), (0, 0), (0, max_steps), (0, 0), (0, 0))
        k_cache, v_cache = jnp.pad(cache.kv[0], pad), jnp.pad(cache.kv[1], pad)
        key_valid = jnp.concatenate([cache.valid, jnp.zeros((b, max_steps), bool)], axis=1)
        # The first token is predicted by the last real prefix token (the text follows the images).
        last = n_prefix - 1 - jnp.argmax(cache.valid[:, ::-1], axis=1)
        logits = self.backbone.embedder.decode(jnp.take_along_axis(cache.out, last[:, None, None], axis=1))[:, 0]
        start = jnp.sum(cache.valid, axis=1, dtype=jnp.int32)

        def cond_fn(carry):
            step, *_, state = carry
            return (step < max_steps) & ~jnp.all(state.done)

        def body_fn(carry):
            step, logits, k_cache, v_cache, key_valid, tokens, logprobs, num, state = carry
            scores = jnp.where(decoding.allowed_tokens(spec, state), logits, -jnp.inf) if constrained else logits
            tok = decoding.sample_token(jax.random.fold_in(rng, step), scores, temperature)
            active = ~state.done
            tok = jnp.where(active, tok, 0)
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=1)[:, 0]
            tokens = tokens.at[:, step].set(tok)
            logprobs = logprobs.at[:, step].set(jnp.where(active, logp, 0.0))
            num = num + active.astype(jnp.int32)
            state = decoding.advance(spec, state, tok)
            # Feed the token: it reads the real prefix, the earlier generated tokens and itself.
            mask = jnp.concatenate([key_valid, jnp.ones((b, 1), bool)], axis=1)[:, None, :]
            (out, _), (k, v) = gemma.forward(
                [self.backbone, self.action_expert],
                [self.embed_text(tok[:, None]), None],
                positions=(start + step)[:, None],
                mask=mask,
                cache=(k_cache, v_cache),
            )
            slot = n_prefix + step
            k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k, slot, axis=2)
            v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v, slot, axis=2)
            key_valid = jax.lax.dynamic_update_slice_in_dim(key_valid, jnp.ones((b, 1), bool), slot, axis=1)
            logits = self.backbone.embedder.decode(out)[:, 0]
            return step + 1, logits, k_cache, v_cache, key_valid, tokens, logprobs, num, state

        init = (
            jnp.asarray(0, jnp.int32),
            logits,
            k_cache,
            v_cache,
            key_valid,
            jnp.zeros((b, max_steps), jnp.int32),
            jnp.zeros((b, max_steps), jnp.float32),
            jnp.zeros((b,), jnp.int32),
            decoding.DecodeState.initial(spec, b),
        )
        *_, tokens, logprobs, num, state = jax.lax.while_loop(cond_fn, body_fn, init)
        return decoding.FastDecodeResult(
            tokens=tokens,
            num_tokens=num,
            valid=decoding.completed(state, spec),
            logprobs=logprobs,
        )
