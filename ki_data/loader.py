"""Streams the token shards into training / evaluation batches with grain.

Never holds the dataset in memory. The unit of reading is a parquet row group. One epoch's order is a *block
shuffle*, fixed by (seed, epoch): the row groups of every shard of the split are permuted together (shuffling across
shards), the rows laid out in that order, and each consecutive window of `shuffle_buffer` rows permuted (shuffling
within a buffer). A worker therefore only needs the row groups of the windows it is reading, which it caches.

The order is a pure function of the row's position in the stream, so the pipeline is a grain `MapDataset`: image
decoding (JPEG by default, PNG) and augmentation run in grain's worker processes (`random_map`, seeded by position),
rows are split between JAX processes by grain's `ElasticIterator` (with `ProcessBlocks`, each process reads its
contiguous block of every global batch, so P processes train on exactly the batches one process would), and the
loader state is just the global position reached, a small JSON dict saved with each checkpoint. A resumed job sees
exactly the batches it would have seen, whatever its number of loader workers.

Row groups are read with parquet page checksums verified. A row that cannot be read or decoded stops the stream with a
`ShardReadError` naming the shard file, the row (episode, frame, row group, position) and the column; no batch ever
holds it.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from pathlib import Path
from typing import Any, Iterator

import grain
import numpy as np
import pyarrow.parquet as pq
from absl import flags

from ki_data.augment import AugmentConfig, augment_image, is_wrist_camera
from ki_data.manifest import Manifest, ManifestError
from ki_data import schema
from ki_data.shard_writer import READ_OPTIONS

Batch = dict[str, np.ndarray]


class LoaderError(ValueError):
    """The shards or a saved loader state cannot be used as asked."""


class ShardReadError(LoaderError):
    """A shard, or one row of it, that cannot be read or decoded. The message names the file, the row and the column;
    the same facts are attributes (None where unknown). Pickles whole, so it crosses grain's worker processes."""

    def __init__(
        self,
        message: str,
        *,
        shard: str | None = None,
        row_group: int | None = None,
        row: int | None = None,
        episode: int | None = None,
        frame: int | None = None,
        column: str | None = None,
    ):
        super().__init__(message)
        self.shard, self.row_group, self.row = shard, row_group, row
        self.episode, self.frame, self.column = episode, frame, column


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"  # pyarrow's messages span lines


def _row_error(
    verb: str, cause: BaseException, *, shard: str, row_group: int, row: int, episode: int | None,
    frame: int | None, column: str | None,
) -> ShardReadError:
    where = f"episode {episode}, frame {frame} (row group {row_group}, row {row})" if episode is not None else (
        f"row group {row_group}, row {row} (episode and frame unreadable too)")
    what = f"column {column}" if column else "the row group"
    return ShardReadError(
        f"shard {shard}: {where}: {what} cannot be {verb} ({_one_line(cause)})",
        shard=shard, row_group=row_group, row=row, episode=episode, frame=frame, column=column,
    )


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    batch_size: int  # global batch (all JAX processes together); each process yields batch_size // process_count
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 2048  # rows permuted together (after the row groups themselves are permuted)
    augment: bool = True
    repeat: bool = True  # endless stream of epochs (training); False: one pass (evaluation)
    num_workers: int = 0  # grain worker processes; 0 = decode in this process
    num_threads: int = 2  # reader threads per process (JPEG/PNG decoding releases the GIL)
    prefetch: int = 4  # batches buffered per worker
    augment_config: AugmentConfig = AugmentConfig()


