"""Looking at token shards: one row's tokens aligned with their masks, its FAST postfix decoded back into
actions, dataset-wide token counts, and (given a checkpoint) what a trained model predicts for the row.

The notebook `notebooks/inspect_tokens.ipynb` and `python -m pipelines.inspect` are thin wrappers over these
functions; rendering (terminal, HTML, plots) lives in `ki_data.inspect_render` and `ki_data.inspect_plots`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import scipy.fft
from jaxtyping import Bool, Float, Int, UInt8
from tqdm import tqdm

from ki_data import schema
from ki_data.artifacts import DataArtifacts
from ki_data.fast_tokenizer import FastDecodeError
from ki_data.images import decode_image
from ki_data.manifest import MANIFEST_FILE, ManifestError
from ki_data.prompt import ACTION_PREFIX, PromptTokens

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_SHARDS = REPO_ROOT / "runs" / "demo" / "shards"
DEMO_CHECKPOINT = REPO_ROOT / "runs" / "demo" / "checkpoint"


class InspectError(ValueError):
    """A shard directory, row or checkpoint cannot be inspected as asked (names what and where)."""


class RowInconsistencyError(InspectError):
    """A shard row's token columns disagree with each other, with its action chunk, or with the prompt builder."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One frame of a shard: its row as `schema.read_rows` decodes it (images still encoded: JPEG by default, PNG if
    the manifest says so; actions [horizon, dim]), with typed views of its columns."""

    shard: Path
    split: str
    columns: schema.Row

    def replace(self, **columns: Any) -> Row:
        """The same row with some columns replaced (to show what a damaged row looks like)."""
        return dataclasses.replace(self, columns={**self.columns, **columns})

    @property
    def episode_index(self) -> int:
        return int(self.columns[schema.EPISODE_INDEX])

    @property
    def frame_index(self) -> int:
        return int(self.columns[schema.FRAME_INDEX])

    @property
    def index(self) -> int:
        return int(self.columns[schema.INDEX])

    @property
    def task(self) -> str:
        return str(self.columns[schema.TASK])

    @property
    def images(self) -> dict[str, bytes]:
        """Camera -> encoded image, in image-token order."""
        return {cam: bytes(v) for name, v in self.columns.items() if (cam := schema.camera_of(name)) is not None}

    @property
    def state(self) -> Float[np.ndarray, " s"]:
        return self.columns[schema.STATE]

    @property
    def actions(self) -> Float[np.ndarray, "h d"]:
        return self.columns[schema.ACTIONS]

    @property
    def action_is_pad(self) -> Bool[np.ndarray, " h"]:
        return self.columns[schema.ACTION_IS_PAD]

    @property
    def tokenized_prompt(self) -> Int[np.ndarray, " l"]:
        return self.columns[schema.TOKENIZED_PROMPT]

    @property
    def tokenized_prompt_mask(self) -> Bool[np.ndarray, " l"]:
        return self.columns[schema.TOKENIZED_PROMPT_MASK]

    @property
    def token_ar_mask(self) -> Bool[np.ndarray, " l"]:
        return self.columns[schema.TOKEN_AR_MASK]

    @property
    def token_loss_mask(self) -> Bool[np.ndarray, " l"]:
        return self.columns[schema.TOKEN_LOSS_MASK]

    @property
    def text_prompt(self) -> Int[np.ndarray, " t"]:
        return self.columns[schema.TEXT_PROMPT]

    @property
    def text_prompt_mask(self) -> Bool[np.ndarray, " t"]:
        return self.columns[schema.TEXT_PROMPT_MASK]

    @property
    def where(self) -> str:
        return f"episode {self.episode_index} frame {self.frame_index} (index {self.index}, {self.shard.name})"

    def decoded_images(self) -> dict[str, UInt8[np.ndarray, "s s 3"]]:
        return {cam: decode_image(b) for cam, b in self.images.items()}

    def as_batch(self) -> dict[str, np.ndarray]:
        """The row as a batch of one in shard-column layout, images decoded (what `Observation.from_batch` reads)."""
        return schema.model_batch([self.columns])


# ----------------------------------------------------------------------------------------------------------------
# Opening shards and finding rows


def open_shards(path: str | os.PathLike) -> DataArtifacts:
    """Opens a preprocessing output directory (manifest, norm stats, both tokenizers)."""
    root = Path(path)
    if not (root / MANIFEST_FILE).is_file():
        raise InspectError(f"{root}: not a shard directory (no manifest.json); run pipelines.preprocess first")
    try:
        return DataArtifacts.open(root)
    except ManifestError as e:
        raise InspectError(str(e)) from None


def load_row(
    shards: DataArtifacts, *, episode: int | None = None, frame: int | None = None, index: int | None = None
) -> Row:
    """One shard row, by (episode, frame) or by the dataset-global `index`; with neither, the first row.

    `episode` alone picks that episode's first frame.
    """
    if index is not None and (episode is not None or frame is not None):
        raise InspectError("give either --index or --episode/--frame, not both")
    if frame is not None and episode is None:
        raise InspectError(f"frame {frame} given without an episode")
    for entry in shards.manifest.shards:
        path = shards.root / entry.path
        if episode is not None and episode not in entry.episodes:
            continue
        keys = schema.read_rows(path, list(schema.KEY_COLUMNS))
        if index is not None:
            hits = np.flatnonzero(keys[schema.INDEX] == index)
        elif episode is not None:
            in_episode = keys[schema.EPISODE_INDEX] == episode
            if not in_episode.any():
                continue
            if frame is None:
                frame_here = keys[schema.FRAME_INDEX][in_episode].min()
                hits = np.flatnonzero(in_episode & (keys[schema.FRAME_INDEX] == frame_here))
            else:
                hits = np.flatnonzero(in_episode & (keys[schema.FRAME_INDEX] == frame))
                if not len(hits):
                    frames = keys[schema.FRAME_INDEX][in_episode]
                    raise InspectError(
                        f"{shards.root}: episode {episode} has no frame {frame} "
                        f"(frames {frames.min()}..{frames.max()} in {entry.path})"
                    )
        else:
            hits = np.array([0]) if len(keys[schema.INDEX]) else np.array([], dtype=int)
        if len(hits):
            wanted = int(keys[schema.INDEX][hits[0]])
            cols = schema.read_rows(path, filters=[(schema.INDEX, "=", wanted)])
            return Row(path, entry.split, schema.row_at(cols, 0))
    what = f"index {index}" if index is not None else f"episode {episode}" if episode is not None else "any row"
    raise InspectError(f"{shards.root}: no shard holds {what}")


# ----------------------------------------------------------------------------------------------------------------
# The aligned token table


@dataclasses.dataclass(frozen=True)
class TokenRecord:
    """One position of a row's token columns, `tokenized_prompt` and `text_prompt` side by side."""

    position: int
    segment: str  # "prefix" (text prompt, bidirectional), "postfix" (Action: FAST | EOS, causal) or "pad"
    kind: str  # "text", "fast" or "pad"
    token_id: int
    piece: str  # the text piece, or "FAST#<fast_id>" for a FAST id
    fast_id: int | None
    text_id: int | None  # None past max_text_len
    text_piece: str | None
    tokenized_prompt_mask: bool
    token_ar_mask: bool
    token_loss_mask: bool
    text_prompt_mask: bool | None


