"""ki_data.verify + pipelines.verify + `pipelines.train --verify`: damaged shards are found and named; and the page
checksums that let every reader catch a flipped byte where it reads it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ki_data.manifest import Manifest, ManifestError
from ki_data.schema import read_rows
from ki_data.shard_writer import READ_OPTIONS, write_parquet_atomic
from ki_data.verify import ShardsDamagedError, check_shards, verify_shards

REPO = Path(__file__).resolve().parents[1]


def flip_middle(path: Path, n: int = 64) -> None:
    """Invert n bytes in the middle of a file (the size stays the same)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


@pytest.fixture
def shards_copy(demo_shards, tmp_path) -> Path:
    out = tmp_path / "shards_copy"
    shutil.copytree(demo_shards, out)
    return out


def _train_shard(out: Path) -> str:
    return next(s.path for s in Manifest.load(out).shards if s.split == "train")


def test_intact_output_verifies(demo_shards):
    report = verify_shards(demo_shards, progress=False)
    m = Manifest.load(demo_shards)
    assert report.ok and not report.problems and not report.extra
    assert report.shards == len(m.shards) and report.bytes_read == sum(s.bytes for s in m.shards)
    assert check_shards(demo_shards, progress=False).ok


def test_flipped_bytes_are_named(shards_copy):
    name = _train_shard(shards_copy)
    flip_middle(shards_copy / name)
    report = verify_shards(shards_copy, progress=False)
    assert not report.ok
    assert [(p.path, p.problem) for p in report.problems] == [(name, "sha256 differs from manifest.json")]
    assert name in report.one_line() and "\n" not in report.one_line()
    with pytest.raises(ShardsDamagedError, match=f"1 of {report.shards} shard.*{name}"):
        check_shards(shards_copy, progress=False)
    # Sizes only: the same length, so flipped bytes go unseen (the page checksums catch them where read).
    assert verify_shards(shards_copy, quick=True, progress=False).ok


def test_missing_truncated_and_extra_files(shards_copy):
    entries = Manifest.load(shards_copy).shards
    first, second = entries[0].path, entries[1].path
    (shards_copy / first).unlink()
    data = (shards_copy / second).read_bytes()
    (shards_copy / second).write_bytes(data[: len(data) // 2])
    shutil.copy(shards_copy / second, shards_copy / "shards" / "stray-00000.parquet")
    for quick in (False, True):
        report = verify_shards(shards_copy, quick=quick, progress=False)
        assert [(p.path, p.problem) for p in report.problems] == [
            (first, "missing"),
            (second, f"size {len(data) // 2} bytes, manifest.json says {len(data)}"),
        ]
        assert report.extra == ("shards/stray-00000.parquet",)
        assert report.bytes_read == 0  # nothing left to hash: both damaged shards were caught by their size


def test_not_a_shard_directory(tmp_path):
    with pytest.raises(ManifestError, match="manifest.json"):
        verify_shards(tmp_path, progress=False)


def test_cli_exit_codes_and_messages(shards_copy, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "pipelines.verify", *map(str, args), "--no-progress"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    ok = run(shards_copy)
    assert ok.returncode == 0 and "match manifest.json" in ok.stdout
    name = _train_shard(shards_copy)
    flip_middle(shards_copy / name)
    bad = run(shards_copy)
    assert bad.returncode == 1, bad.stderr
    assert f"{name} (sha256 differs from manifest.json)" in bad.stdout and "damaged" in bad.stdout
    none = run(tmp_path / "nowhere")
    assert none.returncode == 2 and none.stderr.startswith("error:") and "manifest.json" in none.stderr
    assert "Traceback" not in bad.stderr + none.stderr


def test_train_verify_refuses_damaged_shards_before_writing(shards_copy, tmp_path, capsys):
    from pipelines.train import main

    name = _train_shard(shards_copy)
    flip_middle(shards_copy / name)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "keep.txt").write_text("earlier run")
    # --overwrite would empty the directory: the check must come first.
    rc = main(["--shards", str(shards_copy), "--checkpoint-dir", str(ckpt), "--verify", "--overwrite", "--steps", "1"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc != 0 and "Traceback" not in err
    assert len(errors) == 1 and name in errors[0] and "damaged" in errors[0]
    assert sorted(p.name for p in ckpt.iterdir()) == ["keep.txt"] and (ckpt / "keep.txt").read_text() == "earlier run"


def test_shards_carry_page_checksums_that_readers_verify(tmp_path):
    n = 300
    rng = np.random.default_rng(0)
    table = pa.table({"episode_index": pa.array(np.arange(n) // 100), "frame_index": pa.array(np.arange(n) % 100),
                      "image.top": pa.array([rng.bytes(500) for _ in range(n)], pa.binary())})
    written = write_parquet_atomic(table, tmp_path / "a.parquet")
    again = write_parquet_atomic(table, tmp_path / "b.parquet")
    assert written.sha256 == again.sha256  # checksums keep the bytes a function of the table
    # Flip bytes well inside the first image page (past its page header): only the page CRC can tell.
    col = pq.ParquetFile(written.path).metadata.row_group(0).column(2)
    data = bytearray(written.path.read_bytes())
    at = col.data_page_offset + col.total_compressed_size // 2
    data[at : at + 8] = bytes(b ^ 0xFF for b in data[at : at + 8])
    written.path.write_bytes(bytes(data))
    assert pq.read_table(written.path).num_rows == n  # without verification: damaged bytes read as data
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        pq.read_table(written.path, **READ_OPTIONS)
    with pytest.raises(OSError, match=f"{written.path}: cannot read the shard.*CRC"):
        read_rows(written.path)
