"""π0.5 with knowledge insulation: SigLIP + Gemma backbone (FAST tokens) and a Gemma action expert (flow matching).

Training is ONE forward pass over [I | tokenized_prompt | A] with the table of `ki_model.attention` (docs/DESIGN.md §5): the
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
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int

from ki_model import attention, decoding, gemma, lora, losses, rtc
from ki_model.config import Pi05KIConfig
from ki_model.nn import Dense, Init, compute_dtype, make_param
from ki_model.observation import Observation
from ki_model.siglip import Siglip

# Top-level modules by side of the insulation cut.
BACKBONE_MODULES = ("vision", "backbone")
ACTION_EXPERT_MODULES = ("action_expert", "action_in_proj", "action_positions", "time_mlp_in", "time_mlp_out",
                         "action_out_proj")


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
    prompt_out: Float[Array, "b l w"]  # backbone outputs on the prompt block
    velocity: Float[Array, "b k h d"] | None  # expert output per draw (float32; config.flow_target); None: FAST only
    kv: gemma.KVCache  # K/V of every token of the pass, [depth, b, N, k, h]
    layout: attention.Layout
    num_image_tokens: int


class _DecodeCarry(NamedTuple):
    """The state of `sample_fast_tokens`' loop."""

    step: Int[Array, ""]
    logits: Float[Array, "b vocab"]  # the next token's logits
    k_cache: Float[Array, "depth b s k h"]  # prefix + generated slots
    v_cache: Float[Array, "depth b s k h"]
    key_valid: Bool[Array, "b s"]
    tokens: Int[Array, "b t"]
    logprobs: Float[Array, "b t"]
    num: Int[Array, " b"]
    state: decoding.DecodeState


