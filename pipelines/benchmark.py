"""Speed and memory ratios of the pipeline, each of two things measured in the same run.

    python -m pipelines.benchmark [--quick] [--gpu] [--json PATH] [--cache-dir DIR] [--loader-workers N]

Records two datasets into --cache-dir when absent, with lerobot's writer (smaller with --quick): an ALOHA-like one (3
video cameras at 480x640, 14 dims, 50 fps, moving content) and the gym-pusht demo. Then measures in one process per
phase: on the ALOHA-like data, preprocess vs a LeRobotDataset[i] loop vs decoding alone (one core each), shard bytes,
our loader vs LeRobotDataset + DataLoader with the same augmentation (one core each), 1 vs 2 workers and parallel
camera decoding, the image steps (OpenCV vs PIL resize, JPEG vs PNG); XLA memory at π0.5 size; on pusht, the same
preprocessing figures, the loader vs the train step (tiny and mid configs), the single-pass vs the two-pass train
step, sample_actions vs sample_fast_tokens, RTC-guided vs plain sample_actions, cached vs uncached sampling, and peak
host memory. `--gpu` measures the
π0.5-size figures on an accelerator instead. Prints a table (figure, the two measurements, ratio, target, met) and writes JSON.
The measuring code is the ki_bench package; its figure records (ki_bench.figures) make the JSON and the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ki_bench.report import notes, table
from ki_bench.run import BenchOptions, figures, run_benchmark
from ki_bench.settings import SETTINGS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few minutes on 2 cores: 4 episodes, mid config only for "
                   "the model comparisons, fewer repeats")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: everything shrunk
    p.add_argument("--gpu", action="store_true", help="the GPU mode: π0.5-size inference latency (3 cameras), KI "
                   "training samples/s per device, FAST-decode / flow-sampling latency; nothing else")
    p.add_argument("--json", help="write the figures, targets, raw measurements and machine to this file")
    p.add_argument("--cache-dir", default="runs/benchmark_cache",
                   help="demo dataset, shards and compiled programs are kept here (default: %(default)s)")
    p.add_argument("--repo-id", help="benchmark this LeRobot dataset instead of recording the demo one")
    p.add_argument("--root", help="its directory (default: $HF_LEROBOT_HOME/<repo-id>)")
    p.add_argument("--loader-workers", type=int, default=0, help="grain worker processes of the loader (default: 0)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not keep compiled XLA programs in --cache-dir (compilation is never timed either way)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.root and not a.repo_id:
        p.error("--root needs --repo-id")
    if a.loader_workers < 0:
        p.error("--loader-workers must be >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    mode = "smoke" if a.smoke else "quick" if a.quick else "full"
    opts = BenchOptions(
        settings=SETTINGS[mode],
        cache_dir=Path(a.cache_dir),
        repo_id=a.repo_id,
        root=a.root,
        loader_workers=a.loader_workers,
        compile_cache=not a.no_compile_cache,
        progress=not a.no_progress,
        gpu=a.gpu,
        partial_json=Path(a.json + ".partial") if a.json else None,
    )
    doc = run_benchmark(opts)
    if a.json:  # first: the measurements are kept whatever happens to the printing
        path = Path(a.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2))
    print(table(doc, figures(opts)))
    print()
    print(notes(doc))
    if a.json:
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