@dataclasses.dataclass(frozen=True)
class RowGroup:
    path: str
    index: int  # row group within the file
    rows: int


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """What a reader needs from the manifest, picklable into grain's workers."""

    root: str
    cameras: tuple[str, ...]
    action_horizon: int
    action_dim: int
    files: tuple[str, ...]  # absolute paths of the split's shards, in manifest order
    fingerprint: str  # a saved loader state only fits the same shards (Manifest.fingerprint)

    @classmethod
    def from_dir(cls, shards_dir: str | Path, split: str) -> "ShardSpec":
        root = Path(shards_dir)
        try:
            manifest = Manifest.load(root)
            entries = manifest.shard_entries(split)
        except ManifestError as e:
            raise LoaderError(str(e)) from None
        if not entries:
            raise LoaderError(f"{root}: the manifest lists no {split!r} shards")
        files = []
        for s in entries:
            p = root / s.path
            if not p.is_file():
                raise LoaderError(f"{root}: shard {s.path} listed in manifest.json is missing")
            files.append(str(p))
        return cls(
            root=str(root),
            cameras=manifest.cameras,
            action_horizon=manifest.action_horizon,
            action_dim=manifest.action_dim,
            files=tuple(files),
            fingerprint=manifest.fingerprint(split),
        )


def list_row_groups(files: tuple[str, ...]) -> list[RowGroup]:
    groups = []
    for path in files:
        try:
            meta = pq.ParquetFile(path, **READ_OPTIONS).metadata
        except Exception as e:  # a damaged footer: nothing of this file can be read
            raise ShardReadError(f"shard {path}: cannot be opened ({_one_line(e)})", shard=path) from e
        groups += [RowGroup(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    return [g for g in groups if g.rows > 0]


def block_shuffle_order(groups: list[RowGroup], seed: int, epoch: int, buffer: int) -> np.ndarray:
    """Row ids (positions in the unshuffled concatenation of `groups`) in the order epoch `epoch` reads them."""
    starts = np.cumsum([0] + [g.rows for g in groups])
    rng = np.random.default_rng([seed, epoch])
    order = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in rng.permutation(len(groups))])
    for lo in range(0, len(order), buffer):
        order[lo : lo + buffer] = rng.permutation(order[lo : lo + buffer])
    return order


@dataclasses.dataclass(frozen=True)
class _Unreadable:
    """A row group that failed to read: the first column that fails alone, and whatever episode/frame columns read."""

    column: str | None
    cause: BaseException
    episodes: np.ndarray | None
    frames: np.ndarray | None


def _read_group(g: RowGroup) -> dict[str, Any] | _Unreadable:
    try:
        return schema.decode_table(pq.ParquetFile(g.path, **READ_OPTIONS).read_row_group(g.index))
    except Exception as e:  # any failure: named below, never handed on as data
        cause = e
    # Column by column, to name the damaged one and to recover the rows' episode and frame if their pages are sound.
    cols: dict[str, np.ndarray | None] = {}
    failed: str | None = None
    try:
        f = pq.ParquetFile(g.path, **READ_OPTIONS)
        names = f.schema_arrow.names
    except Exception:
        names, f = [], None
    for name in names:
        try:
            cols[name] = schema.decode_column(f.read_row_group(g.index, columns=[name]).column(0))
        except Exception as e:
            cols[name] = None
            if failed is None:
                failed, cause = name, e
    return _Unreadable(failed, cause, cols.get(schema.EPISODE_INDEX), cols.get(schema.FRAME_INDEX))


# Key of a raw row's origin (shard, row group, row in the group), read by DecodeRow to name a failed decode.
SOURCE_KEY = "__source__"


