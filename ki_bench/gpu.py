"""The benchmark's GPU mode (`python -m pipelines.benchmark --gpu`): π0.5-size figures on an accelerator.

Random weights at π0.5 size (PaliGemma Gemma 2B + SigLIP So400m/14, Gemma-300M action expert, bfloat16), three
224-pixel cameras, horizon 50: inference latency of `sample_actions` (10 flow steps, batch 1), the FAST decoding
latency against it, and KI training samples/s of the trainer's own jitted step (AdamW, remat, the README's
`--layer-chunks`) per device. Compilation
is never timed. On a CPU it runs too (the smoke test shrinks it to the tiny preset), but only a GPU gives the figures
meaning.
"""

from __future__ import annotations

from typing import Any

PI05_CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


def gpu_phase(preset: str, train_batch: int, train_steps: int, repeats: int, compile_cache: str | None,
              action_horizon: int = 50, action_dim: int = 14) -> dict[str, Any]:
    import jax

    from ki_bench.model import ReportSetup, step_throughput, time_sampling, use_compile_cache
    from ki_bench.settings import FINE_TUNE_RUNS
    from ki_bench.synthetic import synthetic_columns, synthetic_tokenizers
    from ki_model.config import Pi05KIConfig

    use_compile_cache(compile_cache)
    toks = synthetic_tokenizers(action_horizon, action_dim)
    # The preset's own token lengths and vocabulary (PaliGemma's 257152 entries, so the FAST head costs what it
    # costs); the synthetic tokenizers' ids all lie inside it.
    cfg = Pi05KIConfig.preset(preset, action_horizon=action_horizon, action_dim=action_dim, cameras=PI05_CAMERAS)
    assert toks.vocab_size <= cfg.vocab_size
    setup = ReportSetup(cfg, toks, PI05_CAMERAS, state_dim=action_dim)
    sampling = time_sampling(setup, batch_size=1, repeats=repeats)
    # The README's full fine-tune (remat, each layer on chunks of the batch in the backward pass).
    train_cfg = Pi05KIConfig.preset(preset, action_horizon=action_horizon, action_dim=action_dim,
                                    cameras=PI05_CAMERAS, remat=True, **FINE_TUNE_RUNS["full"])
    batch = synthetic_columns(train_cfg, toks, train_batch, cameras=PI05_CAMERAS, state_dim=action_dim)
    train = step_throughput(train_cfg, preset, batch, steps=train_steps)
    devices = jax.devices()
    return {"preset": preset, "cameras": list(PI05_CAMERAS), "sampling": sampling, "train": train,
            "samples_per_s_per_device": train["samples_per_s"],  # step_throughput trains on one device
            "jax_backend": jax.default_backend(), "device": devices[0].device_kind, "device_count": len(devices)}
