"""The benchmark's datasets, recorded once with lerobot's writing API and cached (a marker file says complete)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

PUSHT_REPO_ID = "ki/pusht_bench"
COMPLETE = ".ki_bench_complete"


def pusht_root(cache_dir: Path, episodes: int, max_steps: int) -> Path:
    return cache_dir / "lerobot" / f"{PUSHT_REPO_ID}_e{episodes}_s{max_steps}"


def record_pusht_phase(repo_id: str, root: str, episodes: int, max_steps: int) -> dict:
    """Record the demo dataset (gym-pusht, lerobot v3 video) unless a complete one is there."""
    from ki_data.demo_pusht import DemoConfig, record_demo_dataset

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