class ShardRows(grain.MapDataset):
    """Position -> raw shard row (images still encoded: JPEG by default, PNG if the manifest says so). Positions
    past one epoch continue into the next."""

    def __init__(self, spec: ShardSpec, *, seed: int, shuffle: bool, shuffle_buffer: int):
        super().__init__()
        self._spec = spec
        self._groups = list_row_groups(spec.files)
        self._starts = np.cumsum([0] + [g.rows for g in self._groups])
        self._seed = seed
        self._shuffle = shuffle
        self._buffer = max(1, shuffle_buffer)
        # A window spans at most buffer/min_rows + 1 row groups; a worker may straddle two windows.
        min_rows = min(g.rows for g in self._groups)
        self._cache_size = 2 * (-(-self._buffer // min_rows) + 1) + 2
        self._init_cache()

    def _init_cache(self) -> None:
        self._cache: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self):  # pickled into worker processes without caches or locks
        state = self.__dict__.copy()
        for k in ("_cache", "_orders", "_lock"):
            state.pop(k)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_cache()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __str__(self) -> str:
        return f"ShardRows({self._spec.root}, rows={len(self)}, shuffle={self._shuffle})"

    def _order(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._orders:
                if len(self._orders) >= 2:
                    self._orders.pop(min(self._orders))
                self._orders[epoch] = block_shuffle_order(self._groups, self._seed, epoch, self._buffer)
            return self._orders[epoch]

    def _group(self, gi: int) -> dict[str, Any] | _Unreadable:
        with self._lock:
            if gi in self._cache:
                self._cache.move_to_end(gi)
                return self._cache[gi]
        cols = _read_group(self._groups[gi])
        with self._lock:
            self._cache[gi] = cols
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return cols

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, pos = divmod(int(index), len(self))
        row_id = int(self._order(epoch)[pos]) if self._shuffle else pos
        gi = int(np.searchsorted(self._starts, row_id, side="right")) - 1
        cols = self._group(gi)
        i = row_id - int(self._starts[gi])
        g = self._groups[gi]
        if isinstance(cols, _Unreadable):
            known = cols.episodes is not None and cols.frames is not None
            raise _row_error(
                "read", cols.cause, shard=g.path, row_group=g.index, row=i, column=cols.column,
                episode=int(cols.episodes[i]) if known else None, frame=int(cols.frames[i]) if known else None,
            ) from cols.cause
        row = {name: values[i] for name, values in cols.items()}
        row[SOURCE_KEY] = (g.path, g.index, i)
        return row


class DecodeRow(grain.transforms.RandomMap):
    """Raw shard row -> model-ready row: decoded images (augmented at train time), actions as [h, d]."""

    def __init__(self, spec: ShardSpec, augment: bool, augment_config: AugmentConfig):
        self._cameras = spec.cameras
        self._shape = (spec.action_horizon, spec.action_dim)
        self._augment = augment
        self._augment_config = augment_config

    def random_map(self, row: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        from ki_data.images import decode_image  # the preprocess engineer's decoder, the same one Policy uses

        row = dict(row)
        source = row.pop(SOURCE_KEY)
        out: dict[str, np.ndarray] = {}
        for name, value in row.items():
            camera = schema.camera_of(name)
            try:
                if camera is not None:
                    img = decode_image(value)
                    if self._augment:
                        img = augment_image(img, rng, wrist=is_wrist_camera(camera), cfg=self._augment_config)
                    out[name] = img
                elif name == schema.ACTIONS:
                    out[name] = np.asarray(value, np.float32).reshape(self._shape)
                else:
                    out[name] = np.asarray(value)
            except Exception as e:  # a damaged image (PIL) or value: named, and the stream stops here
                shard, row_group, i = source
                raise _row_error(
                    "decoded", e, shard=shard, row_group=row_group, row=i, column=name,
                    episode=int(row[schema.EPISODE_INDEX]), frame=int(row[schema.FRAME_INDEX]),
                ) from e
        return out


class ProcessBlocks(grain.MapDataset):
    """Positions reordered within each global batch so that grain's split between JAX processes (process p reads
    positions p, p + P, p + 2P, ...) hands process p the p-th contiguous block of every global batch. The global
    batch, assembled process after process, is then rows j*B .. j*B + B - 1 in order: the very batch (rows, order,
    augmentation draws, flow noise per row) one process would train on."""

    def __init__(self, parent: grain.MapDataset, batch_size: int, process_count: int):
        super().__init__(parent)
        self._batch, self._count = batch_size, process_count

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"ProcessBlocks(batch={self._batch}, processes={self._count})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, within = divmod(int(index), self._batch)  # index = batch*B + i*P + p: process p's i-th row
        process, i = within % self._count, within // self._count
        return self._parent[batch * self._batch + process * (self._batch // self._count) + i]


def _ensure_absl_flags_parsed() -> None:
    # grain reads absl flags inside its workers; a program that is not an absl app must mark them parsed first.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _process_split(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        return jax.process_index(), jax.process_count()
    return process_index, process_count


class ShardLoader:
    """Iterator over batches (dicts of numpy arrays) with a JSON-serialisable state.

    Training (`repeat=True`) is an endless stream; `state()` / `restore(state)` make resuming exact. Evaluation
    (`repeat=False`) is one ordered pass without augmentation; its last batch may be short.
    """

    def __init__(
        self,
        shards_dir: str | Path,
        split: str,
        config: LoaderConfig,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        _ensure_absl_flags_parsed()
        self.spec = ShardSpec.from_dir(shards_dir, split)
        self.split = split
        self.config = config
        self.process_index, self.process_count = _process_split(process_index, process_count)
        if config.batch_size % self.process_count:
            raise LoaderError(
                f"batch size {config.batch_size} is not divisible by the {self.process_count} JAX processes"
            )
        rows = ShardRows(self.spec, seed=config.seed, shuffle=config.shuffle, shuffle_buffer=config.shuffle_buffer)
        self.num_rows = len(rows)
        ds: grain.MapDataset = rows.repeat(None) if config.repeat else rows
        decode = DecodeRow(self.spec, config.augment, config.augment_config)
        ds = ds.random_map(decode, seed=config.seed)  # the generator goes unused when augment is off
        if config.repeat and self.process_count > 1:
            ds = ProcessBlocks(ds, config.batch_size, self.process_count)
        self._dataset = ds
        self._read = grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch * 8)
        self._mp = (
            grain.MultiprocessingOptions(num_workers=config.num_workers, per_worker_buffer_size=config.prefetch)
            if config.num_workers > 0
            else None
        )
        self._global_next = 0
        self._iter: Iterator[Batch] | None = None

    @property
    def local_batch_size(self) -> int:
        return self.config.batch_size // self.process_count

    def _make_iter(self) -> Iterator[Batch]:
        if self.config.repeat:
            it = grain.experimental.ElasticIterator(
                self._dataset,
                self.config.batch_size,
                grain.sharding.ShardOptions(self.process_index, self.process_count, drop_remainder=True),
                read_options=self._read,
                multiprocessing_options=self._mp,
            ).__iter__()
            it.set_state({"global_next_index": self._global_next})
            return it
        ds = self._dataset[self._global_next + self.process_index :: self.process_count]
        ds = ds.batch(self.local_batch_size, drop_remainder=False, batch_fn=stack_rows)
        ds = ds.to_iter_dataset(self._read)
        if self._mp is not None:
            ds = ds.mp_prefetch(self._mp)
        return iter(ds)

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> Batch:
        if self._iter is None:
            self._iter = self._make_iter()
        batch = next(self._iter)
        self._global_next += self.config.batch_size
        if self._mp is not None:
            # Worker batches arrive in shared memory; own plain copies so that the segments are freed right away.
            batch = {k: np.array(v) for k, v in batch.items()}
        return batch

    def state(self) -> dict[str, Any]:
        """Where the stream is, plus what must not change for the state to mean the same batches."""
        return {
            "global_next_index": self._global_next,
            "split": self.split,
            "seed": self.config.seed,
            "shuffle": self.config.shuffle,
            "shuffle_buffer": self.config.shuffle_buffer,
            "augment": self.config.augment,
            "batch_size": self.config.batch_size,
            "num_rows": self.num_rows,
            "shards_fingerprint": self.spec.fingerprint,
        }

    def restore(self, state: dict[str, Any]) -> None:
        mine = self.state()
        for key in mine:
            if key != "global_next_index" and state.get(key) != mine[key]:
                raise LoaderError(
                    f"saved loader state does not fit this loader: {key} was {state.get(key)!r}, is {mine[key]!r}"
                )
        self.close()
        self._global_next = int(state["global_next_index"])

    def close(self) -> None:
        if self._iter is not None and hasattr(self._iter, "close"):
            self._iter.close()
        self._iter = None

    def __enter__(self) -> "ShardLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: grain's own cleanup may already be gone
            pass


def stack_rows(rows: list[dict[str, np.ndarray]]) -> Batch:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
