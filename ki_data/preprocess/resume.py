"""Resuming: what an interrupted run left in `<out>/.ki_progress/`, and whether it can be kept.

`state.json` holds the fingerprint of the inputs and options (a run of other ones refuses the directory) and the
hashes of the pass-1 artifacts. `manifest.json` there is the draft manifest, written after pass 1: everything the
final one says but its shards and summary, which the merge fills in. Every finished shard has a sidecar (its ShardResult, the pass-2 fingerprint); the
next run keeps a shard whose file still hashes to its sidecar and redoes the rest. The manifest is written last, so
a directory with a manifest is a finished run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from ki_data import schema
from ki_data.lerobot_source import DatasetSpec
from ki_data.manifest import MANIFEST_FILE, Manifest, ManifestError
from ki_data.preprocess.card import CARD_FILE
from ki_data.preprocess.config import OutputExistsError
from ki_data.preprocess.pass2 import ShardResult
from ki_data.preprocess.plan import ShardPlan
from ki_data.shard_writer import atomic_write_json, sha256_file

PROGRESS_DIR = ".ki_progress"
STATE_FILE = "state.json"
SLURM_DIR = "slurm"  # a Slurm run's job files and logs; they stay after the run


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def dir_sha(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def source_identity(spec: DatasetSpec) -> dict:
    return {
        "repo_id": spec.repo_id,
        "root": str(spec.root.resolve()),
        "codebase_version": spec.codebase_version,
        "episodes": [[e.index, e.length] for e in spec.episodes],
    }


# ------------------------------------------------------------------------------------------------ the directory


def clear_output(out: Path) -> None:
    """Remove what a preprocessing run writes (and nothing else)."""
    for name in (MANIFEST_FILE, CARD_FILE, schema.NORM_STATS_FILE):
        (out / name).unlink(missing_ok=True)
    for name in (schema.SHARDS_DIR, "tokenizer", PROGRESS_DIR, SLURM_DIR):
        if (out / name).exists():
            shutil.rmtree(out / name)


def prepare_output(out: Path, run_fingerprint: str, overwrite: bool) -> dict:
    """Resume state of `out` for this fingerprint; clears it with overwrite, refuses to clobber otherwise."""
    state_path = out / PROGRESS_DIR / STATE_FILE
    if out.exists() and any(out.iterdir()):
        if overwrite:
            clear_output(out)
        elif (out / MANIFEST_FILE).exists():
            raise OutputExistsError(
                f"{out} already holds a finished preprocessing run; pass --overwrite to replace it or --output to "
                f"write elsewhere"
            )
        elif not state_path.is_file():
            raise OutputExistsError(f"{out} is not empty and holds no preprocessing run; pass --overwrite or --output")
        else:
            state = json.loads(state_path.read_text())
            if state.get("fingerprint") != run_fingerprint:
                raise OutputExistsError(
                    f"{out} holds an unfinished run of other inputs or options; pass --overwrite to start over"
                )
            return state
    state = {"fingerprint": run_fingerprint}
    save_state(out, state)
    return state


def save_state(out: Path, state: dict) -> None:
    atomic_write_json(out / PROGRESS_DIR / STATE_FILE, state)


def draft_path(out: Path) -> Path:
    return out / PROGRESS_DIR / MANIFEST_FILE


def save_draft(out: Path, draft: Manifest) -> None:
    draft.save(draft_path(out).parent)


def load_draft(out: Path) -> Manifest:
    """The draft manifest of an unfinished run (ManifestError when pass 1 has not written it)."""
    if not draft_path(out).is_file():
        raise ManifestError(f"{draft_path(out)} does not exist: pass 1 of the run in {out} has not finished")
    return Manifest.load(draft_path(out).parent)


def finish_output(out: Path) -> None:
    """After the manifest: the progress records are no longer needed."""
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ pass 1


def pass1_record(out: Path, rejected: dict[str, int]) -> dict:
    """What state.json keeps of a finished pass 1: the hashes of what it wrote."""
    return {
        "norm_stats_sha256": sha256_file(out / schema.NORM_STATS_FILE),
        "text_sha256": sha256_file(out / schema.TEXT_TOKENIZER_FILE),
        "fast_sha256": dir_sha(out / schema.FAST_TOKENIZER_DIR),
        "rejected": rejected,
    }


def pass1_valid(out: Path, record: dict | None) -> bool:
    if not record:
        return False
    try:
        return (
            sha256_file(out / schema.NORM_STATS_FILE) == record["norm_stats_sha256"]
            and sha256_file(out / schema.TEXT_TOKENIZER_FILE) == record["text_sha256"]
            and dir_sha(out / schema.FAST_TOKENIZER_DIR) == record["fast_sha256"]
        )
    except (FileNotFoundError, NotADirectoryError, KeyError):
        return False


# ------------------------------------------------------------------------------------------------ shards


def sidecar_path(out: Path, shard_path: str) -> Path:
    return out / PROGRESS_DIR / (Path(shard_path).name + ".json")


def record_shard(out: Path, result: ShardResult, shard_fingerprint: str) -> None:
    """The sidecar of a shard just written (after its file: a sidecar means the shard is complete)."""
    sidecar = dataclasses.asdict(result) | {"fingerprint": shard_fingerprint}
    sidecar.pop("reused")
    atomic_write_json(sidecar_path(out, result.path), sidecar)


def reusable_shard(out: Path, plan: ShardPlan, shard_fingerprint: str, check_hash: bool = True) -> ShardResult | None:
    """A shard finished by an earlier (killed) run with the same inputs and options, verified by its sha256
    (check_hash=False: by its size only, for shards whose sidecar this run wrote right after hashing the file)."""
    sidecar, path = sidecar_path(out, plan.path), out / plan.path
    if not (sidecar.is_file() and path.is_file()):
        return None
    try:
        data = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        return None
    if data.get("fingerprint") != shard_fingerprint or data.get("episodes") != list(plan.episodes):
        return None
    if path.stat().st_size != data.get("bytes") or (check_hash and sha256_file(path) != data.get("sha256")):
        return None
    data.pop("fingerprint")
    return ShardResult(**data, reused=True)
