"""The benchmark behind `python -m pipelines.benchmark`: speed and memory ratios, each of two things measured in the
same run, on the gym-pusht demo dataset and the model presets.

Every phase runs in its own spawned process, one after the other, so that its peak resident memory is its own
(`ru_maxrss` of that process and of anything it started) and no phase warms another's caches. Timed code runs after
its imports and (for JAX) after compilation. The measuring functions are the owners' own where they exist
(pipelines.preprocess_report, ki_data.loader.measure_throughput, ki_model.profiling.measure_step_throughput,
ki_model.profiling); this module adds cached vs uncached sampling, the prefix pass alone and XLA FLOP counts.

| figure | a / b |
|---|---|
| `preprocess_vs_lerobot_loop` | preprocess frames/s / `LeRobotDataset[i]` loop frames/s (delta_timestamps action chunk) |
| `decode_only_over_preprocess` | decoding the same videos and nothing else (s) / whole `run_preprocess` call (s) |
| `loader_over_train_step` | loader samples/s / samples/s the compiled train step consumes (tiny; `_mid`: mid preset) |
| `two_pass_over_single_pass` | two-pass reference step (s) / single-pass KI step (s), same config and batch |
| `fast_over_flow_latency` | `sample_fast_tokens` latency / `sample_actions` latency (10 flow steps, cached prefix) |
| `uncached_over_cached` | `sample_actions` recomputing the prefix every step / with the KV cache |
"""

from __future__ import annotations

import dataclasses
import functools
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

# Heavy libraries (lerobot/torch, jax) are imported inside the phases: the orchestrating process stays small and
# every child pays for exactly the imports its phase needs.

BENCH_REPO_ID = "ki/pusht_bench"

# Targets from the benchmark issue (reported, never asserted). Keys are the JSON figures.
TARGETS: dict[str, float] = {
    "preprocess_vs_lerobot_loop": 5.0,
    "decode_only_over_preprocess": 0.67,
    "loader_over_train_step": 10.0,
    "two_pass_over_single_pass": 1.5,
    "fast_over_flow_latency": 5.0,
}
REQUIRED_KEYS = (
    "preprocess_vs_lerobot_loop",
    "decode_only_over_preprocess",
    "loader_over_train_step",
    "two_pass_over_single_pass",
    "fast_over_flow_latency",
    "uncached_over_cached",
    "preprocess_peak_rss_mb",
    "train_peak_rss_mb",
)


@dataclasses.dataclass(frozen=True)
class ModelSize:
    label: str  # suffix of the per-config JSON keys ("tiny", "mid")
    preset: str  # a ki_model.train.PRESETS name; the data-dependent fields come from the shards' manifest
    train_batch: int
    train_steps: int  # timed steps after the compiling one


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    mode: str
    episodes: int  # demo dataset size (gym-pusht, scripted policy)
    max_steps: int  # episode length cap
    preprocess_options: dict[str, int]  # PreprocessConfig fields; {} = the demo's defaults (224 px, horizon 50)
    preprocess_repeats: int
    loop_frames: int | None  # frames of the LeRobotDataset loop (None: all, the frames preprocess reads)
    loader_batch: int
    loader_batches: int
    sizes: tuple[ModelSize, ...]  # loader vs train step and training memory, per config
    model_sizes: tuple[str, ...]  # labels of `sizes` for the two-pass and sampling comparisons
    model_batch: int  # train-step batch of the two-pass comparison (sampling uses batch 1)
    repeats: int  # timed repeats of the model comparisons (median)
    headline: str = "mid"  # label whose model figures fill the unsuffixed keys
    flops_presets: tuple[str, ...] = ()  # more presets whose train-step FLOPs are counted (no weights, no compile)
    fast_compile: bool = False  # XLA backend optimisation off (CPU): compiles faster, runs slower; tests only

    def size(self, label: str) -> ModelSize:
        return next(s for s in self.sizes if s.label == label)


_TINY_SHARDS = {"image_size": 32, "action_horizon": 10, "max_token_len": 64, "max_text_len": 32}

