"""Learning curves of several training runs side by side:
`python -m pipelines.compare_runs RUN_DIR... [--labels A,B,...] [--output plot.png]`."""

from __future__ import annotations

import argparse
import sys

from ki_model.learning_curves import RunError, load_run, plot_runs, summary_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.compare_runs", description=__doc__.split(":")[0])
    p.add_argument("runs", nargs="+", help="checkpoint directories of pipelines.train (metrics.jsonl inside)")
    p.add_argument("--labels", default=None, help="comma-separated names of the runs (default: directory names)")
    p.add_argument("--output", default="compare_runs.png", help="plot file (default: %(default)s)")
    a = p.parse_args(argv)
    labels = a.labels.split(",") if a.labels else [None] * len(a.runs)
    if len(labels) != len(a.runs):
        p.error(f"--labels names {len(labels)} runs but {len(a.runs)} were given")
    try:
        runs = [load_run(r, label) for r, label in zip(a.runs, labels, strict=True)]
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plot_runs(runs, a.output)
    print(summary_table(runs))
    for run in runs:
        print(f"  {run.label}: {run.describe()}")
    print(f"plot: {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
