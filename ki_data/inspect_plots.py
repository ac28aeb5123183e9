"""Matplotlib figures for looking at shards: camera images, a FAST postfix decoded against the stored chunk,
dataset-wide token counts, and a model's two action heads against the truth.

Figures are `matplotlib.figure.Figure` objects made without pyplot, so nothing accumulates in global state;
a notebook shows them with `display(fig)`, a script saves them with `fig.savefig(path)`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from jaxtyping import Bool, Float, UInt8
from matplotlib.figure import Figure

from ki_data.inspect import DatasetTokenStats, FastDecode


@runtime_checkable  # so that a run-time type checker can check arguments against it
class HeadPredictions(Protocol):
    """A model's two action heads on one row (what `ki_model.evaluate.predict_row` returns), in the dataset's units."""

    truth: Float[np.ndarray, "h d"]
    flow: Float[np.ndarray, "h d"]
    fast: Float[np.ndarray, "h d"] | None
    action_is_pad: Bool[np.ndarray, " h"]

    def errors(self) -> dict[str, float | None]: ...

TRUTH = "#111827"
FAST = "#c026d3"
FLOW = "#2563eb"


def camera_figure(images: dict[str, UInt8[np.ndarray, "s s 3"]], title: str = "") -> Figure:
    """Each camera's image side by side, as the model sees it (resized with padding)."""
    fig = Figure(figsize=(max(3.2 * len(images), 4.5), 3.6), layout="constrained")
    axes = fig.subplots(1, max(len(images), 1), squeeze=False)[0]
    for ax, (cam, img) in zip(axes, images.items()):
        ax.imshow(img)
        ax.set_title(f"{cam}  {img.shape[1]}x{img.shape[0]}", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _shade_padding(ax, action_is_pad: Bool[np.ndarray, "h"]) -> None:
    steps = np.flatnonzero(action_is_pad)
    if len(steps):
        ax.axvspan(steps[0] - 0.5, len(action_is_pad) - 0.5, color="#e5e7eb", zorder=0, label="padded steps")


def _per_dim_axes(dims: int, title: str) -> tuple[Figure, np.ndarray]:
    cols = min(dims, 4)
    rows = -(-dims // cols)
    fig = Figure(figsize=(max(3.6 * cols, 7.5), 2.6 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax in axes[dims:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return fig, axes[:dims]


def fast_decode_figure(decode: FastDecode, dim_names: list[str] | None = None, *, units: str = "data") -> Figure:
    """Per action dimension: the stored chunk and the chunk decoded from the row's FAST tokens.

    units="data" plots unnormalized values (norm_stats.json), "normalized" the values the tokenizer saw.
    """
    stored = decode.stored_actions if units == "data" else decode.stored
    decoded = decode.decoded_actions if units == "data" else decode.decoded
    horizon, dims = stored.shape
    fig, axes = _per_dim_axes(
        dims,
        f"FAST postfix ({len(decode.fast_ids)} tokens) decoded vs stored chunk ({units} units)\n"
        f"max normalized error {decode.max_error:.4f}, rounding bound {decode.bound:.4f}",
    )
    t = np.arange(horizon)
    for d, ax in enumerate(axes):
        _shade_padding(ax, decode.action_is_pad)
        ax.plot(t, stored[:, d], color=TRUTH, lw=2, label="stored chunk")
        ax.plot(t, decoded[:, d], color=FAST, lw=1.2, ls="--", marker=".", ms=3, label="FAST decoded")
        ax.set_title(dim_names[d] if dim_names else f"action[{d}]", fontsize=9)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    return fig


def token_stats_figure(stats: DatasetTokenStats) -> Figure:
    """Histograms of FAST tokens per chunk and of prompt length, the latter against max_token_len."""
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    ax_fast, ax_len = fig.subplots(1, 2)
    lo, hi = int(stats.fast_tokens.min()), int(stats.fast_tokens.max())
    ax_fast.hist(stats.fast_tokens, bins=np.arange(lo, hi + 2) - 0.5 if hi - lo < 60 else 40, color=FAST, edgecolor="white")
    ax_fast.set_title(f"FAST tokens per action chunk ({stats.rows} rows)", fontsize=10)
    ax_fast.set_xlabel("tokens")
    ax_fast.set_ylabel("rows")

    upper = stats.max_token_len + 1
    bins = np.linspace(0, upper, min(upper, 60) + 1)
    ax_len.hist(stats.text_length, bins=bins, color=FLOW, alpha=0.6, label="text_prompt (prefix)")
    ax_len.hist(stats.prompt_length, bins=bins, color=FAST, alpha=0.6, label="tokenized_prompt (prefix + postfix)")
    ax_len.axvline(stats.max_token_len, color="#dc2626", lw=2, label=f"max_token_len = {stats.max_token_len}")
    ax_len.axvline(stats.max_text_len, color="#2563eb", lw=1, ls=":", label=f"max_text_len = {stats.max_text_len}")
    ax_len.set_title(f"prompt length (longest {int(stats.prompt_length.max())} of {stats.max_token_len})", fontsize=10)
    ax_len.set_xlabel("tokens")
    ax_len.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def predictions_figure(pred: HeadPredictions, dim_names: list[str] | None = None) -> Figure:
    """Per action dimension: the stored chunk, the flow head's actions and the decoded FAST prediction."""
    horizon, dims = pred.truth.shape
    err = pred.errors()
    fast_note = f"FAST MAE {err['fast_mae']:.4g}" if pred.fast is not None else "FAST sample did not decode (see Predictions.fast_error)"
    fig, axes = _per_dim_axes(dims, f"model predictions vs truth\nflow MAE {err['flow_mae']:.4g}; {fast_note}")
    t = np.arange(horizon)
    for d, ax in enumerate(axes):
        _shade_padding(ax, pred.action_is_pad)
        ax.plot(t, pred.truth[:, d], color=TRUTH, lw=2, label="truth")
        ax.plot(t, pred.flow[:, d], color=FLOW, lw=1.4, label="flow (action expert)")
        if pred.fast is not None:
            ax.plot(t, pred.fast[:, d], color=FAST, lw=1.2, ls="--", label="FAST (backbone)")
        ax.set_title(dim_names[d] if dim_names else f"action[{d}]", fontsize=9)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    return fig

