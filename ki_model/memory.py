"""Device memory of the whole train step (model, optimizer, EMA, LoRA, gradient accumulation) by XLA's own accounting:
the trainer's `_train_step` compiled on abstract inputs (`jax.eval_shape` of the train state), so nothing of model
size is allocated and no accelerator is needed. The benchmark's fine-tuning figures (ki_bench.memory) are
`train_step_memory` of the README's runs (`ki_bench.settings.FINE_TUNE_RUNS`).

    python -m ki_model.memory --preset pi05 --batch-size 32 [--layer-chunks 8] [--lora backbone=16,expert=32]
        [--grad-accum 4]
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

GiB = 2**30
PI05_CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
# CPU code generation unoptimised: buffer assignment (what memory_analysis reports) comes from the HLO passes, which
# still run; only LLVM's work is skipped (the π0.5 LoRA step: 5.333 GiB of temporaries either way, 14 s vs 23 s).
ANALYSIS_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _abstract_batch(cfg, batch: int):
    import jax
    import jax.numpy as jnp

    from ki_model.observation import Observation

    S = jax.ShapeDtypeStruct
    L, T, s = cfg.max_token_len, cfg.max_text_len, cfg.image_size
    obs = Observation(
        images={c: S((batch, s, s, 3), jnp.uint8) for c in cfg.cameras},
        image_masks={c: S((batch,), bool) for c in cfg.cameras},
        tokenized_prompt=S((batch, L), jnp.int32), tokenized_prompt_mask=S((batch, L), bool),
        token_ar_mask=S((batch, L), bool), token_loss_mask=S((batch, L), bool),
        text_prompt=S((batch, T), jnp.int32), text_prompt_mask=S((batch, T), bool),
    )
    return obs, S((batch, cfg.action_horizon, cfg.action_dim), jnp.float32), S((batch, cfg.action_horizon), bool)


def train_step_memory(preset: str = "pi05", batch_size: int = 32, *, cameras: tuple[str, ...] = PI05_CAMERAS,
                      remat: str = "nothing_saveable", lora: str = "", grad_accum: int = 1, ema: bool = False,
                      dtype: str | None = None, layer_chunks: int = 1) -> dict[str, Any]:
    """GiB of the compiled train step (state donated, as the trainer does): `state` = parameters + optimizer state
    (+ EMA), `temp` = XLA temporaries (activations kept for the backward pass, gradients, the update), `total` =
    everything the device holds during the step (arguments + outputs not aliased to them + temporaries)."""
    import jax
    from flax import nnx

    from ki_model.config import Pi05KIConfig
    from ki_model.optimizer import OptimizerConfig, make_optimizer, make_schedule
    from ki_model.train import _init_fn, _train_step, step_key

    fields = dict(cameras=cameras, remat=remat, lora=lora, layer_chunks=layer_chunks)
    fields |= {"dtype": dtype} if dtype else {}
    cfg = Pi05KIConfig.preset(preset, **fields)
    opt = OptimizerConfig()
    tx = make_optimizer(opt)
    state = jax.eval_shape(_init_fn(cfg, tx, 0, ema))
    graphdef = nnx.split(nnx.eval_shape(lambda: cfg.create(nnx.Rngs(0))), nnx.Param)[0]
    fn = functools.partial(_train_step, graphdef, tx, make_schedule(opt), 0.999 if ema else None, step_key(0),
                           grad_accum=grad_accum)
    t0 = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=(0,)).lower(state, *_abstract_batch(cfg, batch_size))
    compiled = lowered.compile(ANALYSIS_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None)
    ma = compiled.memory_analysis()
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    total = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
    return {
        "preset": preset, "batch_size": batch_size, "grad_accum": grad_accum, "lora": [list(p) for p in cfg.lora],
        "remat": cfg.remat, "layer_chunks": cfg.layer_chunks, "dtype": cfg.dtype, "ema": ema, "cameras": len(cameras),
        "params_gib": nbytes(state.params) / GiB, "opt_state_gib": nbytes(state.opt_state) / GiB,
        "temp_gib": ma.temp_size_in_bytes / GiB, "total_gib": total / GiB,
        "compile_s": time.perf_counter() - t0, "jax_backend": jax.default_backend(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ki_model.memory", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="pi05")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lora", default="")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--remat", default="nothing_saveable")
    p.add_argument("--ema", action="store_true")
    p.add_argument("--dtype", default=None)
    p.add_argument("--layer-chunks", type=int, default=1)
    a = p.parse_args(argv)
    m = train_step_memory(a.preset, a.batch_size, remat=a.remat, lora=a.lora, grad_accum=a.grad_accum, ema=a.ema,
                          dtype=a.dtype, layer_chunks=a.layer_chunks)
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))


if __name__ == "__main__":
    main()
