"""The shard row (docs/DESIGN.md §4), defined here only: file names, column names, the one frame -> row function,
the Arrow schema with its encoder, and the one parquet -> numpy decoder (the manifest: manifest.py).

One row per frame, a `Row` (column name -> value). `frame_row` makes it from a frame as the dataset holds it (task,
raw state, camera images, the absolute action chunk when there is one): pass 2 writes its rows, and the Policy feeds
its rows to the model (`model_batch`), so training and inference read the same inputs by construction.
`ShardLayout.table` encodes rows' columns as Arrow (vectors as fixed-size lists; `actions`, [horizon, action_dim],
flattened row-major), and `decode_column` / `decode_table` / `read_rows` give them back (`actions` reshaped): every
reader of shards (the loader, inspection, verification, the tests) decodes through them, and names camera columns
through `image_column` / `camera_of`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from jaxtyping import Bool, Float, UInt8

from ki_data.images import decode_image, shard_image
from ki_data.manifest import SCHEMA_VERSION, Manifest
from ki_data.shard_writer import READ_OPTIONS

if TYPE_CHECKING:  # both import this module
    from ki_data.artifacts import DataArtifacts
    from ki_data.prompt import PromptTokens

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

Row = dict[str, Any]  # one shard row: column name -> value (images encoded, as stored)


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

    @classmethod
    def of(cls, manifest: Manifest) -> ShardLayout:
        return cls(cameras=tuple(manifest.cameras), state_dim=manifest.state_dim, action_dim=manifest.action_dim,
                   action_horizon=manifest.action_horizon, max_token_len=manifest.max_token_len,
                   max_text_len=manifest.max_text_len)

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

    def table(self, columns: Mapping[str, Any]) -> pa.Table:
        """Arrow table from numpy columns (vectors as [n, k] arrays, `actions` as [n, h, d], images as bytes), e.g.
        `stack_rows` of `frame_row`s."""
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


def frame_row(
    data: DataArtifacts,
    *,
    task: str,
    state: Float[np.ndarray, " s"],
    images: Mapping[str, UInt8[np.ndarray, "img_h img_w 3"] | bytes],
    actions: Float[np.ndarray, "h d"] | None = None,
    action_is_pad: Bool[np.ndarray, " h"] | None = None,
    key: tuple[int, int, int] | None = None,
) -> tuple[Row, PromptTokens]:
    """One frame -> its shard row, and the prompt tokens it holds (their counts: FAST tokens, clipped coefficients).

    The frame as the dataset holds it: `state` raw (the manifest's `state_keys` concatenated), `actions` the absolute
    chunk t..t+H-1 in the dataset's units with `action_is_pad` (None at inference: no action columns, the prompt's
    text prefix only), `images` per camera HxWx3 uint8, or bytes already made by `shard_image` with the manifest's
    size and format (pass 2 encodes on its own threads). `key`: (episode_index, frame_index, index), None for a live
    frame. The row holds the normalized state and the stored chunk (relative where `--delta-actions` said,
    normalized), as `data` says. Raises PromptTooLongError (never truncates), ValueError naming a missing camera.
    """
    m = data.manifest
    missing = [c for c in m.cameras if c not in images]
    if missing:
        raise ValueError(f"no image for camera(s) {missing}; the shards hold {list(m.cameras)}")
    state_n = data.normalize_state(state)
    stored = None if actions is None else data.stored_actions(actions, state)
    tokens = data.prompt.build(task, state_n, stored)
    row: Row = {} if key is None else dict(zip(KEY_COLUMNS, key, strict=True))
    row[TASK] = task
    for cam in m.cameras:
        image = images[cam]
        row[image_column(cam)] = image if isinstance(image, bytes) else shard_image(image, m.image_size,
                                                                                     m.image_format)
        row[image_mask_column(cam)] = True
    row[STATE] = state_n
    if stored is not None:
        row[ACTIONS] = stored
        row[ACTION_IS_PAD] = np.zeros(len(stored), bool) if action_is_pad is None else action_is_pad
    row.update(tokens.columns())
    return row, tokens


def stack_rows(rows: Sequence[Row], names: Sequence[str]) -> dict[str, Any]:
    """The `names` columns of `rows` (all rows of one kind): arrays stacked, bytes and strings as lists, what
    `ShardLayout.table` takes; with no rows, empty lists."""
    out: dict[str, Any] = {}
    for name in names:
        values = [r[name] for r in rows]
        out[name] = np.stack(values) if values and isinstance(values[0], np.ndarray) else values
    return out


def model_batch(rows: Sequence[Row]) -> dict[str, np.ndarray]:
    """Rows as a batch of decoded columns, what `ki_model.Observation.from_batch` reads: images decoded (uint8
    [b, s, s, 3]), strings as an object array, everything else stacked."""
    out: dict[str, np.ndarray] = {}
    for name in rows[0]:
        values = [r[name] for r in rows]
        if camera_of(name) is not None:
            out[name] = np.stack([decode_image(v) for v in values])
        elif isinstance(values[0], (str, bytes)):
            out[name] = np.empty(len(values), dtype=object)
            out[name][:] = values
        else:
            out[name] = np.stack([np.asarray(v) for v in values])
    return out


def row_at(columns: Mapping[str, np.ndarray], i: int) -> Row:
    """Row i of decoded columns (`decode_table`, `read_rows`)."""
    return {name: values[i] for name, values in columns.items()}


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
