"""What the terminal shows: progress bars and summaries; DataTrove's task logs and ffmpeg's lines go to a log file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import DEMO_REPO_ID

from ki_data.console import log_file

REPO = Path(__file__).resolve().parents[1]


def test_file_descriptor_2_goes_to_the_log_and_our_bars_to_the_terminal(tmp_path):
    # In a child process: pytest's own capture replaces sys.stderr, which would hide what is being tested.
    log = tmp_path / "lib.log"
    code = (
        "import os, sys\n"
        "from ki_data.console import library_output_to, terminal\n"
        f"with library_output_to(__import__('pathlib').Path({str(log)!r})):\n"
        "    os.write(2, b'from a C library\\n')\n"
        "    print(\"a library's message\", file=sys.stderr, flush=True)\n"
        "    print('our bar', file=terminal(), flush=True)\n"
        "os.write(2, b'after\\n')\n"
        "assert terminal() is sys.stderr\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "our bar\nafter\n"
    assert log.read_text() == "from a C library\na library's message\n"


def test_log_file_is_beside_the_output_or_in_ki_log_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("KI_LOG_DIR", raising=False)
    assert log_file("preprocess", tmp_path / "out") == tmp_path / "out.preprocess.log"
    monkeypatch.setenv("KI_LOG_DIR", str(tmp_path / "logs"))
    assert log_file("preprocess", tmp_path / "out") == tmp_path / "logs" / "preprocess.log"


def test_preprocess_keeps_datatrove_out_of_the_terminal(demo_dataset, lerobot_home, tmp_path):
    out = tmp_path / "shards"
    env = {k: v for k, v in os.environ.items() if k != "KI_LOG_DIR"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_LEROBOT_HOME": str(lerobot_home)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.preprocess", DEMO_REPO_ID, "--output", str(out), "--image-size", "32",
         "--action-horizon", "10", "--max-token-len", "64", "--max-text-len", "32", "--workers", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    terminal = proc.stdout + proc.stderr
    assert "pass 2/2" in proc.stderr and "preprocessed" in proc.stdout  # our bar and summary
    assert "datatrove" not in terminal and "PIPELINE" not in terminal
    log = tmp_path / "shards.preprocess.log"
    assert f"library logs: {log}" in proc.stdout and "datatrove" in log.read_text()
