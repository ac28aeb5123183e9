"""Reading a LeRobot v3.0 dataset episode by episode, through the `lerobot` package.

`lerobot.datasets.LeRobotDatasetMetadata` resolves the dataset (local `root`, `$HF_LEROBOT_HOME/<repo_id>`, or the
hub) and tells where every episode lives: its parquet file and row range, and for each camera its video file and
start time in that file. From there we read in bulk instead of one `LeRobotDataset[i]` per frame:

* tabular columns: each parquet file is read once (only the needed columns) and sliced per episode;
* videos: one PyAV decoder per camera walks the file forward; consecutive episodes of a file continue the same
  sequential decode (a seek happens only when an episode starts before the decoder's position);
* image-stored cameras: the encoded PNG/JPEG bytes come from the same parquet files.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from jaxtyping import Float, Int, UInt8

from ki_data.images import decode_image

logger = logging.getLogger(__name__)

STATE_KEY = "observation.state"
ACTION_KEY = "action"
# Tabular columns lerobot writes into every data file (episode_index is read with every slice anyway).
_TABULAR = ("index", "frame_index", "timestamp", "task_index")
# A gap up to this long between the decoder's position and the next request is decoded through, not seeked.
_MAX_DECODE_GAP_S = 2.0


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is neither on disk nor fetchable from the hub."""


class DatasetFormatError(ValueError):
    """The dataset exists but lacks something this reader needs (a column, a file, a video frame)."""


@dataclasses.dataclass(frozen=True)
class Episode:
    """Where one episode lives (from meta/episodes)."""

    index: int
    length: int
    data_file: str  # relative to the dataset root
    video_files: dict[str, str]  # camera feature key -> relative path
    video_from_timestamp: dict[str, float]  # camera feature key -> start time of the episode in that file


@dataclasses.dataclass
class EpisodeColumns:
    """Tabular columns of one episode, as read (no validation; see ki_data.preprocess for the checks).

    `state` / `actions` are float32 [n, dim] with dim from the metadata; a row whose stored vector has another
    length keeps that length in `state_lengths` / `action_lengths` and NaN in the array.
    """

    episode_index: int
    index: Int[np.ndarray, " n"]
    frame_index: Int[np.ndarray, " n"]
    timestamp: Float[np.ndarray, " n"]
    task_index: Int[np.ndarray, " n"]  # -1 where the row has no task index
    state: Float[np.ndarray, "n s"]
    actions: Float[np.ndarray, "n d"]
    state_lengths: Int[np.ndarray, " n"]
    action_lengths: Int[np.ndarray, " n"]

    def __len__(self) -> int:
        return len(self.index)


def lerobot_home() -> Path:
    """lerobot's dataset home ($HF_LEROBOT_HOME, default $HF_HOME/lerobot), the same rule as
    lerobot.utils.constants without importing lerobot (which imports torch: seconds) just to say "not found"."""
    from huggingface_hub.constants import HF_HOME

    return Path(os.getenv("HF_LEROBOT_HOME", Path(HF_HOME) / "lerobot")).expanduser()


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _vectors(column: pa.ChunkedArray, dim: int) -> tuple[Float[np.ndarray, "n dim"], Int[np.ndarray, " n"]]:
    """A list column -> float32 [n, dim] (NaN rows where the stored length differs) and the stored lengths."""
    arr = column.combine_chunks()
    n = len(arr)
    if pa.types.is_fixed_size_list(arr.type):
        lengths = np.full(n, arr.type.list_size, dtype=np.int64)
        if arr.type.list_size == dim:
            return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, dim), lengths
        return np.full((n, dim), np.nan, np.float32), lengths
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        out = np.full((n, dim), np.nan, np.float32)
        ok = lengths == dim
        if ok.any():
            good = arr.filter(pa.array(ok))
            out[ok] = good.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
        return out, lengths
    if dim == 1 and (pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type)):
        return arr.to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, 1), np.ones(n, np.int64)
    raise DatasetFormatError(f"column of type {arr.type} is not a vector column")


