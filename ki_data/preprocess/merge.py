"""The final merge step: once every planned shard is written, the draft manifest written after pass 1 gets its shards
(from their sidecars) and the run's summary, and becomes the manifest; the dataset card is made from it. It runs once,
after the last pass-2 task (in the driver for local and Ray runs, as the dependent job for Slurm), and writes the
manifest last and atomically: a directory with a manifest is finished."""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path

from ki_data import schema
from ki_data.artifacts import DataArtifacts
from ki_data.manifest import Manifest
from ki_data.preprocess import resume
from ki_data.preprocess.card import write_card
from ki_data.preprocess.config import BadInputError, PreprocessError
from ki_data.preprocess.describe import summary_text
from ki_data.preprocess.executors import Pass2Job
from ki_data.preprocess.pass2 import ShardResult
from ki_data.shard_writer import remove_temp_files


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


def written_shards(job: Pass2Job) -> tuple[list[ShardResult], list[str]]:
    """(results of the planned shards with a sidecar of this job, paths of the others), in plan order. Sidecars
    that did not verify were removed before pass 2 (executors.prepare_tasks); the rest were written by a task right
    after it hashed the file, so they are not hashed again (a DROID-size output is terabytes)."""
    results, missing = [], []
    for plan in job.shards:
        r = resume.reusable_shard(job.out, plan, job.fingerprint, check_hash=False)
        (results.append(r) if r is not None else missing.append(plan.path))
    return results, missing


def finish(data: DataArtifacts, job: Pass2Job, record: RunRecord) -> PreprocessResult:
    """`data`: the output directory opened with its draft manifest (`executors.job_artifacts`)."""
    draft, out = data.manifest, data.root
    results, missing = written_shards(job)
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
        raise BadInputError(f"LeRobot dataset '{draft.source['repo_id']}': every row was rejected ({dict(rejected)})")
    remove_temp_files(out / schema.SHARDS_DIR)  # left by a task killed mid-write (all tasks are done now)
    now = time.time()
    timings = record.timings | {"pass2": now - record.pass2_started_at, "total": now - record.started_at}
    manifest = dataclasses.replace(draft, shards=tuple(r.manifest_entry() for r in results),
                                   summary=summarize(draft, results, timings, record))
    write_card(manifest, out)
    manifest.save(out)
    resume.finish_output(out)
    return PreprocessResult(out_dir=out, manifest=manifest)


def summarize(draft: Manifest, results: list[ShardResult], timings: dict[str, float], record: RunRecord) -> dict:
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
        "episodes": len(draft.splits["train"]) + len(draft.splits["val"]),
        "episodes_train": len(draft.splits["train"]),
        "episodes_val": len(draft.splits["val"]),
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
