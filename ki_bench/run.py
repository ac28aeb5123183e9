"""The benchmark behind `python -m pipelines.benchmark`: speed and memory ratios, each of two things measured in the
same run, on the gym-pusht demo dataset and the model presets.

Every phase runs in its own spawned process, one after the other, so that its peak resident memory is its own
(`ru_maxrss` of that process and of anything it started) and no phase warms another's caches. Timed code runs after
its imports and (for JAX) after compilation. The phases live with what they measure (ki_bench.preprocess, .loader,
.model); the figures computed from their raw measurements are ki_bench.figures' records.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ki_bench import datasets
from ki_bench.figures import figures_for
from ki_bench.report import document
from ki_bench.settings import BenchSettings
from ki_bench.timing import run_isolated, usable_cpus

# Phases are named "module:function": only their spawned child imports their module and its heavy libraries
# (lerobot/torch, jax), so the orchestrating process stays small and every child pays for exactly its own imports.


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    settings: BenchSettings
    cache_dir: Path
    repo_id: str | None = None  # another LeRobot dataset instead of the recorded demo
    root: str | None = None
    loader_workers: int = 0
    compile_cache: bool = True
    progress: bool = True


def _set_child_environment(cache_dir: Path, fast_compile: bool) -> None:
    """Children inherit these: offline, headless simulator, quiet encoders, caches inside the benchmark's folder."""
    if fast_compile:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SVT_LOG", "1")
    os.environ.setdefault("HF_LEROBOT_HOME", str(cache_dir / "lerobot"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(cache_dir / "hf_datasets"))


def run_benchmark(opts: BenchOptions) -> dict:
    """All phases, one process each, in order; returns the JSON document (figures, targets, raw, machine)."""
    from tqdm import tqdm

    s = opts.settings
    cache = opts.cache_dir.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    _set_child_environment(cache, s.fast_compile)
    compile_cache = str(cache / "jax_compile") if opts.compile_cache else None
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    if opts.repo_id:
        repo_id, root = opts.repo_id, opts.root or str(Path(os.environ["HF_LEROBOT_HOME"]) / opts.repo_id)
    else:
        repo_id, root = datasets.PUSHT_REPO_ID, str(datasets.pusht_root(cache, s.episodes, s.max_steps))
    shards = str(cache / "shards" / f"{Path(root).name}")

    raw: dict[str, Any] = {}
    # (JSON key, what the progress bar shows, the phase); each runs in a fresh process, in this order.
    phases: list[tuple[str, str, Callable[[], dict]]] = []
    if not opts.repo_id:
        phases.append(("record", "record demo dataset",
                       lambda: run_isolated("ki_bench.datasets:record_pusht_phase", repo_id, root, s.episodes, s.max_steps)))
    phases += [
        ("preprocess", "preprocess + decode only",
         lambda: run_isolated("ki_bench.preprocess:preprocess_phase", repo_id, root, shards, s.preprocess_options, s.preprocess_repeats)),
        ("lerobot_loop", "LeRobotDataset loop",
         lambda: run_isolated("ki_bench.preprocess:lerobot_loop_phase", repo_id, root, raw["preprocess"]["action_horizon"], s.loop_frames)),
        ("loader", "loader",
         lambda: run_isolated("ki_bench.loader:loader_phase", shards, s.loader_batch, s.loader_batches, opts.loader_workers)),
    ]
    for z in s.sizes:
        phases.append((f"train_{z.label}", f"train step ({z.label})", lambda z=z: run_isolated(
            "ki_bench.model:train_phase", shards, z.preset, z.train_batch, z.train_steps, compile_cache)))
    for label in s.model_sizes:
        phases.append((f"model_{label}", f"model timings ({label})", lambda z=s.size(label): run_isolated(
            "ki_bench.model:model_phase", shards, z.preset, s.model_batch, s.repeats, compile_cache)))
    for preset in s.flops_presets:
        phases.append((f"flops_{preset}", f"FLOP count ({preset})",
                       lambda preset=preset: run_isolated("ki_bench.model:flops_phase", shards, preset, s.model_batch)))

    bar = tqdm(phases, desc="benchmark", unit="phase", disable=not opts.progress)
    for key, name, run in bar:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        raw[key] = run()
        raw[key]["phase_wall_s"] = time.perf_counter() - t0
    bar.close()

    doc = document(raw, figures_for(s))
    any_train = raw[f"train_{s.sizes[0].label}"]
    doc["machine"] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "jax_backend": any_train["jax_backend"],
        "device": any_train["device"],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
    }
    doc["settings"] = dataclasses.asdict(s) | {
        "dataset": {"repo_id": repo_id, "root": root}, "shards": shards, "loader_workers": opts.loader_workers,
        "compile_cache": compile_cache,
    }
    doc["raw"] = raw
    doc["wall_s"] = time.perf_counter() - t_start
    return doc