def postfix_of(row: Row) -> Int[np.ndarray, " k"]:
    """The row's postfix: the real tokens of `tokenized_prompt` after the text prompt."""
    return row.tokenized_prompt[row.tokenized_prompt_mask & row.token_ar_mask]


def segment_of(mask: bool, ar: bool) -> str:
    return "pad" if not mask else "postfix" if ar else "prefix"


def token_table(shards: DataArtifacts, row: Row) -> list[TokenRecord]:
    """One record per position 0..max_token_len-1 of the row's token columns."""
    text = shards.prompt.text
    records = []
    for p in range(len(row.tokenized_prompt)):
        tid = int(row.tokenized_prompt[p])
        mask, ar = bool(row.tokenized_prompt_mask[p]), bool(row.token_ar_mask[p])
        segment = segment_of(mask, ar)
        # Only postfix ids can be FAST: with PaliGemma the FAST range overlaps rare text ids.
        fast = segment == "postfix" and bool(shards.prompt.is_fast(tid))
        fast_id = int(shards.prompt.model_to_fast(tid)) if fast else None
        in_text = p < len(row.text_prompt)
        text_id = int(row.text_prompt[p]) if in_text else None
        records.append(
            TokenRecord(
                position=p,
                segment=segment,
                kind="pad" if segment == "pad" else "fast" if fast else "text",
                token_id=tid,
                piece=f"FAST#{fast_id}" if fast else text.id_to_piece(tid),
                fast_id=fast_id,
                text_id=text_id,
                text_piece=text.id_to_piece(text_id) if in_text else None,
                tokenized_prompt_mask=mask,
                token_ar_mask=ar,
                token_loss_mask=bool(row.token_loss_mask[p]),
                text_prompt_mask=bool(row.text_prompt_mask[p]) if in_text else None,
            )
        )
    return records


