"""Evaluate a checkpoint on the validation episodes: `python -m pipelines.evaluate --checkpoint DIR --shards DIR`."""

from __future__ import annotations

import argparse
import sys

from ki_data.loader import LoaderError
from ki_data.manifest import ManifestError
from ki_model.checkpoint import CheckpointError
from ki_model.evaluate import evaluate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="training checkpoint directory (pipelines.train --checkpoint-dir)")
    p.add_argument("--shards", required=True, help="pipelines.preprocess output directory")
    p.add_argument("--batches", type=int, default=None, help="evaluate at most this many batches (default: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output", default=None, help="report directory (default: <checkpoint>/eval)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast-compile", action="store_true",
                   help="CPU: compile without XLA backend optimisation (quicker start, slower batches)")
    a = p.parse_args(argv)
    try:
        r = evaluate(a.checkpoint, a.shards, output_dir=a.output, batches=a.batches, batch_size=a.batch_size, seed=a.seed,
                     fast_compile=a.fast_compile)
    except (LoaderError, CheckpointError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{r['frames']} validation frames, errors in the dataset's units")
    for name, label in (("flow", "flow head"), ("fast_constrained", "FAST constrained"),
                        ("fast_unconstrained", "FAST unconstrained"), ("mean_action_baseline", "mean-action baseline")):
        e = r[name]
        errs = "no valid row" if e["mse"] is None else f"MSE {e['mse']:.4g}  MAE {e['mae']:.4g}"
        valid = f"  valid {e['validity_rate']:.1%}" if "validity_rate" in e else ""
        print(f"  {label:<22}{errs}{valid}")
    print(f"  FAST token accuracy {r['token_accuracy']:.3f}, flow loss {r['flow_loss']:.4f}, FAST loss {r['fast_loss']:.4f}")
    print(f"report: {r['report_path']}")
    print(f"plot:   {r['plot_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
