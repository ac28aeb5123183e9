"""FAST vs per-step binning on synthetic chunk families: tokens per chunk and round-trip RMS error
(`python -m pipelines.fast_report`)."""

from __future__ import annotations

import numpy as np

from ki_data.fast_tokenizer import FastDecodeError, FastTokenizer

FAMILIES = [(50, 2), (10, 7)]  # (horizon, dim)
KINDS = (("smooth", 0.01), ("noisy", 0.2))  # (name, sensor noise)
BINS = 256


def binning_rms(chunks: np.ndarray) -> float:
    """RMS error of 256 uniform bins over [-1, 1], decoded to bin centres."""
    idx = np.clip(np.floor((chunks + 1.0) * BINS / 2.0), 0, BINS - 1)
    return float(np.sqrt(np.mean((-1.0 + (idx + 0.5) * 2.0 / BINS - chunks) ** 2)))


def measure(fast: FastTokenizer, chunks: np.ndarray) -> dict:
    """Tokens per chunk and round-trip RMS of `fast` on held-out chunks; clipped coefficients and chunks that do not
    decode are counted."""
    lengths, errors, failures, clipped = [], [], 0, 0
    for chunk in chunks:
        ids, n_clipped = fast.encode_counted(chunk)
        clipped += n_clipped
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
        "clipped": clipped,  # coefficients clipped into the fitted range
    }