class Pi05KI(nnx.Module):
    def __init__(self, config: Pi05KIConfig, *, rngs: nnx.Rngs):
        self.config = config
        bb, ex = config.backbone, config.expert
        self.vision = Siglip(config.vision, config.image_size, bb.width, rngs=rngs, remat=config.remat)
        ranks = dict(config.lora)
        self.backbone = gemma.Gemma(bb, vocab_size=config.vocab_size, cond_dim=None, rngs=rngs,
                                    lora_rank=ranks.get("backbone"))
        self.action_expert = gemma.Gemma(ex, vocab_size=None, cond_dim=ex.width, rngs=rngs, lora_rank=ranks.get("expert"))
        self.action_in_proj = Dense(config.action_dim, ex.width, axes=(None, "embed"), rngs=rngs)
        # One row per chunk step, at the scale of the action tokens (config.action_positions; None in π0.5).
        self.action_positions = make_param(rngs, Init("normal"), (config.action_horizon, ex.width),
                                           (None, "embed")) if config.action_positions else None
        self.time_mlp_in = Dense(ex.width, ex.width, axes=("embed", "embed_out"), rngs=rngs)
        self.time_mlp_out = Dense(ex.width, ex.width, axes=("embed", "embed_out"), rngs=rngs)
        self.action_out_proj = Dense(ex.width, config.action_dim, axes=("embed", None), rngs=rngs)
        if config.lora:  # the frozen base weights in bfloat16 (ki_model.lora)
            lora.freeze(self, config.lora)

    # ------------------------------------------------------------------ embeddings

    @property
    def dtype(self) -> DTypeLike:
        return compute_dtype(self.config.dtype)

    def camera_order(self, obs: Observation) -> list[str]:
        cams = list(self.config.cameras) or sorted(obs.images)
        missing = [c for c in cams if c not in obs.images or c not in obs.image_masks]
        if missing:
            raise ObservationShapeError(f"cameras {missing} missing from the observation (has {sorted(obs.images)})")
        return cams

    def embed_images(
        self, obs: Observation, *, batch_chunks: int = 1
    ) -> tuple[Float[Array, "b i w"], Bool[Array, "b i"]]:
        """All cameras through SigLIP in one batch (each block in `batch_chunks` chunks of it, in turn); camera c's
        tokens are valid where image_masks[c]."""
        cams = self.camera_order(obs)
        b = obs.batch_size
        stacked = jnp.concatenate([obs.images[c] for c in cams], axis=0)  # [c*b, S, S, 3]
        tokens = self.vision(stacked, self.dtype, batch_chunks=batch_chunks)
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
        self, x_t: Float[Array, "b n d"], time: Float[Array, "b g"]
    ) -> tuple[Float[Array, "b n e"], Float[Array, "b g e"]]:
        """Action tokens (a linear map of the noisy actions, plus each chunk step's row with config.action_positions)
        and the adaRMS conditioning from the flow time: one time per group of consecutive tokens (g = 1 at inference;
        g = K action blocks of a K-sample training pass)."""
        c = self.config
        if x_t.shape[1:] != (time.shape[1] * c.action_horizon, c.action_dim):  # whole chunks, one time each
            raise ObservationShapeError(
                f"noisy actions {x_t.shape} with {time.shape[1]} flow time(s) per row: expected "
                f"[batch, {time.shape[1]} x horizon {c.action_horizon}, dim {c.action_dim}]"
            )
        width = c.expert.width
        tokens = self.action_in_proj(x_t, self.dtype)
        if self.action_positions is not None:  # n = K blocks of the horizon's steps
            steps = self.action_positions[...].astype(tokens.dtype)
            tokens = tokens + jnp.tile(steps, (x_t.shape[1] // steps.shape[0], 1))[None]
        b, g = time.shape
        cond = nnx.swish(self.time_mlp_in(posemb_sincos(time.reshape(-1), width), jnp.float32))
        cond = nnx.swish(self.time_mlp_out(cond, jnp.float32))
        return tokens, cond.reshape(b, g, width)

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

    @property
    def trains_fast(self) -> bool:
        """Whether the backbone is fed the FAST tokens and learns them (fast_loss_weight 0: flow-only training)."""
        return self.config.fast_loss_weight != 0

    @property
    def trains_flow(self) -> bool:
        """Whether the action expert runs and learns the flow (flow_loss_weight 0: FAST-only training)."""
        return self.config.flow_loss_weight != 0

    def train_forward(
        self, obs: Observation, x_t: Float[Array, "b k h d"], time: Float[Array, "b k"]
    ) -> TrainForward:
        """The single pass over [I | tokenized_prompt | A_1 .. A_K] (backbone on I and the prompt, action expert on
        the K noisy action blocks). Flow-only training feeds `text_prompt` instead: no FAST tokens. FAST-only training
        runs no action block (velocity None)."""
        c = self.config
        b, k, h, d = x_t.shape
        if not self.trains_flow:
            img, img_valid = self.embed_images(obs, batch_chunks=c.layer_chunks)
            ids, mask, ar = obs.tokenized_prompt, obs.tokenized_prompt_mask, obs.token_ar_mask
            layout = attention.training_layout(img_valid, mask.astype(bool), ar.astype(bool), h, action_blocks=0)
            (bb_out, _), kv = gemma.forward(
                [self.backbone, self.action_expert], [jnp.concatenate([img, self.embed_text(ids)], axis=1), None],
                positions=layout.positions, mask=layout.mask, remat=c.remat, batch_chunks=c.layer_chunks,
            )
            return TrainForward(bb_out[:, img.shape[1]:], None, kv, layout, img.shape[1])
        img, img_valid = self.embed_images(obs, batch_chunks=c.layer_chunks)
        if self.trains_fast:
            ids, mask, ar = obs.tokenized_prompt, obs.tokenized_prompt_mask, obs.token_ar_mask
        else:
            ids, mask, ar = obs.text_prompt, obs.text_prompt_mask, jnp.zeros_like(obs.text_prompt_mask)
        prompt = self.embed_text(ids)
        act, cond = self.embed_actions(x_t.reshape(b, k * h, d), time)
        layout = attention.training_layout(img_valid, mask.astype(bool), ar.astype(bool), h, action_blocks=k)
        (bb_out, act_out), kv = gemma.forward(
            [self.backbone, self.action_expert],
            [jnp.concatenate([img, prompt], axis=1), act],
            positions=layout.positions,
            mask=layout.mask,
            conds=[None, cond],
            insulated=[False, c.insulation],
            remat=c.remat,
            batch_chunks=c.layer_chunks,
        )
        n_img = img.shape[1]
        velocity = self.action_out_proj(act_out, jnp.float32).reshape(b, k, h, d)
        return TrainForward(bb_out[:, n_img:], velocity, kv, layout, n_img)

    def _fast_loss(
        self, prompt_out: Float[Array, "b l w"], obs: Observation
    ) -> tuple[Float[Array, ""], Float[Array, ""]]:
        """Next-token CE on the targets: the output at prompt index j-1 predicts token j where token_loss_mask[j]."""
        table = self.backbone.embedder.input_embedding[...]
        return losses.fast_cross_entropy(prompt_out, table, obs.tokenized_prompt, obs.token_loss_mask.astype(bool),
                                         slots=self.config.fast_target_slots)

    @staticmethod
    def _flow_loss(
        velocity: Float[Array, "b k h d"], target: Float[Array, "b k h d"], action_is_pad: Bool[Array, "b h"] | None
    ) -> Float[Array, ""]:
        """The mean over the K draws of each draw's flow-matching MSE (every draw has the same real steps)."""
        b, k, h, d = velocity.shape
        pad = None if action_is_pad is None else jnp.repeat(action_is_pad, k, axis=0)
        return losses.flow_matching_loss(velocity.reshape(b * k, h, d), target.reshape(b * k, h, d), pad)

    def _draw_noise_time(
        self, rng: jax.Array, actions: Float[Array, "b h d"]
    ) -> tuple[Float[Array, "b k h d"], Float[Array, "b k"]]:
        """K = config.flow_samples (noise, time) draws per example; time ~ Beta(1.5, 1) in (0.001, 1] as π0's."""
        b, k = actions.shape[0], self.config.flow_samples
        noise_rng, time_rng = jax.random.split(rng)
        noise = jax.random.normal(noise_rng, (b, k, *actions.shape[1:]), jnp.float32)
        time = jax.random.beta(time_rng, 1.5, 1.0, (b, k)) * 0.999 + 0.001
        return noise, time

    def _losses(self, flow: Float[Array, ""], fast: Float[Array, ""], acc: Float[Array, ""]) -> dict[str, Array]:
        c = self.config
        total = c.flow_loss_weight * flow + c.fast_loss_weight * fast if self.trains_flow else c.fast_loss_weight * fast
        return {"flow": flow, "fast": fast, "total": total, "fast_accuracy": acc}

    def losses_given_noise(
        self,
        obs: Observation,
        actions: Float[Array, "b h d"],
        noise: Float[Array, "b k h d"] | Float[Array, "b h d"],
        time: Float[Array, "b k"] | Float[Array, " b"],
        action_is_pad: Bool[Array, "b h"] | None = None,
    ) -> dict[str, Array]:
        """compute_loss with the K noise/time draws given ([b, h, d] / [b]: one draw); deterministic, tests vary them.
        Without FAST training (fast_loss_weight 0) the FAST loss and accuracy are not computed: NaN."""
        self._check_train(obs, actions)
        if noise.ndim == 3:
            noise, time = noise[:, None], time[:, None]
        t = time[:, :, None, None]
        x_t = t * noise + (1.0 - t) * actions[:, None]
        fwd = self.train_forward(obs, x_t, time)
        nan = jnp.asarray(jnp.nan, jnp.float32)
        flow = self._flow_loss(fwd.velocity, self.flow_target(noise, actions[:, None]), action_is_pad) if self.trains_flow else nan
        if not self.trains_fast:
            return {"flow": flow, "fast": nan, "total": self.config.flow_loss_weight * flow, "fast_accuracy": nan}
        fast, acc = self._fast_loss(fwd.prompt_out, obs)
        return self._losses(flow, fast, acc)

    def flow_target(self, noise: Float[Array, "*b h d"], actions: Float[Array, "*#b h d"]) -> Float[Array, "*b h d"]:
        """What the action expert's output is trained toward (config.flow_target)."""
        if self.config.flow_target == "clean":
            return jnp.broadcast_to(actions, noise.shape)
        return noise - actions

    def compute_loss(
        self,
        rng: jax.Array,
        obs: Observation,
        actions: Float[Array, "b h d"],
        action_is_pad: Bool[Array, "b h"] | None = None,
    ) -> dict[str, Array]:
        """{'flow', 'fast', 'total', 'fast_accuracy'} (scalars) from ONE forward pass."""
        noise, time = self._draw_noise_time(rng, actions)
        return self.losses_given_noise(obs, actions, noise, time, action_is_pad)

    # ------------------------------------------------------------------ inference

    def prefix_cache(self, obs: Observation) -> PrefixCache:
        """Run the backbone once over [I | text_prompt]."""
        tokens, valid = self.embed_prefix(obs)
        layout = attention.prefix_layout(valid)
        (out, _), kv = gemma.forward(
            [self.backbone, self.action_expert], [tokens, None], positions=layout.positions, mask=layout.mask
        )
        return PrefixCache(kv, valid, out)

    def _expert_out(
        self,
        kv: gemma.KVCache,
        prefix_valid: Bool[Array, "b n"],
        x_t: Float[Array, "b h d"],
        time: Float[Array, " b"],
        *,
        insulated: bool = True,
        remat: bool | str = False,
    ) -> Float[Array, "b h d"]:
        act, cond = self.embed_actions(x_t, time[:, None])  # one flow time for the whole chunk
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
        """The flow at x_t from a filled prefix cache: the action expert's output, or with flow_target "clean"
        (the expert gives the clean chunk) (x_t - chunk) / t; t > 0 on the sampling path."""
        out = self._expert_out(cache.kv, cache.valid, x_t, time)
        if self.config.flow_target == "clean":
            return (x_t - out) / time[:, None, None]
        return out

    def sample_actions(
        self,
        rng: jax.Array,
        obs: Observation,
        num_steps: int | None = None,
        *,
        noise: Float[Array, "b h d"] | None = None,
        prefix: rtc.Prefix | None = None,
        max_guidance_weight: float = rtc.MAX_GUIDANCE_WEIGHT,
    ) -> Float[Array, "b h d"]:
        """Normalized actions: Euler integration of the flow from noise (t = 1) to data (t = 0), reading the prefix
        cache filled once. num_steps defaults to config.num_flow_steps.

        prefix: guided real-time chunking (ki_model.rtc) toward the previous chunk's remainder, clipped at
        `max_guidance_weight` (static). Without a prefix, or with weight 0, the plain flow: the same program, so
        the same samples bit for bit."""
        c = self.config
        steps = num_steps or c.num_flow_steps
        b = obs.batch_size
        if noise is None:
            noise = jax.random.normal(rng, (b, c.action_horizon, c.action_dim), jnp.float32)
        cache = self.prefix_cache(obs)
        guided = prefix is not None and max_guidance_weight != 0

        def step(i: Int[Array, ""], x: Float[Array, "b h d"]) -> Float[Array, "b h d"]:
            t = 1.0 - i.astype(jnp.float32) / steps
            if guided:
                v = rtc.guided_velocity(lambda z: self.velocity(cache, z, jnp.full((b,), t)), x, t, prefix,
                                        max_guidance_weight)
                return x - v / steps
            return x - self.velocity(cache, x, jnp.full((b,), t)) / steps

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
        if spec.horizon != self.config.action_horizon or spec.action_dim > self.config.action_dim:
            raise ValueError(f"spec is for {spec.horizon}x{spec.action_dim} actions, model for "
                             f"{self.config.action_horizon}x{self.config.action_dim} (FAST may cover fewer dims)")
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

        def cond_fn(c: _DecodeCarry) -> Bool[Array, ""]:
            return (c.step < max_steps) & ~jnp.all(c.state.done)

        def body_fn(c: _DecodeCarry) -> _DecodeCarry:
            scores = jnp.where(decoding.allowed_tokens(spec, c.state), c.logits, -jnp.inf) if constrained else c.logits
            tok = decoding.sample_token(jax.random.fold_in(rng, c.step), scores, temperature)
            active = ~c.state.done
            tok = jnp.where(active, tok, 0)
            logp = jnp.take_along_axis(jax.nn.log_softmax(c.logits, axis=-1), tok[:, None], axis=1)[:, 0]
            # Feed the token: it reads the real prefix, the earlier generated tokens and itself.
            mask = jnp.concatenate([c.key_valid, jnp.ones((b, 1), bool)], axis=1)[:, None, :]
            (out, _), (k, v) = gemma.forward(
                [self.backbone, self.action_expert],
                [self.embed_text(tok[:, None]), None],
                positions=(start + c.step)[:, None],
                mask=mask,
                cache=(c.k_cache, c.v_cache),
            )
            slot = n_prefix + c.step
            return _DecodeCarry(
                step=c.step + 1,
                logits=self.backbone.embedder.decode(out)[:, 0],
                k_cache=jax.lax.dynamic_update_slice_in_dim(c.k_cache, k, slot, axis=2),
                v_cache=jax.lax.dynamic_update_slice_in_dim(c.v_cache, v, slot, axis=2),
                key_valid=jax.lax.dynamic_update_slice_in_dim(c.key_valid, jnp.ones((b, 1), bool), slot, axis=1),
                tokens=c.tokens.at[:, c.step].set(tok),
                logprobs=c.logprobs.at[:, c.step].set(jnp.where(active, logp, 0.0)),
                num=c.num + active.astype(jnp.int32),
                state=decoding.advance(spec, c.state, tok),
            )

        init = _DecodeCarry(
            step=jnp.asarray(0, jnp.int32),
            logits=logits,
            k_cache=k_cache,
            v_cache=v_cache,
            key_valid=key_valid,
            tokens=jnp.zeros((b, max_steps), jnp.int32),
            logprobs=jnp.zeros((b, max_steps), jnp.float32),
            num=jnp.zeros((b,), jnp.int32),
            state=decoding.DecodeState.initial(spec, b),
        )
        out = jax.lax.while_loop(cond_fn, body_fn, init)
        return decoding.FastDecodeResult(
            tokens=out.tokens,
            num_tokens=out.num,
            valid=decoding.completed(out.state, spec),
            logprobs=out.logprobs,
        )
