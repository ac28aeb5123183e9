"""How the benchmark times things: interleaved repeats with their spread, peak resident memory, isolated processes.

Two things compared in a figure are timed in the same process, alternately (a, b, b, a, a, b, ...: the order flips
every round), so that a change of machine load during the run hits both; the first call of each (compilation for JAX)
is reported apart and never counted. A ratio figure is the median of the per-round ratios a_i / b_i, and its spread is
the interquartile range of those ratios plus a distribution-free 95 % confidence interval of their median; repeats go
on until that interval lies on one side of the figure's goal (the run decides the goal) or a cap on repeats or seconds
is reached (it says so). Each benchmark phase runs in a fresh spawned process so that its peak memory is its own.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
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


@dataclasses.dataclass(frozen=True)
class Spread:
    """A ratio measured over paired rounds: the median of the per-round ratios, their interquartile range, a 95 %
    confidence interval of the median (order statistics of the rounds, no assumption on the noise's shape), the
    number of rounds, and whether the run settled the figure (the interval on one side of the goal; without a goal,
    its half-width within `rel_tol` of the median) or stopped at a cap (`stop` says which)."""

    median: float
    q1: float
    q3: float
    ci_low: float
    ci_high: float
    n: int
    settled: bool
    stop: str  # "settled", "max_repeats", "max_seconds"; "frames": one pair per frame of a fixed set
    ratios: tuple[float, ...] = ()

    @classmethod
    def of(cls, ratios: Sequence[float], goal: float | None, rel_tol: float, stop: str | None = None) -> Spread:
        xs = sorted(float(x) for x in ratios)
        n = len(xs)
        q1, med, q3 = (xs[0], xs[0], xs[0]) if n == 1 else statistics.quantiles(xs, n=4, method="inclusive")
        med = float(statistics.median(xs))
        lo, hi = median_interval(xs)
        if goal is not None:
            settled = n >= 3 and (lo > goal or hi < goal)
        else:
            settled = n >= 3 and (hi - lo) / 2 <= rel_tol * abs(med)
        return cls(med, float(q1), float(q3), lo, hi, n, settled, stop or ("settled" if settled else "open"),
                   tuple(xs))

    def map(self, fn: Callable[[float], float]) -> Spread:
        """The same rounds through an increasing function (e.g. ratio -> extra cost): order statistics map over."""
        return dataclasses.replace(self, median=fn(self.median), q1=fn(self.q1), q3=fn(self.q3),
                                   ci_low=fn(self.ci_low), ci_high=fn(self.ci_high),
                                   ratios=tuple(fn(x) for x in self.ratios))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"ratios": list(self.ratios)}


def median_interval(xs: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval for the median of sorted `xs`: (x_(k), x_(n+1-k)) with the largest k whose
    coverage 1 - 2 P(Binomial(n, 1/2) < k) is at least `confidence`; below 6 rounds no k reaches 95 % and the
    interval is (min, max) (coverage 1 - 2^(1-n): 94 % at n = 5, 75 % at n = 3)."""
    n = len(xs)
    below, k = 0.0, 1
    for j in range(1, n // 2 + 1):  # P(Bin < j) accumulates term by term
        below += math.comb(n, j - 1) / 2**n
        if 1 - 2 * below >= confidence:
            k = j
        else:
            break
    return float(xs[k - 1]), float(xs[n - k])


@dataclasses.dataclass(frozen=True)
class RepeatPolicy:
    """How long a paired measurement goes on: at least `min_repeats` rounds, then until every ratio is settled
    (Spread.settled), at most `max_repeats` rounds or `max_seconds` of rounds."""

    min_repeats: int = 5
    max_repeats: int = 15
    max_seconds: float = 120.0
    rel_tol: float = 0.05  # settles a ratio without a goal: CI half-width within 5 % of the median


@dataclasses.dataclass(frozen=True)
class Pair:
    """A ratio of two measured costs, scale * cost[a] / cost[b] per round, and the goal it is judged against."""

    a: str
    b: str
    goal: float | None = None
    scale: float = 1.0


@dataclasses.dataclass
class Paired:
    """What `paired_rounds` measured: every round's cost per function, the first (compiling) call, the spreads."""

    costs: dict[str, list[float]]
    first: dict[str, float]
    spreads: dict[str, Spread]
    seconds: float

    def medians(self) -> dict[str, float]:
        return {name: median(c) for name, c in self.costs.items()}

    def record(self) -> dict[str, Any]:
        """The spreads, the first calls and the number of rounds (every function ran in each), for a phase's JSON."""
        return {"spread": {k: v.to_dict() for k, v in self.spreads.items()}, "compile_s": self.first,
                "repeats": len(next(iter(self.costs.values())))}


def paired_rounds(
    fns: dict[str, Callable[[], float]], pairs: dict[str, Pair], policy: RepeatPolicy, *, desc: str | None = None
) -> Paired:
    """Each function returns its own cost in seconds (wall: `wall_cost(fn)`, or CPU seconds); it is called once
    (compiling / warming), then in rounds, all functions per round, the order reversed every other round. Stops as
    `policy` says; a pair's ratio per round is scale * cost_a / cost_b of that round."""
    first = {name: fn() for name, fn in fns.items()}
    costs: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    bar = None
    if desc is not None:
        from tqdm import tqdm

        bar = tqdm(total=policy.max_repeats, desc=desc, leave=False)
    t0 = time.perf_counter()

    def spreads(stop: str | None = None) -> dict[str, Spread]:
        return {key: Spread.of([p.scale * a / b for a, b in zip(costs[p.a], costs[p.b], strict=True)], p.goal,
                               policy.rel_tol, stop) for key, p in pairs.items()}

    stop = "max_repeats"
    for r in range(policy.max_repeats):
        for name in names if r % 2 == 0 else reversed(names):
            costs[name].append(float(fns[name]()))
        if bar is not None:
            bar.update()
        if r + 1 >= policy.min_repeats:
            if all(sp.settled for sp in spreads().values()):
                stop = "settled"
                break
            if time.perf_counter() - t0 >= policy.max_seconds:
                stop = "max_seconds"
                break
    if bar is not None:
        bar.close()
    return Paired(costs, first, spreads(stop), time.perf_counter() - t0)


def wall_cost(fn: Callable[[], Any]) -> Callable[[], float]:
    """A function that calls `fn` and returns its wall seconds (JAX result ready): for `paired_rounds`."""
    return lambda: timed(fn)


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