def token_table_frame(records: list[TokenRecord]):
    """The token table as a pandas DataFrame indexed by position (for the notebook)."""
    import pandas as pd

    frame = pd.DataFrame([dataclasses.asdict(r) for r in records]).set_index("position")
    for col in ("fast_id", "text_id"):
        frame[col] = frame[col].astype("Int64")
    return frame


def decoded_segments(shards: DataArtifacts, row: Row) -> dict[str, str]:
    """The row's prompt as text: prefix, the text around the FAST ids in the postfix, and text_prompt."""
    text = shards.prompt.text
    prefix = row.tokenized_prompt[row.tokenized_prompt_mask & ~row.token_ar_mask]
    postfix = postfix_of(row)
    fast = shards.prompt.is_fast(postfix)
    first_fast = int(np.argmax(fast)) if fast.any() else len(postfix)
    last_fast = len(postfix) - int(np.argmax(fast[::-1])) if fast.any() else len(postfix)

    def readable(ids: list[int]) -> str:
        # A damaged row may hold ids the text tokenizer does not have (FAST ids in the prefix): shown, not decoded.
        out, run = [], []
        for i in ids:
            if 0 <= i < text.vocab_size:
                run.append(i)
            else:
                out += [text.decode(run), f"<id {i}>"]
                run = []
        return "".join(out + [text.decode(run)])

    return {
        "prefix": readable(prefix.tolist()),
        "text_prompt": readable(row.text_prompt[row.text_prompt_mask].tolist()),
        "postfix_head": readable(postfix[:first_fast].tolist()),
        "postfix_tail": readable([i for i in postfix[last_fast:].tolist() if i != text.eos_id]),
        "postfix_ends_with_eos": bool(len(postfix) and postfix[-1] == text.eos_id),
    }


# ----------------------------------------------------------------------------------------------------------------
# FAST postfix back to actions


@dataclasses.dataclass(frozen=True)
class FastDecode:
    """The row's FAST postfix decoded next to the stored chunk, in normalized and in original units."""

    fast_ids: list[int]
    decoded: Float[np.ndarray, "h d"]  # normalized
    stored: Float[np.ndarray, "h d"]  # normalized
    decoded_actions: Float[np.ndarray, "h d"]  # unnormalized
    stored_actions: Float[np.ndarray, "h d"]  # unnormalized
    action_is_pad: Bool[np.ndarray, "h"]
    bound: float  # the largest normalized error rounding the DCT coefficients can cause

    @property
    def max_error(self) -> float:
        return float(np.abs(self.decoded - self.stored).max())

    @property
    def max_action_error(self) -> Float[np.ndarray, "d"]:
        return np.abs(self.decoded_actions - self.stored_actions).max(axis=0)


def fast_quantization_bound(horizon: int, scale: float) -> float:
    """Worst-case error per normalized action value from rounding `scale * DCT` to integers.

    Each coefficient is off by at most 0.5/scale; the inverse orthonormal DCT spreads that over time with
    weights B[t, k], so a value is off by at most 0.5/scale * max_t sum_k |B[t, k]|.
    """
    inverse = scipy.fft.idct(np.eye(horizon), axis=0, norm="ortho")
    return float(0.5 / scale * np.abs(inverse).sum(axis=1).max())


