"""Atomic file writes: a temporary name in the same directory, fsync, then os.replace.

A reader (or a resumed run) therefore sees either the complete old file, the complete new file, or no file,
never a half-written one. Temporary names start with "." and contain ".tmp." so a resumed run can sweep them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TMP_MARKER = ".tmp."
# Rows per parquet row group: small enough for cheap random access, large enough to amortize page headers.
ROW_GROUP_SIZE = 256
# Every reader of shards passes these to pyarrow (`pq.ParquetFile`, `pq.read_table`): a page whose CRC32 does not
# match raises OSError instead of handing damaged bytes on. Files written without checksums still read.
READ_OPTIONS = {"page_checksum_verification": True}


@dataclasses.dataclass(frozen=True)
class WrittenFile:
    path: Path
    rows: int
    sha256: str
    bytes: int


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def sha256_file(path: Path | str, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        tmp.write_bytes(data)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_copy(src: Path | str, dst: Path | str) -> None:
    atomic_write_bytes(dst, Path(src).read_bytes())


def write_parquet_atomic(table: pa.Table, path: Path | str, row_group_size: int = ROW_GROUP_SIZE) -> WrittenFile:
    """Write a table as parquet, atomically. Same table -> same bytes (fixed writer settings, no timestamps)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        pq.write_table(
            table,
            tmp,
            row_group_size=row_group_size,
            compression="zstd",
            # Encoded images do not repeat: a dictionary only costs time there.
            use_dictionary=[f.name for f in table.schema if not pa.types.is_binary(f.type)],
            write_statistics=False,
            # A CRC32 per page: a reader that verifies them (see READ_OPTIONS) finds a flipped byte where it reads.
            write_page_checksum=True,
        )
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return WrittenFile(path=path, rows=table.num_rows, sha256=sha256_file(path), bytes=path.stat().st_size)


def remove_temp_files(directory: Path | str) -> int:
    """Delete leftovers of interrupted atomic writes under `directory` (recursively). Returns how many."""
    directory = Path(directory)
    if not directory.exists():
        return 0
    stale = [p for p in directory.rglob(f".*{TMP_MARKER}*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)
