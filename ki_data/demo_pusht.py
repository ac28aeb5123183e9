"""The demo dataset: gym-pusht driven by a scripted pushing policy, recorded as a LeRobot v3.0 dataset.

Same environment, rendering and features as the canonical `lerobot/pusht` (96x96 RGB `observation.image`, agent xy
as `observation.state`, target agent xy as `action`, 10 fps, one task string). Deterministic for a seed.

The policy (`ScriptedPusher`) is a greedy contact planner: it samples contact points along the T's outline,
predicts with a quasi-static push model how a short push at each would move the block's 8 keypoints toward the
goal keypoints, picks the best trade-off of gain and travel, walks there around the block (shortest path on a
visibility graph of the inflated outline) and pushes for a few steps. Noise on the approach and random push
lengths make the episodes differ.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
from jaxtyping import Float

PUSHT_TASK = "Push the T-shaped block onto the T-shaped target."
PUSHT_FPS = 10
DEFAULT_REPO_ID = "ki/pusht_demo"
IMAGE_KEY = "observation.image"
# Written into the dataset's meta/ directory: the reset seeds, episode limit and image size of the recording, so that
# a closed-loop evaluation can check its initial states against the recorded ones and render like the recording.
RECORDING_FILE = "meta/ki_pusht_recording.json"

# env.reset seeds. Recording: seed * SEED_STRIDE + episode; closed-loop evaluation: EVAL_SEED_BASE + the same. With
# 0 <= seed < MAX_SEED and episode < SEED_STRIDE, recording seeds stay below MAX_SEED * SEED_STRIDE < EVAL_SEED_BASE,
# so no evaluation episode starts from a recorded episode's seed.
SEED_STRIDE = 100_003
MAX_SEED = 2**20
EVAL_SEED_BASE = 2**40


def check_seed_range(seed: int, episodes: int) -> None:
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}), got {seed}")
    if not 0 < episodes <= SEED_STRIDE:
        raise ValueError(f"episodes must be in [1, {SEED_STRIDE}], got {episodes}")


def recording_reset_seed(seed: int, episode: int) -> int:
    return seed * SEED_STRIDE + episode


def evaluation_reset_seed(seed: int, episode: int) -> int:
    return EVAL_SEED_BASE + seed * SEED_STRIDE + episode

AGENT_RADIUS = 15.0
# Rotational inertia over mass of gym-pusht's T (both parts use the bar's moment: 2 * 1500).
_RHO2 = 3000.0
# Outline of the T in its body frame (the two boxes of gym_pusht's add_tee, merged).
_T_OUTLINE = [(-60, 0), (60, 0), (60, 30), (15, 30), (15, 120), (-15, 120), (-15, 30), (-60, 30)]
# Where the agent's center may go (walls at 5 and 506, agent radius 15).
_LO, _HI = 22.0, 490.0


def _next_waypoint(start: np.ndarray, goal: np.ndarray, poly) -> np.ndarray:
    """First waypoint of the shortest path from start to goal that keeps the agent off the block."""
    import shapely.geometry as sg

    inner = poly.buffer(AGENT_RADIUS + 2, join_style=2)
    if inner.contains(sg.Point(start)) and not inner.contains(sg.Point(goal)):
        # Touching the block after a push: first step straight away from it.
        near = np.array(poly.exterior.interpolate(poly.exterior.project(sg.Point(start))).coords[0])
        away = start - near
        return start + away / (np.linalg.norm(away) + 1e-6) * 20.0

    def free(a: np.ndarray, b: np.ndarray) -> bool:
        return not sg.LineString([a, b]).intersects(inner)

    if free(start, goal):
        return goal
    corners = np.array(poly.buffer(AGENT_RADIUS + 10, join_style=2).exterior.coords)[:-1]
    nodes = [start, goal] + [np.clip(p, _LO, _HI) for p in corners]
    n = len(nodes)
    dist = np.full(n, np.inf)
    dist[0] = 0.0
    prev = [-1] * n
    done = np.zeros(n, bool)
    for _ in range(n):  # Dijkstra on a complete visibility graph of ~10 nodes
        i = int(np.argmin(np.where(done, np.inf, dist)))
        if not np.isfinite(dist[i]) or i == 1:
            break
        done[i] = True
        for j in range(n):
            if not done[j] and free(nodes[i], nodes[j]):
                d = dist[i] + float(np.linalg.norm(nodes[i] - nodes[j]))
                if d < dist[j]:
                    dist[j], prev[j] = d, i
    if not np.isfinite(dist[1]):
        return goal  # boxed in against a wall: go straight and accept a graze
    path = [1]
    while prev[path[-1]] != 0:
        path.append(prev[path[-1]])
    for j in reversed(path):
        if np.linalg.norm(nodes[j] - start) > 8.0:
            return nodes[j]
    return goal


def _contact_candidates(outline: Float[np.ndarray, "k 2"], spacing: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """Points every `spacing` px along the outline (counter-clockwise), with their outward normals."""
    area2 = np.sum(outline[:, 0] * np.roll(outline[:, 1], -1) - np.roll(outline[:, 0], -1) * outline[:, 1])
    ring = outline if area2 > 0 else outline[::-1]
    points, normals = [], []
    for a, b in zip(ring, np.roll(ring, -1, axis=0), strict=True):
        length = float(np.linalg.norm(b - a))
        tangent = (b - a) / length
        s = np.arange(4.0, length - 3.9, spacing)
        points.append(a + s[:, None] * tangent)
        normals.append(np.broadcast_to([tangent[1], -tangent[0]], (len(s), 2)))
    return np.concatenate(points), np.concatenate(normals)


def _distance_to_outline(p: Float[np.ndarray, "m 2"], outline: Float[np.ndarray, "k 2"]) -> Float[np.ndarray, " m"]:
    a, b = outline, np.roll(outline, -1, axis=0)
    ab = b - a
    t = np.clip(np.einsum("mkd,kd->mk", p[:, None] - a[None], ab) / np.sum(ab * ab, axis=1), 0.0, 1.0)
    nearest = a[None] + t[..., None] * ab[None]
    return np.linalg.norm(p[:, None] - nearest, axis=-1).min(axis=1)


def _inside(p: Float[np.ndarray, "m 2"], outline: Float[np.ndarray, "k 2"]) -> np.ndarray:
    """Even-odd rule, vectorized over points."""
    a, b = outline, np.roll(outline, -1, axis=0)
    y = p[:, 1:2]
    crosses = (a[None, :, 1] > y) != (b[None, :, 1] > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = a[None, :, 0] + (y - a[None, :, 1]) * (b[None, :, 0] - a[None, :, 0]) / (b[None, :, 1] - a[None, :, 1])
    return (crosses & (p[:, 0:1] < x_at)).sum(axis=1) % 2 == 1


class ScriptedPusher:
    """Greedy push planner for gym-pusht. `act(env)` returns the next target position of the agent."""

    def __init__(self, rng: np.random.Generator, push_len: tuple[float, float] = (15.0, 30.0), noise: float = 1.5):
        self.rng = rng
        self.push_len = push_len
        self.noise = noise
        self._push_left = 0
        self._retreat = 0
        self._dir = np.zeros(2)
        self._step = 0.0

    def act(self, env) -> Float[np.ndarray, "2"]:
        import shapely.geometry as sg

        u = env.unwrapped
        agent = np.array(u.agent.position)
        if self._push_left > 0:
            self._push_left -= 1
            if self._push_left == 0:
                self._retreat = 2
            return agent + self._dir * self._step
        if self._retreat > 0:  # back off so the next approach does not drag the block
            self._retreat -= 1
            return agent - self._dir * 12.0

        shapes = u._block_shapes
        keypoints = np.array([u.block.local_to_world(v) for s in shapes for v in s.get_vertices()])
        goal_body = u.get_goal_pose_body(u.goal_pose)
        goal = np.array([goal_body.local_to_world(v) for s in shapes for v in s.get_vertices()])
        outline = np.array([u.block.local_to_world(v) for v in _T_OUTLINE])
        poly = sg.Polygon(outline)
        center = np.array(u.block.position)
        err0 = float(np.sum((goal - keypoints) ** 2))

        contacts, normals = _contact_candidates(outline)
        pre = contacts + normals * (AGENT_RADIUS + 5)
        usable = (
            (pre > _LO).all(1) & (pre < _HI).all(1)
            & (_distance_to_outline(pre, outline) >= AGENT_RADIUS + 3)
            & ~_inside(pre, outline)
        )
        push = -normals
        r = contacts - center
        torque = r[:, 0] * push[:, 1] - r[:, 1] * push[:, 0]
        # Quasi-static response of a free body to a 10 px push at each contact: [m, 8, 2] moved keypoints.
        k = 10.0 / (1.0 + torque * torque / _RHO2)
        angle = k * torque / _RHO2
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
        rel = keypoints[None] - center
        rotated = np.stack([cos * rel[..., 0] - sin * rel[..., 1], sin * rel[..., 0] + cos * rel[..., 1]], -1)
        moved = center + (k[:, None] * push)[:, None, :] + rotated
        gain = err0 - ((goal[None] - moved) ** 2).sum(axis=(1, 2))
        score = np.where(usable & (gain > 0), gain / 8.0 - 0.5 * np.linalg.norm(pre - agent, axis=1), -np.inf)
        best = None
        if np.isfinite(score).any():
            i = int(np.argmax(score))
            best = (push[i], pre[i])
        if best is None:
            return agent + self.rng.normal(0.0, self.noise, 2)
        push, pre = best
        if np.linalg.norm(pre - agent) < 5.0:
            rmse = np.sqrt(err0 / len(keypoints))
            self._dir = push
            self._push_left = int(self.rng.integers(3, 7))
            self._step = float(min(self.rng.uniform(*self.push_len), 0.6 * rmse + 2.0))
            return agent + push * self._step
        step = np.clip(_next_waypoint(agent, pre, poly), _LO, _HI) - agent
        norm = float(np.linalg.norm(step))
        if norm > 40.0:
            step *= 40.0 / norm
        return agent + step + self.rng.normal(0.0, self.noise, 2)


def pusht_features(image_storage: str = "video", image_size: int = 96) -> dict:
    """LeRobot feature spec matching lerobot/pusht."""
    if image_storage not in ("video", "image"):
        raise ValueError(f"image_storage must be 'video' or 'image', got {image_storage!r}")
    return {
        IMAGE_KEY: {
            "dtype": image_storage,
            "shape": (image_size, image_size, 3),
            "names": ["height", "width", "channel"],
        },
        "observation.state": {"dtype": "float32", "shape": (2,), "names": {"motors": ["x", "y"]}},
        "action": {"dtype": "float32", "shape": (2,), "names": {"motors": ["x", "y"]}},
        "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
        "next.success": {"dtype": "bool", "shape": (1,), "names": None},
    }


def make_env(image_size: int = 96, max_steps: int = 300):
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame without a display
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import gym_pusht  # noqa: F401  (registers the environment)
        import gymnasium as gym

        return gym.make(
            "gym_pusht/PushT-v0",
            obs_type="pixels_agent_pos",
            render_mode="rgb_array",
            observation_width=image_size,
            observation_height=image_size,
            max_episode_steps=max_steps,
        )


@dataclasses.dataclass(frozen=True)
class EpisodeRecord:
    steps: int
    start_coverage: float
    final_coverage: float
    success: bool
    start_distance: float  # block position to goal position, pixels of the 512 x 512 arena
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
    overwrite: bool = False


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


def _block_goal_distance(env) -> float:
    u = env.unwrapped
    return float(np.linalg.norm(np.array(u.block.position) - np.array(u.goal_pose[:2])))


def run_episode(env, seed: int, policy_seed: tuple[int, int], max_steps: int, on_step=None) -> EpisodeRecord:
    """One scripted episode. on_step(image, state, action, reward, success) is called for every frame."""
    obs, _ = env.reset(seed=seed)
    u = env.unwrapped
    policy = ScriptedPusher(np.random.default_rng(policy_seed))
    start_cov, start_dist = float(u._get_coverage()), _block_goal_distance(env)
    info = {"coverage": start_cov, "is_success": False}
    steps = 0
    for _ in range(max_steps):
        action = np.clip(policy.act(env), 0.0, 512.0).astype(np.float32)
        image, state = obs["pixels"], np.asarray(obs["agent_pos"], dtype=np.float32)
        obs, reward, terminated, truncated, info = env.step(action)
        steps += 1
        if on_step is not None:
            on_step(image, state, action, float(reward), bool(info["is_success"]))
        if terminated or truncated:
            break
    return EpisodeRecord(
        steps=steps,
        start_coverage=start_cov,
        final_coverage=float(info["coverage"]),
        success=bool(info["is_success"]),
        start_distance=start_dist,
        final_distance=_block_goal_distance(env),
    )


def _prepare_root(root: Path, overwrite: bool) -> None:
    if not root.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{root} already exists; pass --overwrite to record the demo dataset again")
    if any(root.iterdir()) and not (root / "meta" / "info.json").is_file():
        raise FileExistsError(f"{root} exists and is not a LeRobot dataset; refusing to delete it")
    shutil.rmtree(root)


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

    check_seed_range(cfg.seed, cfg.episodes)
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
    env = make_env(cfg.image_size, max_steps=cfg.max_steps)

    def add(image, state, action, reward, success):
        dataset.add_frame(
            {
                IMAGE_KEY: image,
                "observation.state": state,
                "action": action,
                "next.reward": np.array([reward], np.float32),
                "next.success": np.array([success]),
                "task": PUSHT_TASK,
            }
        )

    records = []
    seeds = [recording_reset_seed(cfg.seed, ep) for ep in range(cfg.episodes)]
    try:
        for ep in tqdm(range(cfg.episodes), desc="recording pusht", unit="episode", disable=not progress):
            records.append(run_episode(env, seed=seeds[ep], policy_seed=(cfg.seed, ep),
                                       max_steps=cfg.max_steps, on_step=add))
            dataset.save_episode()
    finally:
        dataset.finalize()
        env.close()
    _remove_empty_dirs(root / "images")  # lerobot's emptied staging folders
    recording = {"reset_seeds": seeds, "max_steps": cfg.max_steps, "image_size": cfg.image_size, "task": PUSHT_TASK}
    (root / RECORDING_FILE).write_text(json.dumps(recording, indent=2) + "\n")
    return DemoSummary(root=root, repo_id=cfg.repo_id, episodes=records, seconds=time.perf_counter() - t0)
