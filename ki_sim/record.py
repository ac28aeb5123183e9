"""The demo dataset: gym-pusht driven by a scripted expert (ki_sim.experts), recorded as a LeRobot v3.0 dataset with
lerobot's own writer. Deterministic for a seed.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ki_data.console import terminal
from ki_sim.experts import EXPERTS
from ki_sim.pusht import (
    DEFAULT_REPO_ID,
    ENV_STATE_KEY,
    IMAGE_KEY,
    PUSHT_FPS,
    PUSHT_TASK,
    RECORDING_FILE,
    STATE_KEY,
    block_goal_distance,
    check_seed_range,
    check_start,
    coverage,
    environment_state,
    make_env,
    pusht_features,
    recording_reset_seed,
    reset,
)


@dataclasses.dataclass(frozen=True)
class EpisodeRecord:
    steps: int
    start_coverage: float
    final_coverage: float
    success: bool
    start_distance: float  # block's center of mass to the goal's, pixels of the 512 x 512 arena
    final_distance: float


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    repo_id: str = DEFAULT_REPO_ID
    root: str | None = None  # default: $HF_LEROBOT_HOME/<repo_id>
    episodes: int = 20
    seed: int = 0
    max_steps: int = 150
    image_storage: str = "video"  # or "image" (PNG frames in the parquet files)
    image_size: int = 96
    expert: str = "line"  # ki_sim.experts.EXPERTS: "line" (the demo's) or "planner" (the harder configuration)
    start: str = "random"  # initial states (ki_sim.pusht.STARTS): gym-pusht's, or the agent behind the block
    # px: Gaussian noise added to the action the simulator executes, never to the one recorded (DART): the recording
    # then visits states off the expert's own path, labelled with what the expert does there (how it recovers).
    perturb: float = 0.0
    # Steps recorded after the expert is first done (LinePusher.is_done: the block at the goal); None: every episode
    # runs max_steps, holding still at the goal for its last ~half. Fewer still frames, more rows that teach pushing.
    after_done: int | None = None
    overwrite: bool = False

    def validate(self) -> None:
        if self.expert not in EXPERTS:
            raise ValueError(f"unknown expert {self.expert!r}; known: {sorted(EXPERTS)}")
        check_seed_range(self.seed, self.episodes)
        check_start(self.start)
        if self.perturb < 0:
            raise ValueError(f"perturb must be >= 0 px, got {self.perturb}")
        if self.after_done is not None and self.after_done < 0:
            raise ValueError(f"after_done must be >= 0 steps, got {self.after_done}")


@dataclasses.dataclass(frozen=True)
class DemoSummary:
    root: Path
    repo_id: str
    episodes: list[EpisodeRecord]
    seconds: float

    @property
    def frames(self) -> int:
        return sum(e.steps for e in self.episodes)

    def text(self) -> str:
        eps = self.episodes
        start = np.mean([e.start_coverage for e in eps])
        final = np.mean([e.final_coverage for e in eps])
        d0 = np.mean([e.start_distance for e in eps])
        d1 = np.mean([e.final_distance for e in eps])
        improved = sum(e.final_coverage > e.start_coverage for e in eps)
        return "\n".join(
            [
                f"demo dataset {self.repo_id} at {self.root}",
                f"  episodes {len(eps)}, frames {self.frames}, {self.seconds:.1f}s",
                f"  coverage of the target: start {start:.2f} -> end {final:.2f} (mean); improved in {improved}/"
                f"{len(eps)} episodes; success (>95%) in {sum(e.success for e in eps)}",
                f"  block-to-goal distance: start {d0:.0f} px -> end {d1:.0f} px (mean, 512 px arena)",
            ]
        )


def run_episode(env, seed: int, policy_seed: tuple[int, int], max_steps: int, on_step=None,
                expert: str = "line", perturb: float = 0.0, after_done: int | None = None,
                start: str = "random") -> EpisodeRecord:
    """One scripted episode. on_step(image, state, environment_state, action, reward, success) is called for every
    frame with the expert's action; the simulator executes it plus N(0, perturb^2) px noise. With `after_done` the
    episode ends that many steps after the expert is first done (an expert without `is_done` never is). `start` places
    the agent (ki_sim.pusht.STARTS)."""
    obs = reset(env, seed, start)
    policy = EXPERTS[expert](np.random.default_rng(policy_seed))
    shake = np.random.default_rng((*policy_seed, 1))  # its own stream: perturb 0 records what it recorded before
    start_cov, start_dist = coverage(env), block_goal_distance(env)
    info = {"coverage": start_cov, "is_success": False}
    steps, stop = 0, None  # stop: the step at which the episode ends, once the expert is done
    for step in range(max_steps):
        if after_done is not None and stop is None and getattr(policy, "is_done", lambda _: False)(env):
            stop = step + after_done
        if stop is not None and step >= stop:
            break
        action = np.clip(policy.act(env), 0.0, 512.0).astype(np.float32)
        image, state = obs["pixels"], np.asarray(obs["agent_pos"], dtype=np.float32)
        env_state = environment_state(env)
        executed = np.clip(action + shake.normal(0.0, perturb, 2), 0.0, 512.0).astype(np.float32) if perturb else action
        obs, reward, terminated, truncated, info = env.step(executed)
        steps += 1
        if on_step is not None:
            on_step(image, state, env_state, action, float(reward), bool(info["is_success"]))
        if terminated or truncated:
            break
    return EpisodeRecord(
        steps=steps,
        start_coverage=start_cov,
        final_coverage=float(info["coverage"]),
        success=bool(info["is_success"]),
        start_distance=start_dist,
        final_distance=block_goal_distance(env),
    )


def _prepare_root(root: Path, overwrite: bool) -> None:
    if not root.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{root} already exists; pass --overwrite to record the demo dataset again")
    if any(root.iterdir()) and not (root / "meta" / "info.json").is_file():
        raise FileExistsError(f"{root} exists and is not a LeRobot dataset; refusing to delete it")
    shutil.rmtree(root)


_WORKER_ENV = None  # the simulator of a recording worker process (_start_worker)


def _start_worker(image_size: int, max_steps: int) -> None:
    global _WORKER_ENV
    _WORKER_ENV = make_env(image_size, max_steps=max_steps)


def _simulate(job: tuple[DemoConfig, int, int]) -> tuple[EpisodeRecord, list[tuple]]:
    """One episode in a worker process: its record and its frames, as `run_episode` hands them to on_step."""
    cfg, seed, episode = job
    frames: list[tuple] = []
    record = run_episode(_WORKER_ENV, seed=seed, policy_seed=(cfg.seed, episode), max_steps=cfg.max_steps,
                         on_step=lambda *frame: frames.append(frame), expert=cfg.expert, perturb=cfg.perturb,
                         after_done=cfg.after_done, start=cfg.start)
    return record, frames


def _remove_empty_dirs(directory: Path) -> None:
    if directory.is_dir() and not any(p.is_file() for p in directory.rglob("*")):
        shutil.rmtree(directory)


def _quiet_writers() -> None:
    """Keep the encoders' and `datasets`' chatter out of the terminal (the tqdm bar says what happens)."""
    import av.logging
    import datasets

    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only
    av.logging.set_level(av.logging.ERROR)
    datasets.disable_progress_bars()


def record_demo_dataset(cfg: DemoConfig, progress: bool = True) -> DemoSummary:
    """Record `cfg.episodes` scripted episodes into a LeRobot dataset with lerobot's own writer."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.utils.constants import HF_LEROBOT_HOME
    from tqdm import tqdm

    cfg.validate()
    root = Path(cfg.root) if cfg.root else HF_LEROBOT_HOME / cfg.repo_id
    _prepare_root(root, cfg.overwrite)
    _quiet_writers()
    use_video = cfg.image_storage == "video"
    t0 = time.perf_counter()
    dataset = LeRobotDataset.create(
        cfg.repo_id,
        fps=PUSHT_FPS,
        features=pusht_features(cfg.image_storage, cfg.image_size),
        root=root,
        robot_type="2d pointer",
        use_videos=use_video,
        video_backend="pyav",
        # Encode each episode after it ends (lerobot stages PNG frames): as fast at 96 px as streaming encoding,
        # and its encoder keeps ffmpeg's log quiet.
        streaming_encoding=False,
    )

    def add(image, state, env_state, action, reward, success):
        dataset.add_frame(
            {
                IMAGE_KEY: image,
                STATE_KEY: state,
                ENV_STATE_KEY: env_state,
                "action": action,
                "next.reward": np.array([reward], np.float32),
                "next.success": np.array([success]),
                "task": PUSHT_TASK,
            }
        )

    records = []
    seeds = [recording_reset_seed(cfg.seed, ep) for ep in range(cfg.episodes)]
    # A worker process simulates the episodes (the simulator and the expert: about half the time) while this one
    # writes and encodes them; each episode is simulated alone from its own seeds, so the recording is the same.
    jobs = [(cfg, seeds[ep], ep) for ep in range(cfg.episodes)]
    with multiprocessing.get_context("spawn").Pool(1, _start_worker, (cfg.image_size, cfg.max_steps)) as pool:
        try:
            for record, frames in tqdm(pool.imap(_simulate, jobs), total=cfg.episodes, desc="recording pusht",
                                       unit="episode", disable=not progress, file=terminal()):
                for frame in frames:
                    add(*frame)
                dataset.save_episode()
                records.append(record)
        finally:
            dataset.finalize()
    _remove_empty_dirs(root / "images")  # lerobot's emptied staging folders
    recording = {"reset_seeds": seeds, "max_steps": cfg.max_steps, "image_size": cfg.image_size, "task": PUSHT_TASK,
                 "expert": cfg.expert, "perturb": cfg.perturb, "after_done": cfg.after_done, "start": cfg.start}
    (root / RECORDING_FILE).write_text(json.dumps(recording, indent=2) + "\n")
    return DemoSummary(root=root, repo_id=cfg.repo_id, episodes=records, seconds=time.perf_counter() - t0)
