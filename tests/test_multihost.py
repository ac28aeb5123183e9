"""Multi-host training (issue 14.4): two CPU processes joined by jax.distributed (coordinator on localhost), one
device each, train on the demo shards; the final parameters equal a one-process run with the same global batch, and
only process 0 writes files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

RUN = textwrap.dedent(
    """
    import sys
    import jax

    shards, out, processes, pid, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    if processes > 1:
        jax.distributed.initialize(f"localhost:{port}", processes, pid)
    from ki_model.optimizer import OptimizerConfig
    from ki_model.train import TrainConfig, train

    # eps 1e-6: see tests/test_train.py (gradients that are exactly zero in theory come out as layout-dependent noise).
    opt = OptimizerConfig(peak_lr=3e-3, warmup_steps=2, decay_steps=50, decay_lr=3e-4, eps=1e-6)
    train(TrainConfig(shards=shards, checkpoint_dir=out, config="tiny", steps=3, batch_size=8, log_every=1,
                      save_every=3, num_workers=0, progress=False, optimizer=opt, fast_compile=True, overwrite=True))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _final_params(out: Path) -> dict:
    """The weights as the Policy loads them (one device, whatever topology saved them)."""
    from flax import nnx

    from ki_model.policy import Policy

    policy = Policy.load(out, use_ema=False)
    return nnx.to_pure_dict(policy.params)


@pytest.mark.slow
def test_two_processes_train_like_one(demo_shards, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    one, two = tmp_path / "one", tmp_path / "two"
    two.mkdir()
    (two / "old.txt").write_text("an earlier run: --overwrite replaces it")
    single = subprocess.run([sys.executable, "-c", RUN, str(demo_shards), str(one), "1", "0", "0"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", RUN, str(demo_shards), str(two), "2", str(i), port], env=env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]

    assert not (two / "old.txt").exists()
    metrics = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]  # written once, by process 0
    reference = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(metrics, reference):
        for key in ("flow_loss", "fast_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)

    import jax

    pa, pb = _final_params(one), _final_params(two)
    diff = max(jax.tree.leaves(jax.tree.map(lambda u, v: float(np.max(np.abs(u - v))), pa, pb)))
    scale = max(jax.tree.leaves(jax.tree.map(lambda u: float(np.max(np.abs(u))), pa)))
    assert diff <= 1e-5 * max(1.0, scale)
