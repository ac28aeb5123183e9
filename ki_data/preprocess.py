"""LeRobot dataset -> token shards (DESIGN §3-4): the library behind `python -m pipelines.preprocess`.

Pass 1 (tabular columns only, every selected episode): row checks, normalization statistics, the offline text
tokenizer (unless one is given) and the FAST tokenizer (unless one is given) fitted on every row's normalized
chunk. Pass 2 (episode by episode, in worker processes over whole shards): columns read in bulk, each camera
decoded once sequentially, chunks cut with numpy, prompts built, images resized/padded and PNG-encoded, one
parquet shard written atomically per planned group of episodes.

Determinism: the shard plan (which episodes go to which file) depends only on the inputs and options, never on
the worker count, and each shard is written by one worker from the same code, so shards have the same bytes
whatever `workers` is. A killed run leaves finished shards with a sidecar (rows, sha256, options fingerprint) in
`<out>/.ki_progress/`; the next run reuses those whose file still hashes to the sidecar and redoes the rest.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Bool, Float, Int

from ki_data import schema
from ki_data.fast_tokenizer import FastTokenizer, dct_coefficients
from ki_data.images import encode_image, resize_with_pad
from ki_data.lerobot_source import (
    ACTION_KEY,
    STATE_KEY,
    DatasetSpec,
    EpisodeColumns,
    EpisodeReader,
    ensure_local,
    open_lerobot_dataset,
)
from ki_data.normalize import NormStats, compute_stats, load_norm_stats, normalize, save_norm_stats, unnormalize
from ki_data.prompt import (
    PromptTokens,
    PromptTooLongError,
    build_prompt,
    format_text_prompt,
    model_to_fast_ids,
    model_vocab_size,
    postfix_pieces,
)
from ki_data.shard_writer import atomic_copy, atomic_write_json, remove_temp_files, sha256_file, write_parquet_atomic
from ki_data.text_tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

PROGRESS_DIR = ".ki_progress"
STATE_FILE = "state.json"
# PaliGemma's tokenizer: FAST ids overlay the top of its vocabulary, skipping its 128 special tokens (openpi).
PALIGEMMA_VOCAB_SIZE = 257152
PALIGEMMA_SKIP_TOKENS = 128
# Prompts the offline text tokenizer is trained on (evenly spaced over all rows): plenty for a small vocabulary.
TEXT_TRAIN_MAX_TEXTS = 20_000
# Above this many chunks the FAST fit uses an even subsample plus the chunks holding each extreme coefficient,
# so its value range (what makes encoding lossless) still covers every row.
FAST_FIT_MAX_CHUNKS = 100_000

# Row problems, in the order a row with several is counted.
NO_TASK = "no_task"
STATE_DIM = "state_dim_mismatch"
ACTION_DIM = "action_dim_mismatch"
STATE_NONFINITE = "state_not_finite"
ACTION_NONFINITE = "action_not_finite"
PROMPT_TOO_LONG = "prompt_too_long"
REASONS = (NO_TASK, STATE_DIM, ACTION_DIM, STATE_NONFINITE, ACTION_NONFINITE, PROMPT_TOO_LONG)


class PreprocessError(Exception):
    """A problem the user can fix; the CLI prints its message as one line."""


class BadInputError(PreprocessError, ValueError):
    """A row the preprocessing refuses (names dataset, episode and frame); --skip-bad-rows skips and counts."""


class OutputExistsError(PreprocessError, FileExistsError):
    """The output directory holds a finished (or foreign) run and --overwrite was not given."""


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    repo_id: str
    root: str | None = None  # dataset directory; default $HF_LEROBOT_HOME/<repo_id> or the hub
    output: str | None = None  # default ./shards/<repo_id>
    action_horizon: int = 50
    max_token_len: int = 200
    max_text_len: int = 128
    image_size: int = 224
    text_tokenizer: str | None = None  # a SentencePiece .model (e.g. PaliGemma's); default: train one
    fast_tokenizer: str | None = None  # a FAST directory; default: fit one
    text_vocab_size: int = 1024
    text_split_digits: bool = False  # the offline text tokenizer writes numbers digit by digit (as PaliGemma's)
    fast_vocab_size: int = 1024
    fast_scale: float = 10.0
    cameras: tuple[str, ...] | None = None  # camera names or feature keys; default all
    episodes: tuple[int, ...] | None = None  # default all
    workers: int = 1  # processes for pass 2; 0 = one per CPU core (at most one per shard)
    val_fraction: float = 0.1
    seed: int = 0
    shard_rows: int = 1000  # target rows per shard (a shard holds whole episodes)
    norm_mode: str = "quantile"
    skip_bad_rows: bool = False
    overwrite: bool = False
    progress: bool = True

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("shards") / self.repo_id

    def options(self) -> dict[str, Any]:
        """The options as recorded in the manifest."""
        out = dataclasses.asdict(self)
        out.pop("progress")
        for k in ("cameras", "episodes"):
            out[k] = None if out[k] is None else list(out[k])
        return out

    def validate(self) -> None:
        checks = [
            (self.action_horizon >= 1, f"action_horizon must be >= 1, got {self.action_horizon}"),
            (self.max_token_len >= 2, f"max_token_len must be >= 2, got {self.max_token_len}"),
            (self.max_text_len >= 2, f"max_text_len must be >= 2, got {self.max_text_len}"),
            (self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}"),
            (self.workers >= 0, f"workers must be >= 0 (0: one per CPU core), got {self.workers}"),
            (0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.shard_rows >= 1, f"shard_rows must be >= 1, got {self.shard_rows}"),
            (self.norm_mode in ("quantile", "zscore"), f"norm_mode must be quantile or zscore, got {self.norm_mode}"),
        ]
        for ok, message in checks:
            if not ok:
                raise PreprocessError(message)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    path: str  # relative to the output directory
    split: str
    episodes: tuple[int, ...]
    frames: int  # before rejected rows


@dataclasses.dataclass
class ShardResult:
    path: str
    split: str
    episodes: list[int]
    rows: int
    sha256: str
    bytes: int
    frames: int
    rejected: dict[str, int]
    fast_tokens: list[int]  # [sum, max, count] over the shard's rows
    prompt_tokens: list[int]  # [sum, max, count]
    fast_clipped: int
    reused: bool = False

    def manifest_entry(self) -> dict:
        return {"path": self.path, "split": self.split, "rows": self.rows, "sha256": self.sha256,
                "bytes": self.bytes, "episodes": self.episodes}


# ------------------------------------------------------------------------------------------------ row checks


@dataclasses.dataclass
class RowProblems:
    """Per-row reason codes (index into REASONS, -1 = fine) and, per reason, where it first comes from."""

    codes: Int[np.ndarray, " n"]
    first: dict[str, tuple[int, str]]  # reason -> (frame_index of the source row, detail)

    @property
    def ok(self) -> Bool[np.ndarray, " n"]:
        return self.codes < 0

    def counts(self) -> dict[str, int]:
        c = collections.Counter(REASONS[i] for i in self.codes if i >= 0)
        return dict(sorted(c.items()))


def _chunk_reach(bad: Bool[np.ndarray, " n"], horizon: int) -> Bool[np.ndarray, " n"]:
    """Rows whose action chunk (t .. t+H-1, clamped to the episode) contains a bad action row."""
    n = len(bad)
    out = np.zeros(n, bool)
    for r in np.flatnonzero(bad):
        out[max(0, r - horizon + 1) : r + 1] = True
    return out


def find_row_problems(cols: EpisodeColumns, spec: DatasetSpec, horizon: int) -> RowProblems:
    """Which rows of an episode cannot become a training row, and why (DESIGN: never silently)."""
    n = len(cols)
    codes = np.full(n, -1, np.int64)
    first: dict[str, tuple[int, str]] = {}

    def mark(reason: str, rows: Bool[np.ndarray, " n"], source: Bool[np.ndarray, " n"], detail: Callable[[int], str]):
        if not rows.any():
            return
        src = int(np.flatnonzero(source)[0])
        first.setdefault(reason, (int(cols.frame_index[src]), detail(src)))
        fresh = rows & (codes < 0)
        codes[fresh] = REASONS.index(reason)

    no_task = np.array([t not in spec.tasks or not spec.tasks[t].strip() for t in cols.task_index.tolist()], bool)
    mark(NO_TASK, no_task, no_task,
         lambda r: f"has no task (task_index {cols.task_index[r]} is not in meta/tasks.parquet)"
         if cols.task_index[r] >= 0 else "has no task (task_index is null)")
    bad = cols.state_lengths != spec.state_dim
    mark(STATE_DIM, bad, bad,
         lambda r: f"{STATE_KEY} has {cols.state_lengths[r]} values but the metadata says {spec.state_dim}")
    bad = cols.action_lengths != spec.action_dim
    mark(ACTION_DIM, _chunk_reach(bad, horizon), bad,
         lambda r: f"{ACTION_KEY} has {cols.action_lengths[r]} values but the metadata says {spec.action_dim}")
    bad = (cols.state_lengths == spec.state_dim) & ~np.isfinite(cols.state).all(axis=1)
    mark(STATE_NONFINITE, bad, bad, lambda r: f"{STATE_KEY} is not finite: {cols.state[r].tolist()}")
    bad = (cols.action_lengths == spec.action_dim) & ~np.isfinite(cols.actions).all(axis=1)
    mark(ACTION_NONFINITE, _chunk_reach(bad, horizon), bad,
         lambda r: f"{ACTION_KEY} is not finite: {cols.actions[r].tolist()}")
    return RowProblems(codes=codes, first=first)


def _bad_input(spec: DatasetSpec, episode: int, frame: int, detail: str) -> BadInputError:
    return BadInputError(
        f"LeRobot dataset '{spec.repo_id}', episode {episode}, frame {frame}: {detail}; "
        f"pass --skip-bad-rows to skip and count such rows instead"
    )


def raise_first_problem(spec: DatasetSpec, cols: EpisodeColumns, problems: RowProblems) -> None:
    if not problems.first:
        return
    frame, detail = min(problems.first.values())
    raise _bad_input(spec, cols.episode_index, frame, detail)


# ------------------------------------------------------------------------------------------------ chunks


def chunk_indices(length: int, horizon: int) -> tuple[Int[np.ndarray, "n h"], Bool[np.ndarray, "n h"]]:
    """For every frame t: indices t..t+H-1 clamped to the last frame (the last action repeats), and the pad mask."""
    steps = np.arange(length)[:, None] + np.arange(horizon)[None, :]
    return np.minimum(steps, length - 1), steps >= length


def action_chunks(
    actions: Float[np.ndarray, "n d"], horizon: int
) -> tuple[Float[np.ndarray, "n h d"], Bool[np.ndarray, "n h"]]:
    """Chunk t = actions[t .. t+H-1] inside the episode, padded with the last action; and the pad mask."""
    idx, is_pad = chunk_indices(len(actions), horizon)
    return actions[idx], is_pad


# ------------------------------------------------------------------------------------------------ planning


def select_episodes(spec: DatasetSpec, wanted: tuple[int, ...] | None) -> list[int]:
    available = [e.index for e in spec.episodes]
    if not available:
        raise PreprocessError(f"LeRobot dataset '{spec.repo_id}' has no episodes")
    if wanted is None:
        return available
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise PreprocessError(
            f"LeRobot dataset '{spec.repo_id}' has no episode {missing[0]} (it has {len(available)} episodes: "
            f"{available[0]}..{available[-1]})"
        )
    return sorted(set(wanted))


def select_cameras(spec: DatasetSpec, wanted: tuple[str, ...] | None) -> dict[str, str]:
    """Camera name -> feature key, in the requested (or the dataset's) order."""
    by_name = {schema.camera_name(k): k for k in spec.cameras}
    if wanted is None:
        return by_name
    out = {}
    for w in wanted:
        key = w if w in spec.cameras else by_name.get(w)
        if key is None:
            raise PreprocessError(
                f"LeRobot dataset '{spec.repo_id}' has no camera '{w}' (cameras: {', '.join(by_name) or 'none'})"
            )
        out[schema.camera_name(key)] = key
    return out


def split_episodes(episodes: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Whole episodes to train / val: round(fraction * n) val episodes, at least one when there are several."""
    n = len(episodes)
    if n < 2 or val_fraction <= 0:
        return list(episodes), []
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    order = np.random.default_rng(seed).permutation(n)
    val = sorted(episodes[i] for i in order[:n_val])
    held_out = set(val)
    return [e for e in episodes if e not in held_out], val


def plan_shards(spec: DatasetSpec, splits: dict[str, list[int]], shard_rows: int) -> list[ShardPlan]:
    """Consecutive episodes of a split grouped until a shard reaches `shard_rows` frames."""
    plans = []
    for split in schema.SPLITS:
        group, frames, number = [], 0, 0
        for ep in splits.get(split, []):
            group.append(ep)
            frames += spec.episode(ep).length
            if frames >= shard_rows:
                plans.append(ShardPlan(schema.shard_file(split, number), split, tuple(group), frames))
                group, frames, number = [], 0, number + 1
        if group:
            plans.append(ShardPlan(schema.shard_file(split, number), split, tuple(group), frames))
    return plans


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ pass 1


@dataclasses.dataclass
class Pass1Result:
    stats: dict[str, NormStats]
    rejected: dict[str, int]
    frames: int


def _dir_sha(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _subsample(n: int, k: int) -> Int[np.ndarray, " k"]:
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64)) if n > k else np.arange(n)


class FitChunkCollector:
    """The chunks the FAST tokenizer is fitted on, gathered episode by episode without holding them all.

    Up to `limit` chunks: all of them. Beyond: an even subsample plus, for every coefficient position, the chunks
    holding its smallest and largest value, so the fitted value range (what makes encoding lossless) still covers
    every row.
    """

    def __init__(self, total: int, scale: float, limit: int = FAST_FIT_MAX_CHUNKS):
        self.total, self.scale, self.limit = total, scale, limit
        self.pick = _subsample(total, limit)
        self.parts: list[np.ndarray] = []
        self.offset = 0
        self.lo = self.hi = None  # (values [p], chunks [p, h, d]) per coefficient position

    def add(self, chunks: Float[np.ndarray, "n h d"]) -> None:
        n = len(chunks)
        lo, hi = np.searchsorted(self.pick, [self.offset, self.offset + n])
        self.parts.append(chunks[self.pick[lo:hi] - self.offset])
        self.offset += n
        if self.total <= self.limit or n == 0:
            return
        coef = dct_coefficients(chunks, self.scale).reshape(n, -1)
        for attr, arg, better in (("lo", coef.argmin(0), np.less), ("hi", coef.argmax(0), np.greater)):
            values = coef[arg, np.arange(coef.shape[1])]
            best = getattr(self, attr)
            if best is None:
                setattr(self, attr, (values, chunks[arg]))
            else:
                take = better(values, best[0])
                merged = np.where(take[:, None, None], chunks[arg], best[1])
                setattr(self, attr, (np.where(take, values, best[0]), merged))

    def chunks(self) -> Float[np.ndarray, "m h d"]:
        extremes = [] if self.lo is None else [self.lo[1], self.hi[1]]
        return np.concatenate(self.parts + extremes)


def run_pass1(
    cfg: PreprocessConfig, spec: DatasetSpec, episodes: list[int], out: Path
) -> Pass1Result:
    """Statistics and tokenizers from the tabular columns of every selected episode; writes them into `out`."""
    from tqdm import tqdm

    reader = EpisodeReader(spec)
    kept: list[tuple[EpisodeColumns, Bool[np.ndarray, " n"]]] = []
    rejected: collections.Counter = collections.Counter()
    frames = 0
    for ep in tqdm(episodes, desc="pass 1/2 (tabular)", unit="ep", disable=not cfg.progress):
        cols = reader.read_episode(ep)
        frames += len(cols)
        problems = find_row_problems(cols, spec, cfg.action_horizon)
        if not cfg.skip_bad_rows:
            raise_first_problem(spec, cols, problems)
        rejected.update(problems.counts())
        kept.append((cols, problems.ok))
    reader.close()
    if not any(ok.any() for _, ok in kept):
        raise BadInputError(
            f"LeRobot dataset '{spec.repo_id}': no usable rows left after the checks ({dict(rejected)})"
        )

    # Statistics over every row whose own value is usable (a row may be dropped only for its chunk or task).
    states = np.concatenate([c.state[np.isfinite(c.state).all(1)] for c, _ in kept])
    actions = np.concatenate([c.actions[np.isfinite(c.actions).all(1)] for c, _ in kept])
    stats = {"state": compute_stats(states), "actions": compute_stats(actions)}
    save_norm_stats(out / schema.NORM_STATS_FILE, stats)

    # Normalized chunks and prompt texts of exactly the rows pass 2 will write (or an even sample of them).
    total = int(sum(ok.sum() for _, ok in kept))
    fit = FitChunkCollector(total, cfg.fast_scale)
    text_pick = _subsample(total, TEXT_TRAIN_MAX_TEXTS)
    corpus: list[str] = []
    offset = 0
    for cols, ok in kept:
        if not ok.any():
            continue
        norm_actions = normalize(np.nan_to_num(cols.actions), stats["actions"], cfg.norm_mode)
        fit.add(action_chunks(norm_actions, cfg.action_horizon)[0][ok])
        rows = np.flatnonzero(ok)
        lo, hi = np.searchsorted(text_pick, [offset, offset + len(rows)])
        for r in rows[text_pick[lo:hi] - offset]:
            state = normalize(cols.state[r], stats["state"], cfg.norm_mode)
            corpus.append(format_text_prompt(spec.tasks[int(cols.task_index[r])], state))
        offset += len(rows)

    text_dst = out / schema.TEXT_TOKENIZER_FILE
    if cfg.text_tokenizer:
        TextTokenizer.load(cfg.text_tokenizer)  # fail early on a bad file
        atomic_copy(cfg.text_tokenizer, text_dst)
    else:
        TextTokenizer.train(corpus, vocab_size=cfg.text_vocab_size, split_digits=cfg.text_split_digits).save(text_dst)

    fast_dst = out / schema.FAST_TOKENIZER_DIR
    if cfg.fast_tokenizer:
        fast = FastTokenizer.load(cfg.fast_tokenizer)
        if fast.action_dim is not None and fast.action_dim != spec.action_dim:
            raise PreprocessError(
                f"FAST tokenizer {cfg.fast_tokenizer} was fit on action dim {fast.action_dim}; dataset "
                f"'{spec.repo_id}' has {spec.action_dim}"
            )
    else:
        fast = FastTokenizer.fit(fit.chunks(), vocab_size=cfg.fast_vocab_size, scale=cfg.fast_scale)
    fast.save(fast_dst)
    return Pass1Result(stats=stats, rejected=dict(rejected), frames=frames)


def vocab_layout(text: TextTokenizer, fast: FastTokenizer, user_text: bool) -> tuple[int, int]:
    """(vocab_size, skip_tokens): PaliGemma's overlay convention for its tokenizer, else FAST above the text ids."""
    if user_text and text.vocab_size == PALIGEMMA_VOCAB_SIZE:
        return PALIGEMMA_VOCAB_SIZE, PALIGEMMA_SKIP_TOKENS
    return model_vocab_size(text, fast, 0), 0


# ------------------------------------------------------------------------------------------------ pass 2


@dataclasses.dataclass(frozen=True)
class Pass2Context:
    """Everything a worker needs, picklable (the tokenizers are loaded from the output directory)."""

    spec: DatasetSpec
    out: Path
    cameras: dict[str, str]  # name -> feature key
    layout: schema.ShardLayout
    image_size: int
    horizon: int
    norm_mode: str
    vocab_size: int
    skip_tokens: int
    skip_bad_rows: bool
    fingerprint: str


class _Worker:
    """Per-process state: readers and tokenizers, built once."""

    def __init__(self, ctx: Pass2Context):
        self.ctx = ctx
        self.reader = EpisodeReader(ctx.spec)
        self.text = TextTokenizer.load(ctx.out / schema.TEXT_TOKENIZER_FILE)
        self.fast = FastTokenizer.load(ctx.out / schema.FAST_TOKENIZER_DIR)
        self.stats = load_norm_stats(ctx.out / schema.NORM_STATS_FILE)

    def _prompts(self, cols: EpisodeColumns, ok: np.ndarray, codes: np.ndarray, state: np.ndarray,
                 chunks: np.ndarray) -> dict[int, PromptTokens]:
        """Prompt tokens of the usable rows; a too-long prompt is an error, or (skipping) marks its row bad."""
        ctx, spec = self.ctx, self.ctx.spec
        prompts = {}
        for r in np.flatnonzero(ok):
            try:
                prompts[int(r)] = build_prompt(
                    spec.tasks[int(cols.task_index[r])], state[r], chunks[r], text_tokenizer=self.text,
                    fast_tokenizer=self.fast, max_token_len=ctx.layout.max_token_len,
                    max_text_len=ctx.layout.max_text_len, vocab_size=ctx.vocab_size, skip_tokens=ctx.skip_tokens,
                )
            except PromptTooLongError as e:
                if not ctx.skip_bad_rows:
                    raise _bad_input(spec, cols.episode_index, int(cols.frame_index[r]),
                                     f"the {e.field} needs {e.length} tokens but the limit is {e.limit} "
                                     f"(raise --max-token-len / --max-text-len)") from None
                ok[r] = False
                codes[r] = REASONS.index(PROMPT_TOO_LONG)
        return prompts

    def _images(self, cols: EpisodeColumns, camera_key: str, ok: np.ndarray) -> list[bytes]:
        """Every frame decoded in order (sequential video decode); kept rows resized, padded and PNG-encoded."""
        images = []
        for k, frame in enumerate(self.reader.iter_frames(cols.episode_index, camera_key, cols.timestamp)):
            if ok[k]:
                images.append(encode_image(resize_with_pad(frame, self.ctx.image_size)))
        if len(images) != int(ok.sum()):
            raise BadInputError(
                f"LeRobot dataset '{self.ctx.spec.repo_id}', episode {cols.episode_index}: camera {camera_key} "
                f"has {len(images)} frames for {int(ok.sum())} rows"
            )
        return images

    def episode_columns(self, ep: int) -> tuple[dict[str, Any], collections.Counter, list[PromptTokens]]:
        """One episode's shard columns, its rejected rows by reason, and the prompts of its rows."""
        ctx, spec = self.ctx, self.ctx.spec
        cols = self.reader.read_episode(ep)
        problems = find_row_problems(cols, spec, ctx.horizon)
        if not ctx.skip_bad_rows:
            raise_first_problem(spec, cols, problems)
        ok, codes = problems.ok.copy(), problems.codes.copy()
        state = normalize(np.nan_to_num(cols.state), self.stats["state"], ctx.norm_mode)
        actions = normalize(np.nan_to_num(cols.actions), self.stats["actions"], ctx.norm_mode)
        chunks, is_pad = action_chunks(actions, ctx.horizon)
        prompts = self._prompts(cols, ok, codes, state, chunks)

        rows = np.flatnonzero(ok)
        out: dict[str, Any] = {}
        for name, key in ctx.cameras.items():
            out[schema.image_column(name)] = self._images(cols, key, ok)
            out[schema.image_mask_column(name)] = [True] * len(rows)
        out[schema.EPISODE_INDEX] = np.full(len(rows), ep, np.int64)
        out[schema.FRAME_INDEX] = cols.frame_index[rows]
        out[schema.INDEX] = cols.index[rows]
        out[schema.TASK] = [spec.tasks[int(t)] for t in cols.task_index[rows]]
        out[schema.STATE] = state[rows]
        out[schema.ACTIONS] = chunks[rows]
        out[schema.ACTION_IS_PAD] = is_pad[rows]
        kept = [prompts[int(r)] for r in rows]
        for name in kept[0].columns() if kept else ():
            out[name] = np.stack([getattr(p, name) for p in kept])
        return out, collections.Counter(REASONS[c] for c in codes if c >= 0), kept

    def write_shard(self, plan: ShardPlan, on_frames: Callable[[int], None]) -> ShardResult:
        """Process the plan's episodes in order and write them as one shard (atomically, then its sidecar)."""
        ctx = self.ctx
        parts, rejected, prompts, frames = [], collections.Counter(), [], 0
        clipped_before = self.fast.out_of_range_count
        for ep in plan.episodes:
            columns, rej, kept = self.episode_columns(ep)
            if kept:
                parts.append(columns)
            rejected.update(rej)
            prompts += kept
            frames += ctx.spec.episode(ep).length
            on_frames(ctx.spec.episode(ep).length)
        merged: dict[str, Any] = {}
        for name in ctx.layout.column_names():
            values = [p[name] for p in parts]
            if not values:
                merged[name] = []
            elif isinstance(values[0], np.ndarray):
                merged[name] = np.concatenate(values)
            else:
                merged[name] = [v for part in values for v in part]
        written = write_parquet_atomic(ctx.layout.table(merged), ctx.out / plan.path)
        result = ShardResult(
            path=plan.path, split=plan.split, episodes=list(plan.episodes), rows=written.rows,
            sha256=written.sha256, bytes=written.bytes, frames=frames, rejected=dict(sorted(rejected.items())),
            fast_tokens=_sum_max_count([p.num_fast_tokens for p in prompts]),
            prompt_tokens=_sum_max_count([int(p.tokenized_prompt_mask.sum()) for p in prompts]),
            fast_clipped=self.fast.out_of_range_count - clipped_before,
        )
        sidecar = dataclasses.asdict(result) | {"fingerprint": ctx.fingerprint}
        sidecar.pop("reused")
        atomic_write_json(_sidecar_path(ctx.out, plan.path), sidecar)
        return result

    def close(self) -> None:
        self.reader.close()


def _sum_max_count(values: list[int]) -> list[int]:
    return [int(sum(values)), int(max(values, default=0)), len(values)]


def _sidecar_path(out: Path, shard_path: str) -> Path:
    return out / PROGRESS_DIR / (Path(shard_path).name + ".json")


def reusable_shard(out: Path, plan: ShardPlan, fingerprint: str) -> ShardResult | None:
    """A shard finished by an earlier (killed) run with the same inputs and options, verified by its sha256."""
    sidecar, path = _sidecar_path(out, plan.path), out / plan.path
    if not (sidecar.is_file() and path.is_file()):
        return None
    try:
        data = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        return None
    if data.get("fingerprint") != fingerprint or data.get("episodes") != list(plan.episodes):
        return None
    if sha256_file(path) != data.get("sha256"):
        return None
    data.pop("fingerprint")
    return ShardResult(**data, reused=True)


# Worker processes: one _Worker per process, progress reported through a queue.
_WORKER: _Worker | None = None
_PROGRESS = None


def _init_worker(ctx: Pass2Context, progress_queue) -> None:
    global _WORKER, _PROGRESS
    # Ctrl-C reaches the whole process group: workers leave at once and quietly (a half-written shard is only a
    # temporary file), the parent reports the interruption.
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    logging.basicConfig(level=logging.WARNING)
    _WORKER, _PROGRESS = _Worker(ctx), progress_queue


def _run_shard(plan: ShardPlan) -> ShardResult:
    assert _WORKER is not None
    return _WORKER.write_shard(plan, lambda n: _PROGRESS.put(n))


def resolve_workers(requested: int, shards: int) -> int:
    """Worker processes to start: the request (0: one per CPU core), never more than shards to write."""
    wanted = requested if requested > 0 else (os.cpu_count() or 1)
    return max(1, min(wanted, shards))


def run_pass2(ctx: Pass2Context, plans: list[ShardPlan], workers: int, progress: bool, bar_total: int,
              bar_done: int) -> list[ShardResult]:
    from tqdm import tqdm

    results: list[ShardResult] = []
    with tqdm(total=bar_total, initial=bar_done, desc="pass 2/2 (frames)", unit="fr", disable=not progress) as bar:
        if workers <= 1 or len(plans) <= 1:
            worker = _Worker(ctx)
            try:
                for plan in plans:
                    results.append(worker.write_shard(plan, bar.update))
            finally:
                worker.close()
            return results
        mp_ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        queue = mp_ctx.Queue()
        with ProcessPoolExecutor(max_workers=min(workers, len(plans)), mp_context=mp_ctx,
                                 initializer=_init_worker, initargs=(ctx, queue)) as pool:
            pending = {pool.submit(_run_shard, plan) for plan in plans}
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    while not queue.empty():
                        bar.update(queue.get())
                    for f in done:
                        results.append(f.result())
            except BrokenProcessPool:
                raise PreprocessError(
                    "pass 2 stopped: a worker process ended abruptly (interrupted, or killed e.g. for memory); "
                    "run the same command again to resume from the finished shards"
                ) from None
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
            while not queue.empty():
                bar.update(queue.get())
    return results


# ------------------------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class PreprocessResult:
    out_dir: Path
    manifest: dict

    @property
    def summary(self) -> dict:
        return self.manifest["summary"]

    def summary_text(self) -> str:
        s = self.summary
        rejected = ", ".join(f"{k} {v}" for k, v in s["rows_rejected"].items()) or "none"
        lines = [
            f"preprocessed {self.manifest['source']['repo_id']} -> {self.out_dir}",
            f"  episodes {s['episodes']} (train {s['episodes_train']}, val {s['episodes_val']}), frames {s['frames']:,}"
            f" -> rows {s['rows']:,} in {s['shards']} shard(s), {s['bytes'] / 1e6:.1f} MB",
            f"  FAST tokens per chunk: mean {s['fast_tokens_per_chunk']['mean']:.1f}, max "
            f"{s['fast_tokens_per_chunk']['max']}; prompt tokens: mean {s['prompt_tokens']['mean']:.1f}, max "
            f"{s['prompt_tokens']['max']} of {self.manifest['max_token_len']}",
            f"  rows rejected: {rejected}",
            f"  wall time {s['seconds']:.1f} s ({s['frames_per_second']:.0f} frames/s, {s['workers']} worker(s); "
            + ", ".join(f"{k} {v:.1f} s" for k, v in s["seconds_by_phase"].items()) + ")"
            + (f"; {s['shards_reused']} shard(s) reused from an interrupted run" if s["shards_reused"] else ""),
        ]
        if s["fast_values_clipped"]:
            lines.append(f"  warning: {s['fast_values_clipped']} FAST coefficients were clipped to the tokenizer range")
        return "\n".join(lines)


def _clear_output(out: Path) -> None:
    """Remove what a preprocessing run writes (and nothing else)."""
    for name in (schema.MANIFEST_FILE, schema.NORM_STATS_FILE):
        (out / name).unlink(missing_ok=True)
    for name in (schema.SHARDS_DIR, "tokenizer", PROGRESS_DIR):
        if (out / name).exists():
            shutil.rmtree(out / name)


def _prepare_output(out: Path, fingerprint: str, overwrite: bool) -> dict:
    """Resume state of `out` for this fingerprint; clears it with overwrite, refuses to clobber otherwise."""
    state_path = out / PROGRESS_DIR / STATE_FILE
    if out.exists() and any(out.iterdir()):
        if overwrite:
            _clear_output(out)
        elif (out / schema.MANIFEST_FILE).exists():
            raise OutputExistsError(
                f"{out} already holds a finished preprocessing run; pass --overwrite to replace it or --output to "
                f"write elsewhere"
            )
        elif not state_path.is_file():
            raise OutputExistsError(f"{out} is not empty and holds no preprocessing run; pass --overwrite or --output")
        else:
            state = json.loads(state_path.read_text())
            if state.get("fingerprint") != fingerprint:
                raise OutputExistsError(
                    f"{out} holds an unfinished run of other inputs or options; pass --overwrite to start over"
                )
            return state
    state = {"fingerprint": fingerprint}
    atomic_write_json(state_path, state)
    return state


def _source_identity(spec: DatasetSpec) -> dict:
    return {
        "repo_id": spec.repo_id,
        "root": str(spec.root.resolve()),
        "codebase_version": spec.codebase_version,
        "episodes": [[e.index, e.length] for e in spec.episodes],
    }


def _pass1_valid(out: Path, record: dict | None) -> bool:
    if not record:
        return False
    try:
        return (
            sha256_file(out / schema.NORM_STATS_FILE) == record["norm_stats_sha256"]
            and sha256_file(out / schema.TEXT_TOKENIZER_FILE) == record["text_sha256"]
            and _dir_sha(out / schema.FAST_TOKENIZER_DIR) == record["fast_sha256"]
        )
    except (FileNotFoundError, NotADirectoryError, KeyError):
        return False


def run_preprocess(cfg: PreprocessConfig) -> PreprocessResult:
    """The whole job; returns the manifest it wrote. Raises PreprocessError (and subclasses) or
    DatasetNotFoundError / DatasetFormatError with a one-line message for problems the user can fix."""
    t0 = time.perf_counter()
    cfg.validate()
    spec = open_lerobot_dataset(cfg.repo_id, cfg.root)
    timings = {"open": time.perf_counter() - t0}
    episodes = select_episodes(spec, cfg.episodes)
    cameras = select_cameras(spec, cfg.cameras)
    if not cameras:
        raise PreprocessError(f"LeRobot dataset '{spec.repo_id}' has no camera; a VLA needs at least one image")
    ensure_local(spec, episodes, list(cameras.values()))
    train, val = split_episodes(episodes, cfg.val_fraction, cfg.seed)
    plans = plan_shards(spec, {"train": train, "val": val}, cfg.shard_rows)

    out = cfg.output_dir
    options = cfg.options()
    for k in ("workers", "overwrite", "output"):
        options.pop(k)
    if cfg.text_tokenizer:
        options["text_tokenizer"] = sha256_file(Path(cfg.text_tokenizer))
    if cfg.fast_tokenizer:
        options["fast_tokenizer"] = _dir_sha(Path(cfg.fast_tokenizer))
    fingerprint = _fingerprint({"schema_version": schema.SCHEMA_VERSION, "source": _source_identity(spec),
                                "options": options, "cameras": cameras})
    state = _prepare_output(out, fingerprint, cfg.overwrite)
    remove_temp_files(out)

    # Pass 1, unless an interrupted run of the same job finished it.
    t1 = time.perf_counter()
    if not _pass1_valid(out, state.get("pass1")):
        pass1 = run_pass1(cfg, spec, episodes, out)
        state["pass1"] = {
            "norm_stats_sha256": sha256_file(out / schema.NORM_STATS_FILE),
            "text_sha256": sha256_file(out / schema.TEXT_TOKENIZER_FILE),
            "fast_sha256": _dir_sha(out / schema.FAST_TOKENIZER_DIR),
            "rejected": pass1.rejected,
        }
        atomic_write_json(out / PROGRESS_DIR / STATE_FILE, state)

    text = TextTokenizer.load(out / schema.TEXT_TOKENIZER_FILE)
    fast = FastTokenizer.load(out / schema.FAST_TOKENIZER_DIR)
    vocab_size, skip_tokens = vocab_layout(text, fast, user_text=bool(cfg.text_tokenizer))
    layout = schema.ShardLayout(
        cameras=tuple(cameras), state_dim=spec.state_dim, action_dim=spec.action_dim,
        action_horizon=cfg.action_horizon, max_token_len=cfg.max_token_len, max_text_len=cfg.max_text_len,
    )
    shard_fingerprint = _fingerprint([fingerprint, state["pass1"], vocab_size, skip_tokens])
    ctx = Pass2Context(
        spec=spec, out=out, cameras=cameras, layout=layout, image_size=cfg.image_size, horizon=cfg.action_horizon,
        norm_mode=cfg.norm_mode, vocab_size=vocab_size, skip_tokens=skip_tokens, skip_bad_rows=cfg.skip_bad_rows,
        fingerprint=shard_fingerprint,
    )

    timings["pass1"] = time.perf_counter() - t1

    # Pass 2: shards an interrupted run finished are verified and kept; the rest is (re)written.
    t2 = time.perf_counter()
    reused = {p.path: r for p in plans if (r := reusable_shard(out, p, shard_fingerprint)) is not None}
    todo = [p for p in plans if p.path not in reused]
    done_frames = sum(p.frames for p in plans if p.path in reused)
    workers = resolve_workers(cfg.workers, len(todo))
    fresh = run_pass2(ctx, todo, workers, cfg.progress, sum(p.frames for p in plans), done_frames)
    by_path = {**reused, **{r.path: r for r in fresh}}
    results = [by_path[p.path] for p in plans]
    timings["pass2"] = time.perf_counter() - t2
    if not any(r.rows for r in results):
        rejected = collections.Counter()
        for r in results:
            rejected.update(r.rejected)
        raise BadInputError(f"LeRobot dataset '{spec.repo_id}': every row was rejected ({dict(rejected)})")

    timings["total"] = time.perf_counter() - t0
    manifest = _manifest(cfg, spec, cameras, layout, text, fast, vocab_size, skip_tokens, train, val, results,
                         timings, workers)
    schema.write_manifest(out, manifest)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    return PreprocessResult(out_dir=out, manifest=manifest)


def _manifest(cfg, spec, cameras, layout, text, fast, vocab_size, skip_tokens, train, val, results, timings,
              workers) -> dict:
    seconds = timings["total"]
    frames = sum(r.frames for r in results)
    rows = sum(r.rows for r in results)
    rejected: collections.Counter = collections.Counter()
    for r in results:
        rejected.update(r.rejected)
    fast_sum, fast_max, fast_n = (sum(r.fast_tokens[0] for r in results), max(r.fast_tokens[1] for r in results),
                                  sum(r.fast_tokens[2] for r in results))
    pr_sum, pr_max, pr_n = (sum(r.prompt_tokens[0] for r in results), max(r.prompt_tokens[1] for r in results),
                            sum(r.prompt_tokens[2] for r in results))
    out = cfg.output_dir
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "source": {"repo_id": spec.repo_id, "root": str(spec.root), "codebase_version": spec.codebase_version},
        "fps": spec.fps,
        "cameras": list(cameras),
        "camera_keys": dict(cameras),
        "image_size": cfg.image_size,
        "image_format": "png",
        "action_horizon": layout.action_horizon,
        "state_dim": layout.state_dim,
        "action_dim": layout.action_dim,
        "state_names": None if spec.state_names is None else list(spec.state_names),
        "action_names": None if spec.action_names is None else list(spec.action_names),
        "max_token_len": layout.max_token_len,
        "max_text_len": layout.max_text_len,
        "vocab_size": vocab_size,
        "skip_tokens": skip_tokens,
        "tokenizers": {
            "text": {"path": schema.TEXT_TOKENIZER_FILE, "kind": "user" if cfg.text_tokenizer else "trained",
                     "vocab_size": text.vocab_size, "sha256": text.sha256},
            "fast": {"path": schema.FAST_TOKENIZER_DIR, "kind": "user" if cfg.fast_tokenizer else "fitted",
                     "vocab_size": fast.vocab_size, "scale": fast.scale,
                     "sha256": _dir_sha(out / schema.FAST_TOKENIZER_DIR)},
        },
        "norm_mode": cfg.norm_mode,
        "norm_stats": schema.NORM_STATS_FILE,
        "options": cfg.options(),
        "splits": {"train": list(train), "val": list(val)},
        "shards": [r.manifest_entry() for r in results],
        "summary": {
            "episodes": len(train) + len(val),
            "episodes_train": len(train),
            "episodes_val": len(val),
            "frames": frames,
            "rows": rows,
            "rows_train": sum(r.rows for r in results if r.split == "train"),
            "rows_val": sum(r.rows for r in results if r.split == "val"),
            "shards": len(results),
            "bytes": sum(r.bytes for r in results),
            "fast_tokens_per_chunk": {"mean": fast_sum / max(fast_n, 1), "max": fast_max},
            "prompt_tokens": {"mean": pr_sum / max(pr_n, 1), "max": pr_max},
            "rows_rejected": dict(sorted(rejected.items())),
            "fast_values_clipped": sum(r.fast_clipped for r in results),
            "seconds": round(seconds, 3),
            "seconds_by_phase": {k: round(v, 3) for k, v in timings.items() if k != "total"},
            "frames_per_second": frames / max(seconds, 1e-9),
            "workers": workers,
            "shards_reused": sum(r.reused for r in results),
        },
    }


# ------------------------------------------------------------------------------------------------ a look


def describe_rows(out_dir: str | Path, n: int = 3) -> str:
    """A few decoded rows of the first train shard: task, decoded text prompt, FAST count, action chunk head."""
    out = Path(out_dir)
    manifest = schema.load_manifest(out)
    text = TextTokenizer.load(out / manifest["tokenizers"]["text"]["path"])
    fast = FastTokenizer.load(out / manifest["tokenizers"]["fast"]["path"])
    stats = load_norm_stats(out / schema.NORM_STATS_FILE)
    mode = manifest.get("norm_mode", "quantile")
    vocab, skip = manifest["vocab_size"], manifest["skip_tokens"]
    horizon, dim = manifest["action_horizon"], manifest["action_dim"]
    shards = [s for s in manifest["shards"] if s["rows"] > 0]
    if not shards:
        return f"{out}: no rows"
    cols = schema.read_rows(out / shards[0]["path"])
    prefix_ids, end_ids = postfix_pieces(text)
    lines = [f"{min(n, len(cols[schema.INDEX]))} row(s) of {out / shards[0]['path']}:"]
    for r in range(min(n, len(cols[schema.INDEX]))):
        text_ids = cols[schema.TEXT_PROMPT][r][cols[schema.TEXT_PROMPT_MASK][r]]
        postfix = cols[schema.TOKENIZED_PROMPT][r][cols[schema.TOKEN_AR_MASK][r]]
        fast_model_ids = postfix[len(prefix_ids) : len(postfix) - len(end_ids)]
        fast_ids = model_to_fast_ids(fast_model_ids, vocab, skip)
        decoded = fast.decode(fast_ids, horizon, dim)
        stored = cols[schema.ACTIONS][r]
        head = unnormalize(stored[:3], stats["actions"], mode).astype(np.float64)  # float64: prints short
        lines += [
            f"- episode {cols[schema.EPISODE_INDEX][r]}, frame {cols[schema.FRAME_INDEX][r]} "
            f"(dataset index {cols[schema.INDEX][r]})",
            f"    task:        {cols[schema.TASK][r]}",
            f"    text prompt: {text.decode(text_ids.tolist())!r} ({len(text_ids)} tokens)",
            f"    FAST tokens: {len(fast_ids)} (decoded chunk vs stored: max |diff| "
            f"{np.abs(decoded - stored).max():.3f} in normalized units)",
            f"    actions:     first {len(head)} of {horizon} steps {np.round(head, 2).tolist()}"
            f" (pad steps {int(cols[schema.ACTION_IS_PAD][r].sum())})",
        ]
    return "\n".join(lines)
