"""Record the demo LeRobot dataset from the gym-pusht simulator with a scripted expert.

    python -m pipelines.make_demo_dataset [--repo-id ki/pusht_demo] [--root DIR] [--episodes 20] [--seed 0]
                                          [--expert line|planner]
                                          [--start random|behind] [--perturb PX] [--after-done N]

Lands under $HF_LEROBOT_HOME/<repo_id> (unless --root) so `python -m pipelines.preprocess <repo_id>` finds it offline.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ki_data.console import library_output_to, log_file
from ki_data.lerobot_source import lerobot_home
from ki_sim.experts import EXPERTS
from ki_sim.pusht import DEFAULT_REPO_ID, STARTS, read_recording, recording_reset_seed
from ki_sim.record import DemoConfig, record_demo_dataset


def parse_args(argv: list[str] | None = None) -> tuple[DemoConfig, bool]:
    p = argparse.ArgumentParser(prog="python -m pipelines.make_demo_dataset", description=__doc__.split("\n\n")[0])
    p.add_argument("--repo-id", default=DEFAULT_REPO_ID, help="dataset id (default: %(default)s)")
    p.add_argument("--root", default=None, help="dataset directory (default: $HF_LEROBOT_HOME/<repo-id>)")
    p.add_argument("--episodes", type=int, default=20, help="number of episodes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial states and policy noise")
    p.add_argument("--max-steps", type=int, default=150, help="episode length cap at 10 fps (default: %(default)s)")
    p.add_argument("--image-storage", choices=("video", "image"), default="video",
                   help="cameras as mp4 video (default, like lerobot/pusht) or PNG frames")
    p.add_argument("--image-size", type=int, default=96, help="rendered image side (default: %(default)s)")
    p.add_argument("--expert", choices=sorted(EXPERTS), default="line",
                   help="line: push the block's center straight to the goal's, circling the block counter-clockwise "
                        "(a function of the observation; the demo's); planner: the greedy contact planner with "
                        "random push lengths (the harder configuration) (default: %(default)s)")
    p.add_argument("--start", choices=STARTS, default="random",
                   help="initial states: random (gym-pusht's: agent and block anywhere) or behind (the same block, the "
                        "agent behind it on the line from the goal through its center, where the line expert pushes "
                        "from: every episode is pushing) (default: %(default)s)")
    p.add_argument("--perturb", type=float, default=0.0, metavar="PX",
                   help="Gaussian noise (px) added to each action the simulator executes but not to the recorded one, "
                        "so the recording shows the expert recovering from states off its own path (default: 0)")
    p.add_argument("--after-done", type=int, default=None, metavar="N",
                   help="end each episode N steps after the expert is done (the block at the goal) instead of at "
                        "--max-steps (default: at --max-steps)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at the destination")
    p.add_argument("--skip-existing", action="store_true",
                   help="do nothing when the dataset already exists (a demo recording with other options is recorded "
                        "again)")
    a = p.parse_args(argv)
    if a.episodes < 1 or a.max_steps < 1:
        p.error("--episodes and --max-steps must be positive")
    if a.overwrite and a.skip_existing:
        p.error("--overwrite and --skip-existing exclude each other")
    cfg = DemoConfig(repo_id=a.repo_id, root=a.root, episodes=a.episodes, seed=a.seed, max_steps=a.max_steps,
                     image_storage=a.image_storage, image_size=a.image_size, expert=a.expert,
                     perturb=a.perturb, after_done=a.after_done, start=a.start, overwrite=a.overwrite)
    try:  # the seed range, --perturb and --after-done: DemoConfig's own checks
        cfg.validate()
    except ValueError as e:
        p.error(str(e))
    return cfg, a.skip_existing


def same_recording(root: Path, cfg: DemoConfig) -> bool | None:
    """Whether the recording at `root` is the one `cfg` asks for (episodes, seed, episode limit, image size, expert,
    perturbation, steps after done, initial states); None when it has no recording sidecar (recorded before it existed,
    or not by this command)."""
    rec = read_recording(root)
    if rec is None:
        return None
    wanted = [recording_reset_seed(cfg.seed, e) for e in range(cfg.episodes)]
    got = (rec.get("reset_seeds"), rec.get("max_steps"), rec.get("image_size"), rec["expert"], rec["perturb"],
           rec["after_done"], rec["start"])
    return got == (wanted, cfg.max_steps, cfg.image_size, cfg.expert, cfg.perturb, cfg.after_done, cfg.start)


def main(argv: list[str] | None = None) -> int:
    cfg, skip_existing = parse_args(argv)
    root = Path(cfg.root) if cfg.root else lerobot_home() / cfg.repo_id
    if skip_existing and (root / "meta" / "info.json").is_file():
        same = same_recording(root, cfg)
        if same is None or same:
            print(f"demo dataset {cfg.repo_id} already at {root}; skipping (--overwrite records it again)")
            return 0
        print(f"demo dataset {cfg.repo_id} at {root} was recorded with other options; recording it again")
        cfg = dataclasses.replace(cfg, overwrite=True)
    log = log_file("make_demo_dataset", root)
    try:
        with library_output_to(log):  # lerobot's video encoder (ffmpeg) logs a line per episode
            summary = record_demo_dataset(cfg)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.text())
    print(f"  library logs: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
