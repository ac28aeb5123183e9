"""FAST vs per-step binning on synthetic chunk families: tokens per chunk and round-trip RMS error.

    python -m pipelines.fast_report [--seed 0] [--train 2000] [--held-out 500]

Deterministic for a given seed. Chunks are normalized actions in [-1, 1]: "smooth" is a sum of three random
low-frequency sinusoids plus 0.01 sensor noise, "noisy" adds 0.2 noise. The FAST tokenizer (vocab 1024, scale 10)
is fit on the training chunks and measured on held-out ones; binning spends one token per step and dimension.
"""

from __future__ import annotations

import argparse

import numpy as np

from ki_bench.fast_tokens import FAMILIES, KINDS, binning_rms, measure
from ki_bench.synthetic import sinusoid_mix_chunks
from ki_data.fast_tokenizer import FastTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--held-out", type=int, default=500)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--scale", type=float, default=10.0)
    args = parser.parse_args()

    header = (
        f"{'family':<14}{'kind':<8}{'vocab':>6}{'FAST tok/chunk':>16}{'(min-max)':>11}{'FAST RMS':>10}"
        f"{'max RMS':>9}{'clipped':>8}{'fail':>5}{'bin tok':>8}{'bin RMS':>9}{'ratio':>7}"
    )
    print(f"FAST vocab_size={args.vocab_size} scale={args.scale} (RMS bound 0.5/scale={0.5 / args.scale:.3f}); "
          f"{args.train} training / {args.held_out} held-out chunks per row, seed {args.seed}")
    print(header)
    print("-" * len(header))
    for horizon, dim in FAMILIES:
        for kind, noise in KINDS:
            rng = np.random.default_rng([args.seed, horizon, dim, int(noise * 100)])
            train = sinusoid_mix_chunks(rng, args.train, horizon, dim, noise)
            held = sinusoid_mix_chunks(rng, args.held_out, horizon, dim, noise)
            fast = FastTokenizer.fit(train, vocab_size=args.vocab_size, scale=args.scale)
            m = measure(fast, held)
            bin_tokens = horizon * dim
            span = f"{m['tokens_min']}-{m['tokens_max']}"
            print(
                f"{f'{horizon} x {dim}':<14}{kind:<8}{fast.vocab_size:>6}{m['tokens_mean']:>16.1f}"
                f"{span:>11}{m['rms_mean']:>10.4f}{m['rms_max']:>9.4f}"
                f"{m['clipped']:>8}{m['failures']:>5}{bin_tokens:>8}{binning_rms(held):>9.4f}"
                f"{bin_tokens / m['tokens_mean']:>7.1f}"
            )
    print("ratio = binning tokens / mean FAST tokens; clipped = coefficients clipped into the fitted range;")
    print("fail = held-out chunks that did not decode to horizon x dim coefficients.")


if __name__ == "__main__":
    main()
