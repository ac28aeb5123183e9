"""Check a Hugging Face PaliGemma checkpoint against a model preset before training with `--init paligemma:PATH`.

    python -m pipelines.convert_report PATH [--config pi05] [--vocab-size 257152] [--image-size 224]
                                       [--expert-init fresh|backbone] [--read-all]

Checks config.json, every tensor name and shape and the vocabulary (no weight is read), prints what would be loaded;
`--read-all` also reads and converts every tensor (one at a time) to prove the files are readable end to end.
Exit status 2 with the error on a checkpoint that cannot be loaded.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from ki_model.config import PRESETS, Pi05KIConfig
from ki_model.weights import EXPERT_INITS, PALIGEMMA_VOCAB_SIZE, CheckpointError, load_paligemma


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.convert_report", description=__doc__)
    p.add_argument("path", help="Hugging Face PaliGemma directory (config.json + safetensors)")
    p.add_argument("--config", default="pi05", choices=sorted(PRESETS), help="architecture preset")
    p.add_argument("--vocab-size", type=int, default=PALIGEMMA_VOCAB_SIZE, help="the model's vocabulary")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--expert-init", default="fresh", choices=EXPERT_INITS)
    p.add_argument("--read-all", action="store_true", help="also read and convert every tensor")
    a = p.parse_args(argv)

    # Horizon and action dim do not touch the loaded weights; any value does.
    config = Pi05KIConfig.preset(a.config, action_horizon=1, action_dim=1, vocab_size=a.vocab_size, image_size=a.image_size)
    try:
        ckpt = load_paligemma(a.path, config, expert_init=a.expert_init)
        print(ckpt.report.summary())
        if ckpt.report.ignored:
            print(f"skipped non-learned buffers: {', '.join(ckpt.report.ignored)}")
        if a.read_all:
            counts: dict[str, int] = {}
            for path, value in ckpt.tensors(progress=True):
                if not np.isfinite(np.asarray(value)).all():
                    raise CheckpointError(f"parameter {path} has non-finite values")
                counts[str(path[0])] = counts.get(str(path[0]), 0) + int(value.size)
            print("read and converted: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in sorted(counts.items())))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
