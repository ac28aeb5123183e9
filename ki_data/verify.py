"""Whole-output check of a shard directory against manifest.json: every listed shard present, of its recorded size,
with its recorded sha256.

Reading every byte is the only way to be sure, so this is an explicit step (`python -m pipelines.verify`,
`pipelines.train --verify`), never part of an ordinary training start. `quick=True` compares sizes only: it catches
truncated or missing files in a second, not flipped bytes (the page checksums catch those where they are read).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import time
from pathlib import Path

from tqdm import tqdm

from ki_data.loader import LoaderError
from ki_data.manifest import Manifest
from ki_data.schema import SHARDS_DIR

_BLOCK = 1 << 22  # 4 MiB reads: hashlib releases the GIL on blocks this size, so threads hash in parallel


class ShardsDamagedError(LoaderError):
    """Shards that do not match manifest.json (raised by `check_shards`)."""


@dataclasses.dataclass(frozen=True)
class ShardProblem:
    path: str  # as listed in manifest.json (relative to the output directory)
    problem: str  # "missing", "size ... bytes, manifest.json says ...", "sha256 differs from manifest.json"


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    out_dir: str
    shards: int  # listed in manifest.json
    bytes_read: int  # hashed (0 with quick)
    quick: bool
    problems: tuple[ShardProblem, ...]  # listed shards that are missing or differ, in manifest order
    extra: tuple[str, ...]  # parquet files under shards/ that manifest.json does not list (not read by the loader)
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems

    def one_line(self) -> str:
        if self.ok:
            how = "sizes only: flipped bytes are not looked for" if self.quick else "sizes and sha256"
            return f"{self.out_dir}: {self.shards} shard(s) match manifest.json ({how})"
        named = "; ".join(f"{p.path} ({p.problem})" for p in self.problems)
        return f"{self.out_dir}: {len(self.problems)} of {self.shards} shard(s) damaged: {named}"

    def summary(self) -> str:
        lines = [self.one_line()]
        lines += [f"  extra file not in manifest.json (ignored by the loader): {p}" for p in self.extra]
        rate = self.bytes_read / max(self.seconds, 1e-9) / 1e6
        lines.append(f"  {self.bytes_read / 1e6:.1f} MB hashed in {self.seconds:.1f} s ({rate:.0f} MB/s)"
                     if not self.quick else f"  sizes only (--quick), {self.seconds:.2f} s")
        return "\n".join(lines)


def _sha256(path: Path, bar: tqdm) -> str | OSError:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_BLOCK):
                h.update(chunk)
                bar.update(len(chunk))
    except OSError as e:  # unreadable (permissions, I/O error): a finding about this file, not a crash of the check
        return e
    return h.hexdigest()


def verify_shards(out_dir: str | Path, *, quick: bool = False, progress: bool = True, workers: int = 4) -> VerifyReport:
    """Compare every shard listed in `out_dir`/manifest.json with its recorded size and (unless `quick`) sha256.

    Raises ManifestError if `out_dir` is not a finished preprocessing output; damage is reported, not raised.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    entries = Manifest.load(out).shards
    paths = {s.path: out / s.path for s in entries}
    problems: dict[str, str] = {}
    to_hash = []
    for s in entries:
        p = paths[s.path]
        if not p.is_file():
            problems[s.path] = "missing"
        elif (size := p.stat().st_size) != s.bytes:
            problems[s.path] = f"size {size} bytes, manifest.json says {s.bytes}"
        elif not quick:
            to_hash.append(s)
    total = sum(s.bytes for s in to_hash)
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify shards", disable=not progress or quick) as bar:
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            hashed = pool.map(lambda s: _sha256(paths[s.path], bar), to_hash)
            digests = {s.path: h for s, h in zip(to_hash, hashed)}
    for s in to_hash:
        digest = digests[s.path]
        if isinstance(digest, OSError):
            problems[s.path] = f"unreadable: {digest.strerror or digest}"
        elif digest != s.sha256:
            problems[s.path] = "sha256 differs from manifest.json"
    listed = {p.resolve() for p in paths.values()}
    shard_dir = out / SHARDS_DIR
    found = shard_dir.glob("*.parquet") if shard_dir.is_dir() else []
    extra = sorted(str(p.relative_to(out)) for p in found if p.resolve() not in listed)
    return VerifyReport(
        out_dir=str(out),
        shards=len(entries),
        bytes_read=total,
        quick=quick,
        problems=tuple(ShardProblem(s.path, problems[s.path]) for s in entries if s.path in problems),
        extra=tuple(extra),
        seconds=time.perf_counter() - t0,
    )


def check_shards(out_dir: str | Path, *, progress: bool = True) -> VerifyReport:
    """`verify_shards`, raising ShardsDamagedError (one line naming each damaged shard) unless all match."""
    report = verify_shards(out_dir, progress=progress)
    if not report.ok:
        raise ShardsDamagedError(report.one_line() + f" (python -m pipelines.verify {out_dir} for the report)")
    return report
