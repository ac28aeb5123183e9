"""`python -m pipelines.benchmark` runs end to end and writes well-formed JSON (no timing is asserted).

The hidden --smoke mode shrinks everything (a 48x64 ALOHA-like dataset of 2 x 12 frames, 32 px shards, the tiny
preset, one repeat, quick compiles) and the session's recorded demo dataset is passed with --repo-id/--root. It is
still the longest test (484 s of a 28-min default run on 2 busy cores), so it runs with the slow ones (CI runs both).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ki_bench.figures import REQUIRED_KEYS, TARGETS, figures_for
from ki_bench.report import META_KEYS
from ki_bench.settings import SETTINGS

REPO = Path(__file__).resolve().parents[1]


def _positive_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def raw_pass2_ok(p2: dict) -> bool:
    """The pass-2 worker phase measured a worker: its own peak memory above its start, and CPU in the stages."""
    st = p2["stage_cpu_ms_per_frame"]
    return p2["peak_rss_mb_own"] >= p2["rss_at_start_mb"] > 0 and {"decode", "resize_encode", "write"} <= set(st)


@pytest.mark.slow
def test_benchmark_writes_every_figure_as_a_positive_number(demo_dataset, lerobot_home, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, "-m", "pipelines.benchmark", "--smoke", "--no-progress", "--json", str(out),
        "--cache-dir", str(tmp_path / "cache"),
        "--repo-id", demo_dataset.relative_to(lerobot_home).as_posix(), "--root", str(demo_dataset),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    doc = json.loads(out.read_text())
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    assert not missing, f"JSON lacks {missing}"
    figures = {k: v for k, v in doc.items() if k not in META_KEYS}
    # Every figure record is in the JSON, as a number or as not measured (with the reason), never both.
    records = figures_for(SETTINGS["smoke"])
    assert set(figures) | set(doc["not_measured"]) == {f.key for f in records}
    assert not set(figures) & set(doc["not_measured"])
    floors = {f.key: f.floor for f in records if f.floor is not None}  # e.g. an extra cost: >= 0, never negative
    bad = {k: v for k, v in figures.items() if not _positive_number(v) and not (k == "resize_max_abs_diff" and v == 0)
           and not (k in floors and isinstance(v, float) and math.isfinite(v))}
    assert not bad, f"figures that are not positive numbers: {bad}"
    assert all(figures[k] >= floor for k, floor in floors.items()), {k: figures[k] for k in floors}

    # Every figure measured in rounds reports its spread: the figure is the median of its rounds, inside the
    # interquartile range and the median's interval, with the number of rounds and whether they settled it.
    spread = {f.key for f in records if f.spread is not None}
    assert spread and set(doc["spread"]) == spread
    for key, sp in doc["spread"].items():
        assert sp["q1"] <= doc[key] <= sp["q3"] and sp["ci_low"] <= doc[key] <= sp["ci_high"], (key, sp)
        assert sp["n"] >= 1 and sp["stop"] in ("settled", "max_repeats", "max_seconds", "frames")
    assert raw_pass2_ok(doc["raw"]["pass2_worker"])
    assert doc["targets"] == TARGETS
    met = {k: figures[k] >= v if doc["directions"][k] == ">=" else figures[k] <= v
           for k, v in TARGETS.items() if k in figures}
    assert doc["met"] == met
    assert _positive_number(doc["machine"]["cpu_count"]) and doc["machine"]["jax_backend"] in ("cpu", "gpu", "tpu")

    # Both ways of reading covered the same frames, and decode-only decoded exactly those frames.
    raw = doc["raw"]
    for pre, loop in (("preprocess", "lerobot_loop"), ("preprocess_pusht", "lerobot_loop_pusht")):
        assert raw[pre]["frames"] == raw[loop]["frames"] == raw[pre]["decode_only_frames"] > 0
    assert raw["preprocess"]["cameras"] == 3 and raw["preprocess"]["image_format"] == "jpeg"

    # The table: one line per figure with its ratio as written to the JSON.
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    for key in REQUIRED_KEYS:
        assert key in lines, f"no table line for {key}"
    for key in TARGETS:
        if key in doc["not_measured"]:
            assert "not measured" in lines[key] and doc["not_measured"][key] in lines[key]
        else:
            assert f"{doc[key]:.2f}" in lines[key] and ("yes" if doc["met"][key] else "no") in lines[key].split()[-1:]
