"""Token shard layout (docs/DESIGN.md §4): file names, column names, the Arrow schema and the one parquet -> numpy
decoder of shard rows (the manifest: manifest.py).

One row per frame. Vector columns are Arrow fixed-size lists; `actions` is the [horizon, action_dim] chunk
flattened row-major, and the decoder (`decode_table`, `read_rows`) gives it back as [n, horizon, action_dim].
Every reader of shards (the loader, inspection, verification, the tests) decodes through `decode_column` /
`decode_table`, and names camera columns through `image_column` / `camera_of`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ki_data.manifest import SCHEMA_VERSION
from ki_data.shard_writer import READ_OPTIONS

NORM_STATS_FILE = "norm_stats.json"
FAST_TOKENIZER_DIR = "tokenizer/fast"
TEXT_TOKENIZER_FILE = "tokenizer/text.model"
SHARDS_DIR = "shards"

EPISODE_INDEX = "episode_index"
FRAME_INDEX = "frame_index"
INDEX = "index"
TASK = "task"
STATE = "state"
ACTIONS = "actions"
ACTION_IS_PAD = "action_is_pad"
TOKENIZED_PROMPT = "tokenized_prompt"
TOKENIZED_PROMPT_MASK = "tokenized_prompt_mask"
TOKEN_AR_MASK = "token_ar_mask"
TOKEN_LOSS_MASK = "token_loss_mask"
TEXT_PROMPT = "text_prompt"
TEXT_PROMPT_MASK = "text_prompt_mask"

# The six prompt columns, as `ki_data.prompt.PromptTokens` builds them and `ki_model.Observation` reads them: the
# four over max_token_len (prefix + postfix), then the two over max_text_len (the text prefix alone).
TOKEN_COLUMNS = (TOKENIZED_PROMPT, TOKENIZED_PROMPT_MASK, TOKEN_AR_MASK, TOKEN_LOSS_MASK)
TEXT_COLUMNS = (TEXT_PROMPT, TEXT_PROMPT_MASK)
PROMPT_COLUMNS = TOKEN_COLUMNS + TEXT_COLUMNS
KEY_COLUMNS = (EPISODE_INDEX, FRAME_INDEX, INDEX)  # where a row comes from

IMAGE_PREFIX = "image."
IMAGE_MASK_PREFIX = "image_mask."

# Arrow schema metadata keys: let `read_rows` reshape `actions` without the manifest.
_META_VERSION = b"ki.schema_version"
_META_HORIZON = b"ki.action_horizon"
_META_ACTION_DIM = b"ki.action_dim"


def image_column(camera: str) -> str:
    return IMAGE_PREFIX + camera


def image_mask_column(camera: str) -> str:
    return IMAGE_MASK_PREFIX + camera


def camera_of(column: str) -> str | None:
    """`image.top` -> `top`; None for any other column (`image_mask.top` included)."""
    return column[len(IMAGE_PREFIX) :] if column.startswith(IMAGE_PREFIX) else None


def cameras_in(columns) -> list[str]:
    """The cameras of the `image.<camera>` columns among `columns` (any iterable of names), sorted."""
    return sorted(c for c in map(camera_of, columns) if c is not None)


def camera_name(feature_key: str) -> str:
    """`observation.images.top_cam` -> `top_cam`, `observation.image` -> `image`."""
    for prefix in ("observation.images.", "observation."):
        if feature_key.startswith(prefix):
            return feature_key[len(prefix) :]
    return feature_key


def shard_file(split: str, number: int) -> str:
    """Path of a shard relative to the output directory."""
    return f"{SHARDS_DIR}/{split}-{number:05d}.parquet"


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """Everything the Arrow schema depends on."""

    cameras: tuple[str, ...]
    state_dim: int
    action_dim: int
    action_horizon: int
    max_token_len: int
    max_text_len: int

    def column_names(self) -> list[str]:
        return [f.name for f in self.arrow_schema()]

    def arrow_schema(self) -> pa.Schema:
        def fixed(t: pa.DataType, n: int) -> pa.DataType:
            return pa.list_(pa.field("element", t, nullable=False), n)

        fields = [
            pa.field(EPISODE_INDEX, pa.int64(), nullable=False),
            pa.field(FRAME_INDEX, pa.int64(), nullable=False),
            pa.field(INDEX, pa.int64(), nullable=False),
            pa.field(TASK, pa.string(), nullable=False),
        ]
        for cam in self.cameras:
            fields.append(pa.field(image_column(cam), pa.binary(), nullable=False))
            fields.append(pa.field(image_mask_column(cam), pa.bool_(), nullable=False))
        L, T = self.max_token_len, self.max_text_len
        fields += [
            pa.field(STATE, fixed(pa.float32(), self.state_dim), nullable=False),
            pa.field(ACTIONS, fixed(pa.float32(), self.action_horizon * self.action_dim), nullable=False),
            pa.field(ACTION_IS_PAD, fixed(pa.bool_(), self.action_horizon), nullable=False),
            pa.field(TOKENIZED_PROMPT, fixed(pa.int32(), L), nullable=False),
            pa.field(TOKENIZED_PROMPT_MASK, fixed(pa.bool_(), L), nullable=False),
            pa.field(TOKEN_AR_MASK, fixed(pa.bool_(), L), nullable=False),
            pa.field(TOKEN_LOSS_MASK, fixed(pa.bool_(), L), nullable=False),
            pa.field(TEXT_PROMPT, fixed(pa.int32(), T), nullable=False),
            pa.field(TEXT_PROMPT_MASK, fixed(pa.bool_(), T), nullable=False),
        ]
        metadata = {
            _META_VERSION: str(SCHEMA_VERSION).encode(),
            _META_HORIZON: str(self.action_horizon).encode(),
            _META_ACTION_DIM: str(self.action_dim).encode(),
        }
        return pa.schema(fields, metadata=metadata)

    def table(self, columns: dict[str, Any]) -> pa.Table:
        """Arrow table from numpy columns (vectors as [n, k] arrays, `actions` as [n, h, d], images as bytes)."""
        schema = self.arrow_schema()
        arrays = []
        for field in schema:
            value = columns[field.name]
            if pa.types.is_fixed_size_list(field.type):
                size = field.type.list_size
                flat = np.asarray(value, dtype=field.type.value_type.to_pandas_dtype()).reshape(-1)
                if flat.size != size * len(value):
                    raise ValueError(f"column {field.name}: expected {size} values per row, got {np.shape(value)}")
                values = pa.array(flat, type=field.type.value_type)
                arrays.append(pa.FixedSizeListArray.from_arrays(values, type=field.type))
            else:
                arrays.append(pa.array(value, type=field.type))
        return pa.Table.from_arrays(arrays, schema=schema)


def decode_column(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """One Arrow column of n rows as numpy: a fixed-size list of k as [n, k] (int64 / bool / float32 / int32 as
    stored), bytes and strings as an object array of python bytes / str, scalars as [n]."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    typ = arr.type
    if pa.types.is_fixed_size_list(typ):
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), typ.list_size)
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_string(typ):
        out = np.empty(len(arr), dtype=object)  # filled, not np.array(list): equal-length bytes stay scalars
        out[:] = arr.to_pylist()
        return out
    return arr.to_numpy(zero_copy_only=False)


def decode_table(table: pa.Table) -> dict[str, np.ndarray]:
    """Every column of a shard table (or of some of its rows/columns) through `decode_column`; `actions` reshaped to
    [n, horizon, action_dim] from the schema's metadata."""
    out = {name: decode_column(table.column(name)) for name in table.column_names}
    meta = table.schema.metadata or {}
    if ACTIONS in out and _META_HORIZON in meta:
        out[ACTIONS] = out[ACTIONS].reshape(-1, int(meta[_META_HORIZON]), int(meta[_META_ACTION_DIM]))
    return out


def read_rows(path: Path | str, columns: list[str] | None = None, filters: list | None = None) -> dict[str, np.ndarray]:
    """Decoded columns of one shard (`decode_table`); images still encoded. `filters` (pyarrow's) let parquet skip
    row groups, so one row does not cost a whole shard of images. Page checksums are verified."""
    try:
        table = pq.read_table(path, columns=columns, filters=filters, **READ_OPTIONS)
    except (OSError, pa.ArrowException) as e:  # pyarrow's message does not name the file
        cause = " ".join(str(e).split())
        raise OSError(f"{path}: cannot read the shard ({type(e).__name__}: {cause})") from e
    return decode_table(table)
