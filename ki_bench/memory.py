"""Device-memory figures from XLA's own accounting: `memory_analysis()` of a compiled program on abstract inputs
(`nnx.eval_shape`, `jax.ShapeDtypeStruct`), so nothing of model size is allocated and no accelerator is needed.

Temporaries are what the program needs beyond its arguments and outputs: activations kept for the backward pass,
the cross-entropy's blocks, the gradient's intermediates. They bound the batch a device can train. The fine-tuning
totals (everything the device holds during a train step) are `ki_model.memory.train_step_memory` of the README's runs
(`ki_bench.settings.FINE_TUNE_RUNS`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

GiB = 2**30


def _sizes(compiled) -> dict[str, float]:
    ma = compiled.memory_analysis()
    return {"temp_gib": ma.temp_size_in_bytes / GiB, "argument_gib": ma.argument_size_in_bytes / GiB,
            "output_gib": ma.output_size_in_bytes / GiB}


def _cost(compiled) -> dict[str, float]:
    """XLA's cost analysis of a compiled program: floating-point operations and bytes accessed (after fusion)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"gflop": float(cost["flops"]) / 1e9, "bytes_accessed_gib": float(cost["bytes accessed"]) / GiB}


def memory_phase(preset: str, batch_size: int, cameras: tuple[str, ...], remat: bool = True) -> dict[str, Any]:
    """XLA temporaries of (1) the whole KI loss + gradient w.r.t. the weights, with the layers run in the README
    recipe's chunks (`FINE_TUNE_RUNS["full"]`'s layer_chunks) and (2) the FAST loss part alone
    (`ki_model.losses.fast_cross_entropy`, loss + gradient w.r.t. the backbone output and the embedding table),
    at `preset` size (its vocabulary, token lengths and dtype), `batch_size`, `remat`, the given cameras.

    Also the KI cost where it matters: XLA's cost analysis (FLOPs, bytes accessed) of the compiled KI loss + gradient
    (layers unchunked: a loop body is counted once) against the flow-only one of the same model
    (`fast_loss_weight=0`: FAST tokens not fed; insulation off), same batch. The optimizer update is left out of
    both: it is the same elementwise pass over the same weights.

    And `fine_tune`: the whole train step's memory (`ki_model.memory.train_step_memory`: weights, optimizer state,
    gradients, temporaries) of each README fine-tuning run at this batch (accumulation steps cut to a divisor of the
    batch)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ki_model.config import Pi05KIConfig
    from ki_model.losses import fast_cross_entropy
    from ki_bench.settings import FINE_TUNE_RUNS
    from ki_model.memory import ANALYSIS_COMPILER_OPTIONS, _abstract_batch, train_step_memory
    from ki_model.nn import largest_divisor

    options = ANALYSIS_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    cfg = Pi05KIConfig.preset(preset, cameras=cameras, remat=remat)
    S = jax.ShapeDtypeStruct
    obs, actions, _ = _abstract_batch(cfg, batch_size)

    def compiled_grad(config: Pi05KIConfig):
        gdef, p = nnx.split(nnx.eval_shape(lambda: config.create(nnx.Rngs(0))), nnx.Param)

        def loss(params, obs, actions, rng):
            return nnx.merge(gdef, params).compute_loss(rng, obs, actions)["total"]

        return jax.jit(jax.grad(loss)).lower(p, obs, actions, S((), jax.random.key(0).dtype)).compile(options)

    t0 = time.perf_counter()
    whole = compiled_grad(dataclasses.replace(cfg, layer_chunks=FINE_TUNE_RUNS["full"]["layer_chunks"]))
    whole_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    unchunked = compiled_grad(cfg)
    flow_only = compiled_grad(dataclasses.replace(cfg, fast_loss_weight=0.0, insulation=False))
    flow_only_s = time.perf_counter() - t0
    ki_cost, flow_cost = _cost(unchunked), _cost(flow_only)

    dtype = jnp.dtype(cfg.dtype)
    hidden = S((batch_size, cfg.max_token_len, cfg.backbone.width), dtype)
    table = S((cfg.vocab_size, cfg.backbone.width), jnp.float32)
    tokens, mask = S((batch_size, cfg.max_token_len), jnp.int32), S((batch_size, cfg.max_token_len), bool)

    def fast(hidden, table, tokens, mask):
        return fast_cross_entropy(hidden, table, tokens, mask)[0]

    fast_part = jax.jit(jax.grad(fast, argnums=(0, 1))).lower(hidden, table, tokens, mask).compile(options)

    fine_tune = {}
    for name, run in FINE_TUNE_RUNS.items():
        run = dict(run, grad_accum=largest_divisor(batch_size, run.get("grad_accum", 1)))
        fine_tune[name] = train_step_memory(preset, batch_size, cameras=cameras, remat=cfg.remat, **run)
    return {
        "preset": preset, "batch_size": batch_size, "cameras": list(cameras), "remat": cfg.remat, "dtype": cfg.dtype,
        "vocab_size": cfg.vocab_size, "max_token_len": cfg.max_token_len, "backbone_width": cfg.backbone.width,
        "layer_chunks": FINE_TUNE_RUNS["full"]["layer_chunks"],
        "train_step": _sizes(whole), "train_step_unchunked": _sizes(unchunked), "fast_ce": _sizes(fast_part),
        "compile_s": whole_s, "fine_tune": fine_tune,
        "cost": {"ki": ki_cost, "flow_only": flow_cost, "compile_s": flow_only_s,
                 "flops_ki_over_flow_only": ki_cost["gflop"] / flow_cost["gflop"],
                 "bytes_ki_over_flow_only": ki_cost["bytes_accessed_gib"] / flow_cost["bytes_accessed_gib"]},
        "jax_backend": jax.default_backend(),
    }
