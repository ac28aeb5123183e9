"""Pass 1: from the tabular columns of every selected episode (no video), the row checks, the normalization
statistics, the offline text tokenizer (unless one is given) and the FAST tokenizer (unless one is given), fitted on
the normalized chunks of exactly the rows pass 2 will write. Writes them into the output directory."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np
from jaxtyping import Bool, Float, Int

from ki_data import schema
from ki_data.console import terminal
from ki_data.fast_tokenizer import FastTokenizer, dct_coefficients
from ki_data.lerobot_source import DatasetSpec, EpisodeColumns, EpisodeReader
from ki_data.normalize import NormStats, compute_stats, normalize, save_norm_stats
from ki_data.preprocess.checks import find_row_problems, raise_first_problem
from ki_data.preprocess.chunks import action_chunks
from ki_data.preprocess.config import BadInputError, PreprocessConfig, PreprocessError
from ki_data.prompt import prefix_text
from ki_data.shard_writer import atomic_copy
from ki_data.text_tokenizer import TextTokenizer

# Prompts the offline text tokenizer is trained on (evenly spaced over all rows): plenty for a small vocabulary.
TEXT_TRAIN_MAX_TEXTS = 20_000
# Above this many chunks the FAST fit uses an even subsample plus the chunks holding each extreme coefficient,
# so its value range (what makes encoding lossless) still covers every row.
FAST_FIT_MAX_CHUNKS = 100_000


@dataclasses.dataclass
class Pass1Result:
    stats: dict[str, NormStats]
    rejected: dict[str, int]
    frames: int


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


def _relative_steps(kept: list[tuple[EpisodeColumns, np.ndarray]], horizon: int, delta: tuple[int, ...],
                    limit: int = FAST_FIT_MAX_CHUNKS) -> Float[np.ndarray, "m d"]:
    """The steps of the usable rows' relative chunks (pad steps excluded): what delta actions are normalized by, as
    openpi computes its norm stats after the delta transform. Above `limit` chunks, an even subsample of them."""
    total = int(sum(ok.sum() for _, ok in kept))
    pick = _subsample(total, limit)
    out, offset = [], 0
    for cols, ok in kept:
        rows = np.flatnonzero(ok)
        lo, hi = np.searchsorted(pick, [offset, offset + len(rows)])
        mine = rows[pick[lo:hi] - offset]
        offset += len(rows)
        if len(mine):
            chunks, is_pad = action_chunks(np.nan_to_num(cols.actions), horizon, np.nan_to_num(cols.state), delta)
            out.append(chunks[mine][~is_pad[mine]])
    return np.concatenate(out)


def run_pass1(
    cfg: PreprocessConfig, spec: DatasetSpec, episodes: list[int], out: Path, delta: tuple[int, ...] | None = None
) -> Pass1Result:
    """Statistics and tokenizers from the tabular columns of every selected episode; writes them into `out`. `delta`:
    the parsed `--delta-actions` (ki_data.actions); statistics and the FAST fit are then over the relative chunks."""
    from tqdm import tqdm

    reader = EpisodeReader(spec)
    kept: list[tuple[EpisodeColumns, Bool[np.ndarray, " n"]]] = []
    rejected: collections.Counter = collections.Counter()
    frames = 0
    for ep in tqdm(episodes, desc="pass 1/2 (tabular)", unit="ep", disable=not cfg.progress, file=terminal()):
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
    if delta is None:
        actions = np.concatenate([c.actions[np.isfinite(c.actions).all(1)] for c, _ in kept])
    else:
        actions = _relative_steps(kept, cfg.action_horizon, delta)
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
        chunks = action_chunks(np.nan_to_num(cols.actions), cfg.action_horizon, np.nan_to_num(cols.state), delta)[0]
        fit.add(normalize(chunks[ok], stats["actions"], cfg.norm_mode))
        rows = np.flatnonzero(ok)
        lo, hi = np.searchsorted(text_pick, [offset, offset + len(rows)])
        for r in rows[text_pick[lo:hi] - offset]:
            state = normalize(cols.state[r], stats["state"], cfg.norm_mode)
            corpus.append(prefix_text(spec.tasks[int(cols.task_index[r])], state, cfg.prompt_layout))
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