def decode_fast_postfix(shards: DataArtifacts, row: Row) -> FastDecode:
    """The row's postfix read back into a chunk (`PromptBuilder.read_postfix`, as evaluation reads a sampled one),
    against the stored chunk; raises FastDecodeError saying why when there is no chunk."""
    m = shards.manifest
    reading = shards.prompt.read_postfix(postfix_of(row), m.action_horizon, m.action_dim)
    if reading.error is not None:
        raise FastDecodeError(reading.error)
    decoded = np.asarray(reading.actions, dtype=np.float32)
    return FastDecode(
        fast_ids=reading.fast_ids,
        decoded=decoded,
        stored=row.actions,
        decoded_actions=shards.unnormalize_actions(decoded),
        stored_actions=shards.unnormalize_actions(row.actions),
        action_is_pad=row.action_is_pad,
        bound=fast_quantization_bound(shards.manifest.action_horizon, float(shards.prompt.fast.scale)),
    )


# ----------------------------------------------------------------------------------------------------------------
# Consistency of one row


def _is_leading_run(mask: Bool[np.ndarray, "l"]) -> bool:
    """True for masks of the form 1…1 0…0."""
    n = int(mask.sum())
    return bool(mask[:n].all())


def row_problems(shards: DataArtifacts, row: Row) -> list[str]:
    """Everything wrong with a row's token columns, empty when the row is consistent.

    Checks the mask layout, text_prompt == tokenized_prompt on the prefix (docs/DESIGN.md §3), the postfix layout
    of its layout ([`Action: `] FAST… `|` EOS), the loss mask, the FAST decode against the stored chunk, and that the
    prompt builder on the row's own task/state/actions gives the very same columns.
    """
    problems: list[str] = []
    m, ar, loss = row.tokenized_prompt_mask, row.token_ar_mask, row.token_loss_mask
    tmask = row.text_prompt_mask
    if len(row.tokenized_prompt) != shards.manifest.max_token_len:
        problems.append(f"tokenized_prompt has {len(row.tokenized_prompt)} positions, manifest says {shards.manifest.max_token_len}")
    if len(row.text_prompt) != shards.manifest.max_text_len:
        problems.append(f"text_prompt has {len(row.text_prompt)} positions, manifest says {shards.manifest.max_text_len}")
    if not _is_leading_run(m):
        problems.append("tokenized_prompt_mask is not a run of real tokens followed by padding")
    if not _is_leading_run(tmask):
        problems.append("text_prompt_mask is not a run of real tokens followed by padding")
    if (ar & ~m).any():
        problems.append(f"token_ar_mask set on padding at positions {np.flatnonzero(ar & ~m).tolist()}")
    if (loss & ~(ar & m)).any():
        problems.append(f"token_loss_mask set outside the postfix at positions {np.flatnonzero(loss & ~(ar & m)).tolist()}")
    real_ar = ar[m]
    if real_ar.any() and not real_ar[int(np.argmax(real_ar)) :].all():
        problems.append("token_ar_mask is not 0 on the prefix then 1 on the postfix")
    pad_id = shards.prompt.text.pad_id
    if (row.tokenized_prompt[~m] != pad_id).any():
        problems.append(f"tokenized_prompt padding holds ids other than pad ({pad_id})")
    n_prefix, n_text = int((m & ~ar).sum()), int(tmask.sum())
    if n_text != n_prefix:
        problems.append(f"text_prompt has {n_text} real tokens but the tokenized_prompt prefix has {n_prefix}")
    n = min(n_text, n_prefix)
    if not np.array_equal(row.text_prompt[:n], row.tokenized_prompt[:n]):
        first = int(np.flatnonzero(row.text_prompt[:n] != row.tokenized_prompt[:n])[0])
        problems.append(f"text_prompt and tokenized_prompt differ at position {first} of the prefix")

    text = decoded_segments(shards, row)
    if not text["prefix"].startswith("Task: ") or "State: " not in text["prefix"]:
        problems.append(f"prefix does not read 'Task: …, State: …': {text['prefix']!r}")
    postfix = row.tokenized_prompt[m & ar]
    start, end = shards.prompt.start_ids, shards.prompt.end_ids
    if shards.manifest.prompt_layout == "pi05" and not text["prefix"].endswith(ACTION_PREFIX):
        problems.append(f"prefix does not end with {ACTION_PREFIX!r} (layout pi05): {text['prefix']!r}")
    if tuple(postfix[: len(start)].tolist()) != start:
        problems.append(f"postfix does not start with {ACTION_PREFIX!r} (layout fast): {text['postfix_head']!r}")
    if tuple(postfix[len(postfix) - len(end) :].tolist()) != end:
        problems.append(f"postfix does not end with '|' EOS: {text['postfix_tail']!r}")
    if (~loss[m & ar][shards.prompt.is_fast(postfix)]).any():
        problems.append("some FAST tokens of the postfix are not loss targets")

    try:
        dec = decode_fast_postfix(shards, row)
        if dec.max_error > dec.bound + 1e-4:
            problems.append(
                f"FAST postfix decodes to a chunk {dec.max_error:.4f} away from the stored one (normalized), "
                f"more than rounding allows ({dec.bound:.4f}); were actions clipped at encode?"
            )
    except ValueError as err:  # FastDecodeError: not exactly horizon x dim coefficients, or unknown ids
        problems.append(f"FAST postfix does not decode: {err}")

    try:
        rebuilt = rebuild_prompt(shards, row)
    except ValueError as err:  # PromptTooLongError, a FAST chunk that cannot be encoded
        return problems + [f"the prompt builder fails on the row's own task/state/actions: {err}"]
    for name, column in rebuilt.columns().items():
        if not np.array_equal(column, row.columns[name]):
            problems.append(f"{name} differs from the prompt builder on the row's own task/state/actions")
    return problems


