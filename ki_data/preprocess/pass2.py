"""Pass 2: planned shards written from their episodes. Per episode: the tabular columns read in bulk; each camera
decoded once sequentially and its frames resized/padded and encoded in a pipeline of threads (ki_data.preprocess.
pipeline), the cameras side by side, while this thread cuts the chunks with numpy and builds the prompts; per shard,
the episodes' columns concatenated in plan order and written as one parquet file, atomically.

A shard's bytes depend only on its plan and the pass-1 artifacts in the output directory, never on which process
or machine writes it.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Bool, Float

from ki_data import schema
from ki_data.fast_tokenizer import FastTokenizer
from ki_data.lerobot_source import DatasetSpec, EpisodeColumns, EpisodeReader
from ki_data.manifest import ShardEntry
from ki_data.normalize import load_norm_stats, normalize
from ki_data.preprocess.checks import PROMPT_TOO_LONG, REASONS, bad_input, find_row_problems, raise_first_problem
from ki_data.preprocess.chunks import action_chunks
from ki_data.preprocess.config import BadInputError
from ki_data.preprocess.pipeline import ImagePipeline, StageClock
from ki_data.preprocess.plan import ShardPlan
from ki_data.prompt import PromptBuilder, PromptTokens, PromptTooLongError
from ki_data.shard_writer import write_parquet_atomic
from ki_data.text_tokenizer import TextTokenizer


@dataclasses.dataclass(frozen=True)
class Pass2Context:
    """Everything a worker needs, picklable (the tokenizers are loaded from the output directory)."""

    spec: DatasetSpec
    out: Path
    cameras: dict[str, str]  # name -> feature key
    layout: schema.ShardLayout
    image_size: int
    image_format: str
    horizon: int
    norm_mode: str
    prompt_layout: str
    vocab_size: int
    skip_tokens: int
    skip_bad_rows: bool
    delta_actions: tuple[int, ...] | None  # ki_data.actions: the action dimensions stored relative to the state
    fingerprint: str  # of the inputs, options and pass-1 artifacts: what a finished shard's sidecar must match


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

    def manifest_entry(self) -> ShardEntry:
        return ShardEntry(self.path, self.split, self.rows, self.sha256, self.bytes, tuple(self.episodes))


@dataclasses.dataclass
class EpisodeRows:
    """One episode's shard columns, its rejected rows by reason, and the prompts of the rows it keeps."""

    columns: dict[str, Any]
    rejected: collections.Counter
    prompts: list[PromptTokens]


def _sum_max_count(values: list[int]) -> list[int]:
    return [int(sum(values)), int(max(values, default=0)), len(values)]


