"""Normalization statistics and transforms for state and actions, stored in openpi's norm_stats.json shape.

    {"norm_stats": {"state": {"mean": [...], "std": [...], "q01": [...], "q99": [...], "min": [...], "max": [...]},
                    "actions": {...}}}

Quantile mode (π0.5's, our default) maps q01 -> -1 and q99 -> +1; z-score mode uses mean/std. Like openpi, the
transforms add a small eps to the denominator and do not clip by default: values beyond q01/q99 stay beyond ±1
for the flow target; state binning clips into 0..255 and the FAST tokenizer clips (and counts) its own range.
`clip=True` clips normalized values into [-1, 1] where a caller wants that.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
from jaxtyping import Float

EPS = 1e-6
Mode = Literal["quantile", "zscore"]
_FIELDS = ("mean", "std", "q01", "q99", "min", "max")


@dataclasses.dataclass(frozen=True, eq=False)
class NormStats:
    """Per-dimension statistics (float32 [d]). q01/q99/min/max may be None in an openpi file that lacks them."""

    mean: Float[np.ndarray, " d"]
    std: Float[np.ndarray, " d"]
    q01: Float[np.ndarray, " d"] | None = None
    q99: Float[np.ndarray, " d"] | None = None
    min: Float[np.ndarray, " d"] | None = None
    max: Float[np.ndarray, " d"] | None = None

    def __post_init__(self) -> None:
        dims = set()
        for name in _FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            arr = np.asarray(value, dtype=np.float32)
            if arr.ndim != 1:
                raise ValueError(f"NormStats.{name} must be 1-D, got shape {arr.shape}")
            object.__setattr__(self, name, arr)
            dims.add(arr.shape[0])
        if len(dims) > 1:
            raise ValueError(f"NormStats fields disagree on the dimension: {sorted(dims)}")

    def to_json(self) -> dict[str, list[float]]:
        # float() of a float32 prints the shortest decimal that reads back to the same float32.
        return {n: [float(v) for v in getattr(self, n)] for n in _FIELDS if getattr(self, n) is not None}

    @classmethod
    def from_json(cls, data: dict) -> NormStats:
        for required in ("mean", "std"):
            if required not in data:
                raise ValueError(f"norm stats entry lacks '{required}' (has {sorted(data)})")
        return cls(**{n: None if data.get(n) is None else np.asarray(data[n], np.float32) for n in _FIELDS})


def compute_stats(x: Float[np.ndarray, "n d"]) -> NormStats:
    """mean, std (population), q01, q99 (np.quantile, linear), min, max over axis 0, computed in float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"compute_stats expects [n>0, d] values, got shape {x.shape}")
    if not np.isfinite(x).all():
        row, col = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"compute_stats: non-finite value at row {row}, dim {col}")
    q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
    return NormStats(
        mean=x.mean(axis=0), std=x.std(axis=0), q01=q01, q99=q99, min=x.min(axis=0), max=x.max(axis=0)
    )


def _check(x: np.ndarray, stats: NormStats, mode: str) -> None:
    if mode not in ("quantile", "zscore"):
        raise ValueError(f"normalization mode must be 'quantile' or 'zscore', got {mode!r}")
    if mode == "quantile" and (stats.q01 is None or stats.q99 is None):
        raise ValueError("quantile normalization needs q01 and q99 in the stats")
    if x.shape[-1] != stats.mean.shape[0]:
        raise ValueError(f"values have last dimension {x.shape[-1]}, stats have {stats.mean.shape[0]}")


def normalize(
    x: Float[np.ndarray, "*b d"], stats: NormStats, mode: Mode = "quantile", *, clip: bool = False
) -> Float[np.ndarray, "*b d"]:
    """quantile: (x - q01) / (q99 - q01 + eps) * 2 - 1; zscore: (x - mean) / (std + eps). Returns float32."""
    x = np.asarray(x, dtype=np.float32)
    _check(x, stats, mode)
    if mode == "quantile":
        y = (x - stats.q01) / (stats.q99 - stats.q01 + EPS) * 2.0 - 1.0
    else:
        y = (x - stats.mean) / (stats.std + EPS)
    if clip:
        y = np.clip(y, -1.0, 1.0)
    return y.astype(np.float32)


def unnormalize(x: Float[np.ndarray, "*b d"], stats: NormStats, mode: Mode = "quantile") -> Float[np.ndarray, "*b d"]:
    """Inverse of `normalize` (without clip). Returns float32."""
    x = np.asarray(x, dtype=np.float32)
    _check(x, stats, mode)
    if mode == "quantile":
        y = (x + 1.0) / 2.0 * (stats.q99 - stats.q01 + EPS) + stats.q01
    else:
        y = x * (stats.std + EPS) + stats.mean
    return y.astype(np.float32)


def save_norm_stats(path: str | os.PathLike, stats: dict[str, NormStats]) -> None:
    """Write {"norm_stats": {key: {...}}} (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"norm_stats": {k: s.to_json() for k, s in stats.items()}}, indent=2) + "\n")
    os.replace(tmp, path)


def load_norm_stats(path: str | os.PathLike) -> dict[str, NormStats]:
    """Read a norm_stats.json written by `save_norm_stats` or by openpi."""
    path = Path(path)
    data = json.loads(path.read_text())
    if "norm_stats" not in data:
        raise ValueError(f"{path} has no 'norm_stats' key (keys: {sorted(data)})")
    out = {}
    for key, entry in data["norm_stats"].items():
        try:
            out[key] = NormStats.from_json(entry)
        except ValueError as e:
            raise ValueError(f"{path}: norm_stats['{key}']: {e}") from e
    return out
