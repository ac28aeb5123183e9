"""Preprocessing figures: frames per second of the whole preprocessing against a plain loop over `LeRobotDataset[i]`
with `delta_timestamps` for the action chunk (how openpi reads), decoding alone, pass 1 alone and the per-frame
image costs.

Each measurement imports lerobot before starting its clock, so no figure carries the one-time import of
torch/lerobot; `measure_startup_s` reports that separately. `python -m pipelines.preprocess_report` prints them for
any dataset; the benchmark calls the phases below.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ki_bench.timing import Clock, Pair, RepeatPolicy, Spread, median, paired_rounds, peak_rss_mb, pin_to_one_core


def measure_startup_s() -> float:
    """Seconds to import lerobot's dataset module (torch, datasets, ...): paid once per process by both readers."""
    t0 = time.perf_counter()
    import lerobot.datasets.lerobot_dataset  # noqa: F401

    return time.perf_counter() - t0


def measure_preprocess_fps(
    repo_id: str,
    root: str | Path | None = None,
    *,
    workers: int = 1,
    image_size: int = 224,
    action_horizon: int = 50,
    out_dir: str | Path | None = None,
    **options,
) -> dict:
    """Run the whole preprocessing (both passes, tokenizer fits, shards written) and time it."""
    from ki_data.preprocess import PreprocessConfig, run_preprocess

    measure_startup_s()
    tmp = None
    if out_dir is None:
        tmp = tempfile.mkdtemp(prefix="ki-report-")
        out_dir = Path(tmp) / "out"
    try:
        cfg = PreprocessConfig(repo_id, root=None if root is None else str(root), output=str(out_dir),
                               workers=workers, image_size=image_size, action_horizon=action_horizon,
                               overwrite=True, progress=False, **options)
        with Clock() as clock:
            result = run_preprocess(cfg)
        s, m = result.summary, result.manifest
        return {"frames": s["frames"], "rows": s["rows"], "seconds": clock.wall_s, "cpu_s": clock.cpu_s,
                "fps": s["frames"] / clock.wall_s, "bytes": s["bytes"], "workers": workers, "image_size": image_size,
                "image_format": m.image_format, "cameras": len(m.cameras), "shards": len(m.shards),
                "fast_tokens_mean": s["fast_tokens_per_chunk"]["mean"]}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def measure_lerobot_loop_fps(
    repo_id: str,
    root: str | Path | None = None,
    *,
    action_horizon: int = 50,
    max_frames: int | None = None,
    video_backend: str | None = None,
) -> dict:
    """`for i in range(n): ds[i]` on a LeRobotDataset with delta_timestamps {"action": [0, 1/fps, ...]}.

    Like openpi's LeRobot data source: one random access per frame, each decoding its video frame(s) and
    gathering the action chunk. `video_backend=None` lets lerobot choose (torchcodec when it loads, else pyav).
    """
    measure_startup_s()
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
    from lerobot.utils.import_utils import get_safe_default_video_backend

    if video_backend is None:
        # lerobot logs a long traceback when torchcodec's FFmpeg libraries are missing; the chosen backend is
        # reported in the result instead.
        quiet = logging.getLogger("lerobot.utils.import_utils")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            video_backend = get_safe_default_video_backend()
        finally:
            quiet.setLevel(level)
    backend = video_backend
    t0 = time.perf_counter()
    meta = LeRobotDatasetMetadata(repo_id, root=root)
    delta = {"action": [i / meta.fps for i in range(action_horizon)]}
    ds = LeRobotDataset(repo_id, root=root, delta_timestamps=delta, video_backend=backend)
    open_s = time.perf_counter() - t0
    n = len(ds) if max_frames is None else min(max_frames, len(ds))
    with Clock() as clock:
        for i in range(n):
            item = ds[i]
    assert item["action"].shape[0] == action_horizon
    return {"frames": n, "seconds": clock.wall_s, "cpu_s": clock.cpu_s, "fps": n / clock.wall_s,
            "open_seconds": open_s, "backend": backend}


