"""What a finished run says to a person: the end summary, and a few decoded rows (`--show-rows`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ki_data import schema
from ki_data.artifacts import DataArtifacts
from ki_data.manifest import Manifest


def _fps(value: float | None) -> str:
    return "reused" if value is None else f"{value:,.0f} frames/s"


def summary_text(manifest: Manifest, out_dir: Path) -> str:
    s = manifest.summary
    rejected = ", ".join(f"{k} {v}" for k, v in s["rows_rejected"].items()) or "none"
    lines = [
        f"preprocessed {manifest.source['repo_id']} -> {out_dir}",
        f"  episodes {s['episodes']} (train {s['episodes_train']}, val {s['episodes_val']}), frames {s['frames']:,}"
        f" -> rows {s['rows']:,} in {s['shards']} shard(s), {s['bytes'] / 1e6:.1f} MB",
        f"  FAST tokens per chunk: mean {s['fast_tokens_per_chunk']['mean']:.1f}, max "
        f"{s['fast_tokens_per_chunk']['max']}; prompt tokens: mean {s['prompt_tokens']['mean']:.1f}, max "
        f"{s['prompt_tokens']['max']} of {manifest.max_token_len}",
        f"  rows rejected: {rejected}",
        f"  wall time {s['seconds']:.1f} s ({s['frames_per_second']:.0f} frames/s; "
        + ", ".join(f"{k} {v:.1f} s" for k, v in s["seconds_by_phase"].items()) + ")"
        + (f"; {s['shards_reused']} shard(s) reused from an interrupted run" if s["shards_reused"] else ""),
        f"  pass 1 {_fps(s.get('pass1_frames_per_second'))}, pass 2 {_fps(s.get('pass2_frames_per_second'))} "
        f"on the {s.get('executor', 'local')} executor ({s.get('tasks', '?')} task(s), {s['workers']} worker(s))",
    ]
    if s["fast_values_clipped"]:
        lines.append(f"  warning: {s['fast_values_clipped']} FAST coefficients were clipped to the tokenizer range")
    return "\n".join(lines)


def describe_rows(out_dir: str | Path, n: int = 3) -> str:
    """A few decoded rows of the first shard with rows: task, decoded text prompt, FAST count, action chunk head."""
    art = DataArtifacts.open(out_dir)
    m = art.manifest
    shards = [s for s in m.shards if s.rows > 0]
    if not shards:
        return f"{art.root}: no rows"
    path = art.root / shards[0].path
    cols = schema.read_rows(path)
    lines = [f"{min(n, len(cols[schema.INDEX]))} row(s) of {path}:"]
    for r in range(min(n, len(cols[schema.INDEX]))):
        text_ids = cols[schema.TEXT_PROMPT][r][cols[schema.TEXT_PROMPT_MASK][r]]
        postfix = cols[schema.TOKENIZED_PROMPT][r][cols[schema.TOKEN_AR_MASK][r]]
        reading = art.prompt.read_postfix(postfix, m.action_horizon, m.action_dim)
        stored = cols[schema.ACTIONS][r]
        head = art.unnormalize_actions(stored[:3]).astype(np.float64)  # float64: prints short
        check = (f"decoded chunk vs stored: max |diff| {np.abs(reading.actions - stored).max():.3f} in normalized "
                 f"units" if reading.error is None else f"they do not decode: {reading.error}")
        units = "" if m.delta_actions is None else ", relative to the state where --delta-actions said"
        lines += [
            f"- episode {cols[schema.EPISODE_INDEX][r]}, frame {cols[schema.FRAME_INDEX][r]} "
            f"(dataset index {cols[schema.INDEX][r]})",
            f"    task:        {cols[schema.TASK][r]}",
            f"    text prompt: {art.prompt.text.decode(text_ids.tolist())!r} ({len(text_ids)} tokens)",
            f"    FAST tokens: {len(reading.fast_ids)} ({check})",
            f"    actions:     first {len(head)} of {m.action_horizon} steps {np.round(head, 2).tolist()}"
            f" (pad steps {int(cols[schema.ACTION_IS_PAD][r].sum())}{units})",
        ]
    return "\n".join(lines)
