"""gym-pusht as the demo uses it: the environment, the reset seeds, the features it is recorded with, and the
geometry the experts and the reports read (the block's center of mass, the goal's, the coverage of the target).

Same environment, rendering and features as the canonical `lerobot/pusht` (96x96 RGB `observation.image`, agent xy
as `observation.state`, target agent xy as `action`, 10 fps, one task string), plus the block's pose as
`observation.environment_state` (center of mass x, y and the angle as sin, cos), which `pipelines.preprocess
--state-keys` may add to the model's state.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
from jaxtyping import Float

PUSHT_TASK = "Push the T-shaped block onto the T-shaped target."
PUSHT_FPS = 10
DEFAULT_REPO_ID = "ki/pusht_demo"
IMAGE_KEY = "observation.image"
STATE_KEY = "observation.state"
ENV_STATE_KEY = "observation.environment_state"
ENV_STATE_NAMES = ["block_x", "block_y", "block_sin", "block_cos"]
# Written into the dataset's meta/ directory: the reset seeds, episode limit and image size of the recording, so that
# a closed-loop evaluation can check its initial states against the recorded ones and render like the recording.
RECORDING_FILE = "meta/ki_pusht_recording.json"
# What a sidecar written before a key existed recorded: the contact planner, no perturbation, episodes of the full
# limit, gym-pusht's random initial states.
RECORDING_DEFAULTS = {"expert": "planner", "perturb": 0.0, "after_done": None, "start": "random"}

# env.reset seeds. Recording: seed * SEED_STRIDE + episode; closed-loop evaluation: EVAL_SEED_BASE + the same. With
# 0 <= seed < MAX_SEED and episode < SEED_STRIDE, recording seeds stay below MAX_SEED * SEED_STRIDE < EVAL_SEED_BASE,
# so no evaluation episode starts from a recorded episode's seed.
SEED_STRIDE = 100_003
MAX_SEED = 2**20
EVAL_SEED_BASE = 2**40

# Where the agent's center may go (walls at 5 and 506, agent radius 15).
ARENA_LO, ARENA_HI = 22.0, 490.0
# Initial states. "random": gym-pusht's (agent and block uniform, the block's angle too). "behind": the same block,
# the agent moved to the far side of the block from the goal, on the line through the block's center of mass and the
# goal's, BEHIND_DISTANCE px from the block's (clipped to the arena): where the line expert pushes from, so an
# episode is pushing, with no walk around the block first.
STARTS = ("random", "behind")
BEHIND_DISTANCE = 100.0  # the line expert's circling radius: the T reaches 77 px from its center, the agent 15
# The T's center of mass in its body frame: the mean of its two boxes' centroids (0, 15) and (0, 75), as gym-pusht sets.
T_CENTER_OF_MASS = (0.0, 45.0)


def check_seed_range(seed: int, episodes: int) -> None:
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}), got {seed}")
    if not 0 < episodes <= SEED_STRIDE:
        raise ValueError(f"episodes must be in [1, {SEED_STRIDE}], got {episodes}")


def check_start(start: str) -> None:
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")


def reset(env, seed: int, start: str = "random") -> dict:
    """env.reset(seed=seed), then the `start`'s placement of the agent (STARTS); the first observation."""
    check_start(start)
    obs, _ = env.reset(seed=seed)
    if start == "behind":
        u = env.unwrapped
        center, goal = block_center(env), goal_center(env)
        away = center - goal
        n = away / max(float(np.linalg.norm(away)), 1e-6)
        agent = np.clip(center + BEHIND_DISTANCE * n, ARENA_LO, ARENA_HI)
        # As gym-pusht's own reset places it: set the kinematic agent, one physics step, observe. (Its reset_to_state
        # option cannot express "the same block": setting the angle after the position moves the block.)
        u.agent.position = (float(agent[0]), float(agent[1]))
        u.space.step(u.dt)
        obs = u.get_obs()
    return obs


def recording_reset_seed(seed: int, episode: int) -> int:
    return seed * SEED_STRIDE + episode


def read_recording(root: str | Path) -> dict | None:
    """The recording sidecar of the dataset at `root`, keys it predates filled from RECORDING_DEFAULTS; None when it
    has none (recorded before the sidecar existed, or not by pipelines.make_demo_dataset)."""
    path = Path(root) / RECORDING_FILE
    return RECORDING_DEFAULTS | json.loads(path.read_text()) if path.is_file() else None


def evaluation_reset_seed(seed: int, episode: int) -> int:
    return EVAL_SEED_BASE + seed * SEED_STRIDE + episode


def pusht_features(image_storage: str = "video", image_size: int = 96) -> dict:
    """LeRobot feature spec: lerobot/pusht's, plus the block's pose as `observation.environment_state`."""
    if image_storage not in ("video", "image"):
        raise ValueError(f"image_storage must be 'video' or 'image', got {image_storage!r}")
    return {
        IMAGE_KEY: {
            "dtype": image_storage,
            "shape": (image_size, image_size, 3),
            "names": ["height", "width", "channel"],
        },
        STATE_KEY: {"dtype": "float32", "shape": (2,), "names": {"motors": ["x", "y"]}},
        ENV_STATE_KEY: {"dtype": "float32", "shape": (4,), "names": ENV_STATE_NAMES},
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


# ------------------------------------------------------------------------------------------------ geometry


def block_center(env) -> Float[np.ndarray, "2"]:
    """The T's center of mass in the arena."""
    return np.array(env.unwrapped.block.local_to_world(T_CENTER_OF_MASS), dtype=np.float64)


def goal_center(env) -> Float[np.ndarray, "2"]:
    """Where the T's center of mass is when the T lies on the target."""
    u = env.unwrapped
    return np.array(u.get_goal_pose_body(u.goal_pose).local_to_world(T_CENTER_OF_MASS), dtype=np.float64)


def block_goal_distance(env) -> float:
    """Center of mass to the goal's, pixels of the 512 x 512 arena: what the reports count as closed."""
    return float(np.linalg.norm(block_center(env) - goal_center(env)))


def environment_state(env) -> Float[np.ndarray, "4"]:
    """`observation.environment_state`: the block's center of mass x, y and its angle as sin, cos."""
    angle = float(env.unwrapped.block.angle)
    return np.array([*block_center(env), np.sin(angle), np.cos(angle)], dtype=np.float32)


def coverage(env) -> float:
    """The share of the target's area the T covers (gym-pusht's reward and success measure, computed from the
    simulator's public bodies and shapes)."""
    import shapely.geometry as sg

    u = env.unwrapped

    def outline(body) -> sg.MultiPolygon:
        return sg.MultiPolygon([sg.Polygon([body.local_to_world(v) for v in s.get_vertices()]) for s in u.block.shapes])

    goal = outline(u.get_goal_pose_body(u.goal_pose))
    return float(goal.intersection(outline(u.block)).area / goal.area)
