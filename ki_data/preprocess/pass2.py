"""Pass 2: planned shards written from their episodes. Per episode: the tabular columns read in bulk; each camera
decoded once sequentially and its frames resized/padded and encoded in a pipeline of threads (ki_data.preprocess.
pipeline), the cameras side by side, while this thread turns each frame into its row (`schema.frame_row`, the
function the Policy uses too) as soon as its images are encoded; per shard, the rows stacked in plan order and
written as one parquet file, atomically.

Everything a shard holds besides the source frames comes from the output directory's draft manifest and pass-1
artifacts (`DataArtifacts`): a shard's bytes depend only on its plan and that directory, never on which process or
machine writes it.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

import numpy as np

from ki_data import schema
from ki_data.artifacts import DataArtifacts
from ki_data.lerobot_source import DatasetSpec, EpisodeColumns, EpisodeReader
from ki_data.manifest import ShardEntry
from ki_data.preprocess.checks import PROMPT_TOO_LONG, REASONS, bad_input, find_row_problems, raise_first_problem
from ki_data.preprocess.chunks import chunk_indices
from ki_data.preprocess.config import BadInputError
from ki_data.preprocess.pipeline import ImagePipeline, StageClock
from ki_data.preprocess.plan import ShardPlan
from ki_data.prompt import PromptTokens, PromptTooLongError
from ki_data.shard_writer import write_parquet_atomic


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
    """One episode's shard rows, its rejected rows by reason, and the prompts of the rows it keeps."""

    rows: list[schema.Row]
    rejected: collections.Counter
    prompts: list[PromptTokens]


def _sum_max_count(values: list[int]) -> list[int]:
    return [int(sum(values)), int(max(values, default=0)), len(values)]


class ShardWorker:
    """Per-task state: the episode reader and the camera pipelines, built once, over the output directory's
    artifacts (`data`: the draft manifest, normalization and tokenizers, opened once per process)."""

    def __init__(self, data: DataArtifacts, spec: DatasetSpec):
        self.data, self.spec = data, spec
        m = data.manifest
        self.layout = schema.ShardLayout.of(m)
        self.skip_bad_rows = bool(m.options["skip_bad_rows"])
        self.reader = EpisodeReader(spec)
        self.clock = StageClock()  # CPU seconds per stage, for the benchmark
        self._images = ImagePipeline(len(m.cameras), m.image_size, m.image_format, clock=self.clock)

    def _frames_error(self, cols: EpisodeColumns, camera_key: str, frames: int) -> BadInputError:
        return BadInputError(
            f"LeRobot dataset '{self.spec.repo_id}', episode {cols.episode_index}: camera {camera_key} "
            f"has {frames} frames for {len(cols.timestamp)} rows"
        )

    def episode_rows(self, ep: int) -> EpisodeRows:
        m, spec = self.data.manifest, self.spec
        t0 = time.thread_time()
        cols = self.reader.read_episode(ep)
        problems = find_row_problems(cols, spec, m.action_horizon)
        if not self.skip_bad_rows:
            raise_first_problem(spec, cols, problems)
        # The cameras start now, on their own threads (PyAV, OpenCV and libjpeg-turbo release the GIL); this thread
        # builds each row once its images are encoded. Every row without a problem is encoded; a row dropped below
        # for a too-long prompt (only with skip_bad_rows) has its images discarded.
        images = {cam: self._images.submit(self.reader.iter_frames(ep, key, cols.timestamp), problems.ok)
                  for cam, key in m.camera_keys.items()}
        rows, prompts, too_long = [], [], []
        try:
            state, actions = np.nan_to_num(cols.state), np.nan_to_num(cols.actions)
            steps, is_pad = chunk_indices(len(cols), m.action_horizon)
            self.clock.add("rows", time.thread_time() - t0)
            for k, r in enumerate(np.flatnonzero(problems.ok).tolist()):
                encoded = {cam: images[cam].image(k) for cam in m.cameras}
                t0 = time.thread_time()
                for cam, image in encoded.items():
                    if image is None:  # the video ended first: its frame count, once the camera is done
                        raise self._frames_error(cols, m.camera_keys[cam], images[cam].result()[1])
                try:
                    row, tokens = schema.frame_row(
                        self.data, task=spec.tasks[int(cols.task_index[r])], state=state[r], images=encoded,
                        actions=actions[steps[r]], action_is_pad=is_pad[r],
                        key=(ep, int(cols.frame_index[r]), int(cols.index[r])))
                except PromptTooLongError as e:
                    if not self.skip_bad_rows:
                        raise bad_input(spec, ep, int(cols.frame_index[r]),
                                        f"the {e.field} needs {e.length} tokens but the limit is {e.limit} "
                                        f"(raise --max-token-len / --max-text-len)") from None
                    too_long.append(r)
                else:
                    rows.append(row)
                    prompts.append(tokens)
                self.clock.add("prompts", time.thread_time() - t0)
            for cam, key in m.camera_keys.items():
                frames = images[cam].result()[1]
                if frames != len(cols.timestamp):
                    raise self._frames_error(cols, key, frames)
        except BaseException:
            for f in images.values():  # no thread may still read this episode when the error leaves
                f.exception()
            raise
        codes = problems.codes.copy()
        codes[too_long] = REASONS.index(PROMPT_TOO_LONG)
        return EpisodeRows(rows, collections.Counter(REASONS[c] for c in codes if c >= 0), prompts)

    def write_shard(self, plan: ShardPlan, on_frames: Callable[[int], None]) -> ShardResult:
        """Process the plan's episodes in order and write them as one shard, atomically."""
        rows, rejected, prompts, frames = [], collections.Counter(), [], 0
        for ep in plan.episodes:
            episode = self.episode_rows(ep)
            rows += episode.rows
            rejected.update(episode.rejected)
            prompts += episode.prompts
            frames += self.spec.episode(ep).length
            on_frames(self.spec.episode(ep).length)
        t0 = time.thread_time()
        table = self.layout.table(schema.stack_rows(rows, self.layout.column_names()))
        written = write_parquet_atomic(table, self.data.root / plan.path)
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
