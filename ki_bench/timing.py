"""How the benchmark times things: one interleaved-median helper, peak resident memory, isolated processes.

Two things compared in a figure are timed in the same process, alternately (a, b, a, b, ...), so that a change of
machine load during the run hits both; the first call of each (compilation for JAX) is reported apart and never
counted. Each benchmark phase runs in a fresh spawned process so that its peak memory is its own.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _ready(x: Any) -> Any:
    """Wait for JAX's asynchronous dispatch when `x` holds JAX arrays (no JAX import otherwise)."""
    if "jax" in sys.modules:
        import jax

        return jax.block_until_ready(x)
    return x


def timed(fn: Callable[[], Any]) -> float:
    """Seconds of one call of `fn`, its (JAX) result ready."""
    t0 = time.perf_counter()
    _ready(fn())
    return time.perf_counter() - t0


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], repeats: int, *, desc: str | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """(median seconds, first-call seconds) per function: each is called once (compiling), then `repeats` rounds
    call them in turn. `desc` shows a progress bar."""
    first = {name: timed(fn) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    rounds: Any = range(repeats)
    if desc is not None:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc=desc, leave=False)
    for _ in rounds:
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: median(t) for name, t in times.items()}, first


def peak_rss_mb() -> float:
    """Peak resident memory of this process and of its finished children (the larger), in MiB."""
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) * unit / 2**20


def _resolve(fn: Callable[..., dict] | str) -> Callable[..., dict]:
    if callable(fn):
        return fn
    module, _, name = fn.partition(":")
    return getattr(importlib.import_module(module), name)


def _call_measured(fn: Callable[..., dict] | str, args: tuple, kwargs: dict) -> dict:
    out = _resolve(fn)(*args, **kwargs)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_isolated(fn: Callable[..., dict] | str, /, *args: Any, **kwargs: Any) -> dict:
    """`fn(*args, **kwargs)` in a fresh spawned process; its result gets that process's `peak_rss_mb`. `fn` may be
    named "module:function", so that only the child imports its module."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_call_measured, fn, args, kwargs).result()


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process, all its threads, and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def pin_to_one_core() -> int:
    """Restrict this process (and what it starts) to one CPU, for per-core figures; returns that CPU."""
    cpu = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    return cpu


class Clock:
    """Wall and CPU seconds of a block: `with Clock() as c: ...; c.wall_s, c.cpu_s`."""

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = cpu_seconds() - self._cpu
