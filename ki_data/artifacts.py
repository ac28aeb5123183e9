"""What a shard directory carries besides its shards — manifest, normalization statistics, tokenizers — opened as one.

A training checkpoint copies the same files (`ARTIFACT_PATHS`), so preprocessing, training, evaluation, inspection and
the Policy all read observations and actions through the same object.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from jaxtyping import Float

from ki_data import schema
from ki_data.actions import to_absolute, to_relative
from ki_data.manifest import MANIFEST_FILE, Manifest, ManifestError
from ki_data.normalize import NormStats, load_norm_stats, normalize, unnormalize
from ki_data.prompt import PromptBuilder

if TYPE_CHECKING:
    from ki_data.fast_tokenizer import FastTokenizer
    from ki_data.text_tokenizer import TextTokenizer

# Relative paths a checkpoint copies from the shard directory it trains on.
ARTIFACT_PATHS = (MANIFEST_FILE, schema.NORM_STATS_FILE, "tokenizer")


@dataclasses.dataclass(frozen=True)
class DataArtifacts:
    root: Path
    manifest: Manifest
    norm_stats: dict[str, NormStats]  # "state", "actions"
    prompt: PromptBuilder

    @classmethod
    def open(
        cls,
        directory: str | Path,
        manifest: Manifest | None = None,
        *,
        tokenizers: tuple[TextTokenizer, FastTokenizer] | None = None,
    ) -> DataArtifacts:
        """A shard directory (pipelines.preprocess output) or a checkpoint directory (which carries copies).

        manifest: one not saved in the directory (preprocessing's draft, while the shards are being written).
        tokenizers: (text, fast) already loaded from the directory's files, so that a process reads them once."""
        root = Path(directory)
        needed = ARTIFACT_PATHS if manifest is None else tuple(p for p in ARTIFACT_PATHS if p != MANIFEST_FILE)
        manifest = Manifest.load(root) if manifest is None else manifest
        for name in needed:
            if not (root / name).exists():
                raise ManifestError(f"{root}: {name} is missing; the directory is incomplete")
        prompt = PromptBuilder.from_manifest(manifest, root, tokenizers=tokenizers)
        return cls(root, manifest, load_norm_stats(root / manifest.norm_stats), prompt)

    def normalize_state(self, state: Float[np.ndarray, "*b s"]) -> Float[np.ndarray, "*b s"]:
        return normalize(state, self.norm_stats["state"], self.manifest.norm_mode)

    def unnormalize_state(self, state: Float[np.ndarray, "*b s"]) -> Float[np.ndarray, "*b s"]:
        return unnormalize(state, self.norm_stats["state"], self.manifest.norm_mode)

    def normalize_actions(self, actions: Float[np.ndarray, "*b d"]) -> Float[np.ndarray, "*b d"]:
        return normalize(actions, self.norm_stats["actions"], self.manifest.norm_mode)

    def unnormalize_actions(self, actions: Float[np.ndarray, "*b d"]) -> Float[np.ndarray, "*b d"]:
        return unnormalize(actions, self.norm_stats["actions"], self.manifest.norm_mode)

    def absolute_actions(
        self, chunks: Float[np.ndarray, "*b h d"], state: Float[np.ndarray, "*b s"]
    ) -> Float[np.ndarray, "*b h d"]:
        """Normalized chunks as stored (relative where `--delta-actions` said) -> absolute chunks in the dataset's
        units, with the raw state of each chunk's frame: what people and robots see."""
        return to_absolute(self.unnormalize_actions(chunks), state, self.manifest.delta_actions)

    def stored_actions(
        self, chunks: Float[np.ndarray, "*b h d"], state: Float[np.ndarray, "*b s"]
    ) -> Float[np.ndarray, "*b h d"]:
        """The inverse of `absolute_actions`: absolute chunks in the dataset's units -> as stored (relative against
        `state` where `--delta-actions` said, normalized): what the model reads and writes."""
        return self.normalize_actions(to_relative(chunks, state, self.manifest.delta_actions))

    def mean_action_chunks(self, state: Float[np.ndarray, "b s"], horizon: int) -> Float[np.ndarray, "b h d"]:
        """The mean-action baseline in absolute units: the mean stored chunk step, turned back with each state."""
        mean = self.norm_stats["actions"].mean
        stored = self.normalize_actions(np.broadcast_to(mean, (len(state), horizon, len(mean))))
        return self.absolute_actions(stored, state)

    def hold_still_chunks(self, state: Float[np.ndarray, "b s"], horizon: int) -> Float[np.ndarray, "b h d"]:
        """The hold-still baseline in absolute units: the state dimensions named as the action's, repeated."""
        dims = self.manifest.action_state_dims()
        if dims is None:
            raise ValueError(f"hold still does not apply: {self.manifest.hold_still()[1]}")
        held = np.asarray(state, np.float32)[:, list(dims)]
        return np.broadcast_to(held[:, None, :], (held.shape[0], horizon, held.shape[1]))

    def max_fast_targets(self) -> int | None:
        """The most FAST loss targets of any row: a row's targets are its whole postfix (`start_ids`, the FAST
        tokens, `end_ids`); None when the manifest's summary does not say how many FAST tokens its longest row has."""
        longest = self.manifest.summary.get("fast_tokens_per_chunk", {}).get("max")
        if longest is None:
            return None
        return len(self.prompt.start_ids) + int(longest) + len(self.prompt.end_ids)

    def shard_paths(self, split: str | None = None) -> list[Path]:
        return self.manifest.shard_paths(self.root, split)
