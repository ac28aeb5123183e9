"""The model's figures: train step of the single pass vs the two-pass reference, `sample_actions` vs
`sample_fast_tokens` latency, real-time-chunking-guided vs plain sampling, cached vs uncached sampling, the trainer's
step throughput and XLA FLOP counts.

Each pair runs in one process on the same model and batch, interleaved after compilation (ki_bench.timing): each
ratio is the median of the per-round ratios, with its spread, repeated as the RepeatPolicy says. Batches are synthetic but in shard format (ki_bench.synthetic).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import jax
import optax
from flax import nnx

from ki_bench.synthetic import SyntheticTokenizers, synthetic_batch, synthetic_tokenizers
from ki_bench.timing import Pair, RepeatPolicy, paired_rounds, wall_cost
from ki_model import reference, rtc
from ki_model.config import Pi05KIConfig
from ki_model.decoding import FastDecodeSpec


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
    kw = dict(max_token_len=160, max_text_len=64) | overrides
    cfg = Pi05KIConfig.preset(preset, action_horizon=action_horizon, action_dim=action_dim, vocab_size=toks.vocab_size,
                              **kw)
    return ReportSetup(cfg, toks)


def _batch(setup: ReportSetup, batch_size: int, seed: int):
    return synthetic_batch(
        setup.config, setup.tokenizers, batch_size, seed=seed, cameras=setup.cameras, state_dim=setup.state_dim
    )


def _policy(repeats: int, policy: RepeatPolicy | None) -> RepeatPolicy:
    """`policy`, or exactly `repeats` rounds (the reports' --repeats)."""
    return policy or RepeatPolicy(min_repeats=repeats, max_repeats=repeats, max_seconds=float("inf"))


def time_train_step(setup: ReportSetup, *, batch_size: int = 2, repeats: int = 5, seed: int = 0,
                    policy: RepeatPolicy | None = None) -> dict[str, Any]:
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

    run = paired_rounds({"single_pass": wall_cost(make_step(False)), "two_pass": wall_cost(make_step(True))},
                        {"two_pass_over_single": Pair("two_pass", "single_pass")}, _policy(repeats, policy),
                        desc="train steps")
    med = run.medians()
    return {
        "batch_size": batch_size,
        "sequence_tokens": cfg.tokens_per_image * len(setup.cameras) + cfg.max_token_len + cfg.action_horizon,
        "single_pass_step_s": med["single_pass"],
        "two_pass_step_s": med["two_pass"],
        "two_pass_over_single": run.spreads["two_pass_over_single"].median,
        **run.record(),
    }


def time_sampling(
    setup: ReportSetup, *, batch_size: int = 1, repeats: int = 5, num_steps: int | None = None, seed: int = 0,
    policy: RepeatPolicy | None = None, fast_goal: float | None = None,
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
    run = paired_rounds(
        {
            "sample_actions": wall_cost(lambda: sample(model, rng, batch.obs)),
            "sample_fast_tokens": wall_cost(lambda: decode(model, rng, batch.obs)),
        },
        {"fast_over_flow": Pair("sample_fast_tokens", "sample_actions", fast_goal)},
        _policy(repeats, policy),
        desc="sampling",
    )
    med = run.medians()
    res = decode(model, rng, batch.obs)
    return {
        "batch_size": batch_size,
        "flow_steps": steps,
        "sample_actions_s": med["sample_actions"],
        "sample_fast_tokens_s": med["sample_fast_tokens"],
        "fast_over_flow": run.spreads["fast_over_flow"].median,
        "fast_tokens_decoded": [int(n) for n in res.num_tokens],
        "fast_valid": [bool(v) for v in res.valid],
        **run.record(),
    }


def time_rtc_sampling(
    setup: ReportSetup, *, repeats: int = 5, delay: int = 2, seed: int = 0, policy: RepeatPolicy | None = None,
    goal: float | None = None,
) -> dict[str, Any]:
    """Latency of `sample_actions` guided by real-time chunking (ki_model.rtc: a VJP through the action expert at
    every flow step) vs plain, same model, batch 1 and flow steps, interleaved after compilation. The guidance target
    is a plainly sampled chunk, executed for half the horizon, with `delay` actions of latency."""
    cfg = setup.config
    batch = _batch(setup, 1, seed)
    model = cfg.create(nnx.Rngs(seed))
    steps, h = cfg.num_flow_steps, cfg.action_horizon
    plain = nnx.jit(lambda m, rng, obs: m.sample_actions(rng, obs, num_steps=steps))
    guided = nnx.jit(lambda m, rng, obs, prefix: m.sample_actions(rng, obs, num_steps=steps, prefix=prefix))
    previous = plain(model, jax.random.key(2), batch.obs)
    prefix = rtc.Prefix(previous, rtc.soft_mask(delay, h - h // 2, h)[None])
    rng = jax.random.key(1)
    run = paired_rounds(
        {"plain": wall_cost(lambda: plain(model, rng, batch.obs)),
         "rtc": wall_cost(lambda: guided(model, rng, batch.obs, prefix))},
        {"rtc_over_plain": Pair("rtc", "plain", goal)},
        _policy(repeats, policy),
        desc="RTC sampling",
    )
    med = run.medians()
    return {
        "flow_steps": steps,
        "delay": delay,
        "max_guidance_weight": rtc.MAX_GUIDANCE_WEIGHT,
        "plain_s": med["plain"],
        "rtc_s": med["rtc"],
        "rtc_over_plain": run.spreads["rtc_over_plain"].median,
        **run.record(),
    }


def measure_step_throughput(
    shards: str | Path, *, config: str = "tiny", batch_size: int = 32, steps: int = 10, fsdp_devices: int = 1, seed: int = 0
) -> dict[str, float]:
    """Samples/s the trainer's jitted step consumes (compile excluded), on one fixed batch from the shards."""
    from ki_data.artifacts import DataArtifacts
    from ki_data.loader import LoaderConfig, ShardLoader
    from ki_model import train as T

    model_cfg = T.data_model_config(config, DataArtifacts.open(shards))  # the trainer's own FAST slots
    with ShardLoader(shards, "train", LoaderConfig(batch_size=batch_size, seed=seed), process_index=0, process_count=1) as ld:
        batch = next(ld)
    return step_throughput(model_cfg, config, batch, steps=steps, fsdp_devices=fsdp_devices, seed=seed)


def step_throughput(
    model_cfg: Pi05KIConfig, preset: str, batch: dict, *, steps: int, fsdp_devices: int = 1, seed: int = 0
) -> dict[str, float]:
    """Samples/s of the trainer's own jitted step (model, optimizer of `preset`, no EMA) on one fixed host batch."""
    from ki_model import train as T
    from ki_model.config import preset_optimizer
    from ki_model.optimizer import make_optimizer
    from ki_model.sharding import make_mesh

    opt_cfg = preset_optimizer(preset)
    mesh = make_mesh(fsdp_devices)
    state, shardings, graphdef = T.init_train_state(model_cfg, make_optimizer(opt_cfg), mesh, seed=seed, ema=False)
    obs, actions, pad = T.device_batch(batch, mesh)
    batch_size = len(batch["actions"])
    step_fn = T.make_train_step(graphdef, opt_cfg, shardings, mesh, seed=seed, ema_decay=None)
    state, m = step_fn(state, obs, actions, pad)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step_fn(state, obs, actions, pad)
    jax.block_until_ready(m)
    dt = time.perf_counter() - t0
    return {"batch_size": batch_size, "steps": steps, "seconds": dt, "steps_per_s": steps / dt, "samples_per_s": steps * batch_size / dt}


def shards_setup(shards: str | Path, preset: str) -> ReportSetup:
    """A ReportSetup with a shard directory's config (preset architecture, manifest data fields) and its tokenizers,
    cameras and state size: synthetic batches in exactly those shards' format."""
    from ki_data import DataArtifacts
    from ki_model.train import model_config

    art = DataArtifacts.open(shards)
    toks = SyntheticTokenizers(art.prompt.text, art.prompt.fast, art.manifest.prompt_layout)
    return ReportSetup(model_config(preset, art.manifest), toks, art.manifest.cameras, art.manifest.state_dim)


def time_prefix_and_cache(setup: ReportSetup, *, repeats: int, seed: int = 0,
                          policy: RepeatPolicy | None = None) -> dict[str, Any]:
    """`sample_actions` with the KV cache vs recomputing [prefix | actions] every flow step (use_cache=False), and
    the prefix pass alone (what every sampler pays once), interleaved after compilation; batch 1."""
    cfg = setup.config
    batch = _batch(setup, 1, seed)
    model = cfg.create(nnx.Rngs(seed))
    steps = cfg.num_flow_steps
    cached = nnx.jit(lambda m, rng, obs: m.sample_actions(rng, obs, num_steps=steps))
    noise = jax.random.normal(jax.random.key(1), (1, cfg.action_horizon, cfg.action_dim))
    uncached = nnx.jit(lambda m, rng, obs: reference.sample_actions_no_cache(m, obs, noise, steps))
    prefix = nnx.jit(lambda m, obs: m.prefix_cache(obs))
    rng = jax.random.key(1)
    run = paired_rounds(
        {
            "cached": wall_cost(lambda: cached(model, rng, batch.obs)),
            "uncached": wall_cost(lambda: uncached(model, rng, batch.obs)),
            "prefix": wall_cost(lambda: prefix(model, batch.obs)),
        },
        {"uncached_over_cached": Pair("uncached", "cached")},
        _policy(repeats, policy),
    )
    med = run.medians()
    return {
        "flow_steps": steps,
        "cached_s": med["cached"],
        "uncached_s": med["uncached"],
        "prefix_s": med["prefix"],
        "uncached_over_cached": run.spreads["uncached_over_cached"].median,
        **run.record(),
    }


def train_step_flops(setup: ReportSetup, *, batch_size: int, seed: int = 0) -> dict[str, float]:
    """XLA's FLOP count of loss + gradient (cost analysis of the lowered program, abstract weights: nothing is
    allocated or compiled), single pass vs the two-pass reference on the same batch. The reference's second backbone
    pass feeds a stop-gradient cache, so it adds one forward and no backward: the count says how far apart the two
    steps can be at this config, whatever the hardware."""
    from ki_model.train import abstract_model

    batch = _batch(setup, batch_size, seed)
    graphdef, params = abstract_model(setup.config)
    rng = jax.random.key(seed)

    def flops(two_pass: bool) -> float:
        def loss(p):
            model = nnx.merge(graphdef, p)
            fn = functools.partial(reference.compute_loss_two_pass, model) if two_pass else model.compute_loss
            return fn(rng, batch.obs, batch.actions, batch.action_is_pad)["total"]

        cost = jax.jit(jax.grad(loss)).lower(params).cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    single, two = flops(False), flops(True)
    return {"batch_size": batch_size, "single_pass_gflop": single / 1e9, "two_pass_gflop": two / 1e9,
            "two_pass_over_single_pass_flops": two / single}


# ------------------------------------------------------------------------------------------------ benchmark phases
# Each runs in its own process (ki_bench.timing.run_isolated) and returns a JSON-able dict.


def use_compile_cache(compile_cache: str | None) -> None:
    if compile_cache:
        from ki_model.compile import enable_compilation_cache

        enable_compilation_cache(compile_cache, min_compile_time_s=0.0)


def _device() -> dict[str, str]:
    return {"jax_backend": jax.default_backend(), "device": jax.devices()[0].device_kind}


def train_phase(shards: str, preset: str, batch_size: int, steps: int, compile_cache: str | None) -> dict:
    """measure_step_throughput: the trainer's jitted step, compiled, on a batch from the shards. This process's peak
    memory is that of training at this config (model, optimizer, compiled step, a batch)."""
    use_compile_cache(compile_cache)
    out = measure_step_throughput(shards, config=preset, batch_size=batch_size, steps=steps)
    return out | {"step_s": out["seconds"] / out["steps"]} | _device()


def flops_phase(shards: str, preset: str, batch_size: int) -> dict:
    """train_step_flops at another preset (e.g. pi05: full size, abstract weights) on the shards' data fields."""
    return {"preset": preset} | train_step_flops(shards_setup(shards, preset), batch_size=batch_size)


def model_phase(shards: str, preset: str, batch_size: int, policy: RepeatPolicy, compile_cache: str | None,
                fast_goal: float | None = None, rtc_goal: float | None = None) -> dict:
    """At the shards' config: single vs two-pass train step on one batch, sample_actions vs sample_fast_tokens, RTC
    vs plain sampling; then cached vs uncached sampling and the prefix pass; the FLOP counts."""
    use_compile_cache(compile_cache)
    setup = shards_setup(shards, preset)
    cfg = setup.config
    return {
        "preset": preset,
        "config": {k: v for k, v in cfg.to_dict().items() if not isinstance(v, list)},
        "image_tokens": cfg.tokens_per_image * len(setup.cameras),
        "train_step": time_train_step(setup, batch_size=batch_size, policy=policy),
        "sampling": time_sampling(setup, batch_size=1, policy=policy, fast_goal=fast_goal),
        "rtc": time_rtc_sampling(setup, policy=policy, goal=rtc_goal),
        "cache": time_prefix_and_cache(setup, repeats=policy.min_repeats, policy=policy),
        "flops": train_step_flops(setup, batch_size=batch_size),
    } | _device()


def time_flow_cost(setup: ReportSetup, *, batch_size: int, policy: RepeatPolicy, k: int = 4, seed: int = 0,
                   ki_goal: float | None = 1.25, extra_goal: float | None = 0.15) -> dict[str, Any]:
    """What KI and extra flow samples cost per train step (AdamW, same batch), interleaved after compilation: the KI
    step, the flow-only step of the same model as π0/π0.5 train it (`fast_loss_weight=0`: FAST tokens not fed, no
    FAST loss; insulation off: the flow trains the backbone, whose backward pass KI's flow loss skips), and the KI
    step with `k` flow samples sharing one backbone pass.

    The extra cost of a flow sample, (t_k / t_1 - 1) / (k - 1), cannot be negative: the k-sample step does all of the
    1-sample step's work plus k - 1 more action blocks. A round whose ratio falls below 1 is measurement noise, so
    each round's cost is clamped at its floor 0 before the median (`extra_flow_sample_cost`); the unclamped median is
    kept beside it (`extra_flow_sample_cost_unclamped`) with the number of rounds that were clamped."""
    base = setup.config
    batch = _batch(setup, batch_size, seed)
    variants = {"ki": base, "flow_only": dataclasses.replace(base, fast_loss_weight=0.0, insulation=False),
                f"ki_k{k}": dataclasses.replace(base, flow_samples=k)}

    def make_step(cfg: Pi05KIConfig):
        model = cfg.create(nnx.Rngs(seed))
        optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, rng):
            def loss_fn(m):
                return m.compute_loss(rng, batch.obs, batch.actions, batch.action_is_pad)["total"]

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return loss

        return lambda: step(model, optimizer, jax.random.key(0))

    pairs = {"ki_over_flow_only": Pair("ki", "flow_only", ki_goal),
             f"k{k}_over_k1": Pair(f"ki_k{k}", "ki", None if extra_goal is None else 1 + extra_goal * (k - 1))}
    run = paired_rounds({name: wall_cost(make_step(cfg)) for name, cfg in variants.items()}, pairs, policy,
                        desc="KI cost")
    med = run.medians()
    ratio = run.spreads[f"k{k}_over_k1"]
    extra = ratio.map(lambda r: max(0.0, (r - 1.0) / (k - 1)))
    return {
        "batch_size": batch_size, "k": k, "repeats": len(run.costs["ki"]), "compile_s": run.first,
        "ki_step_s": med["ki"], "flow_only_step_s": med["flow_only"], f"ki_k{k}_step_s": med[f"ki_k{k}"],
        "ki_over_flow_only": run.spreads["ki_over_flow_only"].median,
        "extra_flow_sample_cost": extra.median,
        "extra_flow_sample_cost_unclamped": (ratio.median - 1.0) / (k - 1),
        "extra_flow_sample_rounds_clamped": sum(r < 1.0 for r in ratio.ratios),
        "spread": {"ki_over_flow_only": run.spreads["ki_over_flow_only"].to_dict(),
                   f"k{k}_over_k1": ratio.to_dict(), "extra_flow_sample_cost": extra.to_dict()},
    }


def flow_cost_phase(preset: str, batch_size: int, policy: RepeatPolicy, compile_cache: str | None) -> dict:
    """time_flow_cost at `preset` (small: width 256, depth 4, two 224-pixel cameras), synthetic batches; then XLA's
    cost analysis of the same two train steps at π0.5 size (ki_over_flow_only_cost)."""
    use_compile_cache(compile_cache)
    return {"preset": preset} | time_flow_cost(report_setup(preset), batch_size=batch_size, policy=policy) | _device()
