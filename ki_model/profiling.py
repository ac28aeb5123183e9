"""Timing helpers for the model report and the benchmark: train step of the single pass vs the two-pass reference,
and `sample_actions` vs `sample_fast_tokens` latency. Each pair runs in one process on the same model and batch,
interleaved, after compilation; medians over the repeats."""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import optax
from flax import nnx
from tqdm import tqdm

from ki_model import reference
from ki_model.config import Pi05KIConfig
from ki_model.decoding import FastDecodeSpec
from ki_model.synthetic import SyntheticTokenizers, synthetic_batch, synthetic_tokenizers


@dataclasses.dataclass(frozen=True)
class ReportSetup:
    config: Pi05KIConfig
    tokenizers: SyntheticTokenizers
    cameras: tuple[str, ...] = ("top", "wrist")
    state_dim: int = 7


def report_setup(
    preset: str = "small", *, action_horizon: int = 10, action_dim: int = 7, **overrides: Any
) -> ReportSetup:
    """A config (preset 'small': width 256, depth 4, 224-pixel images; or 'tiny') with ki_data tokenizers."""
    toks = synthetic_tokenizers(action_horizon, action_dim)
    make = {"small": Pi05KIConfig.small, "tiny": Pi05KIConfig.tiny}[preset]
    kw = dict(max_token_len=160, max_text_len=64) | overrides
    cfg = make(action_horizon=action_horizon, action_dim=action_dim, vocab_size=toks.vocab_size, **kw)
    return ReportSetup(cfg, toks)


def _batch(setup: ReportSetup, batch_size: int, seed: int):
    return synthetic_batch(
        setup.config, setup.tokenizers, batch_size, seed=seed, cameras=setup.cameras, state_dim=setup.state_dim
    )


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def _median_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, desc: str) -> tuple[dict, dict]:
    """First call of each = compile (+ one run); then `repeats` rounds alternating the functions."""
    compile_s = {name: _timed(fn) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}, compile_s


def time_train_step(setup: ReportSetup, *, batch_size: int = 2, repeats: int = 5, seed: int = 0) -> dict[str, Any]:
    """Wall time of one jitted AdamW train step (forward + backward + update) for both loss computations."""
    cfg = setup.config
    batch = _batch(setup, batch_size, seed)
    model = cfg.create(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)

    def make_step(two_pass: bool):
        @nnx.jit
        def step(model, optimizer, rng):
            def loss_fn(m):
                fn = functools.partial(reference.compute_loss_two_pass, m) if two_pass else m.compute_loss
                return fn(rng, batch.obs, batch.actions, batch.action_is_pad)["total"]

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return loss

        return lambda: step(model, optimizer, jax.random.key(0))

    med, comp = _median_interleaved(
        {"single_pass": make_step(False), "two_pass": make_step(True)}, repeats, "train steps"
    )
    return {
        "batch_size": batch_size,
        "sequence_tokens": cfg.tokens_per_image * len(setup.cameras) + cfg.max_token_len + cfg.action_horizon,
        "single_pass_step_s": med["single_pass"],
        "two_pass_step_s": med["two_pass"],
        "two_pass_over_single": med["two_pass"] / med["single_pass"],
        "compile_s": comp,
        "repeats": repeats,
    }


def time_sampling(
    setup: ReportSetup, *, batch_size: int = 1, repeats: int = 5, num_steps: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Latency of `sample_actions` (flow, cached prefix) vs `sample_fast_tokens` (constrained greedy) per call."""
    cfg = setup.config
    batch = _batch(setup, batch_size, seed)
    model = cfg.create(nnx.Rngs(seed))
    toks = setup.tokenizers
    spec = FastDecodeSpec.from_grammar(toks.builder(cfg).grammar(), cfg.action_horizon, cfg.action_dim)
    steps = num_steps or cfg.num_flow_steps
    sample = nnx.jit(lambda m, rng, obs: m.sample_actions(rng, obs, num_steps=steps))
    decode = nnx.jit(lambda m, rng, obs: m.sample_fast_tokens(rng, obs, spec.max_decode_steps, spec=spec))
    rng = jax.random.key(1)
    med, comp = _median_interleaved(
        {
            "sample_actions": lambda: sample(model, rng, batch.obs),
            "sample_fast_tokens": lambda: decode(model, rng, batch.obs),
        },
        repeats,
        "sampling",
    )
    res = decode(model, rng, batch.obs)
    return {
        "batch_size": batch_size,
        "flow_steps": steps,
        "sample_actions_s": med["sample_actions"],
        "sample_fast_tokens_s": med["sample_fast_tokens"],
        "fast_over_flow": med["sample_fast_tokens"] / med["sample_actions"],
        "fast_tokens_decoded": [int(n) for n in res.num_tokens],
        "fast_valid": [bool(v) for v in res.valid],
        "compile_s": comp,
        "repeats": repeats,
    }


def measure_step_throughput(
    shards: str | Path, *, config: str = "tiny", batch_size: int = 32, steps: int = 10, fsdp_devices: int = 1, seed: int = 0
) -> dict[str, float]:
    """Samples/s the trainer's jitted step consumes (compile excluded), on one fixed batch from the shards."""
    from ki_data.loader import LoaderConfig, ShardLoader
    from ki_data.manifest import Manifest
    from ki_model import train as T
    from ki_model.optimizer import OptimizerConfig, make_optimizer
    from ki_model.sharding import make_mesh

    model_cfg = T.model_config(config, Manifest.load(shards))
    opt_cfg = OptimizerConfig.for_preset(config)
    mesh = make_mesh(fsdp_devices)
    state, shardings, graphdef = T.init_train_state(model_cfg, make_optimizer(opt_cfg), mesh, seed=seed, ema=False)
    with ShardLoader(shards, "train", LoaderConfig(batch_size=batch_size, seed=seed), process_index=0, process_count=1) as ld:
        obs, actions, pad = T.device_batch(next(ld), mesh)
    step_fn = T.make_train_step(graphdef, opt_cfg, shardings, mesh, seed=seed, ema_decay=None)
    state, m = step_fn(state, obs, actions, pad)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step_fn(state, obs, actions, pad)
    jax.block_until_ready(m)
    dt = time.perf_counter() - t0
    return {"batch_size": batch_size, "steps": steps, "seconds": dt, "steps_per_s": steps / dt, "samples_per_s": steps * batch_size / dt}
