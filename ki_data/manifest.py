"""The manifest of a shard directory (docs/DESIGN.md §4), read and written here only.

`manifest.json` says what the shards hold: their source, shapes, prompt layout, tokenizers, normalization, splits and
every shard file with its row count and sha256. A training checkpoint carries a copy, so inference needs no shards.
Everything else reads the typed `Manifest`, never the JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from ki_data.shard_writer import atomic_write_json

SCHEMA_VERSION = 2  # 2: prompt_layout (pi05 | fast)
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")


class ManifestError(ValueError):
    """A directory whose manifest is missing, unreadable, from another schema version, or that does not fit."""


@dataclasses.dataclass(frozen=True)
class ShardEntry:
    path: str  # relative to the shard directory
    split: str
    rows: int
    sha256: str
    bytes: int
    episodes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TokenizerEntry:
    path: str  # relative to the directory
    kind: str  # text: "user" | "trained"; fast: "user" | "fitted"
    vocab_size: int
    sha256: str
    scale: float | None = None  # FAST only


# Fields that fix the model's data-dependent shapes (the same names as Pi05KIConfig's).
MODEL_FIELDS = ("action_horizon", "action_dim", "cameras", "image_size", "max_token_len", "max_text_len", "vocab_size")
# What a checkpoint and a shard directory must share for the checkpoint to read the shards the same way.
SAME_DATA_FIELDS = MODEL_FIELDS + ("state_dim", "skip_tokens", "norm_mode", "prompt_layout", "image_format",
                                   "state_keys", "delta_actions")
DEFAULT_STATE_KEYS = ("observation.state",)


@dataclasses.dataclass(frozen=True)
class Manifest:
    source: dict[str, Any]  # repo_id, root, codebase_version
    fps: float
    cameras: tuple[str, ...]  # model camera names, in image-token order
    camera_keys: dict[str, str]  # camera name -> the dataset's feature key
    image_size: int
    image_format: str  # "png" | "jpeg"
    action_horizon: int
    state_dim: int
    action_dim: int
    max_token_len: int
    max_text_len: int
    vocab_size: int
    skip_tokens: int
    prompt_layout: str  # ki_data.prompt.LAYOUTS
    tokenizers: dict[str, TokenizerEntry]  # "text", "fast"
    norm_mode: str
    splits: dict[str, tuple[int, ...]]  # split -> episode indices
    shards: tuple[ShardEntry, ...]
    # The dataset's feature names of observation.state and action (LeRobot `names`, flattened; None: unnamed): say
    # whether state and action are the same quantities (pusht: both the agent's x, y).
    state_names: tuple[str, ...] | None = None
    action_names: tuple[str, ...] | None = None
    # The LeRobot features concatenated into the model's state, in order (`--state-keys`); a frame given to the
    # Policy or the server must carry each of them.
    state_keys: tuple[str, ...] = DEFAULT_STATE_KEYS
    # Per action dimension: the state dimension it is stored relative to, or -1 absolute; None: all absolute
    # (ki_data.actions, `--delta-actions`).
    delta_actions: tuple[int, ...] | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the preprocessing options used
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)  # counts and timings of the run
    norm_stats: str = "norm_stats.json"
    schema_version: int = SCHEMA_VERSION

    # ------------------------------------------------------------------ reading and writing

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> Manifest:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(f"{where} has schema_version {version!r}; this code reads version {SCHEMA_VERSION} "
                                f"(preprocess the dataset again)")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in d
                         and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        if missing:
            raise ManifestError(f"{where} lacks {missing}")
        fields = {k: v for k, v in d.items() if k in known}
        try:
            fields["cameras"] = tuple(d["cameras"])
            for key in ("state_names", "action_names", "delta_actions"):
                fields[key] = None if d.get(key) is None else tuple(d[key])
            fields["state_keys"] = tuple(d.get("state_keys", DEFAULT_STATE_KEYS))
            fields["tokenizers"] = {k: TokenizerEntry(**v) for k, v in d["tokenizers"].items()}
            fields["splits"] = {k: tuple(v) for k, v in d["splits"].items()}
            fields["shards"] = tuple(ShardEntry(**{**s, "episodes": tuple(s["episodes"])}) for s in d["shards"])
            return cls(**fields)
        except (TypeError, KeyError, AttributeError) as e:
            raise ManifestError(f"{where} is malformed: {e}") from None

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        """The manifest of a finished preprocessing run (or of a checkpoint, which carries a copy)."""
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(f"{path} does not exist: {directory} is not a finished preprocessing output")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data, where=str(path))

    def save(self, directory: str | Path) -> None:
        atomic_write_json(Path(directory) / MANIFEST_FILE, self.to_dict())

    # ------------------------------------------------------------------ shards

    def shard_entries(self, split: str | None = None) -> list[ShardEntry]:
        if split is not None and split not in SPLITS:
            raise ManifestError(f"unknown split {split!r}; expected one of {SPLITS}")
        return [s for s in self.shards if split is None or s.split == split]

    def shard_paths(self, directory: str | Path, split: str | None = None) -> list[Path]:
        return [Path(directory) / s.path for s in self.shard_entries(split)]

    def fingerprint(self, split: str) -> str:
        """sha256 over a split's shard hashes: what a saved loader position refers to."""
        return hashlib.sha256("".join(s.sha256 for s in self.shard_entries(split)).encode()).hexdigest()

    # ------------------------------------------------------------------ meaning

    def model_fields(self) -> dict[str, Any]:
        """The model config's data-dependent fields (Pi05KIConfig takes them by these names)."""
        return {k: getattr(self, k) for k in MODEL_FIELDS}

    def action_state_dims(self) -> tuple[int, ...] | None:
        """For each action dimension, the state dimension of the same recorded name; None when some action dimension
        has none (or the features are unnamed)."""
        if self.state_names is None or self.action_names is None:
            return None
        if not set(self.action_names) <= set(self.state_names) or len(self.action_names) != self.action_dim:
            return None
        return tuple(self.state_names.index(n) for n in self.action_names)

    def hold_still(self) -> tuple[bool, str]:
        """(applies, why): whether repeating the current state is a meaningful action chunk (the "hold still"
        baseline): every action dimension has a state dimension of the same recorded name (pusht: the agent's x, y,
        also when the state holds more, as the block's pose); `action_state_dims` says which."""
        if self.state_names is None or self.action_names is None:
            return False, "the dataset records no feature names for the state and the action"
        if len(self.action_names) != self.action_dim or len(self.state_names) != self.state_dim:
            return False, (f"the recorded names ({len(self.state_names)} state, {len(self.action_names)} action) do "
                           f"not match the dimensions ({self.state_dim} state, {self.action_dim} action)")
        dims = self.action_state_dims()
        if dims is None:
            missing = [n for n in self.action_names if n not in self.state_names]
            return False, (f"action names {missing} differ from every state dimension's name "
                           f"({list(self.state_names)})")
        return True, f"the action's dimensions are state dimensions ({', '.join(self.action_names)})"

    def data_differences(self, other: Manifest) -> list[tuple[str, Any, Any]]:
        """(field, value here, value in `other`) for everything that would make `other`'s shards read differently
        from these: shapes, token meanings, normalization, tokenizers. Empty when a model trained on one can be used on
        the other."""
        out = [(k, getattr(self, k), getattr(other, k)) for k in SAME_DATA_FIELDS if getattr(self, k) != getattr(other, k)]
        for kind in ("text", "fast"):
            a, b = self.tokenizers[kind].sha256, other.tokenizers[kind].sha256
            if a != b:
                out.append((f"{kind} tokenizer sha256", a, b))
        return out
