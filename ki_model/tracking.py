"""Where a training run's figures go: metrics.jsonl in the checkpoint directory (always; the record the tests,
`pipelines.compare_runs` and a resumed run read), the terminal, and with `--wandb PROJECT` a Weights & Biases run.

wandb is imported only when a run asks for it. Without network (or with WANDB_MODE=offline) the W&B run is written
offline under `<checkpoint_dir>/wandb/`, to be uploaded later with `wandb sync`.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ki_model.checkpoint import METRICS

WANDB_RUN = "wandb_run.json"  # the W&B run id, so that --resume continues the same W&B run


def load_metrics(checkpoint_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(checkpoint_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """A killed run may have logged past its last checkpoint; the resumed run logs those steps again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def format_metrics(m: dict[str, float]) -> str:
    """The terminal line of one logged step (and its validation line when it has one)."""
    text = (
        f"step {m['step']:>6d}  {format_losses(m, '  ')}  "
        f"|g| backbone {m['grad_norm_backbone']:.3f} expert {m['grad_norm_action_expert']:.3f}  "
        f"lr {m['learning_rate']:.2e}  {m['steps_per_s']:.2f} it/s  {m['samples_per_s']:.1f} samples/s"
    )
    return text + (_format_val(m) if "val_flow_loss" in m else "")


def format_losses(m: dict[str, float], sep: str = ", ") -> str:
    """The training losses of a logged step; a head that is not trained (NaN: FAST-only or flow-only) is left out."""
    parts = []
    if m["flow_loss"] == m["flow_loss"]:
        parts.append(f"flow {m['flow_loss']:.4f}")
    if m["fast_loss"] == m["fast_loss"]:
        parts.append(f"fast {m['fast_loss']:.4f}{sep}acc {m['fast_accuracy']:.3f}")
    return sep.join(parts)


def _format_val(m: dict[str, float]) -> str:
    """The validation line; a head that is not trained (NaN: FAST-only or flow-only training) is left out."""
    parts = []
    if m["val_flow_loss"] == m["val_flow_loss"]:
        hold = f" (hold still {m['val_hold_still_baseline_mse']:.4g})" if "val_hold_still_baseline_mse" in m else ""
        parts.append(f"flow {m['val_flow_loss']:.4f} (another row's observation "
                     f"{m['val_flow_loss_shuffled_observation']:.4f})  flow-sample MSE {m['val_flow_mse']:.4g}{hold}")
    if m["val_fast_loss"] == m["val_fast_loss"]:
        parts.append(f"fast {m['val_fast_loss']:.4f}  acc {m['val_fast_accuracy']:.3f}")
    return "\n  val: " + "  ".join(parts)


class Tracker:
    """metrics.jsonl (on the writing process) and, when given, a W&B run that receives the same figures."""

    def __init__(self, out: Path, *, write: bool, wandb_run: Any = None):
        self.out, self.write, self.wandb_run = out, write, wandb_run
        self.plots_before = self._plots()  # what an earlier run (before --resume) left is not this run's

    def log(self, metrics: dict[str, float]) -> None:
        if not self.write:
            return
        with (self.out / METRICS).open("a") as f:
            f.write(json.dumps({k: None if v != v else v for k, v in metrics.items()}) + "\n")  # NaN -> null
        if self.wandb_run is not None:
            # W&B groups charts by the part before "/": training figures apart from the held-out ones.
            figures = {_wandb_key(k): v for k, v in metrics.items() if k != "step" and v == v}
            self.wandb_run.log(figures, step=int(metrics["step"]))

    def log_plots(self, step: int) -> list[Path]:
        """Sends the PNG figures this run wrote into its directory (e.g. an evaluation plot) to W&B; returns them."""
        if not self.write or self.wandb_run is None:
            return []
        import wandb

        plots = sorted(p for p, mtime in self._plots().items() if self.plots_before.get(p) != mtime)
        if plots:
            self.wandb_run.log({f"plots/{p.relative_to(self.out).with_suffix('').as_posix()}": wandb.Image(str(p))
                                for p in plots}, step=step)
        return plots

    def _plots(self) -> dict[Path, int]:
        """PNG files under the run directory (W&B's own copies aside), with their modification times."""
        if self.wandb_run is None or not self.out.is_dir():
            return {}
        return {p: p.stat().st_mtime_ns for p in self.out.rglob("*.png")
                if "wandb" not in p.relative_to(self.out).parts}

    def close(self, failed: bool = False) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None


def _wandb_key(key: str) -> str:
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"


def open_tracker(out: Path, *, write: bool, wandb_project: str | None, config: dict[str, Any],
                 resume_step: int | None) -> Tracker:
    """The run's tracker; on resume, metrics.jsonl is cut back to the checkpoint's step and the W&B run continued."""
    if write and resume_step is not None:
        truncate_metrics(out / METRICS, resume_step)
    wandb_run = _open_wandb(out, wandb_project, config, resume=resume_step is not None) if write and wandb_project \
        else None
    return Tracker(out, write=write, wandb_run=wandb_run)


def _open_wandb(out: Path, project: str, config: dict[str, Any], *, resume: bool) -> Any:
    import wandb  # here only: a run without --wandb imports nothing of it

    saved = out / WANDB_RUN
    run_id = json.loads(saved.read_text())["id"] if resume and saved.exists() else None
    mode = None  # WANDB_MODE, when set, decides (wandb reads it)
    if not os.environ.get("WANDB_MODE") and not _wandb_reachable():
        mode = "offline"
        print(f"--wandb: no network; the W&B run is written to {out / 'wandb'} (upload it with `wandb sync DIR`)")
    try:
        # console="off": the figures are logged as metrics; wrapping stdout would interleave with the progress bar.
        run = wandb.init(project=project, name="/".join(out.parts[-2:]), dir=str(out), config=config, id=run_id,
                         resume="allow" if run_id else None, mode=mode, settings=wandb.Settings(console="off"))
    except wandb.Error as e:
        raise WandbError(f"--wandb {project}: {e} (set WANDB_MODE=offline to log without an account)") from None
    saved.write_text(json.dumps({"id": run.id, "project": project}) + "\n")
    return run


class WandbError(RuntimeError):
    """The W&B run could not start (e.g. online without an account)."""


def _wandb_reachable(timeout_s: float = 3.0) -> bool:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout_s).close()
    except OSError:
        return False
    return True
