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

from ki_bench.timing import median, peak_rss_mb


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
        t0 = time.perf_counter()
        result = run_preprocess(cfg)
        seconds = time.perf_counter() - t0
        s = result.summary
        return {"frames": s["frames"], "rows": s["rows"], "seconds": seconds, "fps": s["frames"] / seconds,
                "bytes": s["bytes"], "workers": workers, "image_size": image_size,
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
    t0 = time.perf_counter()
    for i in range(n):
        item = ds[i]
    seconds = time.perf_counter() - t0
    assert item["action"].shape[0] == action_horizon
    return {"frames": n, "seconds": seconds, "fps": n / seconds, "open_seconds": open_s, "backend": backend}


def measure_decode_only_fps(repo_id: str, root: str | Path | None = None) -> dict:
    """Our sequential reader alone: every frame of every camera decoded once, nothing else (an upper bound)."""
    from ki_data.lerobot_source import EpisodeReader, open_lerobot_dataset

    measure_startup_s()
    spec = open_lerobot_dataset(repo_id, root)
    reader = EpisodeReader(spec)
    t0 = time.perf_counter()
    frames = 0
    for ep in spec.episodes:
        ts = reader.read_episode(ep.index).timestamp
        for key in spec.cameras:
            frames += sum(1 for _ in reader.iter_frames(ep.index, key, ts))
    seconds = time.perf_counter() - t0
    reader.close()
    frames_per_camera = frames / max(len(spec.cameras), 1)
    return {"frames": frames_per_camera, "seconds": seconds, "fps": frames_per_camera / seconds}


def measure_image_cost_ms(repo_id: str, root: str | Path | None = None, image_size: int = 224, n: int = 200) -> dict:
    """Per-frame milliseconds of resize_with_pad and of PNG encoding (the lossless step preprocessing adds)."""
    from ki_data.images import decode_image, encode_image, resize_with_pad
    from ki_data.lerobot_source import EpisodeReader, open_lerobot_dataset

    spec = open_lerobot_dataset(repo_id, root)
    reader = EpisodeReader(spec)
    ep = spec.episodes[0]
    frames = list(reader.iter_frames(ep.index, next(iter(spec.cameras))))[:n]
    reader.close()
    t0 = time.perf_counter()
    resized = [resize_with_pad(f, image_size) for f in frames]
    t1 = time.perf_counter()
    encoded = [encode_image(r) for r in resized]
    t2 = time.perf_counter()
    for b in encoded:
        decode_image(b)
    t3 = time.perf_counter()
    k = len(frames)
    return {"resize_ms": (t1 - t0) / k * 1e3, "png_encode_ms": (t2 - t1) / k * 1e3,
            "png_decode_ms": (t3 - t2) / k * 1e3, "png_bytes": float(np.mean([len(b) for b in encoded]))}


def report(repo_id: str, root: str | None, workers: list[int], action_horizon: int, image_size: int,
           max_loop_frames: int | None) -> str:
    from ki_data.lerobot_source import open_lerobot_dataset

    startup = measure_startup_s()  # first import in this process: the one-time cost
    spec = open_lerobot_dataset(repo_id, root)
    cams = ", ".join(f"{k} ({v})" for k, v in spec.cameras.items())
    rows = []
    for w in workers:
        r = measure_preprocess_fps(repo_id, root, workers=w, image_size=image_size, action_horizon=action_horizon)
        rows.append((f"pipelines.preprocess, {w} worker(s): read, decode, resize {image_size}, PNG, tokens, parquet",
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
        f"  per frame at {image_size}px: resize_with_pad {img['resize_ms']:.2f} ms, "
        f"PNG encode {img['png_encode_ms']:.2f} ms ({img['png_bytes'] / 1e3:.1f} kB), "
        f"PNG decode {img['png_decode_ms']:.2f} ms",
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


def preprocess_phase(repo_id: str, root: str, out: str, options: dict, repeats: int) -> dict:
    """Interleaved: decoding the videos with the sequential reader and nothing else, then the whole `run_preprocess`
    call (one worker, imports off the clock); then pass 1 alone and the per-frame cost of resize + encode."""
    import_s = measure_startup_s()
    rss_imports = peak_rss_mb()
    decode, pre = [], []
    for _ in range(repeats):
        decode.append(measure_decode_only_fps(repo_id, root))
        pre.append(measure_preprocess_fps(repo_id, root, workers=1, out_dir=out, **options))
    pre_s, dec_s = median([r["seconds"] for r in pre]), median([r["seconds"] for r in decode])
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
        "pass1_s": time_pass1(repo_id, root, out, options),
        "image_cost_ms": measure_image_cost_ms(repo_id, root, image_size),
        "image_size": image_size,
        "action_horizon": options.get("action_horizon", 50),
        "import_s": import_s,
        "rss_after_imports_mb": rss_imports,
    }


def lerobot_loop_phase(repo_id: str, root: str, action_horizon: int, max_frames: int | None) -> dict:
    """openpi's way of reading: `LeRobotDataset(delta_timestamps={"action": chunk})[i]` for every frame, video
    decoded per item; imports and dataset construction off the clock."""
    import_s = measure_startup_s()
    rss_imports = peak_rss_mb()
    out = measure_lerobot_loop_fps(repo_id, root, action_horizon=action_horizon, max_frames=max_frames)
    return out | {"import_s": import_s, "rss_after_imports_mb": rss_imports}
