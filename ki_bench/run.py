"""The benchmark behind `python -m pipelines.benchmark`: speed and memory ratios, each of two things measured in the
same run, on the gym-pusht demo dataset and the model presets.

Every phase runs in its own spawned process, one after the other, so that its peak resident memory is its own
(`ru_maxrss` of that process and of anything it started) and no phase warms another's caches. Timed code runs after
its imports and (for JAX) after compilation. The phases live with what they measure (ki_bench.preprocess, .loader,
.model); the figures computed from their raw measurements are ki_bench.figures' records.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ki_bench import datasets
from ki_bench.figures import TARGETS, figures_for, gpu_figures
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
    gpu: bool = False  # the GPU mode: π0.5-size figures only (ki_bench.gpu)
    partial_json: Path | None = None  # the raw measurements so far, rewritten after every phase (a slow machine)


def _set_child_environment(cache_dir: Path, fast_compile: bool) -> None:
    """Children inherit these: offline, headless simulator, quiet encoders, caches inside the benchmark's folder."""
    if fast_compile:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SVT_LOG", "1")
    os.environ.setdefault("HF_LEROBOT_HOME", str(cache_dir / "lerobot"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(cache_dir / "hf_datasets"))


def _phases(opts: BenchOptions, cache: Path, compile_cache: str | None, raw: dict) -> tuple[list, dict]:
    """(the phases in order: (raw key, progress label, run), the datasets measured: raw key -> description)."""
    s = opts.settings
    if opts.gpu:
        return [("gpu", f"GPU figures ({s.gpu_preset})", lambda: run_isolated(
            "ki_bench.gpu:gpu_phase", s.gpu_preset, s.gpu_train_batch, s.gpu_train_steps, s.gpu_repeats,
            compile_cache, s.gpu_action_horizon, s.gpu_action_dim))], {}
    if opts.repo_id:
        repo_id, root = opts.repo_id, opts.root or str(Path(os.environ["HF_LEROBOT_HOME"]) / opts.repo_id)
    else:
        repo_id, root = datasets.PUSHT_REPO_ID, str(datasets.pusht_root(cache, s.episodes, s.max_steps))
    aloha_root = str(datasets.aloha_like_root(cache, s.aloha))
    aloha_id = datasets.ALOHA_REPO_ID
    shards = str(cache / "shards" / Path(root).name)
    aloha_shards = str(cache / "shards" / Path(aloha_root).name)
    horizon = lambda key: raw[key]["action_horizon"]  # noqa: E731
    goals = TARGETS  # the stopping rule of a paired measurement: repeat until the figure is on one side of its goal
    phases: list[tuple[str, str, Callable[[], dict]]] = []
    if not opts.repo_id:
        phases.append(("record", "record demo dataset", lambda: run_isolated(
            "ki_bench.datasets:record_pusht_phase", repo_id, root, s.episodes, s.max_steps)))
    phases += [
        ("record_aloha", "record ALOHA-like dataset",
         lambda: run_isolated("ki_bench.datasets:record_aloha_like_phase", aloha_root, s.aloha)),
        ("preprocess", "ALOHA-like: preprocess + decode only", lambda: run_isolated(
            "ki_bench.preprocess:preprocess_phase", aloha_id, aloha_root, aloha_shards, s.aloha_options, s.policy,
            s.aloha_loop_frames, goals)),
        ("lerobot_loop", "ALOHA-like: LeRobotDataset loop", lambda: run_isolated(
            "ki_bench.preprocess:lerobot_loop_phase", aloha_id, aloha_root, horizon("preprocess"), s.aloha_loop_frames)),
        ("workers", "ALOHA-like: 1 vs 2 workers, camera threads", lambda: run_isolated(
            "ki_bench.preprocess:workers_phase", aloha_id, aloha_root, str(cache / "shards" / "workers"),
            s.aloha_options)),
        ("pass2_prepare", "ALOHA-like: pass 1 for the pass-2 worker", lambda: run_isolated(
            "ki_bench.preprocess:prepare_pass2_phase", aloha_id, aloha_root, str(cache / "shards" / "pass2_worker"),
            s.aloha_options)),
        ("pass2_worker", "ALOHA-like: one pass-2 worker (memory, stages, wall)", lambda: run_isolated(
            "ki_bench.preprocess:pass2_worker_phase", raw["pass2_prepare"]["job"], s.policy)),
        ("core_loader", "ALOHA-like: loaders on one core", lambda: run_isolated(
            "ki_bench.loader:per_core_loader_phase", aloha_shards, aloha_id, aloha_root, s.core_loader_batch,
            s.core_loader_batches, s.policy, goals.get("loader_vs_lerobot_loader_per_core"))),
        ("memory", f"XLA memory ({s.memory_preset})", lambda: run_isolated(
            "ki_bench.memory:memory_phase", s.memory_preset, s.memory_batch,
            ("cam_high", "cam_left_wrist", "cam_right_wrist"))),
        ("preprocess_pusht", "pusht: preprocess + decode only", lambda: run_isolated(
            "ki_bench.preprocess:preprocess_phase", repo_id, root, shards, s.preprocess_options, s.policy,
            s.loop_frames, {})),
        ("lerobot_loop_pusht", "pusht: LeRobotDataset loop", lambda: run_isolated(
            "ki_bench.preprocess:lerobot_loop_phase", repo_id, root, horizon("preprocess_pusht"), s.loop_frames)),
        ("loader", "pusht: loader", lambda: run_isolated(
            "ki_bench.loader:loader_phase", shards, s.loader_batch, s.loader_batches, opts.loader_workers)),
    ]
    for z in s.sizes:
        phases.append((f"train_{z.label}", f"train step ({z.label})", lambda z=z: run_isolated(
            "ki_bench.model:train_phase", shards, z.preset, z.train_batch, z.train_steps, compile_cache)))
    for label in s.model_sizes:
        phases.append((f"model_{label}", f"model timings ({label})", lambda z=s.size(label): run_isolated(
            "ki_bench.model:model_phase", shards, z.preset, s.model_batch, s.policy, compile_cache,
            goals.get("fast_over_flow_latency") if z.label == s.headline_model else None,
            goals.get("rtc_over_plain_latency") if z.label == s.headline_model else None)))
    phases.append(("flow_cost", f"KI cost ({s.flow_cost_preset})", lambda: run_isolated(
        "ki_bench.model:flow_cost_phase", s.flow_cost_preset, s.flow_cost_batch, s.policy, compile_cache)))
    for preset in s.flops_presets:
        phases.append((f"flops_{preset}", f"FLOP count ({preset})",
                       lambda preset=preset: run_isolated("ki_bench.model:flops_phase", shards, preset, s.model_batch)))
    described = {"preprocess": f"{aloha_id} ({aloha_root})", "preprocess_pusht": f"{repo_id} ({root})"}
    return phases, described


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
    raw: dict[str, Any] = {}
    phases, described = _phases(opts, cache, compile_cache, raw)
    bar = tqdm(phases, desc="benchmark", unit="phase", disable=not opts.progress)
    for key, name, run in bar:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        raw[key] = run()
        raw[key]["phase_wall_s"] = time.perf_counter() - t0
        if opts.partial_json is not None:
            opts.partial_json.write_text(json.dumps({"raw": raw}, indent=2))
    bar.close()

    doc = document(raw, figures(opts))
    jax_phase = raw["gpu"] if opts.gpu else raw[f"train_{s.sizes[0].label}"]
    doc["mode"] = "gpu" if opts.gpu else "cpu"
    doc["machine"] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "jax_backend": jax_phase["jax_backend"],
        "device": jax_phase["device"],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
    }
    doc["settings"] = dataclasses.asdict(s) | {
        "datasets": described, "loader_workers": opts.loader_workers, "compile_cache": compile_cache,
    }
    doc["raw"] = raw
    doc["wall_s"] = time.perf_counter() - t_start
    return doc


def figures(opts: BenchOptions) -> list:
    """The figure records of this run (ki_bench.figures)."""
    return gpu_figures(opts.settings) if opts.gpu else figures_for(opts.settings)
