"""The plan of a run: which episodes and cameras, the train/val split, and which episodes go to which shard file.

The plan depends only on the dataset's metadata and the options, never on how many workers or tasks write it, so
every executor writes the same files.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ki_data import schema
from ki_data.lerobot_source import DatasetSpec
from ki_data.manifest import SPLITS
from ki_data.preprocess.config import PreprocessConfig, PreprocessError


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    path: str  # relative to the output directory
    split: str
    episodes: tuple[int, ...]
    frames: int  # before rejected rows


@dataclasses.dataclass(frozen=True)
class JobPlan:
    spec: DatasetSpec
    episodes: tuple[int, ...]  # selected, sorted
    cameras: dict[str, str]  # camera name -> feature key, in image-token order
    splits: dict[str, tuple[int, ...]]  # "train", "val" -> episodes
    shards: tuple[ShardPlan, ...]

    @property
    def frames(self) -> int:
        return sum(p.frames for p in self.shards)


def select_episodes(spec: DatasetSpec, wanted: tuple[int, ...] | None) -> list[int]:
    available = [e.index for e in spec.episodes]
    if not available:
        raise PreprocessError(f"LeRobot dataset '{spec.repo_id}' has no episodes")
    if wanted is None:
        return available
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise PreprocessError(
            f"LeRobot dataset '{spec.repo_id}' has no episode {missing[0]} (it has {len(available)} episodes: "
            f"{available[0]}..{available[-1]})"
        )
    return sorted(set(wanted))


def select_cameras(spec: DatasetSpec, wanted: tuple[str, ...] | None) -> dict[str, str]:
    """Camera name -> feature key, in the requested (or the dataset's) order."""
    by_name = {schema.camera_name(k): k for k in spec.cameras}
    if wanted is None:
        return by_name
    out = {}
    for w in wanted:
        key = w if w in spec.cameras else by_name.get(w)
        if key is None:
            raise PreprocessError(
                f"LeRobot dataset '{spec.repo_id}' has no camera '{w}' (cameras: {', '.join(by_name) or 'none'})"
            )
        out[schema.camera_name(key)] = key
    return out


def split_episodes(episodes: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Whole episodes to train / val: round(fraction * n) val episodes, at least one when there are several."""
    n = len(episodes)
    if n < 2 or val_fraction <= 0:
        return list(episodes), []
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    order = np.random.default_rng(seed).permutation(n)
    val = sorted(episodes[i] for i in order[:n_val])
    held_out = set(val)
    return [e for e in episodes if e not in held_out], val


def plan_shards(spec: DatasetSpec, splits: dict[str, list[int]], shard_rows: int) -> list[ShardPlan]:
    """Consecutive episodes of a split grouped until a shard reaches `shard_rows` frames."""
    plans = []
    for split in SPLITS:
        group, frames, number = [], 0, 0
        for ep in splits.get(split, []):
            group.append(ep)
            frames += spec.episode(ep).length
            if frames >= shard_rows:
                plans.append(ShardPlan(schema.shard_file(split, number), split, tuple(group), frames))
                group, frames, number = [], 0, number + 1
        if group:
            plans.append(ShardPlan(schema.shard_file(split, number), split, tuple(group), frames))
    return plans


def plan_job(cfg: PreprocessConfig, spec: DatasetSpec) -> JobPlan:
    episodes = select_episodes(spec, cfg.episodes)
    cameras = select_cameras(spec, cfg.cameras)
    if not cameras:
        raise PreprocessError(f"LeRobot dataset '{spec.repo_id}' has no camera; a VLA needs at least one image")
    train, val = split_episodes(episodes, cfg.val_fraction, cfg.seed)
    shards = plan_shards(spec, {"train": train, "val": val}, cfg.shard_rows)
    return JobPlan(spec, tuple(episodes), cameras, {"train": tuple(train), "val": tuple(val)}, tuple(shards))