def rebuild_prompt(shards: DataArtifacts, row: Row, *, with_actions: bool = True) -> PromptTokens:
    """The shard directory's prompt builder on the row's task, state and (optionally) actions."""
    return shards.prompt.build(row.task, row.state, row.actions if with_actions else None)


def check_row_consistency(shards: DataArtifacts, row: Row) -> None:
    """Raises RowInconsistencyError listing every problem of `row_problems`; silent on a consistent row."""
    problems = row_problems(shards, row)
    if problems:
        raise RowInconsistencyError(f"{shards.root}, {row.where}:\n  - " + "\n  - ".join(problems))


# ----------------------------------------------------------------------------------------------------------------
# Dataset-wide token counts


@dataclasses.dataclass(frozen=True)
class DatasetTokenStats:
    """Per-row token counts over every shard of a directory."""

    split: np.ndarray  # object[n]
    episode_index: Int[np.ndarray, "n"]
    frame_index: Int[np.ndarray, "n"]
    index: Int[np.ndarray, "n"]
    prompt_length: Int[np.ndarray, "n"]  # real tokens of tokenized_prompt
    text_length: Int[np.ndarray, "n"]  # real tokens of text_prompt
    fast_tokens: Int[np.ndarray, "n"]  # FAST ids per action chunk
    max_token_len: int
    max_text_len: int

    @property
    def rows(self) -> int:
        return len(self.index)

    def near_limit(self, fraction: float = 0.9, top: int = 10) -> list[dict[str, Any]]:
        """The longest rows whose tokenized prompt fills at least `fraction` of max_token_len, longest first."""
        close = np.flatnonzero(self.prompt_length >= fraction * self.max_token_len)
        close = close[np.argsort(-self.prompt_length[close], kind="stable")][:top]
        return [
            {
                "split": str(self.split[i]),
                "episode_index": int(self.episode_index[i]),
                "frame_index": int(self.frame_index[i]),
                "index": int(self.index[i]),
                "prompt_length": int(self.prompt_length[i]),
                "fast_tokens": int(self.fast_tokens[i]),
                "free": int(self.max_token_len - self.prompt_length[i]),
            }
            for i in close
        ]

    def summary(self) -> dict[str, Any]:
        def spread(x: np.ndarray) -> dict[str, float]:
            return {"min": int(x.min()), "mean": round(float(x.mean()), 2), "max": int(x.max())}

        return {
            "rows": self.rows,
            "fast_tokens": spread(self.fast_tokens),
            "prompt_length": spread(self.prompt_length),
            "text_length": spread(self.text_length),
            "max_token_len": self.max_token_len,
            "max_text_len": self.max_text_len,
            "max_fill": round(float(self.prompt_length.max() / self.max_token_len), 3),
        }


