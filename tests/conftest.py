"""Shared fixtures: real LeRobot datasets written with lerobot's own API, offline, and a small shard directory.

The environment is set before anything imports lerobot (it reads HF_LEROBOT_HOME at import time): datasets land
in a per-session temporary directory and nothing reaches a hub.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="ki-tests-"))
os.environ["HF_LEROBOT_HOME"] = str(_SESSION_DIR / "lerobot")
os.environ["HF_DATASETS_CACHE"] = str(_SESSION_DIR / "hf_datasets_cache")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SVT_LOG", "1")

# Shape checks: every function and dataclass of ki_data and ki_model checks its annotations (jaxtyping shapes
# included) at run time, with beartype. On by default; KI_SHAPE_CHECKS=0 turns them off. The hook must be in place
# before anything imports them, hence here. jaxtyping's hook matches a module and everything under it, so the
# modules are listed one by one (from the file system, importing nothing) to leave out those in _UNCHECKED_MODULES.
# The two top-level __init__ files only re-export, so they need no checks.
_UNCHECKED_MODULES: dict[str, str] = {
    # No arrays in it; tyro.MISSING stands for the fields a recipe leaves to the user (ki_model.recipes).
    "ki_model.train_config": "TrainConfig fields may hold tyro.MISSING",
}


def _checked_modules() -> list[str]:
    import pkgutil

    root = Path(__file__).resolve().parent.parent
    names = []
    for package in ("ki_data", "ki_model"):
        for info in pkgutil.iter_modules([str(root / package)], prefix=package + "."):
            names.append(info.name)  # a subpackage's name also covers its modules
    unchecked_packages = [n for n in _UNCHECKED_MODULES if (root / n.replace(".", "/")).is_dir()]
    assert not unchecked_packages, f"list the modules of {unchecked_packages} instead"
    return sorted(n for n in names if n not in _UNCHECKED_MODULES)


if os.environ.get("KI_SHAPE_CHECKS", "1") != "0":
    from jaxtyping import install_import_hook

    # PEP 484's numeric tower, as static checkers read annotations: an int is accepted where a float is annotated.
    install_import_hook(_checked_modules(), "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _session_dir():
    yield _SESSION_DIR
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture
def no_shape_checks():
    """Run-time annotation checks off for one test: for tests of a function's own refusal of a wrong-typed argument,
    which the checks would otherwise refuse first (callers outside the test suite have no checks)."""
    from jaxtyping import config

    before = config.jaxtyping_disable
    config.update("jaxtyping_disable", True)
    yield
    config.update("jaxtyping_disable", before)


@pytest.fixture(scope="session")
def lerobot_home() -> Path:
    return Path(os.environ["HF_LEROBOT_HOME"])


@dataclasses.dataclass
class MadeDataset:
    """A dataset written by `make_lerobot_dataset`, with the exact values that went in."""

    repo_id: str
    root: Path
    fps: int
    cameras: dict[str, tuple[int, int]]  # feature key -> (height, width)
    storage: str
    states: list[np.ndarray]  # per episode [n, state_dim] float32
    actions: list[np.ndarray]  # per episode [n, action_dim] float32
    tasks: list[list[str]]  # per episode, per frame
    images: list[dict[str, np.ndarray]]  # per episode: feature key -> [n, h, w, 3] uint8 (as written)

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.states]


def _frame(rng: np.random.Generator, h: int, w: int, t: int, cam: int) -> np.ndarray:
    """A smooth picture with a moving square: compresses like a camera image, differs per frame and camera."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), np.full_like(xx, 60 * cam + 40)], -1)
    y0, x0 = (3 * t + 5 * cam) % max(h - 8, 1), (5 * t + 3 * cam) % max(w - 8, 1)
    img[y0 : y0 + 8, x0 : x0 + 8] = rng.integers(0, 255, 3)
    return img.astype(np.uint8)


