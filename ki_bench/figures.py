"""The benchmark's figures, one record each: the JSON, the table and the tests all read this list.

A figure is a ratio a / b of two things measured in the same run (or a single quantity a, such as a peak memory),
with a target and the direction that meets it. A timed ratio measured in interleaved rounds carries its spread
(ki_bench.timing.Spread: the median of the per-round ratios is the figure, with their interquartile range, a 95 %
confidence interval of the median and whether the rounds settled it against the goal); a timed figure from a
single run says so (`single_run`). `figures_for(settings)` lists them for one benchmark mode: the
per-model-size variants get their keys here, once (`variant_key`), and nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from ki_bench.settings import FINE_TUNE_RUNS, SETTINGS, BenchSettings, run_flags

Raw = dict[str, Any]  # phase name -> that phase's measurements (the JSON's "raw")

_FORMATS = {"frames/s": ".1f", "frames/CPU-s": ".1f", "samples/s": ".2f", "samples/CPU-s": ".1f", "s": ".2f",
            "CPU-s": ".2f", "ms": ".2f", "GFLOP": ".1f", "MB": ".0f", "kB": ".1f", "GiB": ".2f", "levels": ".0f"}


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
    needs: str | None = None  # set: not measured, for this reason (the figure waits for code elsewhere)
    floor: float | None = None  # the least value it can take by construction (an extra cost: 0); never below
    spread: Callable[[Raw], dict] | None = None  # its Spread (as a dict) in the raw measurements
    single_run: bool = False  # timed once, no spread (shown as such)

    def value(self, raw: Raw) -> float:
        if self.spread is not None:
            return float(self.spread(raw)["median"])
        a = self.a.value(raw)
        return a if self.b is None else a / self.b.value(raw)

    def met(self, value: float) -> bool | None:
        if self.target is None:
            return None
        return value >= self.target if self.direction == ">=" else value <= self.target


def variant_key(base: str, label: str, headline: str) -> str:
    """The key of a per-size figure: the headline size has the plain key, the others `<key>_<label>`."""
    return base if label == headline else f"{base}_{label}"


def _spread(*keys: str) -> Callable[[Raw], dict]:
    """The getter of a Spread dict at raw[keys[0]][keys[1]]...["spread"][keys[-1]]."""
    *path, name = keys
    return lambda r: functools.reduce(lambda d, k: d[k], path, r)["spread"][name]


def _peak(label: str, phase: str) -> Quantity:
    return Quantity(label, "MB", lambda r: r[phase]["peak_rss_mb"])


def _preprocess_figures(phase: str, loop: str, suffix: str, targets: bool) -> list[Figure]:
    q = lambda k: lambda r: r[phase][k]  # noqa: E731
    return [
        Figure(f"preprocess_vs_lerobot_loop{suffix}",
               Quantity("preprocess", "frames/CPU-s", q("preprocess_fps")),
               Quantity("LeRobotDataset[i] loop", "frames/CPU-s", q("loop_fps_cpu")),
               target=4.0 if targets else None, context="(one core each)",
               spread=_spread(phase, "preprocess_vs_lerobot_loop")),
        Figure(f"decode_only_over_preprocess{suffix}",
               Quantity("decode only", "CPU-s", q("decode_only_cpu_s")),
               Quantity("whole preprocess run", "CPU-s", q("preprocess_cpu_s")), target=0.67 if targets else None,
               context="(one core)", spread=_spread(phase, "decode_only_over_preprocess")),
    ]


# The fine-tuning totals: (run in ki_bench.settings.FINE_TUNE_RUNS, label, target GiB). Full fine-tuning on one 80 GB
# card with room; LoRA on a 24 GB card.
_FINE_TUNE_TARGETS = (("full", "full fine-tune", 60.0), ("full_accum", "full fine-tune, accumulated", 60.0),
                      ("lora", "LoRA fine-tune", 20.0), ("lora_accum", "LoRA fine-tune, accumulated", 20.0))


def _fine_tune_figures() -> list[Figure]:
    """Everything the device holds during a train step (weights, optimizer state, gradients, temporaries; EMA off)
    for each README fine-tuning run at the memory phase's preset and batch (XLA memory analysis)."""
    return [
        Figure(f"{name}_total_gib_pi05",
               Quantity(f"{label}, all on device", "GiB",
                        lambda r, name=name: r["memory"]["fine_tune"][name]["total_gib"]),
               target=target, direction="<=", context=f"(remat, {run_flags(FINE_TUNE_RUNS[name])}, EMA off)")
        for name, label, target in _FINE_TUNE_TARGETS
    ]


