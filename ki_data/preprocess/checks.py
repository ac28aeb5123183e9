"""Row checks: which rows of an episode cannot become a training row, and why (never silently).

A row is refused for its own values (task, state) or for its action chunk (any bad action row within the next
`horizon` rows of the episode). Without --skip-bad-rows the first problem stops the run with an error naming the
dataset, episode and frame; with it, rows are skipped and counted by reason.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np
from jaxtyping import Bool, Int

from ki_data.lerobot_source import ACTION_KEY, DatasetSpec, EpisodeColumns
from ki_data.preprocess.config import BadInputError

# Row problems, in the order a row with several is counted.
NO_TASK = "no_task"
STATE_DIM = "state_dim_mismatch"
ACTION_DIM = "action_dim_mismatch"
STATE_NONFINITE = "state_not_finite"
ACTION_NONFINITE = "action_not_finite"
PROMPT_TOO_LONG = "prompt_too_long"  # found in pass 2, where the prompts are built
REASONS = (NO_TASK, STATE_DIM, ACTION_DIM, STATE_NONFINITE, ACTION_NONFINITE, PROMPT_TOO_LONG)


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
         lambda r: f"{' + '.join(spec.state_keys)} has {cols.state_lengths[r]} values but the metadata says {spec.state_dim}")
    bad = cols.action_lengths != spec.action_dim
    mark(ACTION_DIM, _chunk_reach(bad, horizon), bad,
         lambda r: f"{ACTION_KEY} has {cols.action_lengths[r]} values but the metadata says {spec.action_dim}")
    bad = (cols.state_lengths == spec.state_dim) & ~np.isfinite(cols.state).all(axis=1)
    mark(STATE_NONFINITE, bad, bad, lambda r: f"{' + '.join(spec.state_keys)} is not finite: {cols.state[r].tolist()}")
    bad = (cols.action_lengths == spec.action_dim) & ~np.isfinite(cols.actions).all(axis=1)
    mark(ACTION_NONFINITE, _chunk_reach(bad, horizon), bad,
         lambda r: f"{ACTION_KEY} is not finite: {cols.actions[r].tolist()}")
    return RowProblems(codes=codes, first=first)


def bad_input(spec: DatasetSpec, episode: int, frame: int, detail: str) -> BadInputError:
    return BadInputError(
        f"LeRobot dataset '{spec.repo_id}', episode {episode}, frame {frame}: {detail}; "
        f"pass --skip-bad-rows to skip and count such rows instead"
    )


def raise_first_problem(spec: DatasetSpec, cols: EpisodeColumns, problems: RowProblems) -> None:
    if not problems.first:
        return
    frame, detail = min(problems.first.values())
    raise bad_input(spec, cols.episode_index, frame, detail)