SETTINGS: dict[str, BenchSettings] = {
    # tiny = the demo's training (tiny preset, batch 16, on the demo shards); mid = width 256, depth 4 on 224 px.
    "full": BenchSettings(
        mode="full", episodes=20, max_steps=150, preprocess_options={}, preprocess_repeats=3, loop_frames=None,
        loader_batch=16, loader_batches=30,
        sizes=(ModelSize("tiny", "tiny", 16, 10), ModelSize("mid", "small", 8, 5)),
        model_sizes=("tiny", "mid"), model_batch=4, repeats=5, flops_presets=("pi05",),
    ),
    "quick": BenchSettings(
        mode="quick", episodes=4, max_steps=150, preprocess_options={}, preprocess_repeats=2, loop_frames=None,
        loader_batch=16, loader_batches=12,
        sizes=(ModelSize("tiny", "tiny", 16, 5), ModelSize("mid", "small", 4, 3)),
        model_sizes=("mid",), model_batch=2, repeats=3,
    ),
    # Tests only: everything shrunk (32 px shards, the tiny preset alone, quick compiles); its numbers mean nothing.
    "smoke": BenchSettings(
        mode="smoke", episodes=2, max_steps=12, preprocess_options=_TINY_SHARDS, preprocess_repeats=1,
        loop_frames=None, loader_batch=4, loader_batches=3, sizes=(ModelSize("tiny", "tiny", 4, 1),),
        model_sizes=("tiny",), model_batch=2, repeats=1, fast_compile=True,
    ),
}


# ------------------------------------------------------------------------------------------------ processes


def peak_rss_mb() -> float:
    """Peak resident memory of this process and of its finished children (the larger), in MiB."""
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) * unit / 2**20


