"""ki_data.loader + ki_data.augment: streaming the shards with grain."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ki_bench.loader import measure_throughput
from ki_data.augment import AugmentConfig, augment_image, is_wrist_camera
from ki_data.images import decode_image
from ki_data.loader import (
    LoaderConfig,
    LoaderError,
    RowGroup,
    ShardLoader,
    ShardReadError,
    block_shuffle_order,
)
from ki_data.manifest import Manifest
from ki_data.schema import read_rows
from ki_data.shard_writer import READ_OPTIONS, write_parquet_atomic


def _loader(shards, split="train", **kw) -> ShardLoader:
    kw.setdefault("batch_size", 8)
    return ShardLoader(shards, split, LoaderConfig(**kw), process_index=kw.pop("process_index", 0), process_count=1)


def _rows(batches) -> list[tuple[int, int]]:
    return [(int(e), int(f)) for b in batches for e, f in zip(b["episode_index"], b["frame_index"])]


def _all_rows(shards, split) -> dict[tuple[int, int], dict]:
    out = {}
    for path in Manifest.load(shards).shard_paths(shards, split):
        cols = read_rows(path)
        for i in range(len(cols["index"])):
            out[(int(cols["episode_index"][i]), int(cols["frame_index"][i]))] = {k: v[i] for k, v in cols.items()}
    return out


def test_batch_columns_shapes_and_types(demo_shards):
    m = Manifest.load(demo_shards)
    with _loader(demo_shards, batch_size=4) as loader:
        b = next(loader)
    s, h, d = m.image_size, m.action_horizon, m.action_dim
    for cam in m.cameras:
        assert b[f"image.{cam}"].dtype == np.uint8 and b[f"image.{cam}"].shape == (4, s, s, 3)
        assert b[f"image_mask.{cam}"].dtype == bool and b[f"image_mask.{cam}"].shape == (4,)
    assert b["actions"].dtype == np.float32 and b["actions"].shape == (4, h, d)
    assert b["action_is_pad"].dtype == bool and b["action_is_pad"].shape == (4, h)
    assert b["state"].dtype == np.float32 and b["state"].shape == (4, m.state_dim)
    for name in ("tokenized_prompt", "tokenized_prompt_mask", "token_ar_mask", "token_loss_mask"):
        assert b[name].shape == (4, m.max_token_len)
    assert b["tokenized_prompt"].dtype == np.int32 and b["text_prompt"].shape == (4, m.max_text_len)


def test_one_epoch_is_every_train_row_once_in_a_seeded_order(demo_shards):
    m = Manifest.load(demo_shards)
    train_rows = _all_rows(demo_shards, "train")
    n = len(train_rows)
    with _loader(demo_shards, batch_size=4) as loader:
        stream = _rows(next(loader) for _ in range(-(-n // 4)))
    assert sorted(stream[:n]) == sorted(train_rows)  # no loss, no duplicate, training episodes only
    assert {e for e, _ in stream} <= set(m.splits["train"])
    assert stream[:n] != sorted(stream[:n])  # shuffled
    with _loader(demo_shards, batch_size=4) as again, _loader(demo_shards, batch_size=4, seed=1) as other:
        assert _rows(next(again) for _ in range(3)) == stream[:12]
        assert _rows(next(other) for _ in range(3)) != stream[:12]


def test_block_shuffle_mixes_shards_and_stays_inside_windows():
    groups = [RowGroup(f"s{i // 2}.parquet", i % 2, 10) for i in range(6)]  # 3 shards x 2 row groups x 10 rows
    order = block_shuffle_order(groups, seed=0, epoch=0, buffer=20)
    assert sorted(order) == list(range(60))
    assert not np.array_equal(order, block_shuffle_order(groups, seed=0, epoch=1, buffer=20))  # reshuffled per epoch
    assert np.array_equal(order, block_shuffle_order(groups, seed=0, epoch=0, buffer=20))
    # Each window of 20 rows holds exactly two whole row groups (row groups permuted, then rows within the window).
    windows = [set(order[i : i + 20] // 10) for i in range(0, 60, 20)]
    assert all(len(w) == 2 for w in windows)
    assert [sorted(w) for w in windows] != [[0, 1], [2, 3], [4, 5]]  # row groups of different shards meet


def test_eval_loader_reads_val_rows_in_order_without_augmentation(demo_shards):
    val = _all_rows(demo_shards, "val")
    m = Manifest.load(demo_shards)
    with _loader(demo_shards, "val", batch_size=5, shuffle=False, augment=False, repeat=False) as loader:
        batches = list(loader)
    rows = _rows(batches)
    assert rows == sorted(val) and {e for e, _ in rows} <= set(m.splits["val"])
    cam = m.cameras[0]
    b = batches[0]
    for i in range(len(b["index"])):
        row = val[(int(b["episode_index"][i]), int(b["frame_index"][i]))]
        assert np.array_equal(b[f"image.{cam}"][i], decode_image(row[f"image.{cam}"]))
        assert np.array_equal(b["actions"][i].reshape(-1), row["actions"].reshape(-1))
        assert np.array_equal(b["tokenized_prompt"][i], row["tokenized_prompt"])


def test_training_images_are_augmented(demo_shards):
    m = Manifest.load(demo_shards)
    cam = m.cameras[0]
    rows = _all_rows(demo_shards, "train")
    with _loader(demo_shards, batch_size=8) as loader:
        b = next(loader)
    changed = [
        not np.array_equal(b[f"image.{cam}"][i], decode_image(rows[(int(b["episode_index"][i]), int(b["frame_index"][i]))][f"image.{cam}"]))
        for i in range(8)
    ]
    assert all(changed)


def test_resumed_loader_yields_the_same_batches_with_workers(demo_shards):
    with _loader(demo_shards, batch_size=4) as loader:
        for _ in range(3):
            next(loader)
        state = json.loads(json.dumps(loader.state()))  # what a checkpoint stores
        expected = [next(loader) for _ in range(4)]
    with _loader(demo_shards, batch_size=4, num_workers=2) as resumed:
        resumed.restore(state)
        got = [next(resumed) for _ in range(4)]
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]), k  # images included: augmentation is seeded by stream position


def test_state_from_another_configuration_is_refused(demo_shards):
    with _loader(demo_shards, batch_size=4) as loader:
        next(loader)
        state = loader.state()
    with _loader(demo_shards, batch_size=4, seed=7) as other:
        with pytest.raises(LoaderError, match="seed was 0, is 7"):
            other.restore(state)


def test_rows_are_split_between_processes(demo_shards):
    cfg = LoaderConfig(batch_size=8)
    with ShardLoader(demo_shards, "train", cfg, process_index=0, process_count=1) as single:
        whole = [_rows([next(single)]) for _ in range(2)]
    parts = []
    for p in range(2):
        with ShardLoader(demo_shards, "train", cfg, process_index=p, process_count=2) as loader:
            assert loader.local_batch_size == 4
            parts.append([_rows([next(loader)]) for _ in range(2)])
    for step in range(2):
        a, b = parts[0][step], parts[1][step]
        assert not set(a) & set(b)
        assert sorted(a + b) == sorted(whole[step])  # together: exactly the global batch
    with pytest.raises(LoaderError, match="not divisible"):
        ShardLoader(demo_shards, "train", LoaderConfig(batch_size=5), process_index=0, process_count=2)


def test_unknown_split_and_missing_manifest_are_refused(demo_shards, tmp_path):
    with pytest.raises(LoaderError, match="unknown split"):
        _loader(demo_shards, "test")
    with pytest.raises(Exception, match="manifest"):
        _loader(tmp_path)


def test_augment_geometry_only_off_wrist():
    img = np.zeros((32, 32, 3), np.uint8)
    img[4:8, 20:24] = 255  # a bright square off-centre
    cfg = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0)  # geometry only
    moved = [not np.array_equal(augment_image(img, np.random.default_rng(s), wrist=False, cfg=cfg), img) for s in range(5)]
    assert all(moved)
    for s in range(5):  # wrist cameras: colour only, and with no jitter the image is unchanged
        assert np.array_equal(augment_image(img, np.random.default_rng(s), wrist=True, cfg=cfg), img)
    jittered = augment_image(np.full((8, 8, 3), 100, np.uint8), np.random.default_rng(0), wrist=True)
    assert jittered.dtype == np.uint8 and not np.array_equal(jittered, np.full((8, 8, 3), 100, np.uint8))
    a = augment_image(img, np.random.default_rng(3), wrist=False)
    assert np.array_equal(a, augment_image(img, np.random.default_rng(3), wrist=False))  # seeded
    assert is_wrist_camera("wrist_left") and is_wrist_camera("observation.images.Wrist") and not is_wrist_camera("top")


def test_measure_throughput_reports_samples_per_second(demo_shards):
    r = measure_throughput(demo_shards, batch_size=4, num_batches=3, warmup_batches=1)
    assert r["samples_per_s"] > 0 and r["batch_size"] == 4 and r["num_batches"] == 3


# ------------------------------------------------------------------------------------------------ damaged shards


def _copy_with_train_shard(demo_shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(demo_shards, out)
    return out, Manifest.load(out).shard_paths(out, "train")[0]


def _read_until_error(loader) -> tuple[list[dict], ShardReadError]:
    batches = []
    with pytest.raises(ShardReadError) as info:
        for _ in range(100):
            batches.append(next(loader))
    return batches, info.value


@pytest.mark.parametrize("num_workers", [0, 2])
def test_flipped_bytes_in_a_shard_are_named_not_read(demo_shards, tmp_path, num_workers):
    out, path = _copy_with_train_shard(demo_shards, tmp_path)
    intact = read_rows(path)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    path.write_bytes(bytes(data))
    # Which column the flip hit, found independently: the one whose pages fail their checksum when read alone.
    f = pq.ParquetFile(path, **READ_OPTIONS)
    assert f.metadata.num_row_groups == 1  # so the loader's first row (shuffle off) is the group's row 0

    def fails(name):
        try:
            f.read_row_group(0, columns=[name])
        except OSError:
            return True
        return False

    damaged = [name for name in f.schema_arrow.names if fails(name)]
    assert len(damaged) == 1
    with _loader(out, batch_size=4, shuffle=False, num_workers=num_workers) as loader:
        batches, err = _read_until_error(loader)
    assert batches == []  # the shard has one row group: not one of its rows is handed on
    e, fr = int(intact["episode_index"][0]), int(intact["frame_index"][0])
    assert (err.shard, err.column, err.row_group, err.row) == (str(path), damaged[0], 0, 0)
    assert (err.episode, err.frame) == (e, fr)
    msg = str(err)
    assert "\n" not in msg and str(path) in msg and f"episode {e}, frame {fr}" in msg and f"column {damaged[0]}" in msg
    assert "CRC checksum verification failed" in msg


@pytest.mark.parametrize("num_workers", [0, 2])
def test_undecodable_image_in_a_sound_shard_is_named_and_never_batched(demo_shards, tmp_path, num_workers):
    out, path = _copy_with_train_shard(demo_shards, tmp_path)
    cam = Manifest.load(out).cameras[0]
    table = pq.read_table(path)
    bad_row = 9  # in the third batch of 4
    images = table.column(f"image.{cam}").to_pylist()
    images[bad_row] = images[bad_row][:8] + b"not a png, garbage bytes"  # PNG signature, then nonsense
    table = table.set_column(table.schema.get_field_index(f"image.{cam}"), table.schema.field(f"image.{cam}"),
                             pa.array(images, pa.binary()))
    write_parquet_atomic(table, path)  # a valid parquet file with valid checksums: only the image is broken
    e, fr = int(table["episode_index"][bad_row].as_py()), int(table["frame_index"][bad_row].as_py())
    with _loader(out, batch_size=4, shuffle=False, augment=False, num_workers=num_workers) as loader:
        batches, err = _read_until_error(loader)
    assert len(batches) == bad_row // 4  # every batch before the damaged row, none from it on
    assert (e, fr) not in _rows(batches)
    assert (err.shard, err.column, err.episode, err.frame, err.row) == (str(path), f"image.{cam}", e, fr, bad_row)
    msg = str(err)
    assert f"shard {path}: episode {e}, frame {fr}" in msg and f"column image.{cam} cannot be decoded" in msg


def test_damaged_shard_in_an_evaluation_pass_is_named(demo_shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(demo_shards, out)
    path = Manifest.load(out).shard_paths(out, "val")[0]
    cam = Manifest.load(out).cameras[0]
    table = pq.read_table(path)
    images = [b"\x00" * 16] * table.num_rows
    table = table.set_column(table.schema.get_field_index(f"image.{cam}"), table.schema.field(f"image.{cam}"),
                             pa.array(images, pa.binary()))
    write_parquet_atomic(table, path)
    with _loader(out, "val", batch_size=5, shuffle=False, augment=False, repeat=False, num_workers=2) as loader:
        batches, err = _read_until_error(loader)
    assert batches == [] and err.shard == str(path) and err.column == f"image.{cam}"
    assert (err.episode, err.frame) == (table["episode_index"][0].as_py(), table["frame_index"][0].as_py())


def test_unopenable_shard_is_named(demo_shards, tmp_path):
    out, path = _copy_with_train_shard(demo_shards, tmp_path)
    path.write_bytes(path.read_bytes()[:100])  # truncated: no footer
    with pytest.raises(ShardReadError, match=f"shard {path}: cannot be opened"):
        _loader(out)
