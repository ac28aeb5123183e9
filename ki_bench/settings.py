"""What a benchmark run measures and how much: the modes (full, quick, smoke) and the model sizes."""

from __future__ import annotations

import dataclasses
from typing import Any

from ki_bench.datasets import AlohaLikeConfig
from ki_bench.timing import RepeatPolicy


@dataclasses.dataclass(frozen=True)
class ModelSize:
    label: str  # suffix of the per-config figure keys ("tiny", "mid")
    preset: str  # a ki_model.config.PRESETS name; the data-dependent fields come from the shards' manifest
    train_batch: int
    train_steps: int  # timed steps after the compiling one


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    mode: str
    episodes: int  # demo dataset size (gym-pusht, scripted policy)
    max_steps: int  # episode length cap
    preprocess_options: dict[str, int]  # PreprocessConfig fields; {} = the demo's defaults (224 px, horizon 50)
    loop_frames: int | None  # frames of the LeRobotDataset loop (None: all, the frames preprocess reads)
    loader_batch: int
    loader_batches: int
    sizes: tuple[ModelSize, ...]  # loader vs train step and training memory, per config
    model_sizes: tuple[str, ...]  # labels of `sizes` for the two-pass and sampling comparisons
    model_batch: int  # train-step batch of the two-pass comparison (sampling uses batch 1)
    policy: RepeatPolicy  # how many interleaved rounds each timed ratio gets (ki_bench.timing.paired_rounds)
    headline: str = "mid"  # label whose model figures fill the unsuffixed keys
    flops_presets: tuple[str, ...] = ()  # more presets whose train-step FLOPs are counted (no weights, no compile)
    fast_compile: bool = False  # XLA backend optimisation off (CPU): compiles faster, runs slower; tests only
    # The ALOHA-like dataset (ki_bench.datasets) and what is measured on it.
    aloha: AlohaLikeConfig = AlohaLikeConfig()
    # PreprocessConfig fields: 224 px, horizon 50, room for 14 state values and a 50 x 14 FAST chunk
    aloha_options: dict[str, int] = dataclasses.field(default_factory=lambda: {"max_token_len": 320})
    aloha_loop_frames: int | None = None
    core_loader_batch: int = 8  # our loader vs LeRobotDataset + DataLoader, one core each
    core_loader_batches: int = 16  # of ours; the LeRobot loader runs a quarter of them
    flow_cost_preset: str = "small"  # KI vs flow-only and K flow samples, two 224-pixel cameras
    flow_cost_batch: int = 4
    memory_preset: str = "pi05"  # XLA memory analysis (abstract weights: no allocation)
    memory_batch: int = 32
    # GPU mode: π0.5-size figures on the accelerator
    gpu_preset: str = "pi05"
    gpu_train_batch: int = 32
    gpu_train_steps: int = 10
    gpu_repeats: int = 10
    gpu_action_horizon: int = 50
    gpu_action_dim: int = 14

    def size(self, label: str) -> ModelSize:
        return next(s for s in self.sizes if s.label == label)

    @property
    def base_size(self) -> str:
        """The size whose loader/training figures fill the unsuffixed keys."""
        return self.sizes[0].label

    @property
    def headline_model(self) -> str:
        """The size whose model timings fill the unsuffixed keys."""
        return self.headline if self.headline in self.model_sizes else self.model_sizes[0]


# The README's fine-tuning runs at batch 32 (`pipelines.train --remat` plus these options; EMA off): in the backward
# pass each layer runs on 1/8 of the (micro-)batch at a time. ki_bench.memory measures each one's total
# (ki_model.memory.train_step_memory); ki_bench.figures holds their targets.
FINE_TUNE_RUNS: dict[str, dict[str, Any]] = {
    "full": {"layer_chunks": 8},
    "full_accum": {"grad_accum": 4, "layer_chunks": 8},
    "lora": {"lora": "backbone,expert", "layer_chunks": 8},
    "lora_accum": {"lora": "backbone,expert", "grad_accum": 4, "layer_chunks": 8},
}


def run_flags(run: dict[str, Any]) -> str:
    """The `pipelines.train` / `python -m ki_model.memory` options of a FINE_TUNE_RUNS entry."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in run.items())


_TINY_SHARDS = {"image_size": 32, "action_horizon": 10, "max_token_len": 64, "max_text_len": 32}

SETTINGS: dict[str, BenchSettings] = {
    # tiny = the demo's training (tiny preset, batch 16, on the demo shards); mid = width 256, depth 4 on 224 px.
    "full": BenchSettings(
        mode="full", episodes=20, max_steps=150, preprocess_options={}, loop_frames=None,
        loader_batch=16, loader_batches=30,
        sizes=(ModelSize("tiny", "tiny", 16, 10), ModelSize("mid", "small", 8, 5)),
        model_sizes=("tiny", "mid"), model_batch=4, policy=RepeatPolicy(min_repeats=5, max_repeats=25, max_seconds=300), flops_presets=("pi05",),
        aloha=AlohaLikeConfig(episodes=4, frames=300),
    ),
    "quick": BenchSettings(
        mode="quick", episodes=4, max_steps=150, preprocess_options={}, loop_frames=None,
        loader_batch=16, loader_batches=12,
        sizes=(ModelSize("tiny", "tiny", 16, 5), ModelSize("mid", "small", 4, 3)),
        model_sizes=("mid",), model_batch=2, policy=RepeatPolicy(min_repeats=5, max_repeats=12, max_seconds=100),
        aloha=AlohaLikeConfig(episodes=2, frames=250), aloha_loop_frames=250, core_loader_batches=8,
    ),
    # Tests only: everything shrunk (32 px shards, the tiny preset alone, quick compiles); its numbers mean nothing.
    "smoke": BenchSettings(
        mode="smoke", episodes=2, max_steps=12, preprocess_options=_TINY_SHARDS,
        loop_frames=None, loader_batch=4, loader_batches=3, sizes=(ModelSize("tiny", "tiny", 4, 1),),
        model_sizes=("tiny",), model_batch=2, policy=RepeatPolicy(min_repeats=2, max_repeats=2),
        fast_compile=True,
        aloha=AlohaLikeConfig(episodes=2, frames=12, height=48, width=64),
        aloha_options=_TINY_SHARDS | {"max_token_len": 160, "max_text_len": 96},
        core_loader_batch=4, core_loader_batches=4, memory_preset="tiny", memory_batch=2,
        flow_cost_preset="tiny", flow_cost_batch=2,
        gpu_preset="tiny", gpu_train_batch=2, gpu_train_steps=1, gpu_repeats=1, gpu_action_horizon=10,
        gpu_action_dim=7,
    ),
}
