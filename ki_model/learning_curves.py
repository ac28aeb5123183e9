"""Learning curves of several training runs side by side (e.g. insulation on / off, FAST loss weights).

A run is a checkpoint directory: its metrics.jsonl (training losses, and `val_*` figures when it was trained with
--eval-every), model_config.json and train_config.json, and, when present, an `eval_report.json` of the validation
split and a `rollout_report.json` in one of its sub-directories (pipelines.evaluate / pipelines.rollout outputs).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from ki_model import checkpoint as ckpt

# (metrics.jsonl key, panel title, log scale)
TRAIN_PANELS = (("flow_loss", "training flow loss", True), ("fast_loss", "training FAST loss", True),
                ("fast_accuracy", "training FAST token accuracy", False))

# Validation figures under the names older runs logged, before they took evaluation's (ki_model.scoring).
_OLD_NAMES = {"val_flow_loss_shuffled": "val_flow_loss_shuffled_observation",
              "val_mean_action_mse": "val_mean_action_baseline_mse", "val_hold_still_mse": "val_hold_still_baseline_mse"}


class RunError(ValueError):
    """A directory that is not a training run (no metrics.jsonl)."""


@dataclasses.dataclass
class Run:
    path: Path
    label: str
    metrics: list[dict[str, Any]]
    model_config: dict[str, Any]
    train_config: dict[str, Any]
    eval_report: dict[str, Any] | None
    rollout_report: dict[str, Any] | None  # the flow head's closed loop
    rollout_fast_report: dict[str, Any] | None = None  # the FAST head's
    init_run: Run | None = None  # the run a `--init ki:` / `ki-backbone:` run started from (stage 1)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [m for m in self.metrics if m.get(key) is not None]
        return np.array([m["step"] for m in rows]), np.array([m[key] for m in rows], float)

    def describe(self) -> str:
        """What sets the run apart: insulation, FAST weight, steps, learning rate."""
        mc, tc = self.model_config, self.train_config
        parts = [f"insulation {'on' if mc.get('insulation', True) else 'off'}",
                 f"FAST weight {mc.get('fast_loss_weight', 1.0):g}"]
        if tc.get("steps"):
            parts.append(f"{tc['steps']} steps of batch {tc.get('batch_size')}")
        lr = (tc.get("optimizer") or {}).get("peak_lr")
        if lr:
            parts.append(f"peak lr {lr:g}")
        if tc.get("number_embeddings"):
            parts.append("number embeddings")
        if mc.get("flow_loss_weight", 1.0) == 0:
            parts.append("FAST only")
        if self.init_run is not None:
            parts.append(f"from {self.init_run.path} ({tc['init'].split(':', 1)[0]})")
        return ", ".join(parts)


def _find_report(run_dir: Path, name: str, want: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The first `*/name` report whose top-level fields (or `setup` fields) have the wanted values; a report that
    lacks a field counts as having it (e.g. rollouts from before the `head` option were flow-head rollouts)."""
    for path in sorted(run_dir.glob(f"*/{name}")):
        report = json.loads(path.read_text())
        fields = {**report.get("setup", {}), **report}
        if all(fields.get(k, v) == v for k, v in (want or {}).items()):
            return report
    return None


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    root = Path(run_dir)
    path = root / ckpt.METRICS
    if not path.is_file():
        raise RunError(f"{root}: no {ckpt.METRICS}; not a training run directory (pipelines.train --checkpoint-dir)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    metrics = [{_OLD_NAMES.get(k, k): v for k, v in m.items()} for m in rows]
    read = lambda name: json.loads((root / name).read_text()) if (root / name).is_file() else {}  # noqa: E731
    return Run(
        path=root,
        label=label or root.name,
        metrics=metrics,
        model_config=read(ckpt.MODEL_CONFIG),
        train_config=read(ckpt.TRAIN_CONFIG),
        eval_report=_find_report(root, "eval_report.json", {"split": "val"}),
        rollout_report=_find_report(root, "rollout_report.json", {"head": "flow"}),
        rollout_fast_report=_find_report(root, "rollout_report.json", {"head": "fast"}),
        init_run=_init_run(read(ckpt.TRAIN_CONFIG).get("init")),
    )


def _init_run(init: str | None) -> Run | None:
    """The stage-1 run of a `--init ki:DIR` / `ki-backbone:DIR` run, when its directory is still there."""
    if not init or not init.startswith(("ki:", "ki-backbone:")):
        return None
    path = Path(init.split(":", 1)[1])
    return load_run(path) if (path / ckpt.METRICS).is_file() else None


def fast_disturbance(run: Run) -> tuple[float, float] | None:
    """(validation FAST loss at the end of the init run, at this run's first evaluation): how much the start of
    stage 2 disturbed what stage 1's backbone had learned (the KI paper's claim: without insulation, much)."""
    if run.init_run is None:
        return None
    _, before = run.init_run.series("val_fast_loss")
    _, after = run.series("val_fast_loss")
    return (float(before[-1]), float(after[0])) if len(before) and len(after) else None


def final_figures(run: Run) -> dict[str, float | None]:
    """The last logged training/validation figures and the evaluation and rollout summaries, flat."""
    last = run.metrics[-1] if run.metrics else {}
    out: dict[str, float | None] = {k: last.get(k) for k in ("step", "flow_loss", "fast_loss", "fast_accuracy")}
    e = run.eval_report
    if e is not None:  # the validation split's evaluation, under validation's names (`val_<head>_mse`)
        for head in ("flow", "flow_sample_mean", "fast_constrained", "hold_still_baseline", "mean_action_baseline"):
            out[f"val_{head}_mse"] = (e.get(head) or {}).get("mse")
    for head, r in (("flow", run.rollout_report), ("fast", run.rollout_fast_report)):
        if r is None:
            continue
        out[f"{head}_max_coverage"] = r["policy"]["mean_max_coverage"]
        out[f"{head}_distance_closed"] = r["policy"].get("mean_distance_closed")
        out[f"{head}_closed_vs_expert"] = r["policy"].get("distance_closed_vs_expert")
        out["expert_max_coverage"] = r.get("expert", {}).get("mean_max_coverage")
        out["expert_distance_closed"] = r.get("expert", {}).get("mean_distance_closed")
    # Before the head option, rollouts reported coverage only: keep that figure under its old name.
    if run.rollout_report is not None:
        out["policy_max_coverage"] = run.rollout_report["policy"]["mean_max_coverage"]
        out["policy_vs_expert"] = run.rollout_report["policy"].get("max_coverage_vs_expert")
    disturbed = fast_disturbance(run)
    if disturbed is not None:
        out["val_fast_loss_end_of_init"], out["val_fast_loss_first_eval"] = disturbed
    return out


def summary_table(runs: list[Run]) -> str:
    cols = [("step", "steps", "{:.0f}"), ("flow_loss", "flow", "{:.3f}"), ("fast_accuracy", "FAST acc", "{:.3f}"),
            ("val_flow_mse", "val flow", "{:.0f}"), ("val_flow_sample_mean_mse", "flow mean", "{:.0f}"),
            ("val_fast_constrained_mse", "val FAST", "{:.0f}"), ("val_hold_still_baseline_mse", "hold still", "{:.0f}"),
            ("flow_distance_closed", "flow closed", "{:.0%}"), ("flow_closed_vs_expert", "vs expert", "{:.0%}"),
            ("flow_max_coverage", "flow cov", "{:.3f}"),
            ("fast_distance_closed", "FAST closed", "{:.0%}"), ("fast_closed_vs_expert", "vs expert", "{:.0%}"),
            ("val_fast_loss_end_of_init", "FAST@s1 end", "{:.3f}"),
            ("val_fast_loss_first_eval", "FAST@s2 1st", "{:.3f}")]
    width = max(12, *(len(r.label) + 2 for r in runs))
    lines = [f"{'run':<{width}}" + "".join(f"{h:>12}" for _, h, _ in cols)]  # 12: the longest header + 1
    for run in runs:
        f = final_figures(run)
        cells = ["" if f.get(k) is None else fmt.format(f[k]) for k, _, fmt in cols]
        lines.append(f"{run.label:<{width}}" + "".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def plot_runs(runs: list[Run], path: str | Path) -> None:
    """Top: training losses and accuracy. Bottom: validation losses (and with another row's observation, dashed),
    validation flow-sample MSE against hold-still, and the final evaluation / closed-loop figures as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    for j, run in enumerate(runs):
        color = f"C{j}"
        # Validation FAST loss; a stage-2 run continues its stage-1 curve (drawn thin), steps counted on.
        offset = 0
        if run.init_run is not None:
            xi, yi = run.init_run.series("val_fast_loss")
            axes[0, 3].plot(xi, yi, color=color, lw=0.8, alpha=0.6)
            offset = int(xi[-1]) if len(xi) else 0
        x, y = run.series("val_fast_loss")
        if len(x):
            axes[0, 3].plot(x + offset, y, color=color, marker=".", label=run.label)
        for ax, (key, title, log) in zip(axes[0, :3], TRAIN_PANELS, strict=True):
            x, y = run.series(key)
            ax.plot(x, y, color=color, label=run.label)
            ax.set_title(title, fontsize=10)
            if log:
                ax.set_yscale("log")
        x, y = run.series("val_flow_loss")
        if len(x):
            axes[1, 0].plot(x, y, color=color, label=run.label)
            xs, ys = run.series("val_flow_loss_shuffled_observation")
            axes[1, 0].plot(xs, ys, color=color, ls="--")
        x, y = run.series("val_flow_mse")
        if len(x):
            axes[1, 1].plot(x, y, color=color, label=run.label)
            xh, yh = run.series("val_hold_still_baseline_mse")
            if len(xh):
                axes[1, 1].axhline(yh[-1], color="k", ls=":", lw=1)
    axes[1, 0].set_title("validation flow loss (dashed: another row's observation)", fontsize=10)
    axes[1, 1].set_title("validation flow-sample MSE (dotted: hold still)", fontsize=10)
    axes[0, 3].set_title("validation FAST loss (thin: the stage-1 run it started from)", fontsize=10)
    axes[1, 3].axis("off")
    for ax in (*axes[0], axes[1, 0], axes[1, 1]):
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
    axes[0, 3].set_xlabel("step (a stage-2 run's counted on from its stage 1's last)", fontsize=8)
    axes[0, 0].legend(fontsize=8)
    _final_bars(axes[1, 2], runs)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _final_bars(ax: Any, runs: list[Run]) -> None:
    """Validation MSE of the flow head (mean of samples when reported) and the FAST head over hold-still's, and the
    share of the block-to-goal distance each head closed in closed loop over the expert's: lower / higher is better,
    1 = the baseline. Two-line names: four side by side fit the panel."""
    names = ["flow MSE\n/ hold still", "FAST MSE\n/ hold still", "closed (flow)\n/ expert", "closed (FAST)\n/ expert"]
    width = 0.8 / max(len(runs), 1)
    shown = False
    for j, run in enumerate(runs):
        f = final_figures(run)
        hold, fast = f.get("val_hold_still_baseline_mse"), f.get("val_fast_constrained_mse")
        flow = f.get("val_flow_sample_mean_mse") or f.get("val_flow_mse")
        values = [flow / hold if flow and hold else np.nan, fast / hold if fast and hold else np.nan]
        values += [np.nan if f.get(k) is None else f[k] for k in ("flow_closed_vs_expert", "fast_closed_vs_expert")]
        if not np.all(np.isnan(values)):
            shown = True
        ax.bar(np.arange(4) + (j - (len(runs) - 1) / 2) * width, values, width, color=f"C{j}", label=run.label)
    ax.axhline(1.0, color="k", lw=1)
    ax.legend(fontsize=8)
    ax.set_xticks(np.arange(4), names, fontsize=7)
    ax.set_title("final evaluation (1 = baseline)" if shown else "final evaluation: no eval/rollout reports found",
                 fontsize=10)
