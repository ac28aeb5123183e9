"""Pass 2 as DataTrove tasks: on this machine's processes (`LocalPipelineExecutor`) or on a Ray cluster (Ray tasks,
each running DataTrove's executor for its rank; see `run_ray` for why not `RayPipelineExecutor`); the Slurm job
array is written by `slurm.py`.

Task r of T writes the r-th contiguous group of planned shards (`task_groups`), skipping those whose file already
hashes to its sidecar; every shard it writes gets its sidecar at once. A task reads two files of the output
directory: the draft manifest written after pass 1 (`resume.load_draft`; what the shards hold), opened with the
pass-1 artifacts as `DataArtifacts` once per process (`job_artifacts`), and `.ki_progress/pass2/job.pkl`
(`Pass2Job`: the source dataset, the groups, the fingerprint), so an executor ships a path, not a dataset's worth of
episode metadata per task.

Resuming: DataTrove marks a finished task in its logging directory (`completions/`) and skips it when the same
command runs again; our hashes overrule it: a task is run again when one of its shards no longer verifies. The
completion logs live in a directory named for the task count, so a rerun with another --tasks starts them afresh
(finished shards are still kept by their hashes).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import signal
import sys
import threading
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from ki_data.artifacts import DataArtifacts
from ki_data.console import terminal
from ki_data.fast_tokenizer import FastTokenizer
from ki_data.lerobot_source import DatasetSpec
from ki_data.preprocess import resume
from ki_data.preprocess.config import ExecutorConfig, PreprocessError
from ki_data.preprocess.pass2 import ShardWorker
from ki_data.preprocess.plan import ShardPlan
from ki_data.shard_writer import atomic_write_bytes
from ki_data.text_tokenizer import TextTokenizer

PASS2_DIR = "pass2"  # under resume.PROGRESS_DIR: the job file and the local/Ray logging directories


@dataclasses.dataclass(frozen=True)
class Pass2Job:
    """What every pass-2 task and the merge step read besides the draft manifest (pickled once into the job file)."""

    out: Path  # the output directory (absolute): draft manifest, pass-1 artifacts, shards
    spec: DatasetSpec  # the source the tasks read (the manifest records only its identity)
    groups: tuple[tuple[ShardPlan, ...], ...]  # task rank -> its shards, contiguous in plan order
    fingerprint: str  # of the inputs, options and pass-1 artifacts: what a finished shard's sidecar must match

    @property
    def tasks(self) -> int:
        return len(self.groups)

    @property
    def shards(self) -> tuple[ShardPlan, ...]:
        return tuple(p for group in self.groups for p in group)


def task_groups(shards: tuple[ShardPlan, ...], tasks: int) -> tuple[tuple[ShardPlan, ...], ...]:
    """`tasks` (0: one per shard) contiguous groups of nearly equal size; consecutive shards share video files."""
    n = min(tasks or len(shards), len(shards))
    size, extra = divmod(len(shards), n)
    groups, start = [], 0
    for r in range(n):
        end = start + size + (r < extra)
        groups.append(shards[start:end])
        start = end
    return tuple(groups)


def save_job(path: Path, job: Pass2Job) -> None:
    atomic_write_bytes(path, pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))


def load_job(path: str | Path) -> Pass2Job:
    return pickle.loads(Path(path).read_bytes())


def job_file(out: Path) -> Path:
    return out / resume.PROGRESS_DIR / PASS2_DIR / "job.pkl"


# The last job's artifacts in this process: the driver (which runs the merge, and with one worker the tasks too) and
# every task process load the tokenizers once. Keyed by the draft's text, which names the tokenizers by sha256, and
# the fingerprint, which covers the normalization statistics.
_opened: dict[tuple[str, str, str], DataArtifacts] = {}


def job_artifacts(job: Pass2Job, tokenizers: tuple[TextTokenizer, FastTokenizer] | None = None) -> DataArtifacts:
    """The output directory opened with its draft manifest; `tokenizers`: its two tokenizers already loaded."""
    key = (str(job.out), job.fingerprint, resume.draft_path(job.out).read_text())
    if key not in _opened:
        _opened.clear()
        _opened[key] = DataArtifacts.open(job.out, resume.load_draft(job.out), tokenizers=tokenizers)
    return _opened[key]


# ------------------------------------------------------------------------------------------------ pipeline steps


class WriteShards(PipelineStep):
    """DataTrove step: task `rank` writes its group of shards (those not already written and verified)."""

    name = "write shards"
    type = "ki pass 2"

    def __init__(self, job_path: str):
        super().__init__()
        self.job_path = job_path

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> None:
        job = load_job(self.job_path)
        worker = None
        try:
            for plan in job.groups[rank]:
                if resume.reusable_shard(job.out, plan, job.fingerprint) is not None:
                    self.stat_update("shards_kept")
                    continue
                worker = worker or ShardWorker(job_artifacts(job), job.spec)
                result = worker.write_shard(plan, lambda n: self.stat_update("frames", value=n))
                resume.record_shard(job.out, result, job.fingerprint)
                self.stat_update("shards_written")
                self.stat_update("rows", value=result.rows)
        finally:
            if worker is not None:
                worker.close()


# ------------------------------------------------------------------------------------------------ before a run


def prepare_tasks(job: Pass2Job, logging_dir: Path, verified: set[str]) -> list[int]:
    """Forget what the hashes contradict: sidecars of shards that do not verify, and DataTrove completions of tasks
    holding one. Returns the ranks with shards still to write."""
    todo = []
    for rank, group in enumerate(job.groups):
        stale = [p for p in group if p.path not in verified]
        for plan in stale:
            resume.sidecar_path(job.out, plan.path).unlink(missing_ok=True)
        if stale:
            (logging_dir / "completions" / f"{rank:05d}").unlink(missing_ok=True)
            todo.append(rank)
    return todo


class ShardProgress:
    """A tqdm bar over pass 2's frames, advanced as the sidecars of finished shards appear: it works the same
    whichever process, machine or executor writes them (the output directory is shared)."""

    def __init__(self, out: Path, plans: tuple[ShardPlan, ...], done: set[str], enabled: bool):
        from tqdm import tqdm

        self.out, self.plans, self.counted = out, plans, set(done)
        self.bar = tqdm(total=sum(p.frames for p in plans), initial=sum(p.frames for p in plans if p.path in done),
                        desc="pass 2/2 (frames)", unit="fr", disable=not enabled, file=terminal())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _poll(self) -> None:
        for plan in self.plans:
            if plan.path not in self.counted and resume.sidecar_path(self.out, plan.path).is_file():
                self.counted.add(plan.path)
                self.bar.update(plan.frames)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._poll()

    def __enter__(self) -> ShardProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
        self.bar.close()


def resolve_workers(requested: int, tasks: int) -> int:
    """Tasks to run at once on this machine: the request (0: one per CPU core), never more than tasks to run."""
    wanted = requested if requested > 0 else (os.cpu_count() or 1)
    return max(1, min(wanted, tasks))


# ------------------------------------------------------------------------------------------------ executors


class _ForkedChildrenDieWithParent:
    """While active, a process forked from this one gets SIGKILL when its parent dies (Linux `PR_SET_PDEATHSIG`).

    `LocalPipelineExecutor.run` forks a `multiprocess` manager server that waits for connections forever: without
    this, every run killed from outside (`kill -9`, the OOM killer) would leave an idle copy of the whole
    process behind (about 0.5 GB here)."""

    active = False

    @staticmethod
    def after_fork_in_child() -> None:
        if _ForkedChildrenDieWithParent.active and sys.platform == "linux":
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG

    def __enter__(self) -> None:
        type(self).active = True

    def __exit__(self, *exc) -> None:
        type(self).active = False


os.register_at_fork(after_in_child=_ForkedChildrenDieWithParent.after_fork_in_child)


def run_local(job_path: Path, tasks: int, workers: int, logging_dir: Path) -> None:
    """DataTrove's LocalPipelineExecutor: one task after another in this process (workers=1), or a pool of
    `workers` processes. A task's exception (e.g. a BadInputError) reaches the caller as it was raised."""
    from datatrove.executor import LocalPipelineExecutor

    with _ForkedChildrenDieWithParent():
        LocalPipelineExecutor(pipeline=[WriteShards(str(job_path))], tasks=tasks, workers=workers,
                              logging_dir=str(logging_dir), skip_completed=True).run()


