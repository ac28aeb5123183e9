"""The loader's figure: samples per second of ki_data.loader.ShardLoader, decoding and augmentation included."""

from __future__ import annotations

import time
from pathlib import Path

from ki_data.loader import LoaderConfig, ShardLoader


def measure_throughput(
    shards_dir: str | Path,
    *,
    batch_size: int = 32,
    num_batches: int = 20,
    num_workers: int = 0,
    split: str = "train",
    augment: bool = True,
    warmup_batches: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """Loader samples/s, decoding + augmentation included (worker start-up excluded by `warmup_batches`)."""
    cfg = LoaderConfig(batch_size=batch_size, seed=seed, augment=augment, num_workers=num_workers)
    with ShardLoader(shards_dir, split, cfg, process_index=0, process_count=1) as loader:
        for _ in range(warmup_batches):
            next(loader)
        t0 = time.perf_counter()
        for _ in range(num_batches):
            next(loader)
        dt = time.perf_counter() - t0
    return {
        "batch_size": batch_size,
        "num_batches": num_batches,
        "num_workers": num_workers,
        "augment": augment,
        "seconds": dt,
        "batches_per_s": num_batches / dt,
        "samples_per_s": num_batches * batch_size / dt,
    }


def loader_phase(shards: str, batch_size: int, num_batches: int, num_workers: int) -> dict:
    """measure_throughput as training reads (image decode + augmentation)."""
    return measure_throughput(shards, batch_size=batch_size, num_batches=num_batches, num_workers=num_workers)