def measure_decode_only_fps(repo_id: str, root: str | Path | None = None) -> dict:
    """Our sequential reader alone: every frame of every camera decoded once, nothing else (an upper bound)."""
    from ki_data.lerobot_source import EpisodeReader, open_lerobot_dataset

    measure_startup_s()
    spec = open_lerobot_dataset(repo_id, root)
    reader = EpisodeReader(spec)
    frames = 0
    with Clock() as clock:
        for ep in spec.episodes:
            ts = reader.read_episode(ep.index).timestamp
            for key in spec.cameras:
                frames += sum(1 for _ in reader.iter_frames(ep.index, key, ts))
    reader.close()
    frames_per_camera = frames / max(len(spec.cameras), 1)
    return {"frames": frames_per_camera, "seconds": clock.wall_s, "cpu_s": clock.cpu_s,
            "fps": frames_per_camera / clock.wall_s}


def measure_image_cost_ms(repo_id: str, root: str | Path | None = None, image_size: int = 224, n: int = 100) -> dict:
    """Per camera-frame milliseconds and bytes of each image step, on up to `n` frames of every camera of the first
    episode: resize_with_pad (OpenCV) against openpi's PIL version (and their largest pixel difference), JPEG and PNG
    encode and decode at the model resolution."""
    from ki_data.images import decode_image, encode_image, resize_with_pad, resize_with_pad_pil
    from ki_data.lerobot_source import EpisodeReader, open_lerobot_dataset

    spec = open_lerobot_dataset(repo_id, root)
    reader = EpisodeReader(spec)
    ep = spec.episodes[0]
    frames = [f for key in spec.cameras for f in list(reader.iter_frames(ep.index, key))[:n]]
    reader.close()

    per: dict[str, list[float]] = {}  # step -> seconds per frame, for the per-frame (paired) ratios

    def per_frame_ms(fn, xs, name: str) -> tuple[float, list]:
        out, times = [], []
        for x in xs:
            t0 = time.perf_counter()
            out.append(fn(x))
            times.append(time.perf_counter() - t0)
        per[name] = times
        return sum(times) / len(xs) * 1e3, out

    out: dict = {"frames": len(frames), "source_shape": list(frames[0].shape)}
    out["resize_ms"], resized = per_frame_ms(lambda f: resize_with_pad(f, image_size), frames, "resize")
    out["resize_pil_ms"], reference = per_frame_ms(lambda f: resize_with_pad_pil(f, image_size), frames, "resize_pil")
    diffs = [np.abs(a.astype(np.int16) - b) for a, b in zip(resized, reference, strict=True)]
    out["resize_max_abs_diff"] = int(max(d.max() for d in diffs))
    out["resize_mean_abs_diff"] = float(np.mean([d.mean() for d in diffs]))
    for fmt in ("jpeg", "png"):
        out[f"{fmt}_encode_ms"], blobs = per_frame_ms(lambda r, fmt=fmt: encode_image(r, fmt), resized,
                                                      f"{fmt}_encode")
        out[f"{fmt}_decode_ms"], _ = per_frame_ms(decode_image, blobs, f"{fmt}_decode")
        out[f"{fmt}_kb"] = float(np.mean([len(b) for b in blobs])) / 1e3
    # Each frame is a pair (the same picture through both ways): the spread of the per-frame ratios.
    ratio = lambda a, b: [x / y for x, y in zip(per[a], per[b], strict=True)]  # noqa: E731
    out["spread"] = {
        "resize_pil_over_opencv": Spread.of(ratio("resize_pil", "resize"), None, 0.05, stop="frames").to_dict() | {"ratios": []},
        "png_over_jpeg_encode": Spread.of(ratio("png_encode", "jpeg_encode"), None, 0.05, stop="frames").to_dict() | {"ratios": []},
        "png_over_jpeg_decode": Spread.of(ratio("png_decode", "jpeg_decode"), None, 0.05, stop="frames").to_dict() | {"ratios": []},
    }
    return out


