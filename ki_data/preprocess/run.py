"""The job: open and plan, pass 1 (unless a killed run finished it), the draft manifest, pass 2 on a DataTrove
executor over the shards not yet written and verified, then the merge (manifest and dataset card), written last.

The draft manifest (`.ki_progress/manifest.json`) says everything the shards hold; pass 2 and the merge read it
(through `DataArtifacts`) and nothing else of the options, so every field has one source.

`run_preprocess` runs pass 2 here (local processes) or on a Ray cluster and returns the finished run;
`write_slurm_preprocess` runs pass 1 here and writes pass 2 and the merge as a Slurm job for the user to submit.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ki_data import schema
from ki_data.actions import DeltaSpecError, parse_delta_actions
from ki_data.fast_tokenizer import FastTokenizer
from ki_data.lerobot_source import ensure_local, open_lerobot_dataset
from ki_data.manifest import SCHEMA_VERSION, Manifest, TokenizerEntry
from ki_data.preprocess import resume
from ki_data.preprocess.config import PreprocessConfig, PreprocessError
from ki_data.preprocess.executors import (
    PASS2_DIR,
    Pass2Job,
    ShardProgress,
    job_artifacts,
    job_file,
    prepare_tasks,
    resolve_workers,
    run_local,
    run_ray,
    save_job,
    task_groups,
    unfinished_error,
)
from ki_data.preprocess.merge import PreprocessResult, RunRecord, finish, written_shards
from ki_data.preprocess.pass1 import run_pass1
from ki_data.preprocess.plan import JobPlan, plan_job
from ki_data.preprocess.slurm import SlurmJob, write_slurm_job
from ki_data.prompt import vocab_layout
from ki_data.shard_writer import remove_temp_files, sha256_file
from ki_data.text_tokenizer import TextTokenizer


def _run_fingerprint(cfg: PreprocessConfig, job: JobPlan) -> str:
    """Inputs and options that change what is written (not where, nor how many processes or which executor)."""
    options = cfg.options()
    for k in ("workers", "overwrite", "output", "executor"):
        options.pop(k)
    if cfg.text_tokenizer:
        options["text_tokenizer"] = sha256_file(Path(cfg.text_tokenizer))
    if cfg.fast_tokenizer:
        options["fast_tokenizer"] = resume.dir_sha(Path(cfg.fast_tokenizer))
    return resume.fingerprint({"schema_version": SCHEMA_VERSION, "source": resume.source_identity(job.spec),
                               "options": options, "cameras": job.cameras})


def _draft_manifest(cfg: PreprocessConfig, plan: JobPlan, delta: tuple[int, ...] | None, text: TextTokenizer,
                    fast: FastTokenizer, out: Path) -> Manifest:
    """The manifest of the run without its shards and summary (the merge adds them), from the options, the plan and
    the tokenizers pass 1 left in `out`."""
    spec = plan.spec
    vocab_size, skip_tokens = vocab_layout(text, fast)
    return Manifest(
        source={"repo_id": spec.repo_id, "root": str(spec.root), "codebase_version": spec.codebase_version},
        fps=spec.fps,
        cameras=tuple(plan.cameras),
        camera_keys=dict(plan.cameras),
        image_size=cfg.image_size,
        image_format=cfg.image_format,
        action_horizon=cfg.action_horizon,
        state_dim=spec.state_dim,
        action_dim=spec.action_dim,
        state_names=spec.state_names,
        action_names=spec.action_names,
        state_keys=spec.state_keys,
        delta_actions=delta,
        max_token_len=cfg.max_token_len,
        max_text_len=cfg.max_text_len,
        vocab_size=vocab_size,
        skip_tokens=skip_tokens,
        prompt_layout=cfg.prompt_layout,
        tokenizers={
            "text": TokenizerEntry(schema.TEXT_TOKENIZER_FILE, "user" if cfg.text_tokenizer else "trained",
                                   text.vocab_size, text.sha256),
            "fast": TokenizerEntry(schema.FAST_TOKENIZER_DIR, "user" if cfg.fast_tokenizer else "fitted",
                                   fast.vocab_size, resume.dir_sha(out / schema.FAST_TOKENIZER_DIR), scale=fast.scale),
        },
        norm_mode=cfg.norm_mode,
        splits=dict(plan.splits),
        shards=(),
        options=cfg.options(),
        norm_stats=schema.NORM_STATS_FILE,
    )


@dataclasses.dataclass(frozen=True)
class _Prepared:
    job: Pass2Job
    verified: set[str]  # shards an interrupted run finished, verified by their sha256
    timings: dict[str, float]
    started_at: float
    pass1_reused: bool

    def record(self, executor: str, workers: int, pass2_started_at: float) -> RunRecord:
        return RunRecord(executor=executor, tasks=self.job.tasks, workers=workers, reused=frozenset(self.verified),
                         timings=self.timings, pass1_reused=self.pass1_reused, started_at=self.started_at,
                         pass2_started_at=pass2_started_at)


def _prepare(cfg: PreprocessConfig) -> _Prepared:
    """Everything up to pass 2: the plan, the output directory, pass 1, the draft manifest and the job file the tasks
    read."""
    started_at, t0 = time.time(), time.perf_counter()
    cfg.validate()
    spec = open_lerobot_dataset(cfg.repo_id, cfg.root, state_keys=cfg.state_keys)
    try:
        delta = parse_delta_actions(cfg.delta_actions, action_dim=spec.action_dim, state_dim=spec.state_dim,
                                    action_names=spec.action_names, state_names=spec.state_names)
    except DeltaSpecError as e:
        raise PreprocessError(f"LeRobot dataset '{cfg.repo_id}': {e}") from None
    # Absolute paths: tasks on other processes and machines may run in another working directory.
    spec = dataclasses.replace(spec, root=spec.root.resolve())
    timings = {"open": time.perf_counter() - t0}
    plan = plan_job(cfg, spec)
    ensure_local(spec, list(plan.episodes), list(plan.cameras.values()))

    out = cfg.output_dir
    run_fingerprint = _run_fingerprint(cfg, plan)
    state = resume.prepare_output(out, run_fingerprint, cfg.overwrite)
    remove_temp_files(out)
    out = out.resolve()

    # Pass 1, unless an interrupted run of the same job finished it.
    t1 = time.perf_counter()
    pass1_reused = resume.pass1_valid(out, state.get("pass1"))
    if not pass1_reused:
        pass1 = run_pass1(cfg, spec, list(plan.episodes), out, delta)
        state = state | {"pass1": resume.pass1_record(out, pass1.rejected)}
        resume.save_state(out, state)
    # The tokenizers, loaded once in this process: the draft describes them, and the merge (and with one worker the
    # tasks, in this process) reuse them through `job_artifacts`.
    tokenizers = (TextTokenizer.load(out / schema.TEXT_TOKENIZER_FILE), FastTokenizer.load(out / schema.FAST_TOKENIZER_DIR))
    draft = _draft_manifest(cfg, plan, delta, *tokenizers, out)
    resume.save_draft(out, draft)
    timings["pass1"] = time.perf_counter() - t1

    fingerprint = resume.fingerprint([run_fingerprint, state["pass1"], draft.vocab_size, draft.skip_tokens])
    job = Pass2Job(out, spec, task_groups(plan.shards, cfg.executor.tasks), fingerprint)
    save_job(job_file(out), job)
    job_artifacts(job, tokenizers)
    verified = {p.path for p in plan.shards if resume.reusable_shard(out, p, fingerprint) is not None}
    return _Prepared(job, verified, timings, started_at, pass1_reused)


def run_preprocess(cfg: PreprocessConfig) -> PreprocessResult:
    """The whole job on the local or Ray executor; returns the manifest it wrote. Raises PreprocessError (and
    subclasses) or DatasetNotFoundError / DatasetFormatError with a one-line message for problems the user can fix."""
    kind = cfg.executor.kind
    if kind == "slurm":
        raise PreprocessError("the Slurm executor writes a job to submit: use write_slurm_preprocess")
    prep = _prepare(cfg)
    job, out = prep.job, prep.job.out
    logging_dir = out / resume.PROGRESS_DIR / PASS2_DIR / f"tasks-{job.tasks}"
    todo = prepare_tasks(job, logging_dir, prep.verified)
    # Local: processes on this machine. Ray: tasks at once (0: as many as the cluster's CPUs allow); a cluster
    # started for the run gets that many CPUs.
    local_cpus = kind == "local" or not cfg.executor.ray_address
    workers = resolve_workers(cfg.workers, len(todo)) if local_cpus else cfg.workers
    pass2_started_at = time.time()
    with ShardProgress(out, job.shards, prep.verified, cfg.progress):
        if todo and kind == "local":
            run_local(job_file(out), job.tasks, workers, logging_dir)
        elif todo:
            run_ray(job_file(out), job.tasks, todo, workers, logging_dir, cfg.executor)
    _, missing = written_shards(job)
    if missing:
        raise unfinished_error(job, missing, logging_dir)
    return finish(job_artifacts(job), job, prep.record(kind, workers, pass2_started_at))


def write_slurm_preprocess(cfg: PreprocessConfig) -> SlurmJob | PreprocessResult:
    """Pass 1 here, then pass 2 (a job array) and the merge (a job depending on it) written for `sbatch`; when every
    shard is already written (the job ran), the merge runs here and the finished run is returned."""
    prep = _prepare(cfg)
    job, out = prep.job, prep.job.out
    logging_dir = out / resume.SLURM_DIR / f"pass2-tasks-{job.tasks}"
    todo = prepare_tasks(job, logging_dir, prep.verified)
    if not todo:
        return finish(job_artifacts(job), job, prep.record("slurm", cfg.workers, time.time()))
    return write_slurm_job(cfg.executor, cfg.workers, job_file(out), job, todo,
                           prep.record("slurm", cfg.workers, time.time()), logging_dir)
