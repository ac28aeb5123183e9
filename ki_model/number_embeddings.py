"""A from-scratch prior for the state tokens: embeddings of number tokens that start from a code of their value.

π0.5 writes the state into the prompt as 256 bins ("State: 217 124;"). A pretrained backbone (PaliGemma) already
embeds numbers so that close values look alike. A backbone trained from scratch starts every bin as an unrelated
random vector: our offline tokenizer gives each bin its own piece ("▁217"; "▁124;" where a ";" follows). With
knowledge insulation only the FAST loss trains the backbone, and it learns to decode the bins where it predicts the
FAST tokens (the postfix), which the action expert never reads: the prefix keeps the unrelated per-bin vectors and the
expert, reading the prefix through stop_gradient, cannot tell where the robot is (learn log, issue 13).

`apply_number_embeddings` (train `--number-embeddings`) sets each number token's row to a sinusoidal code of its value
spread over all columns by a fixed random projection, plus a direction all number tokens share, so the bin is
linearly readable in the prefix from the first layer on, neighbouring bins start alike, and a head can find the
state's k-th number by its position. Nothing changes for a backbone loaded from PaliGemma (refused with --init).
"""

from __future__ import annotations

import re

import numpy as np
from jaxtyping import Float

from ki_data import TextTokenizer
from ki_data.prompt import STATE_BINS

# A piece that spells a whole state bin: the word-start marker, the digits, optional punctuation after it. Pieces
# without the marker ("8;" after "▁12" when the tokenizer splits "▁128;") are a number's tail, not a number.
_NUMBER_PIECE = re.compile(r"^▁(\d{1,3})[;,.:]?$")
CODE_FREQUENCIES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # cycles over the bin range


def number_tokens(text: TextTokenizer) -> dict[int, int]:
    """Text-token id -> the bin value its piece spells (pieces with a leading zero, e.g. "07", are not bins)."""
    out = {}
    for i in range(text.vocab_size):
        m = _NUMBER_PIECE.match(text.id_to_piece(i))
        if m and (len(m.group(1)) == 1 or not m.group(1).startswith("0")) and int(m.group(1)) < STATE_BINS:
            out[i] = int(m.group(1))
    return out


def number_code(values: np.ndarray, width: int) -> Float[np.ndarray, "n c"]:
    """[cos, sin](π f u) for u = value / (bins - 1) and the CODE_FREQUENCIES that fit in half the width."""
    u = np.asarray(values, np.float64)[:, None] / (STATE_BINS - 1)
    freqs = np.asarray(CODE_FREQUENCIES[: max(1, width // 4)])
    angle = np.pi * freqs[None, :] * u
    return np.concatenate([np.cos(angle), np.sin(angle)], axis=1)


def number_rows(values: np.ndarray, width: int, seed: int = 0, shared: bool = True) -> Float[np.ndarray, "n w"]:
    """Embedding rows for bins `values`: the value code spread over all columns by a fixed random projection, plus
    (shared=True) a direction all of them share at the same RMS. Unit RMS per entry."""
    code = number_code(values, width)
    code = code - code.mean(axis=0)  # what sets the numbers apart ...
    rng = np.random.default_rng(seed)
    rows = code @ rng.standard_normal((code.shape[1], width))
    # ... plus a part they share: keys of number tokens then have a part that does not depend on the value, which
    # RoPE turns into "the 3rd number of the state" for a head to select whatever the value. Measured
    # (scripts/flow_vs_regression.py --objective regression, 1000 steps): 0.32 x hold still with it, 0.47 without.
    common = rng.standard_normal(width)
    if shared:
        rows = rows + common * np.sqrt(np.mean(np.square(rows)) / np.mean(np.square(common)))
    return rows / np.sqrt(np.mean(np.square(rows)))


def apply_number_embeddings(
    embedding: Float[np.ndarray, "vocab width"], text: TextTokenizer, seed: int = 0
) -> tuple[Float[np.ndarray, "vocab width"], int]:
    """The embedding table with every number token's row replaced by `number_rows` of its value, at the RMS of the
    table's entries; "▁12" and "▁12;" get the same row. Returns (table, number
    of tokens changed)."""
    table = np.array(embedding, dtype=np.float32, copy=True)
    ids = number_tokens(text)
    if not ids:
        return table, 0
    rows = np.fromiter(ids.keys(), int)
    # Same RMS per entry as the random initialisation (normal, std width**-0.5): the code neither drowns nor vanishes.
    scale = float(np.sqrt(np.mean(np.square(table))))
    table[rows] = number_rows(np.fromiter(ids.values(), int), table.shape[1], seed) * scale
    return table, len(rows)