class ShardWorker:
    """Per-process state: readers and tokenizers, built once."""

    def __init__(self, ctx: Pass2Context):
        self.ctx = ctx
        self.reader = EpisodeReader(ctx.spec)
        self.prompt = PromptBuilder(
            TextTokenizer.load(ctx.out / schema.TEXT_TOKENIZER_FILE),
            FastTokenizer.load(ctx.out / schema.FAST_TOKENIZER_DIR),
            layout=ctx.prompt_layout, max_token_len=ctx.layout.max_token_len, max_text_len=ctx.layout.max_text_len,
            vocab_size=ctx.vocab_size, skip_tokens=ctx.skip_tokens,
        )
        self.stats = load_norm_stats(ctx.out / schema.NORM_STATS_FILE)
        self.clock = StageClock()  # CPU seconds per stage, for the benchmark
        self._images = ImagePipeline(len(ctx.cameras), ctx.image_size, ctx.image_format, clock=self.clock)

    def _prompts(self, cols: EpisodeColumns, ok: Bool[np.ndarray, " n"], state: Float[np.ndarray, "n s"],
                 chunks: Float[np.ndarray, "n h d"]) -> tuple[dict[int, PromptTokens], list[int]]:
        """(prompt tokens of the usable rows, rows whose prompt is too long): too long is an error unless skipping."""
        ctx, spec = self.ctx, self.ctx.spec
        prompts, too_long = {}, []
        for r in np.flatnonzero(ok):
            try:
                prompts[int(r)] = self.prompt.build(spec.tasks[int(cols.task_index[r])], state[r], chunks[r])
            except PromptTooLongError as e:
                if not ctx.skip_bad_rows:
                    raise bad_input(spec, cols.episode_index, int(cols.frame_index[r]),
                                    f"the {e.field} needs {e.length} tokens but the limit is {e.limit} "
                                    f"(raise --max-token-len / --max-text-len)") from None
                too_long.append(int(r))
        return prompts, too_long

    def _check_frames(self, cols: EpisodeColumns, camera_key: str, frames: int) -> None:
        if frames != len(cols.timestamp):
            raise BadInputError(
                f"LeRobot dataset '{self.ctx.spec.repo_id}', episode {cols.episode_index}: camera {camera_key} "
                f"has {frames} frames for {len(cols.timestamp)} rows"
            )

    def episode_rows(self, ep: int) -> EpisodeRows:
        ctx, spec = self.ctx, self.ctx.spec
        t0 = time.thread_time()
        cols = self.reader.read_episode(ep)
        problems = find_row_problems(cols, spec, ctx.horizon)
        if not ctx.skip_bad_rows:
            raise_first_problem(spec, cols, problems)
        # The cameras start now, on their own threads (PyAV, OpenCV and libjpeg-turbo release the GIL); this thread
        # builds the prompts meanwhile. Every row without a problem is encoded; a row dropped below for a too-long
        # prompt (only with skip_bad_rows) has its images discarded.
        images = {key: self._images.submit(self.reader.iter_frames(ep, key, cols.timestamp), problems.ok)
                  for key in ctx.cameras.values()}
        try:
            raw_state = np.nan_to_num(cols.state)
            state = normalize(raw_state, self.stats["state"], ctx.norm_mode)
            chunks, is_pad = action_chunks(np.nan_to_num(cols.actions), ctx.horizon, raw_state, ctx.delta_actions)
            chunks = normalize(chunks, self.stats["actions"], ctx.norm_mode)
            self.clock.add("rows", time.thread_time() - t0)
            t0 = time.thread_time()
            prompts, too_long = self._prompts(cols, problems.ok, state, chunks)
            self.clock.add("prompts", time.thread_time() - t0)
        except BaseException:
            for f in images.values():  # no thread may still read this episode when the error leaves
                f.exception()
            raise
        t0 = time.thread_time()
        ok, codes = problems.ok.copy(), problems.codes.copy()
        ok[too_long] = False
        codes[too_long] = REASONS.index(PROMPT_TOO_LONG)

        rows = np.flatnonzero(ok)
        encoded_rows = ok[problems.ok]  # which of the encoded images (rows without a problem) are kept
        out: dict[str, Any] = {}
        for name, key in ctx.cameras.items():
            blobs, frames = images[key].result()
            self._check_frames(cols, key, frames)
            out[schema.image_column(name)] = [b for b, keep in zip(blobs, encoded_rows, strict=True) if keep]
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
        self.clock.add("rows", time.thread_time() - t0)
        return EpisodeRows(out, collections.Counter(REASONS[c] for c in codes if c >= 0), kept)

    def write_shard(self, plan: ShardPlan, on_frames: Callable[[int], None]) -> ShardResult:
        """Process the plan's episodes in order and write them as one shard, atomically."""
        ctx = self.ctx
        parts, rejected, prompts, frames = [], collections.Counter(), [], 0
        for ep in plan.episodes:
            episode = self.episode_rows(ep)
            if episode.prompts:
                parts.append(episode.columns)
            rejected.update(episode.rejected)
            prompts += episode.prompts
            frames += ctx.spec.episode(ep).length
            on_frames(ctx.spec.episode(ep).length)
        t0 = time.thread_time()
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
        self.clock.add("write", time.thread_time() - t0)
        return ShardResult(
            path=plan.path, split=plan.split, episodes=list(plan.episodes), rows=written.rows,
            sha256=written.sha256, bytes=written.bytes, frames=frames, rejected=dict(sorted(rejected.items())),
            fast_tokens=_sum_max_count([p.num_fast_tokens for p in prompts]),
            prompt_tokens=_sum_max_count([int(p.tokenized_prompt_mask.sum()) for p in prompts]),
            fast_clipped=sum(p.fast_clipped for p in prompts),
        )

    def close(self) -> None:
        self._images.close()
        self.reader.close()