class _VideoCursor:
    """Sequential decoder over one camera's video files; yields frames at requested timestamps in order."""

    def __init__(self, tolerance_s: float):
        self.tolerance_s = tolerance_s
        self.path: Path | None = None
        self._container = None
        self._stream = None
        self._frames: Iterator | None = None
        self._last_time = -np.inf

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._stream = self._frames = self.path = None
        self._last_time = -np.inf

    def _open(self, path: Path) -> None:
        self.close()
        self._container = av.open(str(path))
        self._stream = self._container.streams.video[0]
        self._frames = self._container.decode(self._stream)
        self.path = path

    def _seek(self, t: float) -> None:
        # Lands on the keyframe at or before t; frames before t are skipped by the caller's loop.
        self._container.seek(int(t / self._stream.time_base), stream=self._stream, backward=True, any_frame=False)
        self._frames = self._container.decode(self._stream)
        self._last_time = -np.inf

    def frames_at(self, path: Path, timestamps: Float[np.ndarray, " n"]) -> Iterator[UInt8[np.ndarray, "h w 3"]]:
        tol = self.tolerance_s
        if path != self.path:
            self._open(path)
        # Continue the running decode when the request starts just after it (the next episode of the file).
        if len(timestamps) and not (self._last_time + tol / 2 < timestamps[0] <= self._last_time + _MAX_DECODE_GAP_S):
            self._seek(float(timestamps[0]))
        for k, t in enumerate(timestamps):
            while True:
                try:
                    frame = next(self._frames)
                except StopIteration:
                    raise DatasetFormatError(
                        f"video {path} ends before t={t:.4f}s (frame {k} of the requested range)"
                    ) from None
                if frame.time is None:
                    continue
                self._last_time = frame.time
                if frame.time < t - tol:
                    continue
                if frame.time > t + tol:
                    raise DatasetFormatError(
                        f"video {path} has no frame at t={t:.4f}s (next frame at {frame.time:.4f}s, frame {k} of "
                        f"the requested range)"
                    )
                yield frame.to_ndarray(format="rgb24")
                break


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the readers need to know about a dataset; plain data, so worker processes get it without lerobot."""

    repo_id: str
    root: Path
    fps: int
    codebase_version: str
    state_dim: int
    action_dim: int
    cameras: dict[str, str]  # camera feature key -> "video" | "image", in the dataset's feature order
    tasks: dict[int, str]  # task_index -> task
    episodes: tuple[Episode, ...]  # sorted by index
    requested_root: Path | None = None  # the root the caller named (None: lerobot's home or the hub cache)
    # The features' recorded names, flattened (None when the dataset names none): tells whether state and action
    # are the same quantities (pusht: both the agent's x, y).
    state_names: tuple[str, ...] | None = None
    action_names: tuple[str, ...] | None = None
    # The features concatenated into the state, in order, and each one's size (`--state-keys`).
    state_keys: tuple[str, ...] = (STATE_KEY,)
    state_key_dims: tuple[int, ...] | None = None

    @property
    def num_frames(self) -> int:
        return sum(e.length for e in self.episodes)

    @functools.cached_property
    def _by_index(self) -> dict[int, Episode]:
        return {e.index: e for e in self.episodes}

    def episode(self, index: int) -> Episode:
        ep = self._by_index.get(index)
        if ep is None:
            raise DatasetFormatError(f"LeRobot dataset '{self.repo_id}' has no episode {index}")
        return ep

    def missing_files(self, episodes: list[int], camera_keys: list[str] | None = None) -> list[Path]:
        keys = list(self.cameras) if camera_keys is None else camera_keys
        paths = set()
        for i in episodes:
            ep = self.episode(i)
            paths.add(self.root / ep.data_file)
            paths.update(self.root / ep.video_files[k] for k in keys if k in ep.video_files)
        return sorted(p for p in paths if not p.is_file())


def _episodes_from_meta(meta) -> tuple[Episode, ...]:
    if meta.episodes is None:
        return ()
    table = meta.episodes
    data = table.select_columns([c for c in table.column_names if not c.startswith("stats/")]).to_dict()
    out = []
    for row, ep in enumerate(data["episode_index"]):
        video_files, video_from = {}, {}
        for key in meta.video_keys:
            video_files[key] = meta.video_path.format(
                video_key=key,
                chunk_index=data[f"videos/{key}/chunk_index"][row],
                file_index=data[f"videos/{key}/file_index"][row],
            )
            video_from[key] = float(data[f"videos/{key}/from_timestamp"][row])
        out.append(
            Episode(
                index=int(ep),
                length=int(data["length"][row]),
                data_file=meta.data_path.format(
                    chunk_index=data["data/chunk_index"][row], file_index=data["data/file_index"][row]
                ),
                video_files=video_files,
                video_from_timestamp=video_from,
            )
        )
    return tuple(sorted(out, key=lambda e: e.index))


def feature_names(feature: dict) -> tuple[str, ...] | None:
    """A LeRobot feature's `names` flattened: a list as is, a dict's lists in order (`{"motors": [...]}`)."""
    names = feature.get("names")
    if isinstance(names, dict):
        names = [n for group in names.values() for n in (group if isinstance(group, (list, tuple)) else [group])]
    if not names:
        return None
    return tuple(str(n) for n in names)


def state_names_of(features: dict, keys: tuple[str, ...]) -> tuple[str, ...] | None:
    """The concatenated state's names: each feature's own names (`key[i]` for an unnamed one); None when none is
    named."""
    named = [feature_names(features[k]) for k in keys]
    if all(n is None for n in named):
        return None
    out: list[str] = []
    for key, names in zip(keys, named, strict=True):
        out += list(names) if names is not None else [f"{key}[{i}]" for i in range(int(np.prod(features[key]["shape"])))]
    return tuple(out)


def open_lerobot_dataset(
    repo_id: str, root: str | Path | None = None, *, download: bool = True, state_keys: tuple[str, ...] | None = None
) -> DatasetSpec:
    """Resolve a dataset through lerobot's metadata: `root`, else `$HF_LEROBOT_HOME/<repo_id>`, else the hub.

    `state_keys`: the features concatenated into the model's state (default `observation.state`), e.g.
    ("observation.state", "observation.environment_state").

    Raises DatasetNotFoundError (one sentence, no traceback needed) when it is nowhere to be found.
    """
    local = Path(root) if root is not None else lerobot_home() / repo_id
    has_local = (local / "meta" / "info.json").is_file()
    if not has_local and (_hub_offline() or not download):
        raise DatasetNotFoundError(
            f"LeRobot dataset '{repo_id}' was not found: there is no {local / 'meta' / 'info.json'} and the "
            f"Hugging Face Hub is offline (record one with `python -m pipelines.make_demo_dataset` or pass --root)"
        )
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    try:
        meta = LeRobotDatasetMetadata(repo_id, root=root)
    except Exception as e:  # hub errors come in many classes (offline, not found, auth, network)
        if has_local:
            raise DatasetFormatError(f"LeRobot dataset '{repo_id}' at {local} could not be read: {e}") from e
        first_line = str(e).splitlines()[0] if str(e) else "no details"
        raise DatasetNotFoundError(
            f"LeRobot dataset '{repo_id}' was found neither under {local} nor on the Hugging Face Hub "
            f"({type(e).__name__}: {first_line})"
        ) from None
    features = meta.features
    state_keys = tuple(state_keys or (STATE_KEY,))
    if len(set(state_keys)) != len(state_keys):
        raise DatasetFormatError(f"state keys {list(state_keys)} name a feature twice")
    for key in (*state_keys, ACTION_KEY):
        if key not in features:
            raise DatasetFormatError(
                f"LeRobot dataset '{repo_id}' has no '{key}' feature (features: {', '.join(sorted(features))})"
            )
    depth = set(meta.depth_keys)
    tasks = {}
    if meta.tasks is not None:
        tasks = {int(i): str(t) for t, i in zip(meta.tasks.index, meta.tasks["task_index"], strict=True)}
    return DatasetSpec(
        repo_id=repo_id,
        root=Path(meta.root),
        fps=int(meta.fps),
        codebase_version=str(meta.info.codebase_version),
        state_dim=sum(int(np.prod(features[k]["shape"])) for k in state_keys),
        action_dim=int(np.prod(features[ACTION_KEY]["shape"])),
        cameras={k: features[k]["dtype"] for k in meta.camera_keys if k not in depth},
        tasks=tasks,
        episodes=_episodes_from_meta(meta),
        requested_root=None if root is None else Path(root),
        state_names=state_names_of(features, state_keys),
        action_names=feature_names(features[ACTION_KEY]),
        state_keys=state_keys,
        state_key_dims=tuple(int(np.prod(features[k]["shape"])) for k in state_keys),
    )


def ensure_local(spec: DatasetSpec, episodes: list[int], camera_keys: list[str] | None = None) -> None:
    """Make sure the data and video files of `episodes` are on disk, downloading them through lerobot."""
    missing = spec.missing_files(episodes, camera_keys)
    if not missing:
        return
    if _hub_offline():
        raise DatasetNotFoundError(
            f"LeRobot dataset '{spec.repo_id}' under {spec.root} lacks {len(missing)} file(s) (first: "
            f"{missing[0]}) and the Hugging Face Hub is offline"
        )
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    logger.info("downloading %d missing file(s) of %s through lerobot", len(missing), spec.repo_id)
    try:
        # Same root as the metadata was resolved with, so the files land where `spec.root` points.
        LeRobotDataset(spec.repo_id, root=spec.requested_root, episodes=sorted(episodes), video_backend="pyav")
    except Exception as e:
        raise DatasetNotFoundError(
            f"LeRobot dataset '{spec.repo_id}': could not download its files ({type(e).__name__}: {e})"
        ) from None
    still = spec.missing_files(episodes, camera_keys)
    if still:
        raise DatasetNotFoundError(f"LeRobot dataset '{spec.repo_id}' still lacks {still[0]} after download")


class EpisodeReader:
    """Bulk, episode-ordered reads of a dataset's files (pyarrow + PyAV; no lerobot import, cheap in workers)."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        self.root = spec.root
        self._table_cache: dict[tuple[str, tuple[str, ...]], pa.Table] = {}
        self._videos: dict[str, _VideoCursor] = {}

    def _table(self, data_file: str, columns: tuple[str, ...]) -> pa.Table:
        """One data file's columns, cached (one entry per column set: episodes of a file come in a row)."""
        key = (data_file, columns)
        table = self._table_cache.get(key)
        if table is None:
            path = self.root / data_file
            try:
                table = pq.read_table(path, columns=list(columns))
            except (KeyError, pa.ArrowInvalid) as e:
                raise DatasetFormatError(f"{path}: cannot read columns {list(columns)}: {e}") from None
            self._table_cache = {k: v for k, v in self._table_cache.items() if k[1] != columns}
            self._table_cache[key] = table
        return table

    def _episode_rows(self, ep: Episode, columns: tuple[str, ...]) -> pa.Table:
        table = self._table(ep.data_file, ("episode_index", *columns))
        eps = table.column("episode_index").to_numpy()
        rows = np.flatnonzero(eps == ep.index)
        if len(rows) == 0:
            raise DatasetFormatError(f"episode {ep.index} has no rows in {self.root / ep.data_file}")
        if rows[-1] - rows[0] + 1 == len(rows):
            return table.slice(int(rows[0]), len(rows))
        return table.take(pa.array(rows))

    # ---------------------------------------------------------------------------------------- reads

    def read_episode(self, index: int) -> EpisodeColumns:
        """All tabular columns of one episode in one bulk read, ordered by frame_index."""
        ep = self.spec.episode(index)
        keys = self.spec.state_keys
        table = self._episode_rows(ep, (*_TABULAR, *keys, ACTION_KEY))
        order = np.argsort(table.column("frame_index").to_numpy(), kind="stable")
        if not np.array_equal(order, np.arange(len(order))):
            table = table.take(pa.array(order))
        dims = self.spec.state_key_dims or (self.spec.state_dim,)
        parts = [_vectors(table.column(k), d) for k, d in zip(keys, dims, strict=True)]
        state = np.concatenate([p[0] for p in parts], axis=1)
        # A row whose stored vector of any key has the wrong length is NaN there; its length is the sum.
        state_len = np.sum([p[1] for p in parts], axis=0) if len(parts) > 1 else parts[0][1]
        actions, action_len = _vectors(table.column(ACTION_KEY), self.spec.action_dim)
        task = table.column("task_index").combine_chunks()
        return EpisodeColumns(
            episode_index=ep.index,
            index=table.column("index").to_numpy().astype(np.int64),
            frame_index=table.column("frame_index").to_numpy().astype(np.int64),
            timestamp=table.column("timestamp").to_numpy(zero_copy_only=False).astype(np.float64),
            task_index=task.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64),
            state=state,
            actions=actions,
            state_lengths=state_len,
            action_lengths=action_len,
        )

    def iter_frames(
        self, index: int, camera_key: str, timestamps: Float[np.ndarray, " n"] | None = None
    ) -> Iterator[UInt8[np.ndarray, "h w 3"]]:
        """The episode's frames of one camera, in order, as RGB uint8 [h, w, 3].

        Video: decoded sequentially at the episode's timestamps (`timestamps` relative to the episode start, from
        `read_episode(...).timestamp`). Images: decoded from the bytes stored in the data file.
        """
        ep = self.spec.episode(index)
        if self.spec.cameras[camera_key] == "video":
            if timestamps is None:
                timestamps = self.read_episode(index).timestamp
            cursor = self._videos.get(camera_key)
            if cursor is None:
                # A quarter frame: far tighter than the frame spacing, far looser than float32 timestamp error.
                cursor = self._videos[camera_key] = _VideoCursor(tolerance_s=0.25 / self.spec.fps)
            path = self.root / ep.video_files[camera_key]
            try:
                yield from cursor.frames_at(path, ep.video_from_timestamp[camera_key] + np.asarray(timestamps))
            except DatasetFormatError as e:
                raise DatasetFormatError(
                    f"LeRobot dataset '{self.spec.repo_id}', episode {ep.index}, camera {camera_key}: {e}"
                ) from None
            return
        table = self._episode_rows(ep, ("frame_index", camera_key))
        order = np.argsort(table.column("frame_index").to_numpy(), kind="stable")
        column = table.column(camera_key).combine_chunks()
        for row in order:
            item = column[int(row)].as_py()
            yield self._decode_stored_image(item, ep, camera_key)

    def _decode_stored_image(self, item, ep: Episode, camera_key: str) -> UInt8[np.ndarray, "h w 3"]:
        if isinstance(item, dict):
            if item.get("bytes"):
                return decode_image(item["bytes"])
            if item.get("path"):
                path = Path(item["path"])
                path = path if path.is_absolute() else self.root / path
                if path.is_file():
                    return decode_image(path.read_bytes())
        raise DatasetFormatError(f"episode {ep.index}, camera {camera_key}: an image row has neither bytes nor a file")

    def close(self) -> None:
        for cursor in self._videos.values():
            cursor.close()
        self._videos.clear()
        self._table_cache.clear()

