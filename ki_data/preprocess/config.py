"""What a preprocessing run is asked to do (`PreprocessConfig`, `ExecutorConfig`) and the errors it raises for the
user to fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ki_data.images import DEFAULT_IMAGE_FORMAT, IMAGE_FORMATS
from ki_data.prompt import DEFAULT_LAYOUT, LAYOUTS


class PreprocessError(Exception):
    """A problem the user can fix; the CLI prints its message as one line."""


class BadInputError(PreprocessError, ValueError):
    """A row the preprocessing refuses (names dataset, episode and frame); --skip-bad-rows skips and counts."""


class OutputExistsError(PreprocessError, FileExistsError):
    """The output directory holds a finished (or foreign) run and --overwrite was not given."""


EXECUTORS = ("local", "ray", "slurm")


@dataclasses.dataclass(frozen=True)
class ExecutorConfig:
    """Where pass 2 runs (DataTrove executors). None of it changes what is written: a run started on one executor
    resumes on another."""

    kind: str = "local"  # local: processes on this machine; ray: a Ray cluster; slurm: write a Slurm job array
    tasks: int = 0  # DataTrove tasks, each a contiguous group of planned shards; 0: one task per shard
    ray_address: str | None = None  # a running cluster ("auto", "ray://host:10001", "host:6379"); None: start one
    slurm_partition: str | None = None
    slurm_time: str = "24:00:00"  # per task
    slurm_cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0  # reserved per task CPU on Ray and Slurm


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    repo_id: str
    root: str | None = None  # dataset directory; default $HF_LEROBOT_HOME/<repo_id> or the hub
    output: str | None = None  # default ./shards/<repo_id>
    action_horizon: int = 50
    max_token_len: int = 200
    max_text_len: int = 128
    image_size: int = 224
    image_format: str = DEFAULT_IMAGE_FORMAT  # ki_data.images.IMAGE_FORMATS: "jpeg" (quality 95) or "png"
    text_tokenizer: str | None = None  # a SentencePiece .model (e.g. PaliGemma's); default: train one
    fast_tokenizer: str | None = None  # a FAST directory; default: fit one
    text_vocab_size: int = 1024
    text_split_digits: bool = False  # the offline text tokenizer writes numbers digit by digit (as PaliGemma's)
    fast_vocab_size: int = 1024
    fast_scale: float = 10.0
    cameras: tuple[str, ...] | None = None  # camera names or feature keys; default all
    # LeRobot features concatenated into the model's state, in order (e.g. + observation.environment_state).
    state_keys: tuple[str, ...] = ("observation.state",)
    # Action dimensions stored relative to the state (ki_data.actions): openpi's counts "6,-1,6,-1" or action
    # feature names "x,y"; None: all absolute.
    delta_actions: str | None = None
    episodes: tuple[int, ...] | None = None  # default all
    workers: int = 1  # pass-2 tasks run at once; 0 = one per CPU core (local) or no limit (ray, slurm)
    val_fraction: float = 0.1
    seed: int = 0
    shard_rows: int = 1000  # target rows per shard (a shard holds whole episodes)
    norm_mode: str = "quantile"
    prompt_layout: str = DEFAULT_LAYOUT  # ki_data.prompt.LAYOUTS
    skip_bad_rows: bool = False
    overwrite: bool = False
    progress: bool = True
    executor: ExecutorConfig = ExecutorConfig()

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("shards") / self.repo_id

    def options(self) -> dict[str, Any]:
        """The options as recorded in the manifest."""
        out = dataclasses.asdict(self)  # the executor as a nested dict
        out.pop("progress")
        for k in ("cameras", "episodes", "state_keys"):
            out[k] = None if out[k] is None else list(out[k])
        return out

    def validate(self) -> None:
        checks = [
            (self.action_horizon >= 1, f"action_horizon must be >= 1, got {self.action_horizon}"),
            (self.max_token_len >= 2, f"max_token_len must be >= 2, got {self.max_token_len}"),
            (self.max_text_len >= 2, f"max_text_len must be >= 2, got {self.max_text_len}"),
            (len(self.state_keys) >= 1, "state_keys must name at least one feature"),
            (self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}"),
            (self.image_format in IMAGE_FORMATS, f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format}"),
            (self.workers >= 0, f"workers must be >= 0 (0: one per CPU core), got {self.workers}"),
            (0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.shard_rows >= 1, f"shard_rows must be >= 1, got {self.shard_rows}"),
            (self.norm_mode in ("quantile", "zscore"), f"norm_mode must be quantile or zscore, got {self.norm_mode}"),
            (self.prompt_layout in LAYOUTS, f"prompt_layout must be one of {LAYOUTS}, got {self.prompt_layout}"),
            (self.executor.kind in EXECUTORS, f"executor must be one of {EXECUTORS}, got {self.executor.kind}"),
            (self.executor.tasks >= 0, f"tasks must be >= 0 (0: one per shard), got {self.executor.tasks}"),
            (self.executor.kind != "slurm" or bool(self.executor.slurm_partition),
             "--executor slurm needs --slurm-partition"),
            (self.executor.slurm_cpus_per_task >= 1,
             f"slurm_cpus_per_task must be >= 1, got {self.executor.slurm_cpus_per_task}"),
            (self.executor.mem_per_cpu_gb > 0, f"mem_per_cpu_gb must be > 0, got {self.executor.mem_per_cpu_gb}"),
        ]
        for ok, message in checks:
            if not ok:
                raise PreprocessError(message)