def _call_measured(fn: Callable[..., dict], args: tuple, kwargs: dict) -> dict:
    out = fn(*args, **kwargs)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_isolated(fn: Callable[..., dict], /, *args: Any, **kwargs: Any) -> dict:
    """`fn(*args, **kwargs)` in a fresh spawned process; its result gets that process's `peak_rss_mb`."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_call_measured, fn, args, kwargs).result()


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """(median seconds, first-call seconds) per function: the first call compiles, then `repeats` alternating rounds."""
    import jax

    def timed(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - t0

    first = {name: timed(fn) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: _median(t) for name, t in times.items()}, first


# ------------------------------------------------------------------------------------------------ dataset


def bench_dataset_root(cache_dir: Path, settings: BenchSettings) -> Path:
    return cache_dir / "lerobot" / f"{BENCH_REPO_ID}_e{settings.episodes}_s{settings.max_steps}"


_COMPLETE = ".ki_bench_complete"


def record_phase(repo_id: str, root: str, episodes: int, max_steps: int) -> dict:
    """Record the demo dataset (gym-pusht, lerobot v3 video) unless a complete one is there."""
    from ki_data.demo_pusht import DemoConfig, record_demo_dataset

    path = Path(root)
    if (path / _COMPLETE).is_file():
        return {"recorded": False}
    if path.exists():  # an interrupted recording inside the benchmark's own cache folder
        shutil.rmtree(path)
    summary = record_demo_dataset(
        DemoConfig(repo_id=repo_id, root=root, episodes=episodes, max_steps=max_steps, seed=0),
        progress=False,
    )
    (path / _COMPLETE).write_text(json.dumps({"episodes": episodes, "frames": summary.frames}))
    return {"recorded": True, "record_s": summary.seconds, "frames": summary.frames}


def preprocess_phase(repo_id: str, root: str, out: str, options: dict, repeats: int) -> dict:
    """pipelines.preprocess_report's measurements, interleaved: decoding the videos with
    the sequential reader and nothing else, then the whole `run_preprocess` call (one worker, imports off the
    clock); then pass 1 alone and the per-frame cost of resize + PNG encode."""
    from pipelines.preprocess_report import (
        measure_decode_only_fps,
        measure_image_cost_ms,
        measure_preprocess_fps,
        measure_startup_s,
    )

    import_s = measure_startup_s()
    rss_imports = peak_rss_mb()
    decode, pre = [], []
    for _ in range(repeats):
        decode.append(measure_decode_only_fps(repo_id, root))
        pre.append(measure_preprocess_fps(repo_id, root, workers=1, out_dir=out, **options))
    pre_s, dec_s = _median([r["seconds"] for r in pre]), _median([r["seconds"] for r in decode])
    frames = pre[-1]["frames"]
    image_size = options.get("image_size", 224)
    return {
        "frames": frames,
        "preprocess_s": pre_s,
        "preprocess_s_all": [r["seconds"] for r in pre],
        "preprocess_fps": frames / pre_s,
        "decode_only_frames": decode[-1]["frames"],
        "decode_only_s": dec_s,
        "decode_only_s_all": [r["seconds"] for r in decode],
        "pass1_s": _time_pass1(repo_id, root, out, options),
        "image_cost_ms": measure_image_cost_ms(repo_id, root, image_size),
        "image_size": image_size,
        "action_horizon": options.get("action_horizon", 50),
        "import_s": import_s,
        "rss_after_imports_mb": rss_imports,
    }


def _time_pass1(repo_id: str, root: str, out: str, options: dict) -> float:
    """Pass 1 alone (row checks, statistics, text tokenizer training, FAST fit): a per-dataset cost."""
    from ki_data.lerobot_source import open_lerobot_dataset
    from ki_data.preprocess import PreprocessConfig, run_pass1, select_episodes

    cfg = PreprocessConfig(repo_id=repo_id, root=root, output=out, progress=False, **options)
    spec = open_lerobot_dataset(repo_id, root)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer").mkdir()
        t0 = time.perf_counter()
        run_pass1(cfg, spec, select_episodes(spec, cfg.episodes), Path(tmp))
        return time.perf_counter() - t0


def lerobot_loop_phase(repo_id: str, root: str, action_horizon: int, max_frames: int | None) -> dict:
    """openpi's way of reading (pipelines.preprocess_report): `LeRobotDataset(delta_timestamps={"action": chunk})[i]`
    for every frame, video decoded per item; imports and dataset construction off the clock."""
    from pipelines.preprocess_report import measure_lerobot_loop_fps, measure_startup_s

    import_s = measure_startup_s()
    rss_imports = peak_rss_mb()
    out = measure_lerobot_loop_fps(repo_id, root, action_horizon=action_horizon, max_frames=max_frames)
    return out | {"import_s": import_s, "rss_after_imports_mb": rss_imports}


def loader_phase(shards: str, batch_size: int, num_batches: int, num_workers: int) -> dict:
    """ki_data.loader.measure_throughput (PNG decode + augmentation, as training reads)."""
    from ki_data.loader import measure_throughput

    return measure_throughput(shards, batch_size=batch_size, num_batches=num_batches, num_workers=num_workers)


def _use_compile_cache(compile_cache: str | None) -> None:
    if compile_cache:
        from ki_model.compile import enable_compilation_cache

        enable_compilation_cache(compile_cache, min_compile_time_s=0.0)


def train_phase(shards: str, preset: str, batch_size: int, steps: int, compile_cache: str | None) -> dict:
    """ki_model.profiling.measure_step_throughput: the trainer's jitted step, compiled, on a batch from the shards.
    This process's peak memory is that of training at this config (model, optimizer, compiled step, a batch)."""
    _use_compile_cache(compile_cache)
    import jax

    from ki_model.profiling import measure_step_throughput

    out = measure_step_throughput(shards, config=preset, batch_size=batch_size, steps=steps)
    out["step_s"] = out["seconds"] / out["steps"]
    out["jax_backend"] = jax.default_backend()
    out["device"] = jax.devices()[0].device_kind
    return out


def demo_setup(shards: str, preset: str):
    """A ki_model.profiling.ReportSetup with the demo shards' config (preset architecture, manifest data fields)
    and their tokenizers, cameras and state size: synthetic batches in exactly the demo's format."""
    from ki_data import DataArtifacts
    from ki_model.profiling import ReportSetup
    from ki_model.synthetic import SyntheticTokenizers
    from ki_model.train import model_config

    art = DataArtifacts.open(shards)
    toks = SyntheticTokenizers(art.prompt.text, art.prompt.fast, art.manifest.prompt_layout)
    return ReportSetup(model_config(preset, art.manifest), toks, art.manifest.cameras, art.manifest.state_dim)


