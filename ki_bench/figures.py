"""The benchmark's figures, one record each: the JSON, the table and the tests all read this list.

A figure is a ratio a / b of two things measured in the same run (or a single quantity a, such as a peak memory),
with a target and the direction that meets it. `figures_for(settings)` lists them for one benchmark mode: the
per-model-size variants get their keys here, once (`variant_key`), and nowhere else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ki_bench.settings import SETTINGS, BenchSettings

Raw = dict[str, Any]  # phase name -> that phase's measurements (the JSON's "raw")

_FORMATS = {"frames/s": ".1f", "samples/s": ".2f", "s": ".2f", "ms": ".1f", "GFLOP": ".1f", "MB": ".0f"}


@dataclasses.dataclass(frozen=True)
class Quantity:
    """One measured thing: what it is, its unit and where it sits in the raw measurements."""

    label: str
    unit: str
    get: Callable[[Raw], float]
    fmt: str | None = None  # format spec of the value; default by unit

    def value(self, raw: Raw) -> float:
        return float(self.get(raw))

    def text(self, raw: Raw) -> str:
        return f"{self.label} {self.value(raw):{self.fmt or _FORMATS.get(self.unit, '.2f')}} {self.unit}"


@dataclasses.dataclass(frozen=True)
class Figure:
    key: str  # the JSON key
    a: Quantity
    b: Quantity | None = None  # None: the figure is `a` itself
    target: float | None = None
    direction: str = ">="  # the target is met when figure >= target (">=") or figure <= target ("<=")
    context: str = ""  # shown after b in the table (the model size)
    section: str = "ratios"  # "ratios" | "memory": where the table prints it

    def value(self, raw: Raw) -> float:
        a = self.a.value(raw)
        return a if self.b is None else a / self.b.value(raw)

    def met(self, value: float) -> bool | None:
        if self.target is None:
            return None
        return value >= self.target if self.direction == ">=" else value <= self.target


def variant_key(base: str, label: str, headline: str) -> str:
    """The key of a per-size figure: the headline size has the plain key, the others `<key>_<label>`."""
    return base if label == headline else f"{base}_{label}"


def _peak(label: str, phase: str) -> Quantity:
    return Quantity(label, "MB", lambda r: r[phase]["peak_rss_mb"])


def figures_for(s: BenchSettings) -> list[Figure]:
    """Every figure of a run with settings `s`, in table order."""
    pre = lambda k: lambda r: r["preprocess"][k]  # noqa: E731
    out = [
        Figure("preprocess_vs_lerobot_loop",
               Quantity("preprocess", "frames/s", pre("preprocess_fps")),
               Quantity("LeRobotDataset[i] loop", "frames/s", lambda r: r["lerobot_loop"]["fps"]), target=5.0),
        Figure("decode_only_over_preprocess",
               Quantity("decode only", "s", pre("decode_only_s")),
               Quantity("whole preprocess run", "s", pre("preprocess_s")), target=0.67),
    ]
    loader = Quantity("loader", "samples/s", lambda r: r["loader"]["samples_per_s"], fmt=".1f")
    for z in s.sizes:
        train = Quantity("train step", "samples/s", lambda r, z=z: r[f"train_{z.label}"]["samples_per_s"])
        out.append(Figure(variant_key("loader_over_train_step", z.label, s.base_size), loader, train,
                          target=10.0 if z.label == s.base_size else None, context=f"({z.label})"))
    for label in s.model_sizes:
        headline = label == s.headline_model
        m = lambda part, k, label=label: lambda r: r[f"model_{label}"][part][k]  # noqa: E731
        ms = lambda part, k, label=label: lambda r: r[f"model_{label}"][part][k] * 1e3  # noqa: E731
        out += [
            Figure(variant_key("two_pass_over_single_pass", label, s.headline_model),
                   Quantity("two-pass", "s", m("train_step", "two_pass_step_s")),
                   Quantity("single pass", "s", m("train_step", "single_pass_step_s")),
                   target=1.5 if headline else None, context=f"({label})"),
            Figure(variant_key("fast_over_flow_latency", label, s.headline_model),
                   Quantity("sample_fast_tokens", "ms", ms("sampling", "sample_fast_tokens_s")),
                   Quantity("sample_actions", "ms", ms("sampling", "sample_actions_s")),
                   target=5.0 if headline else None, context=f"({label})"),
            Figure(variant_key("uncached_over_cached", label, s.headline_model),
                   Quantity("uncached", "ms", ms("cache", "uncached_s")),
                   Quantity("cached", "ms", ms("cache", "cached_s")), context=f"({label})"),
            Figure(variant_key("two_pass_over_single_pass_flops", label, s.headline_model),
                   Quantity("two-pass", "GFLOP", m("flops", "two_pass_gflop")),
                   Quantity("single pass", "GFLOP", m("flops", "single_pass_gflop")), context=f"({label})"),
        ]
    for preset in s.flops_presets:
        fl = lambda k, preset=preset: lambda r: r[f"flops_{preset}"][k]  # noqa: E731
        out.append(Figure(f"two_pass_over_single_pass_flops_{preset}",
                          Quantity("two-pass", "GFLOP", fl("two_pass_gflop"), fmt=".0f"),
                          Quantity("single pass", "GFLOP", fl("single_pass_gflop"), fmt=".0f"), context=f"({preset})"))
    out += [
        Figure("preprocess_peak_rss_mb", _peak("preprocess", "preprocess"), section="memory"),
        Figure("lerobot_loop_peak_rss_mb", _peak("LeRobotDataset loop", "lerobot_loop"), section="memory"),
        Figure("loader_peak_rss_mb", _peak("loader", "loader"), section="memory"),
    ]
    for z in s.sizes:
        out.append(Figure(variant_key("train_peak_rss_mb", z.label, s.base_size),
                          _peak(f"training {z.label} ({z.preset}, batch {z.train_batch})", f"train_{z.label}"),
                          section="memory"))
    return out


def targets(figures: list[Figure]) -> dict[str, float]:
    return {f.key: f.target for f in figures if f.target is not None}


def directions(figures: list[Figure]) -> dict[str, str]:
    return {f.key: f.direction for f in figures if f.target is not None}


# What the tests check: the figures every mode writes, and the targets (the same in every mode).
REQUIRED_KEYS: tuple[str, ...] = tuple(
    f.key for f in figures_for(SETTINGS["smoke"])
    if all(f.key in {g.key for g in figures_for(s)} for s in SETTINGS.values())
)
TARGETS: dict[str, float] = targets(figures_for(SETTINGS["full"]))
assert all(targets(figures_for(s)) == TARGETS for s in SETTINGS.values()), "targets must not depend on the mode"
