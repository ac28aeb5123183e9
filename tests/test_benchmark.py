"""`python -m pipelines.benchmark` runs end to end and writes well-formed JSON (no timing is asserted).

The hidden --smoke mode shrinks everything (a 48x64 ALOHA-like dataset of 2 x 12 frames, 32 px shards, the tiny
preset, one repeat, quick compiles) and the session's recorded demo dataset is passed with --repo-id/--root, so the
command takes a minute or two.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from ki_bench.figures import REQUIRED_KEYS, TARGETS, figures_for
from ki_bench.report import META_KEYS
from ki_bench.settings import SETTINGS

REPO = Path(__file__).resolve().parents[1]


def _positive_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


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
    signed = {f.key for f in records if f.signed}  # differences of timings: finite, any sign
    bad = {k: v for k, v in figures.items() if not _positive_number(v) and not (k == "resize_max_abs_diff" and v == 0)
           and not (k in signed and isinstance(v, float) and math.isfinite(v))}
    assert not bad, f"figures that are not positive numbers: {bad}"
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
