"""The benchmark's datasets, recorded once with lerobot's writing API and cached (a marker file says complete)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

PUSHT_REPO_ID = "ki/pusht_bench"
COMPLETE = ".ki_bench_complete"


def pusht_root(cache_dir: Path, episodes: int, max_steps: int) -> Path:
    return cache_dir / "lerobot" / f"{PUSHT_REPO_ID}_e{episodes}_s{max_steps}"


def record_pusht_phase(repo_id: str, root: str, episodes: int, max_steps: int) -> dict:
    """Record the demo dataset (gym-pusht, lerobot v3 video) unless a complete one is there."""
    from ki_sim.record import DemoConfig, record_demo_dataset

    path = Path(root)
    if (path / COMPLETE).is_file():
        return {"recorded": False}
    if path.exists():  # an interrupted recording inside the benchmark's own cache folder
        shutil.rmtree(path)
    summary = record_demo_dataset(
        DemoConfig(repo_id=repo_id, root=root, episodes=episodes, max_steps=max_steps, seed=0),
        progress=False,
    )
    (path / COMPLETE).write_text(json.dumps({"episodes": episodes, "frames": summary.frames}))
    return {"recorded": True, "record_s": summary.seconds, "frames": summary.frames}


# ------------------------------------------------------------------------------------------------ ALOHA-like

ALOHA_REPO_ID = "ki/aloha_like_bench"
# openpi's ALOHA cameras: a scene camera above the table and one on each wrist.
ALOHA_CAMERAS = ("observation.images.cam_high", "observation.images.cam_left_wrist",
                 "observation.images.cam_right_wrist")
ALOHA_TASKS = ("fold the towel", "put the cup in the bin", "hand over the marker", "open the ziploc bag")


@dataclasses.dataclass(frozen=True)
class AlohaLikeConfig:
    """A dataset that costs what a real bimanual recording costs to read: 3 video cameras at 480x640 (lerobot's
    own encoder settings: AV1, a keyframe every 2 frames, crf 30), 14-dim state and action at 50 fps, and pictures
    whose content moves (arms over a textured table, wrist views panning with the arm, sensor noise)."""

    episodes: int = 4
    frames: int = 300  # per episode
    height: int = 480
    width: int = 640
    fps: int = 50
    seed: int = 0


def aloha_like_root(cache_dir: Path, cfg: AlohaLikeConfig) -> Path:
    return cache_dir / "lerobot" / f"{ALOHA_REPO_ID}_e{cfg.episodes}_f{cfg.frames}_{cfg.height}x{cfg.width}"


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A table-like RGB texture: smoothed noise at several scales, a few coloured objects with sharp edges."""
    import cv2

    img = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 40.0), (16, 24.0), (64, 12.0), (256, 6.0)):
        # mostly brightness, a little colour: surfaces vary in shade more than in hue
        small = rng.normal(0.0, 1.0, (cells * h // w + 1, cells, 1)) + rng.normal(0.0, 0.25, (cells * h // w + 1, cells, 3))
        img += amp * cv2.resize(small.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img += np.array([120.0, 100.0, 80.0], np.float32)  # wood-ish
    for _ in range(12):
        y, x = int(rng.integers(0, h - 40)), int(rng.integers(0, w - 40))
        dy, dx = int(rng.integers(15, 90)), int(rng.integers(15, 90))
        img[y : y + dy, x : x + dx] = rng.uniform(20, 235, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _trajectories(rng: np.random.Generator, n: int, dim: int, fps: int) -> np.ndarray:
    """Smooth joint trajectories [n, dim] in [-1, 1]: a few slow sinusoids per joint (0.05-0.6 Hz)."""
    t = np.arange(n)[:, None] / fps
    out = np.zeros((n, dim))
    for _ in range(3):
        out += rng.uniform(0.1, 0.33, dim) * np.sin(2 * np.pi * rng.uniform(0.05, 0.6, dim) * t + rng.uniform(0, 6.3, dim))
    return out.astype(np.float32)


class _Scene:
    """Renders the three cameras of one frame from the 14 joint values (two arms of 6 joints + a gripper)."""

    def __init__(self, rng: np.random.Generator, h: int, w: int):
        self.h, self.w = h, w
        self.table = _texture(rng, h, w)
        self.far = _texture(rng, 2 * h, 2 * w)  # what the wrist cameras pan over
        self.noise = rng.normal(0.0, 2.0, (4, h + 8, w + 8, 3)).astype(np.int16)  # sensor noise bank
        self.k = 0

    def _noisy(self, img: np.ndarray) -> np.ndarray:
        self.k += 1
        dy, dx = self.k % 7, (3 * self.k) % 8
        n = self.noise[self.k % len(self.noise), dy : dy + self.h, dx : dx + self.w]
        return np.clip(img.astype(np.int16) + n, 0, 255).astype(np.uint8)

    def _arm(self, img: np.ndarray, joints: np.ndarray, base: tuple[int, int], color: tuple[int, int, int]) -> None:
        import cv2

        x, y = base
        angle = -np.pi / 2
        for j, length in enumerate((0.28, 0.22, 0.15)):
            angle += 1.2 * float(joints[j])
            nx = int(x + length * self.w * np.cos(angle))
            ny = int(y + length * self.h * np.sin(angle))
            cv2.line(img, (x, y), (nx, ny), color, thickness=max(4, self.w // (40 + 10 * j)), lineType=cv2.LINE_AA)
            x, y = nx, ny
        opening = int(8 + 20 * (1 + float(joints[6])))
        cv2.circle(img, (x, y), max(5, self.w // 60), (30, 30, 30), -1, lineType=cv2.LINE_AA)
        cv2.line(img, (x - opening // 2, y), (x - opening // 2, y - 25), (200, 200, 200), 5)
        cv2.line(img, (x + opening // 2, y), (x + opening // 2, y - 25), (200, 200, 200), 5)

    def _wrist(self, joints: np.ndarray, side: int) -> np.ndarray:
        import cv2

        h, w = self.h, self.w
        cy = int((0.5 + 0.4 * joints[0]) * h)
        cx = int((0.5 + 0.4 * joints[1] + 0.2 * side) * w)
        view = self.far[cy : cy + h, cx : cx + w].copy()  # the table seen from the gripper, panning with the arm
        opening = int(w * (0.12 + 0.08 * (1 + float(joints[6]))))
        for sign in (-1, 1):  # the gripper's fingers, fixed in the wrist camera's frame
            x = w // 2 + sign * opening
            cv2.rectangle(view, (x - 18, int(0.62 * h)), (x + 18, h), (60, 60, 70), -1)
        return view

    def render(self, state: np.ndarray) -> dict[str, np.ndarray]:
        left, right = state[:7], state[7:]
        top = self.table.copy()
        self._arm(top, left, (self.w // 4, self.h - 1), (230, 230, 230))
        self._arm(top, right, (3 * self.w // 4, self.h - 1), (220, 220, 235))
        views = (top, self._wrist(left, -1), self._wrist(right, 1))
        return {k: self._noisy(v) for k, v in zip(ALOHA_CAMERAS, views, strict=True)}


def record_aloha_like(repo_id: str, root: str | Path, cfg: AlohaLikeConfig, progress: bool = False) -> dict:
    """Write the dataset with lerobot's writing API (create / add_frame / save_episode / finalize)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from tqdm import tqdm

    from ki_sim.record import _quiet_writers

    _quiet_writers()
    t0 = time.perf_counter()
    features: dict[str, Any] = {
        key: {"dtype": "video", "shape": (cfg.height, cfg.width, 3), "names": ["height", "width", "channels"]}
        for key in ALOHA_CAMERAS
    }
    names = [f"{side}_{j}" for side in ("left", "right") for j in (*map(str, range(6)), "gripper")]
    features["observation.state"] = {"dtype": "float32", "shape": (14,), "names": names}
    features["action"] = {"dtype": "float32", "shape": (14,), "names": names}
    ds = LeRobotDataset.create(repo_id, fps=cfg.fps, features=features, root=root, robot_type="aloha-like",
                               use_videos=True, video_backend="pyav",
                               # After each episode, not streamed: lerobot's streaming encoder drops frames when the
                               # CPU is busy (seen: 17 of 250 on a loaded 2-core machine), and the videos then end
                               # before the data does.
                               streaming_encoding=False)
    rng = np.random.default_rng(cfg.seed)
    try:
        for e in tqdm(range(cfg.episodes), desc="recording ALOHA-like", unit="episode", disable=not progress):
            scene = _Scene(rng, cfg.height, cfg.width)
            states = _trajectories(rng, cfg.frames + 1, 14, cfg.fps)
            for t in range(cfg.frames):
                frame = {"observation.state": states[t], "action": states[t + 1], "task": ALOHA_TASKS[e % len(ALOHA_TASKS)]}
                frame.update(scene.render(states[t]))
                ds.add_frame(frame)
            ds.save_episode(parallel_encoding=False)
    finally:
        ds.finalize()
    return {"record_s": time.perf_counter() - t0, "frames": cfg.episodes * cfg.frames}


def record_aloha_like_phase(root: str, cfg: AlohaLikeConfig) -> dict:
    """Record the ALOHA-like dataset unless a complete one is there (it is slow: minutes on two cores)."""
    path = Path(root)
    if (path / COMPLETE).is_file():
        return {"recorded": False} | json.loads((path / COMPLETE).read_text())
    if path.exists():  # an interrupted recording inside the benchmark's own cache folder
        shutil.rmtree(path)
    out = record_aloha_like(ALOHA_REPO_ID, path, cfg)
    (path / COMPLETE).write_text(json.dumps(dataclasses.asdict(cfg) | out))
    return {"recorded": True} | out
