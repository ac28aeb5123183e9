"""Running pass 2 over the planned shards: in this process, or in a pool of worker processes (one ShardWorker each,
progress reported through a queue). Every finished shard gets its sidecar at once, so a killed run resumes."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from ki_data.preprocess.config import PreprocessError
from ki_data.preprocess.pass2 import Pass2Context, ShardResult, ShardWorker
from ki_data.preprocess.plan import ShardPlan
from ki_data.preprocess.resume import record_shard


def write_and_record(worker: ShardWorker, plan: ShardPlan, on_frames: Callable[[int], None]) -> ShardResult:
    result = worker.write_shard(plan, on_frames)
    record_shard(worker.ctx.out, result, worker.ctx.fingerprint)
    return result


# Worker processes: one ShardWorker per process, progress reported through a queue.
_WORKER: ShardWorker | None = None
_PROGRESS = None


def _init_worker(ctx: Pass2Context, progress_queue) -> None:
    global _WORKER, _PROGRESS
    # Ctrl-C reaches the whole process group: workers leave at once and quietly (a half-written shard is only a
    # temporary file), the parent reports the interruption.
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    logging.basicConfig(level=logging.WARNING)
    _WORKER, _PROGRESS = ShardWorker(ctx), progress_queue


def _run_shard(plan: ShardPlan) -> ShardResult:
    assert _WORKER is not None
    return write_and_record(_WORKER, plan, lambda n: _PROGRESS.put(n))


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
            worker = ShardWorker(ctx)
            try:
                for plan in plans:
                    results.append(write_and_record(worker, plan, bar.update))
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
