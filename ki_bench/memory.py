"""Device-memory figures from XLA's own accounting: `memory_analysis()` of a compiled program on abstract inputs
(`nnx.eval_shape`, `jax.ShapeDtypeStruct`), so nothing of model size is allocated and no accelerator is needed.

Temporaries are what the program needs beyond its arguments and outputs: activations kept for the backward pass,
the cross-entropy's blocks, the gradient's intermediates. They bound the batch a device can train.
"""

from __future__ import annotations

import time
from typing import Any

GiB = 2**30


def _abstract_observation(cfg, batch: int):
    import jax
    import jax.numpy as jnp

    from ki_model.observation import Observation

    S = jax.ShapeDtypeStruct
    L, T, s = cfg.max_token_len, cfg.max_text_len, cfg.image_size
    return Observation(
        images={c: S((batch, s, s, 3), jnp.uint8) for c in cfg.cameras},
        image_masks={c: S((batch,), bool) for c in cfg.cameras},
        tokenized_prompt=S((batch, L), jnp.int32), tokenized_prompt_mask=S((batch, L), bool),
        token_ar_mask=S((batch, L), bool), token_loss_mask=S((batch, L), bool),
        text_prompt=S((batch, T), jnp.int32), text_prompt_mask=S((batch, T), bool),
    )


def _sizes(compiled) -> dict[str, float]:
    ma = compiled.memory_analysis()
    return {"temp_gib": ma.temp_size_in_bytes / GiB, "argument_gib": ma.argument_size_in_bytes / GiB,
            "output_gib": ma.output_size_in_bytes / GiB}


def memory_phase(preset: str, batch_size: int, cameras: tuple[str, ...], remat: bool = True) -> dict[str, Any]:
    """XLA temporaries of (1) the whole KI loss + gradient w.r.t. the weights and (2) the FAST loss part alone
    (`ki_model.losses.fast_cross_entropy`, loss + gradient w.r.t. the backbone output and the embedding table),
    at `preset` size (its vocabulary, token lengths and dtype), `batch_size`, `remat`, the given cameras."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ki_model.config import Pi05KIConfig
    from ki_model.losses import fast_cross_entropy

    cfg = Pi05KIConfig.preset(preset, cameras=cameras, remat=remat)
    S = jax.ShapeDtypeStruct
    obs = _abstract_observation(cfg, batch_size)
    actions = S((batch_size, cfg.action_horizon, cfg.action_dim), jnp.float32)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: cfg.create(nnx.Rngs(0))), nnx.Param)

    def loss(params, obs, actions, rng):
        return nnx.merge(graphdef, params).compute_loss(rng, obs, actions)["total"]

    t0 = time.perf_counter()
    whole = jax.jit(jax.grad(loss)).lower(params, obs, actions, S((), jax.random.key(0).dtype)).compile()
    whole_s = time.perf_counter() - t0

    dtype = jnp.dtype(cfg.dtype)
    hidden = S((batch_size, cfg.max_token_len, cfg.backbone.width), dtype)
    table = S((cfg.vocab_size, cfg.backbone.width), jnp.float32)
    tokens, mask = S((batch_size, cfg.max_token_len), jnp.int32), S((batch_size, cfg.max_token_len), bool)

    def fast(hidden, table, tokens, mask):
        return fast_cross_entropy(hidden, table, tokens, mask)[0]

    fast_part = jax.jit(jax.grad(fast, argnums=(0, 1))).lower(hidden, table, tokens, mask).compile()
    return {
        "preset": preset, "batch_size": batch_size, "cameras": list(cameras), "remat": remat, "dtype": cfg.dtype,
        "vocab_size": cfg.vocab_size, "max_token_len": cfg.max_token_len, "backbone_width": cfg.backbone.width,
        "train_step": _sizes(whole), "fast_ce": _sizes(fast_part), "compile_s": whole_s,
        "jax_backend": jax.default_backend(),
    }
