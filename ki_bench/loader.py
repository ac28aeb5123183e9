"""The loader's figure: samples per second of ki_data.loader.ShardLoader, decoding and augmentation included."""

from __future__ import annotations

from pathlib import Path

from ki_bench.timing import Clock
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
        with Clock() as clock:  # CPU seconds count worker processes only once they have exited: wall is the figure
            for _ in range(num_batches):
                next(loader)
    dt = clock.wall_s
    return {
        "batch_size": batch_size,
        "num_batches": num_batches,
        "num_workers": num_workers,
        "augment": augment,
        "seconds": dt,
        "cpu_s": clock.cpu_s,
        "batches_per_s": num_batches / dt,
        "samples_per_s": num_batches * batch_size / dt,
        "samples_per_cpu_s": num_batches * batch_size / clock.cpu_s,
    }


def loader_phase(shards: str, batch_size: int, num_batches: int, num_workers: int) -> dict:
    """measure_throughput as training reads (image decode + augmentation)."""
    return measure_throughput(shards, batch_size=batch_size, num_batches=num_batches, num_workers=num_workers)


def _lerobot_transform(cameras: tuple[str, ...], image_size: int, augment: bool, seed: int):
    """What a LeRobot-based trainer does per item to match our loader: the item's camera frames (CHW float in
    [0, 1]) to uint8, resized with padding to the model resolution, augmented with the same recipe."""
    import numpy as np

    from ki_data.augment import augment_image, is_wrist_camera
    from ki_data.images import resize_with_pad

    rng = np.random.default_rng(seed)

    def transform(item: dict) -> dict:
        out = {"action": item["action"].numpy(), "state": item["observation.state"].numpy()}
        for key in cameras:
            img = np.rint(item[key].numpy().transpose(1, 2, 0) * 255.0).astype(np.uint8)
            img = resize_with_pad(img, image_size)
            if augment:
                img = augment_image(img, rng, wrist=is_wrist_camera(key))
            out[key] = img
        return out

    return transform


def measure_lerobot_loader(
    repo_id: str, root: str, *, image_size: int, action_horizon: int, batch_size: int, num_batches: int,
    augment: bool = True, warmup_batches: int = 1, seed: int = 0,
) -> dict[str, float]:
    """Samples/s of LeRobotDataset (delta_timestamps action chunk, video decoded per item) through a torch DataLoader
    in this process, each item resized and augmented as our loader does; wall and CPU seconds."""
    import torch
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

    meta = LeRobotDatasetMetadata(repo_id, root=root)
    cameras = tuple(meta.camera_keys)
    delta = {"action": [i / meta.fps for i in range(action_horizon)]}
    ds = LeRobotDataset(repo_id, root=root, delta_timestamps=delta, video_backend="pyav")
    transform = _lerobot_transform(cameras, image_size, augment, seed)

    class Transformed(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ds)

        def __getitem__(self, i: int) -> dict:
            return transform(ds[i])

    loader = torch.utils.data.DataLoader(Transformed(), batch_size=batch_size, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(seed))
    it = iter(loader)
    for _ in range(warmup_batches):
        next(it)
    with Clock() as clock:
        for _ in range(num_batches):
            batch = next(it)
    assert batch[cameras[0]].shape[1:] == (image_size, image_size, 3)
    n = num_batches * batch_size
    return {"batch_size": batch_size, "num_batches": num_batches, "cameras": len(cameras), "augment": augment,
            "seconds": clock.wall_s, "cpu_s": clock.cpu_s, "samples_per_s": n / clock.wall_s,
            "samples_per_cpu_s": n / clock.cpu_s}


def per_core_loader_phase(shards: str, repo_id: str, root: str, batch_size: int, num_batches: int,
                          policy=None, goal: float | None = None) -> dict:
    """On one core, in interleaved rounds: our loader (augmentation on, no worker processes) and LeRobotDataset +
    torch DataLoader with the same resize and augmentation, on the same dataset; per round the ratio of samples per
    CPU-second (ki_bench.timing.paired_rounds, `policy`; one round when None)."""
    import torch

    from ki_bench.timing import Pair, RepeatPolicy, paired_rounds, pin_to_one_core
    from ki_data.manifest import Manifest

    cpu = pin_to_one_core()
    torch.set_num_threads(1)
    m = Manifest.load(shards)
    last: dict[str, dict] = {}

    def ours() -> float:
        last["ours"] = measure_throughput(shards, batch_size=batch_size, num_batches=num_batches, num_workers=0)
        return 1.0 / last["ours"]["samples_per_cpu_s"]

    def theirs() -> float:
        last["lerobot"] = measure_lerobot_loader(repo_id, root, image_size=m.image_size,
                                                 action_horizon=m.action_horizon, batch_size=batch_size,
                                                 num_batches=max(1, num_batches // 4))
        return 1.0 / last["lerobot"]["samples_per_cpu_s"]

    rounds = paired_rounds({"ours": ours, "lerobot": theirs},
                           {"ours_over_lerobot": Pair("lerobot", "ours", goal)},
                           policy or RepeatPolicy(min_repeats=1, max_repeats=1))
    med = rounds.medians()
    return {"pinned_cpu": cpu, "ours": last["ours"] | {"samples_per_cpu_s": 1.0 / med["ours"]},
            "lerobot": last["lerobot"] | {"samples_per_cpu_s": 1.0 / med["lerobot"]},
            "spread": {k: v.to_dict() for k, v in rounds.spreads.items()}, "repeats": len(rounds.costs["ours"]),
            "cameras": len(m.cameras), "image_size": m.image_size, "image_format": m.image_format}