def time_prefix_and_cache(setup, *, repeats: int, seed: int = 0) -> dict:
    """`sample_actions` with the KV cache vs recomputing [prefix | actions] every flow step (use_cache=False), and
    the prefix pass alone (what every sampler pays once), interleaved after compilation; batch 1."""
    from flax import nnx
    import jax

    from ki_model import reference
    from ki_model.synthetic import synthetic_batch

    cfg = setup.config
    batch = synthetic_batch(cfg, setup.tokenizers, 1, seed=seed, cameras=setup.cameras, state_dim=setup.state_dim)
    model = cfg.create(nnx.Rngs(seed))
    steps = cfg.num_flow_steps
    cached = nnx.jit(lambda m, rng, obs: m.sample_actions(rng, obs, num_steps=steps))
    noise = jax.random.normal(jax.random.key(1), (1, cfg.action_horizon, cfg.action_dim))
    uncached = nnx.jit(lambda m, rng, obs: reference.sample_actions_no_cache(m, obs, noise, steps))
    prefix = nnx.jit(lambda m, obs: m.prefix_cache(obs))
    rng = jax.random.key(1)
    med, first = _interleaved_medians(
        {
            "cached": lambda: cached(model, rng, batch.obs),
            "uncached": lambda: uncached(model, rng, batch.obs),
            "prefix": lambda: prefix(model, batch.obs),
        },
        repeats,
    )
    return {
        "flow_steps": steps,
        "cached_s": med["cached"],
        "uncached_s": med["uncached"],
        "prefix_s": med["prefix"],
        "uncached_over_cached": med["uncached"] / med["cached"],
        "compile_s": first,
        "repeats": repeats,
    }


def train_step_flops(setup, *, batch_size: int, seed: int = 0) -> dict:
    """XLA's FLOP count of loss + gradient (cost analysis of the lowered program, abstract weights: nothing is
    allocated or compiled), single pass vs the two-pass reference on the same batch. The reference's second backbone
    pass feeds a stop-gradient cache, so it adds one forward and no backward: the count says how far apart the two
    steps can be at this config, whatever the hardware."""
    import jax
    from flax import nnx

    from ki_model import reference
    from ki_model.synthetic import synthetic_batch
    from ki_model.train import abstract_model

    cfg = setup.config
    batch = synthetic_batch(cfg, setup.tokenizers, batch_size, seed=seed, cameras=setup.cameras, state_dim=setup.state_dim)
    graphdef, params = abstract_model(cfg)
    rng = jax.random.key(seed)

    def flops(two_pass: bool) -> float:
        def loss(p):
            model = nnx.merge(graphdef, p)
            fn = functools.partial(reference.compute_loss_two_pass, model) if two_pass else model.compute_loss
            return fn(rng, batch.obs, batch.actions, batch.action_is_pad)["total"]

        cost = jax.jit(jax.grad(loss)).lower(params).cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    single, two = flops(False), flops(True)
    return {"batch_size": batch_size, "single_pass_gflop": single / 1e9, "two_pass_gflop": two / 1e9,
            "two_pass_over_single_pass_flops": two / single}


def flops_phase(shards: str, preset: str, batch_size: int) -> dict:
    """train_step_flops at another preset (e.g. pi05: full size, abstract weights) on the demo's data fields."""
    return {"preset": preset} | train_step_flops(demo_setup(shards, preset), batch_size=batch_size)


def model_phase(shards: str, preset: str, batch_size: int, repeats: int, compile_cache: str | None) -> dict:
    """ki_model.profiling's timings at the demo's config: single vs two-pass train step on one
    batch, sample_actions vs sample_fast_tokens; then cached vs uncached sampling and the prefix pass."""
    _use_compile_cache(compile_cache)
    import jax

    from ki_model.profiling import time_sampling, time_train_step

    setup = demo_setup(shards, preset)
    cfg = setup.config
    train = time_train_step(setup, batch_size=batch_size, repeats=repeats)
    sampling = time_sampling(setup, batch_size=1, repeats=repeats)
    cache = time_prefix_and_cache(setup, repeats=repeats)
    flops = train_step_flops(setup, batch_size=batch_size)
    return {
        "preset": preset,
        "config": {k: v for k, v in cfg.to_dict().items() if not isinstance(v, list)},
        "image_tokens": cfg.tokens_per_image * len(setup.cameras),
        "train_step": train,
        "sampling": sampling,
        "cache": cache,
        "flops": flops,
        "jax_backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
    }