def dataset_token_stats(shards: DataArtifacts, *, progress: bool = True) -> DatasetTokenStats:
    """Reads only the token columns of every shard (no images) and counts tokens per row."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in DatasetTokenStats.__dataclass_fields__ if "max_" not in k}
    names = [*schema.KEY_COLUMNS, schema.TOKENIZED_PROMPT, schema.TOKENIZED_PROMPT_MASK, schema.TOKEN_AR_MASK,
             schema.TEXT_PROMPT_MASK]
    for entry in tqdm(shards.manifest.shards, desc="token stats", unit="shard", disable=not progress):
        cols = schema.read_rows(shards.root / entry.path, names)
        postfix = cols[schema.TOKENIZED_PROMPT_MASK] & cols[schema.TOKEN_AR_MASK]
        parts["split"].append(np.full(len(cols[schema.INDEX]), entry.split, dtype=object))
        for key in schema.KEY_COLUMNS:
            parts[key].append(cols[key])
        parts["prompt_length"].append(cols[schema.TOKENIZED_PROMPT_MASK].sum(axis=1))
        parts["text_length"].append(cols[schema.TEXT_PROMPT_MASK].sum(axis=1))
        parts["fast_tokens"].append((postfix & shards.prompt.is_fast(cols[schema.TOKENIZED_PROMPT])).sum(axis=1))
    if not parts["index"]:
        raise InspectError(f"{shards.root}: the manifest lists no shards")
    return DatasetTokenStats(
        **{k: np.concatenate(v) for k, v in parts.items()},
        max_token_len=shards.manifest.max_token_len,
        max_text_len=shards.manifest.max_text_len,
    )


def check_token_stats(stats: DatasetTokenStats) -> None:
    """Raises InspectError if any row overflows its limits or has no FAST tokens (preprocess must never write one)."""
    problems = []
    over = np.flatnonzero(stats.prompt_length > stats.max_token_len)
    if len(over):
        problems.append(f"{len(over)} rows longer than max_token_len {stats.max_token_len}")
    over_text = np.flatnonzero(stats.text_length > stats.max_text_len)
    if len(over_text):
        problems.append(f"{len(over_text)} rows with text_prompt longer than max_text_len {stats.max_text_len}")
    empty = np.flatnonzero(stats.fast_tokens == 0)
    if len(empty):
        i = empty[0]
        problems.append(
            f"{len(empty)} rows without FAST tokens (first: episode {stats.episode_index[i]} frame {stats.frame_index[i]})"
        )
    if problems:
        raise InspectError("; ".join(problems))


# ----------------------------------------------------------------------------------------------------------------
# Where the notebook looks


def notebook_paths(env: Mapping[str, str] | None = None) -> tuple[Path, Path | None]:
    """Shard directory and checkpoint for the notebook.

    Shards: $KI_SHARDS, else the demo's runs/demo/shards. Checkpoint: $KI_CHECKPOINT (set but empty: none),
    else runs/demo/checkpoint when it exists. Relative paths are taken from the repository root.
    """
    env = os.environ if env is None else env

    def resolve(p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else REPO_ROOT / path

    shards = resolve(env["KI_SHARDS"]) if env.get("KI_SHARDS") else DEMO_SHARDS
    if "KI_CHECKPOINT" in env:
        checkpoint = resolve(env["KI_CHECKPOINT"]) if env["KI_CHECKPOINT"] else None
    else:
        checkpoint = DEMO_CHECKPOINT if DEMO_CHECKPOINT.exists() else None
    return shards, checkpoint


def row_summary(shards: DataArtifacts, row: Row) -> dict[str, Any]:
    """A few facts about a row for headers: where it is, its task, lengths against the limits."""
    m = row.tokenized_prompt_mask
    return {
        "dataset": shards.manifest.source.get("repo_id"),
        "split": row.split,
        "episode": row.episode_index,
        "frame": row.frame_index,
        "index": row.index,
        "task": row.task,
        "prompt_length": int(m.sum()),
        "max_token_len": shards.manifest.max_token_len,
        "text_length": int(row.text_prompt_mask.sum()),
        "max_text_len": shards.manifest.max_text_len,
        "fast_tokens": int(shards.prompt.is_fast(postfix_of(row)).sum()),
        "padded_steps": int(row.action_is_pad.sum()),
    }


def to_json(obj: Any) -> str:
    """JSON for summaries holding numpy scalars."""
    return json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