def measure_camera_parallel_decode(repo_id: str, root: str | Path | None = None) -> dict:
    """Decode-only of every episode, cameras one after the other vs the cameras of an episode in parallel threads
    (PyAV releases the GIL while decoding), wall and CPU seconds: what decoding the cameras in parallel would gain."""
    from concurrent.futures import ThreadPoolExecutor

    from ki_data.lerobot_source import EpisodeReader, open_lerobot_dataset

    spec = open_lerobot_dataset(repo_id, root)
    cams = list(spec.cameras)

    def one(ep: int, key: str, ts) -> int:
        reader = EpisodeReader(spec)
        try:
            return sum(1 for _ in reader.iter_frames(ep, key, ts))
        finally:
            reader.close()

    timestamps = {ep.index: EpisodeReader(spec).read_episode(ep.index).timestamp for ep in spec.episodes}
    out = {"cameras": len(cams)}
    with Clock() as seq:
        for ep, ts in timestamps.items():
            for key in cams:
                one(ep, key, ts)
    with ThreadPoolExecutor(len(cams)) as pool, Clock() as par:
        for ep, ts in timestamps.items():
            list(pool.map(lambda key, ep=ep, ts=ts: one(ep, key, ts), cams))
    return out | {"sequential_s": seq.wall_s, "sequential_cpu_s": seq.cpu_s, "parallel_s": par.wall_s,
                  "parallel_cpu_s": par.cpu_s}