# ------------------------------------------------------------------------------------------------ the run


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
        repo_id, root = BENCH_REPO_ID, str(bench_dataset_root(cache, s))
    shards = str(cache / "shards" / f"{Path(root).name}")

    raw: dict[str, Any] = {}
    # (JSON key, what the progress bar shows, the phase); each runs in a fresh process, in this order.
    phases: list[tuple[str, str, Callable[[], dict]]] = []
    if not opts.repo_id:
        phases.append(("record", "record demo dataset",
                       lambda: run_isolated(record_phase, repo_id, root, s.episodes, s.max_steps)))
    phases += [
        ("preprocess", "preprocess + decode only",
         lambda: run_isolated(preprocess_phase, repo_id, root, shards, s.preprocess_options, s.preprocess_repeats)),
        ("lerobot_loop", "LeRobotDataset loop",
         lambda: run_isolated(lerobot_loop_phase, repo_id, root, raw["preprocess"]["action_horizon"], s.loop_frames)),
        ("loader", "loader",
         lambda: run_isolated(loader_phase, shards, s.loader_batch, s.loader_batches, opts.loader_workers)),
    ]
    for z in s.sizes:
        phases.append((f"train_{z.label}", f"train step ({z.label})", lambda z=z: run_isolated(
            train_phase, shards, z.preset, z.train_batch, z.train_steps, compile_cache)))
    for label in s.model_sizes:
        phases.append((f"model_{label}", f"model timings ({label})", lambda z=s.size(label): run_isolated(
            model_phase, shards, z.preset, s.model_batch, s.repeats, compile_cache)))
    for preset in s.flops_presets:
        phases.append((f"flops_{preset}", f"FLOP count ({preset})",
                       lambda preset=preset: run_isolated(flops_phase, shards, preset, s.model_batch)))

    bar = tqdm(phases, desc="benchmark", unit="phase", disable=not opts.progress)
    for key, name, run in bar:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        raw[key] = run()
        raw[key]["phase_wall_s"] = time.perf_counter() - t0
    bar.close()

    doc = figures(raw, s)
    doc["targets"] = dict(TARGETS)
    doc["met"] = {k: bool(doc[k] >= v) for k, v in TARGETS.items()}
    any_train = raw[f"train_{s.sizes[0].label}"]
    doc["machine"] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
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


def figures(raw: dict[str, Any], s: BenchSettings) -> dict[str, float]:
    """The JSON figures (every ratio: bigger is better) from the phases' raw measurements."""
    pre, loop, loader = raw["preprocess"], raw["lerobot_loop"], raw["loader"]
    out: dict[str, float] = {
        "preprocess_vs_lerobot_loop": pre["preprocess_fps"] / loop["fps"],
        "decode_only_over_preprocess": pre["decode_only_s"] / pre["preprocess_s"],
    }
    base = s.sizes[0].label
    for size in s.sizes:
        suffix = "" if size.label == base else f"_{size.label}"
        out[f"loader_over_train_step{suffix}"] = loader["samples_per_s"] / raw[f"train_{size.label}"]["samples_per_s"]
    headline = s.headline if s.headline in s.model_sizes else s.model_sizes[0]
    for label in s.model_sizes:
        suffix = "" if label == headline else f"_{label}"
        m = raw[f"model_{label}"]
        ts, sa, ca = m["train_step"], m["sampling"], m["cache"]
        out[f"two_pass_over_single_pass{suffix}"] = ts["two_pass_step_s"] / ts["single_pass_step_s"]
        out[f"fast_over_flow_latency{suffix}"] = sa["sample_fast_tokens_s"] / sa["sample_actions_s"]
        out[f"uncached_over_cached{suffix}"] = ca["uncached_s"] / ca["cached_s"]
        out[f"two_pass_over_single_pass_flops{suffix}"] = m["flops"]["two_pass_over_single_pass_flops"]
    for preset in s.flops_presets:
        out[f"two_pass_over_single_pass_flops_{preset}"] = raw[f"flops_{preset}"]["two_pass_over_single_pass_flops"]
    out["preprocess_peak_rss_mb"] = pre["peak_rss_mb"]
    out["lerobot_loop_peak_rss_mb"] = loop["peak_rss_mb"]
    out["loader_peak_rss_mb"] = loader["peak_rss_mb"]
    for size in s.sizes:
        suffix = "" if size.label == base else f"_{size.label}"
        out[f"train_peak_rss_mb{suffix}"] = raw[f"train_{size.label}"]["peak_rss_mb"]
    return out