def build_lerobot_dataset(
    repo_id: str,
    *,
    root: Path | None = None,
    lengths: tuple[int, ...] = (12, 9),
    cameras: dict[str, tuple[int, int]] | None = None,
    storage: str = "video",
    state_dim: int = 3,
    action_dim: int = 2,
    tasks: tuple[str, ...] = ("Pick_Up the RED cube",),
    fps: int = 10,
    seed: int = 0,
) -> MadeDataset:
    """Write a real LeRobot v3.0 dataset with lerobot's writing API (create / add_frame / save_episode / finalize).

    Episode e uses tasks[e % len(tasks)]. States and actions are smooth random walks (float32).
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.utils.constants import HF_LEROBOT_HOME

    cameras = {"observation.images.wrist_left": (24, 32)} if cameras is None else cameras
    features = {
        key: {"dtype": storage, "shape": (h, w, 3), "names": ["height", "width", "channels"]}
        for key, (h, w) in cameras.items()
    }
    features["observation.state"] = {"dtype": "float32", "shape": (state_dim,), "names": None}
    features["action"] = {"dtype": "float32", "shape": (action_dim,), "names": None}
    root = Path(root) if root is not None else HF_LEROBOT_HOME / repo_id
    ds = LeRobotDataset.create(repo_id, fps=fps, features=features, root=root, use_videos=storage == "video",
                               video_backend="pyav")
    rng = np.random.default_rng(seed)
    made = MadeDataset(repo_id, root, fps, dict(cameras), storage, [], [], [], [])
    for e, n in enumerate(lengths):
        task = tasks[e % len(tasks)]
        states = np.cumsum(rng.normal(0, 0.3, (n, state_dim)), 0).astype(np.float32) + 5.0 * e
        actions = np.cumsum(rng.normal(0, 0.5, (n, action_dim)), 0).astype(np.float32) - 2.0 * e
        images = {k: np.stack([_frame(rng, h, w, t, c) for t in range(n)]) for c, (k, (h, w)) in
                  enumerate(cameras.items())}
        for t in range(n):
            frame = {"observation.state": states[t], "action": actions[t], "task": task}
            frame.update({k: v[t] for k, v in images.items()})
            ds.add_frame(frame)
        ds.save_episode(parallel_encoding=False)  # no fork() of the (threaded) test process per camera
        made.states.append(states)
        made.actions.append(actions)
        made.tasks.append([task] * n)
        made.images.append(images)
    ds.finalize()
    return made


@pytest.fixture(scope="session")
def make_lerobot_dataset():
    """Factory: make_lerobot_dataset(repo_id, lengths=..., cameras=..., storage="video"|"image", state_dim=...,
    action_dim=..., tasks=..., root=None) -> MadeDataset. Lands under $HF_LEROBOT_HOME/<repo_id> by default."""
    return build_lerobot_dataset


DEMO_REPO_ID = "ki/pusht_demo_tests"
# Small enough for the tiny model preset (ki_model Pi05KIConfig.tiny: 32 px, 64 / 32 tokens).
DEMO_SHARD_OPTIONS = dict(image_size=32, action_horizon=10, max_token_len=64, max_text_len=32)


@pytest.fixture(scope="session")
def demo_dataset(lerobot_home) -> Path:
    """A few short gym-pusht episodes recorded like the demo dataset (video), under $HF_LEROBOT_HOME."""
    from ki_sim.record import DemoConfig, record_demo_dataset

    summary = record_demo_dataset(DemoConfig(repo_id=DEMO_REPO_ID, episodes=3, max_steps=24, seed=0),
                                  progress=False)
    return summary.root


@pytest.fixture(scope="session")
def demo_shards(demo_dataset, tmp_path_factory) -> Path:
    """`demo_dataset` preprocessed into a shard directory (32 px images, horizon 10, 64 / 32 tokens); read-only."""
    from ki_data.preprocess import PreprocessConfig, run_preprocess

    out = tmp_path_factory.mktemp("demo_shards") / "out"
    cfg = PreprocessConfig(repo_id=DEMO_REPO_ID, output=str(out), progress=False, **DEMO_SHARD_OPTIONS)
    return run_preprocess(cfg).out_dir


@pytest.fixture(scope="session")
def trained_checkpoint(demo_shards, tmp_path_factory) -> Path:
    """The tiny model trained for 2 steps (with EMA) on `demo_shards`: shared by the evaluation, policy, rollout and
    inspection tests, with the settings of test_train.py so that its compiled programs are reused; validation figures
    (--eval-every) at step 2; read-only."""
    from ki_model.compile import enable_compilation_cache
    from ki_model.optimizer import OptimizerConfig
    from ki_model.train import TrainConfig, train

    enable_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache")
    out = tmp_path_factory.mktemp("trained") / "ckpt"
    optimizer = OptimizerConfig(peak_lr=3e-3, warmup_steps=4, decay_steps=200, decay_lr=3e-4)
    train(TrainConfig(shards=str(demo_shards), checkpoint_dir=str(out), steps=2, batch_size=8, log_every=1,
                      save_every=2, num_workers=0, progress=False, optimizer=optimizer, ema_decay=0.9,
                      fast_compile=True, eval_every=2, eval_batches=1))
    return out


def interrupt_after_shards(monkeypatch: pytest.MonkeyPatch, config, shards: int = 2) -> list[str]:
    """Runs preprocessing with `config` until `shards` shards are written, then raises KeyboardInterrupt in the next
    write (what Ctrl-C, or a kill between two shards, leaves behind); returns the written shards' relative paths."""
    from ki_data.preprocess import run_preprocess
    from ki_data.preprocess.pass2 import ShardWorker

    real_write, written = ShardWorker.write_shard, []

    def dies_after(self, plan, on_frames):
        if len(written) == shards:
            raise KeyboardInterrupt
        written.append(plan.path)
        return real_write(self, plan, on_frames)

    with monkeypatch.context() as m:
        m.setattr(ShardWorker, "write_shard", dies_after)
        with pytest.raises(KeyboardInterrupt):
            run_preprocess(config)
    return written
