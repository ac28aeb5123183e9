"""The job: open and plan, pass 1 (unless a killed run finished it), pass 2 over the shards not yet verified, then
the manifest with its summary, written last."""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path

from ki_data import schema
from ki_data.fast_tokenizer import FastTokenizer
from ki_data.lerobot_source import ensure_local, open_lerobot_dataset
from ki_data.manifest import SCHEMA_VERSION, Manifest, TokenizerEntry
from ki_data.preprocess import resume
from ki_data.preprocess.config import BadInputError, PreprocessConfig
from ki_data.preprocess.describe import summary_text
from ki_data.preprocess.pass1 import run_pass1
from ki_data.preprocess.pass2 import Pass2Context, ShardResult
from ki_data.preprocess.plan import JobPlan, plan_job
from ki_data.preprocess.workers import resolve_workers, run_pass2
from ki_data.prompt import vocab_layout
from ki_data.shard_writer import remove_temp_files, sha256_file
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


def _run_fingerprint(cfg: PreprocessConfig, job: JobPlan) -> str:
    """Inputs and options that change what is written (not how many processes write it, nor where)."""
    options = cfg.options()
    for k in ("workers", "overwrite", "output"):
        options.pop(k)
    if cfg.text_tokenizer:
        options["text_tokenizer"] = sha256_file(Path(cfg.text_tokenizer))
    if cfg.fast_tokenizer:
        options["fast_tokenizer"] = resume.dir_sha(Path(cfg.fast_tokenizer))
    return resume.fingerprint({"schema_version": SCHEMA_VERSION, "source": resume.source_identity(job.spec),
                               "options": options, "cameras": job.cameras})


def _pass2_context(cfg: PreprocessConfig, job: JobPlan, out: Path, state: dict, run_fingerprint: str) -> Pass2Context:
    text = TextTokenizer.load(out / schema.TEXT_TOKENIZER_FILE)
    fast = FastTokenizer.load(out / schema.FAST_TOKENIZER_DIR)
    vocab_size, skip_tokens = vocab_layout(text, fast)
    layout = schema.ShardLayout(
        cameras=tuple(job.cameras), state_dim=job.spec.state_dim, action_dim=job.spec.action_dim,
        action_horizon=cfg.action_horizon, max_token_len=cfg.max_token_len, max_text_len=cfg.max_text_len,
    )
    return Pass2Context(
        spec=job.spec, out=out, cameras=job.cameras, layout=layout, image_size=cfg.image_size,
        horizon=cfg.action_horizon, norm_mode=cfg.norm_mode, prompt_layout=cfg.prompt_layout, vocab_size=vocab_size,
        skip_tokens=skip_tokens, skip_bad_rows=cfg.skip_bad_rows,
        fingerprint=resume.fingerprint([run_fingerprint, state["pass1"], vocab_size, skip_tokens]),
    )


def run_preprocess(cfg: PreprocessConfig) -> PreprocessResult:
    """The whole job; returns the manifest it wrote. Raises PreprocessError (and subclasses) or
    DatasetNotFoundError / DatasetFormatError with a one-line message for problems the user can fix."""
    t0 = time.perf_counter()
    cfg.validate()
    spec = open_lerobot_dataset(cfg.repo_id, cfg.root)
    timings = {"open": time.perf_counter() - t0}
    job = plan_job(cfg, spec)
    ensure_local(spec, list(job.episodes), list(job.cameras.values()))

    out = cfg.output_dir
    run_fingerprint = _run_fingerprint(cfg, job)
    state = resume.prepare_output(out, run_fingerprint, cfg.overwrite)
    remove_temp_files(out)

    # Pass 1, unless an interrupted run of the same job finished it.
    t1 = time.perf_counter()
    if not resume.pass1_valid(out, state.get("pass1")):
        pass1 = run_pass1(cfg, spec, list(job.episodes), out)
        state = state | {"pass1": resume.pass1_record(out, pass1.rejected)}
        resume.save_state(out, state)
    ctx = _pass2_context(cfg, job, out, state, run_fingerprint)
    timings["pass1"] = time.perf_counter() - t1

    # Pass 2: shards an interrupted run finished are verified and kept; the rest is (re)written.
    t2 = time.perf_counter()
    reused = {p.path: r for p in job.shards if (r := resume.reusable_shard(out, p, ctx.fingerprint)) is not None}
    todo = [p for p in job.shards if p.path not in reused]
    done_frames = sum(p.frames for p in job.shards if p.path in reused)
    workers = resolve_workers(cfg.workers, len(todo))
    fresh = run_pass2(ctx, todo, workers, cfg.progress, job.frames, done_frames)
    by_path = {**reused, **{r.path: r for r in fresh}}
    results = [by_path[p.path] for p in job.shards]
    timings["pass2"] = time.perf_counter() - t2
    if not any(r.rows for r in results):
        rejected = collections.Counter()
        for r in results:
            rejected.update(r.rejected)
        raise BadInputError(f"LeRobot dataset '{spec.repo_id}': every row was rejected ({dict(rejected)})")

    timings["total"] = time.perf_counter() - t0
    manifest = build_manifest(cfg, job, ctx, results, summarize(job, results, timings, workers))
    manifest.save(out)
    resume.finish_output(out)
    return PreprocessResult(out_dir=out, manifest=manifest)


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
        image_format="png",
        action_horizon=layout.action_horizon,
        state_dim=layout.state_dim,
        action_dim=layout.action_dim,
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


def summarize(job: JobPlan, results: list[ShardResult], timings: dict[str, float], workers: int) -> dict:
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
        "workers": workers,
        "shards_reused": sum(r.reused for r in results),
    }