# ------------------------------------------------------------------------------------------------ the table


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms"


def _s(x: float) -> str:
    return f"{x:.2f} s"


def table(doc: dict) -> str:
    """One line per figure: the two raw measurements (a, b), a / b, the target and whether it is met."""
    raw, s = doc["raw"], doc["settings"]
    pre, loop, loader = raw["preprocess"], raw["lerobot_loop"], raw["loader"]
    sizes = {z["label"]: z for z in s["sizes"]}
    base = s["sizes"][0]["label"]
    headline = s["headline"] if s["headline"] in s["model_sizes"] else s["model_sizes"][0]
    rows: list[tuple[str, str, str, str]] = [
        ("preprocess_vs_lerobot_loop", f"preprocess {pre['preprocess_fps']:.1f} frames/s",
         f"LeRobotDataset[i] loop {loop['fps']:.1f} frames/s", "preprocess_vs_lerobot_loop"),
        ("decode_only_over_preprocess", f"decode only {_s(pre['decode_only_s'])}",
         f"whole preprocess run {_s(pre['preprocess_s'])}", "decode_only_over_preprocess"),
    ]
    for label, z in sizes.items():
        suffix = "" if label == base else f"_{label}"
        train = raw[f"train_{label}"]
        rows.append((f"loader_over_train_step{suffix}", f"loader {loader['samples_per_s']:.1f} samples/s",
                     f"train step {train['samples_per_s']:.2f} samples/s ({label})", "loader_over_train_step"))
    for label in s["model_sizes"]:
        suffix = "" if label == headline else f"_{label}"
        m = raw[f"model_{label}"]
        ts, sa, ca, fl = m["train_step"], m["sampling"], m["cache"], m["flops"]
        rows += [
            (f"two_pass_over_single_pass{suffix}", f"two-pass {_s(ts['two_pass_step_s'])}/step",
             f"single pass {_s(ts['single_pass_step_s'])}/step ({label})", "two_pass_over_single_pass"),
            (f"fast_over_flow_latency{suffix}", f"sample_fast_tokens {_ms(sa['sample_fast_tokens_s'])}",
             f"sample_actions {_ms(sa['sample_actions_s'])} ({label})", "fast_over_flow_latency"),
            (f"uncached_over_cached{suffix}", f"uncached {_ms(ca['uncached_s'])}",
             f"cached {_ms(ca['cached_s'])} ({label})", ""),
            (f"two_pass_over_single_pass_flops{suffix}", f"two-pass {fl['two_pass_gflop']:.1f} GFLOP",
             f"single pass {fl['single_pass_gflop']:.1f} GFLOP ({label})", ""),
        ]
    for preset in s["flops_presets"]:
        fl = raw[f"flops_{preset}"]
        rows.append((f"two_pass_over_single_pass_flops_{preset}", f"two-pass {fl['two_pass_gflop']:.0f} GFLOP",
                     f"single pass {fl['single_pass_gflop']:.0f} GFLOP ({preset})", ""))
    w = max(len(r[0]) for r in rows) + 2
    lines = [f"{'figure':<{w}}{'a':<36}{'b':<44}{'a / b':>8}  {'target':<8}met"]
    for key, a, b, target_key in rows:
        target = doc["targets"].get(target_key)
        met = "-" if target is None else ("yes" if doc[key] >= target else "no")
        tgt = "-" if target is None else f">= {target:g}"
        lines.append(f"{key:<{w}}{a:<36}{b:<44}{doc[key]:>8.2f}  {tgt:<8}{met}")
    mem = [("preprocess_peak_rss_mb", f"preprocess ({pre['rss_after_imports_mb']:.0f} after imports)"),
           ("lerobot_loop_peak_rss_mb", f"LeRobotDataset loop ({loop['rss_after_imports_mb']:.0f} after imports)"),
           ("loader_peak_rss_mb", f"loader ({s['loader_workers']} workers)")]
    for label, z in sizes.items():
        suffix = "" if label == base else f"_{label}"
        mem.append((f"train_peak_rss_mb{suffix}", f"training {label} ({z['preset']}, batch {z['train_batch']})"))
    lines.append("")
    lines += [f"{key:<{w}}{what:<36}{doc[key]:>8.0f} MB peak RSS" for key, what in mem]
    return "\n".join(lines)


