"""Data flows one way (docs/DESIGN.md §2): ki_data never imports ki_model, and the inference path stays light."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):  # also imports inside functions and TYPE_CHECKING blocks
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_ki_data_never_imports_ki_model():
    offenders = {
        str(p.relative_to(REPO)): sorted(m for m in _imported_modules(p) if m.split(".")[0] in ("ki_model", "pipelines"))
        for p in sorted((REPO / "ki_data").rglob("*.py"))
    }
    assert not {k: v for k, v in offenders.items() if v}


def _loaded_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_the_policy_imports_no_training_code():
    # Flax NNX itself imports optax (flax.nnx.helpers), so optax is judged against what `flax.nnx` already loads.
    baseline = _loaded_after("import flax.nnx")
    loaded = _loaded_after("import ki_model.policy") - baseline
    heavy = {"optax", "grain", "orbax.checkpoint", "orbax.checkpoint.checkpoint_manager", "ki_model.train",
             "ki_model.optimizer", "ki_data.loader", "torch", "lerobot"}
    assert "ki_model.policy" in loaded and not heavy & loaded, sorted(heavy & loaded)
    assert not {"grain", "orbax.checkpoint.checkpoint_manager"} & baseline


def test_the_data_package_imports_no_video_or_model_stack():
    loaded = _loaded_after("import ki_data")
    assert "ki_data.prompt" in loaded
    assert not {"av", "torch", "lerobot", "jax", "grain", "ki_model"} & loaded


def test_nothing_below_the_benchmark_imports_it():
    # ki_bench measures ki_data and ki_model; they never reach up into it (nor into the command-line pipelines).
    offenders = {
        str(p.relative_to(REPO)): sorted(m for m in _imported_modules(p) if m.split(".")[0] in ("ki_bench", "pipelines"))
        for pkg in ("ki_data", "ki_model") for p in sorted((REPO / pkg).rglob("*.py"))
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_simulator_harness_stays_outside_the_core():
    # ki_sim drives gym-pusht with the core packages; ki_data and ki_model never import it nor the simulator.
    sim = ("ki_sim", "gym_pusht", "gymnasium", "pymunk", "pygame")
    offenders = {
        str(p.relative_to(REPO)): sorted(m for m in _imported_modules(p) if m.split(".")[0] in sim)
        for pkg in ("ki_data", "ki_model") for p in sorted((REPO / pkg).rglob("*.py"))
    }
    assert not {k: v for k, v in offenders.items() if v}
    assert any(m.startswith("ki_model") for m in _imported_modules(REPO / "ki_sim" / "rollout.py"))
