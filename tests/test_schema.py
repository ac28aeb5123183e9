"""ki_data.schema: the shard row's column names, the camera column naming, rows stacked for the encoder and batched for
the model, and the one parquet -> numpy decoder."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ki_data import schema
from ki_data.images import encode_image
from ki_data.prompt import PromptTokens

LAYOUT = schema.ShardLayout(cameras=("top", "wrist_left"), state_dim=3, action_dim=2, action_horizon=4,
                            max_token_len=6, max_text_len=5)


def _columns(n: int, rng: np.random.Generator) -> dict[str, object]:
    L, T = LAYOUT.max_token_len, LAYOUT.max_text_len
    cols: dict[str, object] = {
        schema.EPISODE_INDEX: np.arange(n) // 2,
        schema.FRAME_INDEX: np.arange(n) % 2,
        schema.INDEX: np.arange(n) + 100,
        schema.TASK: [f"task {i}" for i in range(n)],
        schema.STATE: rng.normal(size=(n, 3)).astype(np.float32),
        schema.ACTIONS: rng.normal(size=(n, 4, 2)).astype(np.float32),
        schema.ACTION_IS_PAD: rng.random((n, 4)) < 0.3,
        schema.TOKENIZED_PROMPT: rng.integers(0, 1000, (n, L), dtype=np.int32),
        schema.TEXT_PROMPT: rng.integers(0, 1000, (n, T), dtype=np.int32),
    }
    for name in (schema.TOKENIZED_PROMPT_MASK, schema.TOKEN_AR_MASK, schema.TOKEN_LOSS_MASK):
        cols[name] = rng.random((n, L)) < 0.5
    cols[schema.TEXT_PROMPT_MASK] = rng.random((n, T)) < 0.5
    for cam in LAYOUT.cameras:
        cols[schema.image_column(cam)] = [bytes([i, 7, 7]) for i in range(n)]  # equal lengths: must stay bytes
        cols[schema.image_mask_column(cam)] = np.arange(n) % 3 != 0
    return cols


def test_camera_columns_round_trip():
    assert schema.image_column("top") == "image.top" and schema.image_mask_column("top") == "image_mask.top"
    assert schema.camera_of(schema.image_column("wrist_left")) == "wrist_left"
    for other in ("image_mask.top", "state", "images.top", "task"):
        assert schema.camera_of(other) is None
    names = LAYOUT.column_names()
    assert schema.cameras_in(names) == sorted(LAYOUT.cameras)
    assert schema.cameras_in({"image.b": 0, "image.a": 0, "image_mask.c": 0}) == ["a", "b"]


def test_prompt_columns_are_the_prompt_tokens_fields():
    """The six prompt columns named once: PromptTokens builds exactly them, in the shard's column order."""
    fields = [f.name for f in dataclasses.fields(PromptTokens)]
    assert set(schema.PROMPT_COLUMNS) <= set(fields)
    assert schema.PROMPT_COLUMNS == schema.TOKEN_COLUMNS + schema.TEXT_COLUMNS
    names = LAYOUT.column_names()
    assert [n for n in names if n in schema.PROMPT_COLUMNS] == list(schema.PROMPT_COLUMNS)
    assert [n for n in names if n in schema.KEY_COLUMNS] == list(schema.KEY_COLUMNS)


def test_decoder_gives_back_what_was_written(tmp_path):
    rng = np.random.default_rng(0)
    cols = _columns(6, rng)
    path = tmp_path / "s.parquet"
    pq.write_table(LAYOUT.table(cols), path, row_group_size=4)
    rows = schema.read_rows(path)
    assert list(rows) == LAYOUT.column_names()
    for name, value in cols.items():
        got = rows[name]
        if name == schema.TASK or schema.camera_of(name):
            assert got.dtype == object and got.shape == (6,) and list(got) == list(value), name
        else:
            assert got.dtype == np.asarray(value).dtype and got.shape == np.shape(value), name
            np.testing.assert_array_equal(got, value)
    # Only some columns, and one row by filter (what inspection reads).
    some = schema.read_rows(path, [schema.INDEX, schema.ACTIONS], filters=[(schema.INDEX, "=", 104)])
    assert some[schema.INDEX].tolist() == [104] and some[schema.ACTIONS].shape == (1, 4, 2)
    np.testing.assert_array_equal(some[schema.ACTIONS][0], cols[schema.ACTIONS][4])
    # One row group, column by column (what the loader reads): the same arrays.
    group = pq.ParquetFile(path).read_row_group(1)
    np.testing.assert_array_equal(schema.decode_table(group)[schema.ACTIONS], cols[schema.ACTIONS][4:])
    np.testing.assert_array_equal(schema.decode_column(group.column(schema.STATE)), cols[schema.STATE][4:])


def test_decoder_on_an_empty_table_and_an_unreadable_file(tmp_path):
    empty = schema.decode_table(LAYOUT.table(_columns(0, np.random.default_rng(1))))
    assert empty[schema.TOKENIZED_PROMPT].shape == (0, LAYOUT.max_token_len)
    assert empty[schema.ACTIONS].shape == (0, 4, 2) and empty[schema.TASK].shape == (0,)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(OSError, match=f"{bad}: cannot read the shard"):
        schema.read_rows(bad)
    assert schema.decode_column(pa.array([b"ab", b"cd"])).tolist() == [b"ab", b"cd"]


def test_rows_stack_for_the_encoder_and_batch_for_the_model():
    """Rows (what `frame_row` makes) -> the encoder's columns (`stack_rows`) and the model's batch (`model_batch`)."""
    cols = _columns(3, np.random.default_rng(3))
    rows = [{name: values[i] for name, values in cols.items()} for i in range(3)]
    assert LAYOUT.table(schema.stack_rows(rows, LAYOUT.column_names())).equals(LAYOUT.table(cols))
    assert LAYOUT.table(schema.stack_rows([], LAYOUT.column_names())).num_rows == 0
    pixels = np.random.default_rng(4).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    for row, img in zip(rows, pixels):
        for cam in LAYOUT.cameras:
            row[schema.image_column(cam)] = encode_image(img, "png")
    batch = schema.model_batch(rows)
    for cam in LAYOUT.cameras:
        np.testing.assert_array_equal(batch[schema.image_column(cam)], pixels)  # decoded (PNG: exactly)
        np.testing.assert_array_equal(batch[schema.image_mask_column(cam)], cols[schema.image_mask_column(cam)])
    assert batch[schema.TASK].dtype == object and list(batch[schema.TASK]) == cols[schema.TASK]
    np.testing.assert_array_equal(batch[schema.ACTIONS], cols[schema.ACTIONS])
    np.testing.assert_array_equal(batch[schema.TOKENIZED_PROMPT], cols[schema.TOKENIZED_PROMPT])