def notes(doc: dict) -> str:
    """How each figure was measured, and the split of each cost that says what bounds the ratio."""
    raw, s, m = doc["raw"], doc["settings"], doc["machine"]
    pre, loop, loader = raw["preprocess"], raw["lerobot_loop"], raw["loader"]
    img, frames = pre["image_cost_ms"], pre["frames"]
    per_frame = pre["preprocess_s"] * 1e3 / frames
    lines = [
        f"machine: {m['cpus_usable']} CPUs, jax {m['jax_backend']} ({m['device']}), load average "
        f"{m['load_average_start'][0]:.1f} -> {m['load_average_end'][0]:.1f}; mode {s['mode']}, {doc['wall_s']:.0f} s",
        f"dataset: {s['dataset']['repo_id']}, {frames} frames; shards {pre['image_size']} px, action horizon "
        f"{pre['action_horizon']}",
        f"preprocess: whole run_preprocess call (pass 1 + pass 2, 1 worker; lerobot import, {pre['import_s']:.1f} s, "
        f"off the clock), median of {len(pre['preprocess_s_all'])}: {per_frame:.2f} ms/frame = resize "
        f"{img['resize_ms']:.2f} + PNG encode {img['png_encode_ms']:.2f} (at {pre['image_size']} px) + pass 1 "
        f"{pre['pass1_s'] * 1e3 / frames:.2f} + the rest {per_frame - img['resize_ms'] - img['png_encode_ms'] - pre['pass1_s'] * 1e3 / frames:.2f} "
        f"(video decode alone: {pre['decode_only_s'] * 1e3 / pre['decode_only_frames']:.2f} ms/frame)",
        f"LeRobotDataset loop: {loop['frames']} items with a {pre['action_horizon']}-step action chunk "
        f"({loop['backend']}), one pass, {1e3 / loop['fps']:.2f} ms/item; construction {loop['open_seconds']:.1f} s "
        f"not counted",
        f"loader: {loader['num_batches']} batches of {loader['batch_size']} after warm-up, {loader['num_workers']} "
        f"worker processes, PNG decode + augmentation",
    ]
    for z in s["sizes"]:
        t = raw[f"train_{z['label']}"]
        lines.append(f"train step {z['label']}: preset {z['preset']}, batch {z['train_batch']}, {t['steps']} timed steps "
                     f"after compilation: {t['step_s']:.2f} s/step")
    for label in s["model_sizes"]:
        mm = raw[f"model_{label}"]
        c, ts, sa, ca, fl = mm["config"], mm["train_step"], mm["sampling"], mm["cache"], mm["flops"]
        k = max(sa["fast_tokens_decoded"])
        lines += [
            f"model {label}: {c['backbone_variant']} + {c['expert_variant']} + {c['vision_variant']}, "
            f"{mm['image_tokens']} image tokens, max_token_len {c['max_token_len']}, horizon {c['action_horizon']} x "
            f"dim {c['action_dim']}; train batch {ts['batch_size']}, sampling batch {sa['batch_size']}; medians of "
            f"{ts['repeats']} after compilation",
            f"  train step FLOPs (XLA count, loss + gradient): two-pass / single = "
            f"{fl['two_pass_over_single_pass_flops']:.2f} (the reference's second pass is forward-only)",
            f"  sampling: prefix pass alone {_ms(ca['prefix_s'])}; sample_actions = prefix + {sa['flow_steps']} flow "
            f"steps ({(sa['sample_actions_s'] - ca['prefix_s']) * 1e3 / sa['flow_steps']:.1f} ms each); "
            f"sample_fast_tokens = prefix + {k} tokens ({(sa['sample_fast_tokens_s'] - ca['prefix_s']) * 1e3 / k:.1f} "
            f"ms each)",
        ]
    for preset in s["flops_presets"]:
        fl = raw[f"flops_{preset}"]
        lines.append(f"FLOPs at {preset} (batch {fl['batch_size']}): two-pass / single = "
                     f"{fl['two_pass_over_single_pass_flops']:.2f}")
    return "\n".join(lines)