def ki_pass2_task(job_path: str, tasks: int, rank: int, logging_dir: str) -> None:
    """One pass-2 task, as a Ray task runs it: DataTrove's run of this rank, in this process (its task log, stats and
    completion record; skipped when a previous run completed it). `_run_for_rank` is what every DataTrove executor
    calls per rank; `LocalPipelineExecutor.run` would also fork a `multiprocess` manager, and a forked child keeps
    the Ray worker's connection open, so Ray would not see the worker die."""
    from datatrove.executor import LocalPipelineExecutor

    executor = LocalPipelineExecutor(pipeline=[WriteShards(job_path)], tasks=tasks, workers=1,
                                     logging_dir=logging_dir, skip_completed=True)
    executor._run_for_rank(rank)


def run_ray(job_path: Path, tasks: int, ranks: list[int], workers: int, logging_dir: Path, ex: ExecutorConfig) -> None:
    """Ray tasks (`ray.remote`), one per DataTrove rank, on the cluster at `ex.ray_address` or on a local one started
    for the run with `workers` CPUs. Every node needs ki installed and the output directory on a shared filesystem.

    Not DataTrove's RayPipelineExecutor: it runs each rank in a `multiprocess` pool child of its actor, and when that
    child dies (SIGKILL, the OOM killer) the pool waits for it forever and the run hangs without an error. A Ray task
    whose worker process dies is retried by Ray (`max_retries`), and the retry keeps the shards already written.
    """
    import ray

    owns = not ray.is_initialized()
    if owns:
        if ex.ray_address:
            ray.init(address=ex.ray_address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(ki_pass2_task).options(num_cpus=1, memory=int(ex.mem_per_cpu_gb * 2**30), max_retries=3)
    limit = workers if workers > 0 else len(ranks)
    queue, running = list(ranks), {}  # object ref -> rank
    try:
        while queue or running:
            while queue and len(running) < limit:
                rank = queue.pop(0)
                running[remote.remote(str(job_path), tasks, rank, str(logging_dir))] = rank
            [done], _ = ray.wait(list(running), num_returns=1)
            rank = running.pop(done)
            try:
                ray.get(done)
            except ray.exceptions.RayTaskError as e:
                # The task's own exception (e.g. a BadInputError naming the episode and frame), without Ray's wrapper.
                raise (e.cause if isinstance(e.cause, PreprocessError) else e) from None
            except ray.exceptions.RayError as e:  # the worker died more often than Ray retries, the node was lost...
                raise PreprocessError(
                    f"pass 2 stopped: Ray task {rank} failed ({type(e).__name__}: {str(e).splitlines()[0]}); run the "
                    f"same command again to resume from the finished shards"
                ) from None
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
        if owns:
            ray.shutdown()


_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*")


def task_error(logging_dir: Path, rank: int) -> str | None:
    """The last exception line a DataTrove task logged, if any."""
    path = logging_dir / "logs" / f"task_{rank:05d}.log"
    if not path.is_file():
        return None
    lines = [m.group(0) for line in path.read_text(errors="replace").splitlines() if (m := _ERROR_LINE.match(line))]
    return lines[-1] if lines else None


def unfinished_error(job: Pass2Job, missing: list[str], logging_dir: Path) -> PreprocessError:
    ranks = [r for r, g in enumerate(job.groups) if any(p.path in missing for p in g)]
    said = next((e for r in ranks if (e := task_error(logging_dir, r))), None)
    return PreprocessError(
        f"pass 2 did not finish: {len(missing)} of {len(job.shards)} shard(s) missing after task(s) "
        f"{ranks[:10]}{'...' if len(ranks) > 10 else ''} ended"
        + (f"; task {ranks[0]} said: {said}" if said else "")
        + f" (task logs in {logging_dir / 'logs'}); run the same command again to resume"
    )
