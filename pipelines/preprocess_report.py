"""The preprocessing "Report" figure: frames per second of `pipelines.preprocess` on a (video) dataset against a
plain loop over `LeRobotDataset[i]` with `delta_timestamps` for the action chunk (how openpi reads), in one run.

    python -m pipelines.preprocess_report [REPO_ID] [--root DIR] [--workers 1 2] [--action-horizon 50]

The measurements are ki_bench.preprocess's (the benchmark uses the same ones).
"""

from __future__ import annotations

import argparse
import sys

from ki_sim.pusht import DEFAULT_REPO_ID


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.preprocess_report", description=__doc__.split("\n\n")[0])
    p.add_argument("repo_id", nargs="?", default=DEFAULT_REPO_ID, help="dataset (default: %(default)s)")
    p.add_argument("--root", help="dataset directory (default: $HF_LEROBOT_HOME/<repo_id>)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default: 1 2)")
    p.add_argument("--action-horizon", type=int, default=50)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--max-loop-frames", type=int, default=None, help="cap the LeRobotDataset loop (default: all)")
    a = p.parse_args(argv)
    from ki_bench.preprocess import report
    from ki_data.lerobot_source import DatasetNotFoundError

    try:
        print(report(a.repo_id, a.root, a.workers, a.action_horizon, a.image_size, a.max_loop_frames))
    except DatasetNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