def report(repo_id: str, root: str | None, workers: list[int], action_horizon: int, image_size: int,
           max_loop_frames: int | None) -> str:
    from ki_data.lerobot_source import open_lerobot_dataset

    startup = measure_startup_s()  # first import in this process: the one-time cost
    spec = open_lerobot_dataset(repo_id, root)
    cams = ", ".join(f"{k} ({v})" for k, v in spec.cameras.items())
    rows = []
    for w in workers:
        r = measure_preprocess_fps(repo_id, root, workers=w, image_size=image_size, action_horizon=action_horizon)
        rows.append((f"pipelines.preprocess, {w} worker(s): read, decode, resize {image_size}, "
                     f"{r['image_format'].upper()}, tokens, parquet",
                     r["fps"], r["seconds"], r["frames"]))
    loop = measure_lerobot_loop_fps(repo_id, root, action_horizon=action_horizon, max_frames=max_loop_frames)
    rows.append((f"LeRobotDataset[i] loop, delta_timestamps action chunk H={action_horizon} ({loop['backend']})",
                 loop["fps"], loop["seconds"], loop["frames"]))
    dec = measure_decode_only_fps(repo_id, root)
    rows.append(("sequential decode only (ki_data EpisodeReader), no resize/encode", dec["fps"], dec["seconds"],
                 dec["frames"]))
    img = measure_image_cost_ms(repo_id, root, image_size)
    width = max(len(r[0]) for r in rows)
    lines = [
        f"Report: preprocessing throughput on {repo_id} ({len(spec.episodes)} episodes, {spec.num_frames} frames, "
        f"{spec.fps} fps; cameras: {cams})",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), Python "
        f"{platform.python_version()}; all rows measured in this one run",
        f"  {'method'.ljust(width)}  {'frames/s':>9}  {'seconds':>8}  {'frames':>7}",
    ]
    for name, fps, seconds, frames in rows:
        lines.append(f"  {name.ljust(width)}  {fps:9.1f}  {seconds:8.2f}  {frames:7.0f}")
    lines += [
        f"  per camera-frame at {image_size}px: resize_with_pad {img['resize_ms']:.2f} ms (PIL "
        f"{img['resize_pil_ms']:.2f} ms, largest pixel difference {img['resize_max_abs_diff']}), JPEG encode "
        f"{img['jpeg_encode_ms']:.2f} / decode {img['jpeg_decode_ms']:.2f} ms ({img['jpeg_kb']:.1f} kB), PNG encode "
        f"{img['png_encode_ms']:.2f} / decode {img['png_decode_ms']:.2f} ms ({img['png_kb']:.1f} kB)",
        f"  not in the figures: importing lerobot/torch once per process, {startup:.1f} s; LeRobotDataset "
        f"construction {loop['open_seconds']:.2f} s",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ benchmark phases


def time_pass1(repo_id: str, root: str, out: str, options: dict) -> float:
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


def preprocess_phase(repo_id: str, root: str, out: str, options: dict, policy: RepeatPolicy, loop_frames: int | None,
                     goals: dict[str, float | None], one_core: bool = True) -> dict:
    """On one core, in interleaved rounds: decoding the videos with the sequential reader and nothing else, the whole
    `run_preprocess` call (one worker, imports off the clock) and openpi's `LeRobotDataset[i]` loop over
    `loop_frames` frames; each round gives one ratio per figure (`goals`: figure -> goal, for the stopping rule).
    Then pass 1 alone and the per-frame image costs. Figures use CPU seconds (this process and its children),
    which a loaded machine inflates far less than wall."""
    from ki_data.lerobot_source import open_lerobot_dataset

    cpu = pin_to_one_core() if one_core else None
    import_s = measure_startup_s()
    import torch

    torch.set_num_threads(1)
    rss_imports = peak_rss_mb()
    n_frames = open_lerobot_dataset(repo_id, root).num_frames
    horizon = options.get("action_horizon", 50)
    loop_n = n_frames if loop_frames is None else min(loop_frames, n_frames)
    last: dict[str, dict] = {}

    def run(name: str, fn):
        def cost() -> float:
            last[name] = fn()
            return last[name]["cpu_s"]
        return cost

    fns = {
        "decode_only": run("decode_only", lambda: measure_decode_only_fps(repo_id, root)),
        "preprocess": run("preprocess", lambda: measure_preprocess_fps(repo_id, root, workers=1, out_dir=out,
                                                                       **options)),
        "loop": run("loop", lambda: measure_lerobot_loop_fps(repo_id, root, action_horizon=horizon,
                                                             max_frames=loop_n)),
    }
    # frames/CPU-s of preprocess over the loop's = (loop CPU-s / preprocess CPU-s) * (preprocess frames / loop frames)
    pairs = {
        "preprocess_vs_lerobot_loop": Pair("loop", "preprocess", goals.get("preprocess_vs_lerobot_loop"),
                                           scale=n_frames / loop_n),
        "decode_only_over_preprocess": Pair("decode_only", "preprocess", goals.get("decode_only_over_preprocess")),
    }
    rounds = paired_rounds(fns, pairs, policy)
    pre, frames = last["preprocess"], last["preprocess"]["frames"]
    assert frames == n_frames, (frames, n_frames)
    med = rounds.medians()
    image_size = options.get("image_size", 224)
    return {
        "pinned_cpu": cpu,
        "frames": frames,
        "rows": pre["rows"],
        "cameras": pre["cameras"],
        "shards": pre["shards"],
        "bytes": pre["bytes"],
        "image_format": pre["image_format"],
        "preprocess_cpu_s": med["preprocess"],
        "preprocess_cpu_s_all": rounds.costs["preprocess"],
        "preprocess_fps": frames / med["preprocess"],  # frames per CPU-second
        "decode_only_frames": last["decode_only"]["frames"],
        "decode_only_cpu_s": med["decode_only"],
        "decode_only_cpu_s_all": rounds.costs["decode_only"],
        "loop_frames": loop_n,
        "loop_cpu_s_all": rounds.costs["loop"],
        "loop_fps_cpu": loop_n / med["loop"],
        "loop_backend": last["loop"]["backend"],
        "spread": {k: v.to_dict() for k, v in rounds.spreads.items()},
        "rounds_s": rounds.seconds,
        "pass1_s": time_pass1(repo_id, root, out, options),
        "image_cost_ms": measure_image_cost_ms(repo_id, root, image_size),
        "image_size": image_size,
        "action_horizon": horizon,
        "import_s": import_s,
        "rss_after_imports_mb": rss_imports,
    }


def lerobot_loop_phase(repo_id: str, root: str, action_horizon: int, max_frames: int | None,
                       one_core: bool = True) -> dict:
    """openpi's way of reading, on one core: `LeRobotDataset(delta_timestamps={"action": chunk})[i]` for every
    frame, video decoded per item; imports and dataset construction off the clock."""
    cpu = pin_to_one_core() if one_core else None
    import_s = measure_startup_s()
    import torch

    torch.set_num_threads(1)
    rss_imports = peak_rss_mb()
    out = measure_lerobot_loop_fps(repo_id, root, action_horizon=action_horizon, max_frames=max_frames)
    return out | {"fps_cpu": out["frames"] / out["cpu_s"], "pinned_cpu": cpu, "import_s": import_s,
                  "rss_after_imports_mb": rss_imports}


def workers_phase(repo_id: str, root: str, out: str, options: dict) -> dict:
    """Why a second preprocessing worker may not help: 1 vs 2 workers (all cores, wall clock), with the number of
    shards (workers take whole shards) and the decoder's use of cores (CPU / wall of decoding alone), and the
    cameras of each episode decoded in parallel threads vs one after the other."""
    measure_startup_s()
    runs = {w: measure_preprocess_fps(repo_id, root, workers=w, out_dir=out, **options) for w in (1, 2)}
    decode = measure_decode_only_fps(repo_id, root)
    return {
        "workers_1_s": runs[1]["seconds"], "workers_2_s": runs[2]["seconds"],
        "workers_1_cpu_s": runs[1]["cpu_s"], "workers_2_cpu_s": runs[2]["cpu_s"],
        "shards": runs[2]["shards"], "frames": runs[2]["frames"],
        "decode_cpu_over_wall": decode["cpu_s"] / decode["seconds"],
        "camera_decode": measure_camera_parallel_decode(repo_id, root),
    }


def prepare_pass2_phase(repo_id: str, root: str, out: str, options: dict) -> dict:
    """Everything before pass 2 (plan, pass 1, the job file the tasks read) into `out`, in its own process, so
    that the pass-2 worker phase after it measures a worker and nothing else."""
    from ki_data.preprocess import PreprocessConfig
    from ki_data.preprocess.executors import job_file
    from ki_data.preprocess.run import _prepare

    cfg = PreprocessConfig(repo_id, root=root, output=out, workers=1, overwrite=True, progress=False, **options)
    prep = _prepare(cfg)
    return {"job": str(job_file(prep.job.out)), "shards": len(prep.job.shards)}


def _own_peak_rss_mb() -> float:
    import resource
    import sys

    unit = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20


def pass2_worker_phase(job_path: str, policy: RepeatPolicy, goal: float | None = None) -> dict:
    """One pass-2 worker as a DataTrove task runs it (ki_data.preprocess.pass2.ShardWorker over every planned
    shard), in this fresh process, on all cores: its peak resident memory (this process alone: the imports,
    the decoders, the camera pipelines' queues, a shard's columns), the CPU seconds of each pipeline stage, and in
    interleaved rounds its wall time against decoding alone (the cameras of each episode in parallel threads, as
    pass 2 decodes them): how much of pass 2 hides behind the decoder."""
    from concurrent.futures import ThreadPoolExecutor

    from ki_data.lerobot_source import EpisodeReader
    from ki_data.preprocess.executors import job_artifacts, load_job
    from ki_data.preprocess.pass2 import ShardWorker

    rss_start = _own_peak_rss_mb()
    job = load_job(job_path)
    data = job_artifacts(job)
    plans = list(job.shards)
    episodes = [ep for p in plans for ep in p.episodes]
    frames = sum(job.spec.episode(ep).length for ep in episodes)
    stage_cpu: dict[str, float] = {}

    def pass2() -> float:
        worker = ShardWorker(data, job.spec)
        try:
            with Clock() as clock:
                for plan in plans:
                    worker.write_shard(plan, lambda n: None)
        finally:
            worker.close()
        stage_cpu.clear()
        stage_cpu.update(worker.clock.cpu_s | {"process": clock.cpu_s})
        return clock.wall_s

    cams = list(data.manifest.camera_keys.values())
    pool = ThreadPoolExecutor(len(cams))

    def decode_only() -> float:
        reader = EpisodeReader(job.spec)
        try:
            with Clock() as clock:
                for ep in episodes:
                    ts = reader.read_episode(ep).timestamp
                    list(pool.map(lambda key, ep=ep, ts=ts: sum(1 for _ in reader.iter_frames(ep, key, ts)), cams))
        finally:
            reader.close()
        return clock.wall_s

    rounds = paired_rounds({"pass2": pass2, "decode_only": decode_only},
                           {"decode_only_over_pass2_wall": Pair("decode_only", "pass2", goal)}, policy)
    pool.shutdown()
    med = rounds.medians()
    return {
        "frames": frames, "cameras": len(cams), "shards": len(plans), "peak_rss_mb_own": _own_peak_rss_mb(),
        "rss_at_start_mb": rss_start, "pass2_s": med["pass2"], "decode_only_s": med["decode_only"],
        "stage_cpu_ms_per_frame": {k: v * 1e3 / frames for k, v in stage_cpu.items()},
        "spread": {k: v.to_dict() for k, v in rounds.spreads.items()}, "repeats": len(rounds.costs["pass2"]),
    }