def figures_for(s: BenchSettings) -> list[Figure]:
    """Every figure of a CPU run with settings `s`, in table order (`gpu_figures` for the GPU mode)."""
    img = lambda k: lambda r: r["preprocess"]["image_cost_ms"][k]  # noqa: E731
    out = _preprocess_figures("preprocess", "lerobot_loop", "", True) + [
        Figure("shard_kb_per_camera_frame",
               Quantity("shard bytes / (rows x cameras)", "kB",
                        lambda r: r["preprocess"]["bytes"] / (r["preprocess"]["rows"] * r["preprocess"]["cameras"]) / 1e3),
               target=20.0, direction="<="),
        Figure("loader_vs_lerobot_loader_per_core",
               Quantity("our loader", "samples/CPU-s", lambda r: r["core_loader"]["ours"]["samples_per_cpu_s"]),
               Quantity("LeRobotDataset + DataLoader", "samples/CPU-s",
                        lambda r: r["core_loader"]["lerobot"]["samples_per_cpu_s"]),
               target=10.0, context="(augmented)", spread=_spread("core_loader", "ours_over_lerobot")),
        Figure("ki_over_flow_only_step", Quantity("KI train step", "s", lambda r: r["flow_cost"]["ki_step_s"]),
               Quantity("flow-only step", "s", lambda r: r["flow_cost"]["flow_only_step_s"]), target=1.25,
               context="(small preset; flow-only = π0-style: no FAST tokens, insulation off)", direction="<=",
               spread=_spread("flow_cost", "ki_over_flow_only")),
        Figure("ki_over_flow_only_flops_pi05",
               Quantity("KI loss + grad", "GFLOP", lambda r: r["memory"]["cost"]["ki"]["gflop"], fmt=".0f"),
               Quantity("flow-only", "GFLOP", lambda r: r["memory"]["cost"]["flow_only"]["gflop"], fmt=".0f"),
               target=1.25, direction="<=", context="(XLA cost analysis, compiled; memory phase's preset and batch)"),
        Figure("ki_over_flow_only_bytes_pi05",
               Quantity("KI loss + grad", "GiB", lambda r: r["memory"]["cost"]["ki"]["bytes_accessed_gib"], fmt=".0f"),
               Quantity("flow-only", "GiB", lambda r: r["memory"]["cost"]["flow_only"]["bytes_accessed_gib"],
                        fmt=".0f"), context="(bytes accessed, XLA cost analysis)"),
        Figure("extra_flow_sample_cost", Quantity("(K=4 step / K=1 step - 1) / 3", "",
                                                  lambda r: r["flow_cost"]["extra_flow_sample_cost"], fmt=".3f"),
               context="(small preset; each round clamped at 0)", target=0.15, direction="<=", floor=0.0,
               spread=_spread("flow_cost", "extra_flow_sample_cost")),
        Figure("pass2_worker_peak_rss_mb", Quantity("one pass-2 worker, own process", "MB",
                                                    lambda r: r["pass2_worker"]["peak_rss_mb_own"]),
               target=1024.0, direction="<=", context="(ALOHA-like, all its shards)"),
        Figure("decode_only_over_pass2_wall", Quantity("decode only, cameras in threads", "s",
                                                       lambda r: r["pass2_worker"]["decode_only_s"]),
               Quantity("pass 2 (pipelined)", "s", lambda r: r["pass2_worker"]["pass2_s"]),
               context="(wall, all cores)", spread=_spread("pass2_worker", "decode_only_over_pass2_wall")),
        Figure("fast_ce_temp_gib_pi05", Quantity("XLA temporaries, FAST loss + grad", "GiB",
                                                 lambda r: r["memory"]["fast_ce"]["temp_gib"]),
               target=1.5, direction="<="),
        Figure("train_step_temp_gib_pi05", Quantity("XLA temporaries, KI loss + grad", "GiB",
                                                    lambda r: r["memory"]["train_step"]["temp_gib"]),
               target=8.0, direction="<=", context=f"(remat, {run_flags(FINE_TUNE_RUNS['full'])})"),
        *_fine_tune_figures(),
        Figure("resize_pil_over_opencv", Quantity("PIL bilinear", "ms", img("resize_pil_ms")),
               Quantity("OpenCV area", "ms", img("resize_ms")), context="(per camera-frame)",
               spread=_spread("preprocess", "image_cost_ms", "resize_pil_over_opencv")),
        Figure("resize_max_abs_diff", Quantity("largest |OpenCV - PIL|", "levels", img("resize_max_abs_diff"))),
        Figure("png_over_jpeg_encode", Quantity("PNG encode", "ms", img("png_encode_ms")),
               Quantity("JPEG encode", "ms", img("jpeg_encode_ms")), context="(224 px)",
               spread=_spread("preprocess", "image_cost_ms", "png_over_jpeg_encode")),
        Figure("png_over_jpeg_decode", Quantity("PNG decode", "ms", img("png_decode_ms")),
               Quantity("JPEG decode", "ms", img("jpeg_decode_ms")), context="(224 px)",
               spread=_spread("preprocess", "image_cost_ms", "png_over_jpeg_decode")),
        Figure("two_workers_speedup", Quantity("1 worker", "s", lambda r: r["workers"]["workers_1_s"]),
               Quantity("2 workers", "s", lambda r: r["workers"]["workers_2_s"]), context="(wall, all cores)",
               single_run=True),
        Figure("camera_parallel_decode_speedup",
               Quantity("cameras in turn", "s", lambda r: r["workers"]["camera_decode"]["sequential_s"]),
               Quantity("cameras in parallel", "s", lambda r: r["workers"]["camera_decode"]["parallel_s"]),
               context="(wall, all cores)", single_run=True),
    ] + _preprocess_figures("preprocess_pusht", "lerobot_loop_pusht", "_pusht", False)
    loader = Quantity("loader", "samples/s", lambda r: r["loader"]["samples_per_s"], fmt=".1f")
    for z in s.sizes:
        train = Quantity("train step", "samples/s", lambda r, z=z: r[f"train_{z.label}"]["samples_per_s"])
        out.append(Figure(variant_key("loader_over_train_step", z.label, s.base_size), loader, train,
                          target=10.0 if z.label == s.base_size else None, context=f"({z.label})",
                          single_run=True))
    for label in s.model_sizes:
        headline = label == s.headline_model
        m = lambda part, k, label=label: lambda r: r[f"model_{label}"][part][k]  # noqa: E731
        ms = lambda part, k, label=label: lambda r: r[f"model_{label}"][part][k] * 1e3  # noqa: E731
        out += [
            Figure(variant_key("two_pass_over_single_pass", label, s.headline_model),
                   Quantity("two-pass", "s", m("train_step", "two_pass_step_s")),
                   Quantity("single pass", "s", m("train_step", "single_pass_step_s")), context=f"({label})",
                   spread=_spread(f"model_{label}", "train_step", "two_pass_over_single")),
            Figure(variant_key("fast_over_flow_latency", label, s.headline_model),
                   Quantity("sample_fast_tokens", "ms", ms("sampling", "sample_fast_tokens_s"), fmt=".1f"),
                   Quantity("sample_actions", "ms", ms("sampling", "sample_actions_s"), fmt=".1f"),
                   target=5.0 if headline else None, context=f"({label})",
                   spread=_spread(f"model_{label}", "sampling", "fast_over_flow")),
            Figure(variant_key("rtc_over_plain_latency", label, s.headline_model),
                   Quantity("sample_actions, RTC-guided", "ms", ms("rtc", "rtc_s"), fmt=".1f"),
                   Quantity("sample_actions", "ms", ms("rtc", "plain_s"), fmt=".1f"),
                   target=1.6 if headline else None, direction="<=", context=f"({label}; real-time chunking)",
                   spread=_spread(f"model_{label}", "rtc", "rtc_over_plain")),
            Figure(variant_key("uncached_over_cached", label, s.headline_model),
                   Quantity("uncached", "ms", ms("cache", "uncached_s"), fmt=".1f"),
                   Quantity("cached", "ms", ms("cache", "cached_s"), fmt=".1f"), context=f"({label})",
                   spread=_spread(f"model_{label}", "cache", "uncached_over_cached")),
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
        Figure("preprocess_peak_rss_mb", _peak("preprocess (ALOHA-like)", "preprocess"), section="memory"),
        Figure("lerobot_loop_peak_rss_mb", _peak("LeRobotDataset loop (ALOHA-like)", "lerobot_loop"), section="memory"),
        Figure("core_loaders_peak_rss_mb", _peak("both loaders, one process (ALOHA-like)", "core_loader"),
               section="memory"),
        Figure("preprocess_peak_rss_mb_pusht", _peak("preprocess (pusht)", "preprocess_pusht"), section="memory"),
        Figure("loader_peak_rss_mb", _peak("loader (pusht)", "loader"), section="memory"),
    ]
    for z in s.sizes:
        out.append(Figure(variant_key("train_peak_rss_mb", z.label, s.base_size),
                          _peak(f"training {z.label} ({z.preset}, batch {z.train_batch})", f"train_{z.label}"),
                          section="memory"))
    return out


