"""Evaluate a checkpoint on the validation (or training) episodes:
`python -m pipelines.evaluate --checkpoint DIR --shards DIR [--split train|val] [--flow-samples N]`."""

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
    p.add_argument("--split", choices=("val", "train"), default="val",
                   help="the held-out episodes (default) or the training episodes (memorising vs learning)")
    p.add_argument("--flow-samples", type=int, default=8,
                   help="flow samples averaged per frame for the sample-mean error (default: %(default)s; 1: off)")
    p.add_argument("--shuffle", action="store_true",
                   help="read the split in a fixed shuffled order, so that --batches spans the episodes")
    p.add_argument("--fast-compile", action="store_true",
                   help="CPU: compile without XLA backend optimisation (quicker start, slower batches)")
    a = p.parse_args(argv)
    try:
        r = evaluate(a.checkpoint, a.shards, output_dir=a.output, batches=a.batches, batch_size=a.batch_size, seed=a.seed,
                     fast_compile=a.fast_compile, split=a.split, flow_samples=a.flow_samples, shuffle=a.shuffle)
    except (LoaderError, CheckpointError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{r['frames']} {'validation' if a.split == 'val' else 'training'} frames, errors in the dataset's units")
    rows = [("flow", "flow head (1 sample)"), ("flow_sample_mean", f"flow head (mean of {a.flow_samples})"),
            ("fast_constrained", "FAST constrained"), ("fast_unconstrained", "FAST unconstrained"),
            ("mean_action_baseline", "mean-action baseline"), ("hold_still_baseline", "hold-still baseline")]
    for name, label in rows:
        e = r.get(name)
        if e is None:
            continue
        errs = "no valid row" if e["mse"] is None else f"MSE {e['mse']:.4g}  MAE {e['mae']:.4g}"
        valid = f"  valid {e['validity_rate']:.1%}" if "validity_rate" in e else ""
        print(f"  {label:<26}{errs}{valid}")
    if not r["hold_still_applies"]:
        print(f"  hold-still baseline: not applicable ({r['hold_still_note']})")
    print(f"  FAST token accuracy {r['fast_accuracy']:.3f}, flow loss {r['flow_loss']:.4f} (another row's observation: "
          f"{r['flow_loss_shuffled_observation']:.4f}), FAST loss {r['fast_loss']:.4f}")
    print(f"report: {r['report_path']}")
    print(f"plot:   {r['plot_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
