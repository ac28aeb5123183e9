"""scripts/flow_vs_regression.py, the README's yardstick for the flow head: it trains and scores on real shards,
and a --rollout it cannot do is refused before any training."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "flow_vs_regression.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_trains_and_scores_against_hold_still(demo_shards):
    proc = _run(str(demo_shards), "--objective", "flow-x", "--steps", "120", "--batch", "4")  # warm-up: 100 steps
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = re.findall(r"step (\d+)  loss (\S+)  val MSE / hold still (\S+)", proc.stdout)
    assert [int(s) for s, _, _ in lines] == [30, 60, 90, 120]  # a score at each quarter of the run
    assert all(float(loss) > 0 and float(ratio) > 0 for _, loss, ratio in lines)


def test_a_rollout_on_shards_without_the_block_pose_is_refused_before_training(demo_shards):
    proc = _run(str(demo_shards), "--objective", "regression", "--steps", "120", "--rollout")
    assert proc.returncode != 0
    assert ("--rollout needs shards whose state is observation.state + observation.environment_state "
            "(preprocess --state-keys); these hold observation.state") in proc.stderr
    assert "step" not in proc.stdout  # nothing trained