def gpu_figures(s: BenchSettings) -> list[Figure]:
    """The GPU mode's figures (`python -m pipelines.benchmark --gpu`), at `s.gpu_preset` size."""
    g = lambda *ks: lambda r: functools.reduce(lambda d, k: d[k], ks, r["gpu"])  # noqa: E731
    p = s.gpu_preset
    return [
        Figure(f"gpu_inference_ms_{p}", Quantity("sample_actions, 3 cameras, batch 1", "ms",
                                                 lambda r: g("sampling", "sample_actions_s")(r) * 1e3),
               target=40.0, direction="<="),
        Figure(f"gpu_train_samples_per_s_{p}",
               Quantity(f"KI train step (AdamW, remat, {run_flags(FINE_TUNE_RUNS['full'])})", "samples/s",
                        g("samples_per_s_per_device")), target=25.0),
        Figure(f"gpu_fast_over_flow_latency_{p}",
               Quantity("sample_fast_tokens", "ms", lambda r: g("sampling", "sample_fast_tokens_s")(r) * 1e3),
               Quantity("sample_actions", "ms", lambda r: g("sampling", "sample_actions_s")(r) * 1e3), target=5.0,
               spread=lambda r: r["gpu"]["sampling"]["spread"]["fast_over_flow"]),
    ]


def targets(figures: list[Figure]) -> dict[str, float]:
    """Key -> target of every figure that has one, measured or not."""
    return {f.key: f.target for f in figures if f.target is not None}


def directions(figures: list[Figure]) -> dict[str, str]:
    return {f.key: f.direction for f in figures if f.target is not None}


# What the tests check: the figures every mode writes, and the targets (the same in every mode).
REQUIRED_KEYS: tuple[str, ...] = tuple(
    f.key for f in figures_for(SETTINGS["smoke"])
    if f.needs is None and all(f.key in {g.key for g in figures_for(s)} for s in SETTINGS.values())
)
TARGETS: dict[str, float] = targets(figures_for(SETTINGS["full"]))
assert all(targets(figures_for(s)) == TARGETS for s in SETTINGS.values()), "targets must not depend on the mode"
