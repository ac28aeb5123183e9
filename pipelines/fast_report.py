"""FAST vs per-step binning on synthetic chunk families: tokens per chunk and round-trip RMS error.

    python -m pipelines.fast_report [--seed 0] [--train 2000] [--held-out 500]

Deterministic for a given seed. Chunks are normalized actions in [-1, 1]: "smooth" is a sum of three random
low-frequency sinusoids plus 0.01 sensor noise, "noisy" adds 0.2 noise. The FAST tokenizer (vocab 1024, scale 10)
is fit on the training chunks and measured on held-out ones; binning spends one token per step and dimension.
"""

from __future__ import annotations

import argparse

import numpy as np

from ki_data.fast_tokenizer import FastDecodeError, FastTokenizer

FAMILIES = [(50, 2), (10, 7)]
BINS = 256


def make_chunks(rng: np.random.Generator, n: int, horizon: int, dim: int, noise: float) -> np.ndarray:
    t = np.linspace(0.0, 1.0, horizon)[None, :, None]
    out = np.zeros((n, horizon, dim))
    for _ in range(3):
        freq = rng.uniform(0.1, 2.0, (n, 1, dim))
        phase = rng.uniform(0.0, 2 * np.pi, (n, 1, dim))
        out += rng.uniform(0.0, 0.33, (n, 1, dim)) * np.sin(2 * np.pi * freq * t + phase)
    return np.clip(out + rng.normal(0.0, noise, out.shape), -1.0, 1.0)


def binning_rms(chunks: np.ndarray) -> float:
    """RMS error of 256 uniform bins over [-1, 1], decoded to bin centres."""
    idx = np.clip(np.floor((chunks + 1.0) * BINS / 2.0), 0, BINS - 1)
    return float(np.sqrt(np.mean((-1.0 + (idx + 0.5) * 2.0 / BINS - chunks) ** 2)))


def measure(fast: FastTokenizer, chunks: np.ndarray) -> dict:
    lengths, errors, failures = [], [], 0
    for chunk in chunks:
        ids = fast.encode(chunk)
        try:
            back = fast.decode(ids, *chunk.shape)
        except FastDecodeError:
            failures += 1
            continue
        lengths.append(len(ids))
        errors.append(np.sqrt(np.mean((back - chunk) ** 2)))
    return {
        "tokens_mean": float(np.mean(lengths)),
        "tokens_min": int(np.min(lengths)),
        "tokens_max": int(np.max(lengths)),
        "rms_mean": float(np.mean(errors)),
        "rms_max": float(np.max(errors)),
        "failures": failures,
    }


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
        for kind, noise in (("smooth", 0.01), ("noisy", 0.2)):
            rng = np.random.default_rng([args.seed, horizon, dim, int(noise * 100)])
            train = make_chunks(rng, args.train, horizon, dim, noise)
            held = make_chunks(rng, args.held_out, horizon, dim, noise)
            fast = FastTokenizer.fit(train, vocab_size=args.vocab_size, scale=args.scale)
            m = measure(fast, held)
            bin_tokens = horizon * dim
            span = f"{m['tokens_min']}-{m['tokens_max']}"
            print(
                f"{f'{horizon} x {dim}':<14}{kind:<8}{fast.vocab_size:>6}{m['tokens_mean']:>16.1f}"
                f"{span:>11}{m['rms_mean']:>10.4f}{m['rms_max']:>9.4f}"
                f"{fast.out_of_range_count:>8}{m['failures']:>5}{bin_tokens:>8}{binning_rms(held):>9.4f}"
                f"{bin_tokens / m['tokens_mean']:>7.1f}"
            )
    print("ratio = binning tokens / mean FAST tokens; clipped = coefficients clipped into the fitted range;")
    print("fail = held-out chunks that did not decode to horizon x dim coefficients.")


if __name__ == "__main__":
    main()
