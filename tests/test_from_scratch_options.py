"""Options for a backbone trained from scratch: number-token embeddings (README: training from scratch)."""

from __future__ import annotations

import numpy as np
import pytest

from ki_data import TextTokenizer
from ki_data.prompt import prefix_text
from ki_model.number_embeddings import apply_number_embeddings, number_code, number_tokens


@pytest.fixture(scope="module")
def text() -> TextTokenizer:
    prompts = [prefix_text("push the block", s, "pi05") for s in np.random.default_rng(0).uniform(-1, 1, (300, 2))]
    return TextTokenizer.train(prompts, vocab_size=1024)


def test_every_state_bin_token_is_found_with_its_value(text):
    numbers = number_tokens(text)
    for b in (0, 7, 99, 128, 255):
        for piece_text in (f" {b}", f" {b};"):  # a bin, and a bin before the prompt's ";"
            ids = text.encode(piece_text)
            if len(ids) == 1:
                assert numbers[ids[0]] == b
            else:  # split ("▁12", "8;"): the tail is not taken for a number
                assert ids[-1] not in numbers, [text.id_to_piece(i) for i in ids]
    assert all(text.id_to_piece(i).startswith("▁") for i in numbers)
    assert len(numbers) > 300  # nearly every bin, in both forms


def test_number_embeddings_code_the_value_and_keep_the_rest(text):
    rng = np.random.default_rng(1)
    table = (rng.standard_normal((text.vocab_size + 50, 64)) * 64**-0.5).astype(np.float32)
    new, changed = apply_number_embeddings(table, text)
    numbers = number_tokens(text)
    assert changed == len(numbers) > 256
    others = np.array([i for i in range(len(table)) if i not in numbers])
    np.testing.assert_array_equal(new[others], table[others])
    ids, values = np.fromiter(numbers, int), np.fromiter(numbers.values(), int)
    # Linearly readable: least squares from the rows recovers the value almost exactly...
    design = np.concatenate([new[ids], np.ones((len(ids), 1))], axis=1)
    fit = design @ np.linalg.lstsq(design, values, rcond=None)[0]
    assert np.sqrt(np.mean((fit - values) ** 2)) < 5.0  # bins, out of 256
    # ...neighbours start alike, far bins apart; equal values share the row ("▁12" and "▁12;").
    row = {v: new[i] for i, v in numbers.items()}
    assert np.linalg.norm(row[100] - row[101]) < 0.3 * np.linalg.norm(row[100] - row[200])
    a, b = text.encode(" 12")[0], text.encode(" 12;")[0]
    np.testing.assert_array_equal(new[a], new[b])
    assert np.sqrt(np.mean(new[ids] ** 2)) == pytest.approx(np.sqrt(np.mean(table**2)), rel=1e-3)
    assert number_code(values[:3], 64).shape == (3, 14)
    # Every number row shares one direction (a value-independent part of its attention key), as strong as the code.
    rows = new[ids]
    common = rows.mean(axis=0)
    assert np.linalg.norm(common) ** 2 == pytest.approx(np.mean(np.sum((rows - common) ** 2, axis=1)), rel=0.3)
    assert np.min(rows @ common) > 0
