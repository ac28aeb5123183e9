"""The final merge step: once every planned shard is written, their sidecars become the manifest (with the run's
summary) and the dataset card. It runs once, after the last pass-2 task (in the driver for local and Ray runs, as the
dependent job for Slurm), and writes the manifest last and atomically: a directory with a manifest is finished."""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path

from ki_data import schema
from ki_data.fast_tokenizer import FastTokenizer
from ki_data.manifest import Manifest, TokenizerEntry
from ki_data.preprocess import resume
from ki_data.preprocess.card import write_card
from ki_data.preprocess.config import BadInputError, PreprocessConfig, PreprocessError
from ki_data.preprocess.describe import summary_text
from ki_data.preprocess.pass2 import Pass2Context, ShardResult
from ki_data.preprocess.plan import JobPlan
from ki_data.shard_writer import remove_temp_files
from ki_data.text_tokenizer import TextTokenizer


@dataclasses.dataclass
class PreprocessResult:
    out_dir: Path
    manifest: Manifest

    @property
    def summary(self) -> dict:
        return self.manifest.summary

    def summary_text(self) -> str:
        return summary_text(self.manifest, self.out_dir)


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """How the run went, for the summary."""

    executor: str
    tasks: int
    workers: int
    reused: frozenset[str]  # shards verified from an interrupted run before pass 2 started
    timings: dict[str, float]  # seconds of the phases before pass 2
    pass1_reused: bool  # an interrupted run had finished pass 1
    started_at: float  # time.time() at the start of the run
    pass2_started_at: float


def written_shards(job: JobPlan, ctx: Pass2Context) -> tuple[list[ShardResult], list[str]]:
    """(results of the planned shards with a sidecar of this job, paths of the others), in plan order. Sidecars
    that did not verify were removed before pass 2 (executors.prepare_tasks); the rest were written by a task right
    after it hashed the file, so they are not hashed again (a DROID-size output is terabytes)."""
    results, missing = [], []
    for plan in job.shards:
        r = resume.reusable_shard(ctx.out, plan, ctx.fingerprint, check_hash=False)
        (results.append(r) if r is not None else missing.append(plan.path))
    return results, missing


def finish(cfg: PreprocessConfig, job: JobPlan, ctx: Pass2Context, record: RunRecord) -> PreprocessResult:
    results, missing = written_shards(job, ctx)
    if missing:
        raise PreprocessError(
            f"pass 2 did not finish: {len(missing)} of {len(job.shards)} shard(s) are missing or damaged (first: "
            f"{missing[0]}); run the same command again to write them"
        )
    results = [dataclasses.replace(r, reused=r.path in record.reused) for r in results]
    if not any(r.rows for r in results):
        rejected = collections.Counter()
        for r in results:
            rejected.update(r.rejected)
        raise BadInputError(f"LeRobot dataset '{job.spec.repo_id}': every row was rejected ({dict(rejected)})")
    remove_temp_files(ctx.out / schema.SHARDS_DIR)  # left by a task killed mid-write (all tasks are done now)
    now = time.time()
    timings = record.timings | {"pass2": now - record.pass2_started_at, "total": now - record.started_at}
    manifest = build_manifest(cfg, job, ctx, results, summarize(job, results, timings, record))
    write_card(manifest, ctx.out)
    manifest.save(ctx.out)
    resume.finish_output(ctx.out)
    return PreprocessResult(out_dir=cfg.output_dir, manifest=manifest)


def build_manifest(cfg: PreprocessConfig, job: JobPlan, ctx: Pass2Context, results: list[ShardResult],
                   summary: dict) -> Manifest:
    out, layout = ctx.out, ctx.layout
    text = TextTokenizer.load(out / schema.TEXT_TOKENIZER_FILE)
    fast = FastTokenizer.load(out / schema.FAST_TOKENIZER_DIR)
    return Manifest(
        source={"repo_id": job.spec.repo_id, "root": str(job.spec.root),
                "codebase_version": job.spec.codebase_version},
        fps=job.spec.fps,
        cameras=tuple(job.cameras),
        camera_keys=dict(job.cameras),
        image_size=cfg.image_size,
        image_format=cfg.image_format,
        action_horizon=layout.action_horizon,
        state_dim=layout.state_dim,
        action_dim=layout.action_dim,
        state_names=job.spec.state_names,
        action_names=job.spec.action_names,
        state_keys=job.spec.state_keys,
        delta_actions=ctx.delta_actions,
        max_token_len=layout.max_token_len,
        max_text_len=layout.max_text_len,
        vocab_size=ctx.vocab_size,
        skip_tokens=ctx.skip_tokens,
        prompt_layout=cfg.prompt_layout,
        tokenizers={
            "text": TokenizerEntry(schema.TEXT_TOKENIZER_FILE, "user" if cfg.text_tokenizer else "trained",
                                   text.vocab_size, text.sha256),
            "fast": TokenizerEntry(schema.FAST_TOKENIZER_DIR, "user" if cfg.fast_tokenizer else "fitted",
                                   fast.vocab_size, resume.dir_sha(out / schema.FAST_TOKENIZER_DIR), scale=fast.scale),
        },
        norm_mode=cfg.norm_mode,
        splits=dict(job.splits),
        shards=tuple(r.manifest_entry() for r in results),
        options=cfg.options(),
        summary=summary,
        norm_stats=schema.NORM_STATS_FILE,
    )


def summarize(job: JobPlan, results: list[ShardResult], timings: dict[str, float], record: RunRecord) -> dict:
    """Counts and timings of the run, as the manifest records them."""
    seconds = timings["total"]
    frames = sum(r.frames for r in results)
    rejected: collections.Counter = collections.Counter()
    for r in results:
        rejected.update(r.rejected)
    fast_sum, fast_max, fast_n = (sum(r.fast_tokens[0] for r in results), max(r.fast_tokens[1] for r in results),
                                  sum(r.fast_tokens[2] for r in results))
    pr_sum, pr_max, pr_n = (sum(r.prompt_tokens[0] for r in results), max(r.prompt_tokens[1] for r in results),
                            sum(r.prompt_tokens[2] for r in results))
    fresh_frames = sum(r.frames for r in results if not r.reused)
    return {
        "episodes": len(job.splits["train"]) + len(job.splits["val"]),
        "episodes_train": len(job.splits["train"]),
        "episodes_val": len(job.splits["val"]),
        "frames": frames,
        "rows": sum(r.rows for r in results),
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
        # Pass 1 reads every frame's tabular columns; pass 2 only the shards this run wrote.
        "pass1_frames_per_second": None if record.pass1_reused else frames / max(timings["pass1"], 1e-9),
        "pass2_frames_per_second": fresh_frames / max(timings["pass2"], 1e-9),
        "executor": record.executor,
        "tasks": record.tasks,
        "workers": record.workers,
        "shards_reused": sum(r.reused for r in results),
    }
