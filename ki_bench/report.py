"""The benchmark's outputs from the figure records: the JSON document, the table and the notes."""

from __future__ import annotations

from typing import Any

from ki_bench.figures import Figure, Raw, targets


def document(raw: Raw, figures: list[Figure]) -> dict[str, Any]:
    """The JSON's figures (key -> value), their targets and whether each is met."""
    doc: dict[str, Any] = {f.key: f.value(raw) for f in figures}
    doc["targets"] = targets(figures)
    doc["met"] = {f.key: f.met(doc[f.key]) for f in figures if f.target is not None}
    return doc


def table(doc: dict[str, Any], figures: list[Figure]) -> str:
    """One line per figure: the two measurements (a, b), a / b, the target and whether it is met; then the peak
    memories."""
    raw = doc["raw"]
    ratios = [f for f in figures if f.section == "ratios"]
    w = max(len(f.key) for f in figures) + 2
    lines = [f"{'figure':<{w}}{'a':<36}{'b':<44}{'a / b':>8}  {'target':<8}met"]
    for f in ratios:
        b = "" if f.b is None else f"{f.b.text(raw)} {f.context}".strip()
        met = f.met(doc[f.key])
        tgt = "-" if f.target is None else f"{f.direction} {f.target:g}"
        mark = "-" if met is None else ("yes" if met else "no")
        lines.append(f"{f.key:<{w}}{f.a.text(raw):<36}{b:<44}{doc[f.key]:>8.2f}  {tgt:<8}{mark}")
    lines.append("")
    for f in figures:
        if f.section == "memory":
            lines.append(f"{f.key:<{w}}{f.a.label:<36}{doc[f.key]:>8.0f} MB peak RSS")
    return "\n".join(lines)


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms"


def notes(doc: dict[str, Any]) -> str:
    """How each figure was measured, and the split of each cost that says what bounds the ratio."""
    raw, s, m = doc["raw"], doc["settings"], doc["machine"]
    pre, loop, loader = raw["preprocess"], raw["lerobot_loop"], raw["loader"]
    img, frames = pre["image_cost_ms"], pre["frames"]
    per_frame = pre["preprocess_s"] * 1e3 / frames
    pass1 = pre["pass1_s"] * 1e3 / frames
    lines = [
        f"machine: {m['cpus_usable']} CPUs, jax {m['jax_backend']} ({m['device']}), load average "
        f"{m['load_average_start'][0]:.1f} -> {m['load_average_end'][0]:.1f}; mode {s['mode']}, {doc['wall_s']:.0f} s",
        f"dataset: {s['dataset']['repo_id']}, {frames} frames; shards {pre['image_size']} px, action horizon "
        f"{pre['action_horizon']}",
        f"preprocess: whole run_preprocess call (pass 1 + pass 2, 1 worker; lerobot import, {pre['import_s']:.1f} s, "
        f"off the clock), median of {len(pre['preprocess_s_all'])}: {per_frame:.2f} ms/frame = resize "
        f"{img['resize_ms']:.2f} + PNG encode {img['png_encode_ms']:.2f} (at {pre['image_size']} px) + pass 1 "
        f"{pass1:.2f} + the rest {per_frame - img['resize_ms'] - img['png_encode_ms'] - pass1:.2f} "
        f"(video decode alone: {pre['decode_only_s'] * 1e3 / pre['decode_only_frames']:.2f} ms/frame)",
        f"LeRobotDataset loop: {loop['frames']} items with a {pre['action_horizon']}-step action chunk "
        f"({loop['backend']}), one pass, {1e3 / loop['fps']:.2f} ms/item; construction {loop['open_seconds']:.1f} s "
        f"not counted",
        f"loader: {loader['num_batches']} batches of {loader['batch_size']} after warm-up, {loader['num_workers']} "
        f"worker processes, PNG decode + augmentation",
    ]
    for z in s["sizes"]:
        t = raw[f"train_{z['label']}"]
        lines.append(f"train step {z['label']}: preset {z['preset']}, batch {z['train_batch']}, {t['steps']} timed steps "
                     f"after compilation: {t['step_s']:.2f} s/step")
    for label in s["model_sizes"]:
        mm = raw[f"model_{label}"]
        c, ts, sa, ca, fl = mm["config"], mm["train_step"], mm["sampling"], mm["cache"], mm["flops"]
        k = max(sa["fast_tokens_decoded"])
        lines += [
            f"model {label}: {c['backbone_variant']} + {c['expert_variant']} + {c['vision_variant']}, "
            f"{mm['image_tokens']} image tokens, max_token_len {c['max_token_len']}, horizon {c['action_horizon']} x "
            f"dim {c['action_dim']}; train batch {ts['batch_size']}, sampling batch {sa['batch_size']}; medians of "
            f"{ts['repeats']} after compilation",
            f"  train step FLOPs (XLA count, loss + gradient): two-pass / single = "
            f"{fl['two_pass_over_single_pass_flops']:.2f} (the reference's second pass is forward-only)",
            f"  sampling: prefix pass alone {_ms(ca['prefix_s'])}; sample_actions = prefix + {sa['flow_steps']} flow "
            f"steps ({(sa['sample_actions_s'] - ca['prefix_s']) * 1e3 / sa['flow_steps']:.1f} ms each); "
            f"sample_fast_tokens = prefix + {k} tokens ({(sa['sample_fast_tokens_s'] - ca['prefix_s']) * 1e3 / k:.1f} "
            f"ms each)",
        ]
    for preset in s["flops_presets"]:
        fl = raw[f"flops_{preset}"]
        lines.append(f"FLOPs at {preset} (batch {fl['batch_size']}): two-pass / single = "
                     f"{fl['two_pass_over_single_pass_flops']:.2f}")
    return "\n".join(lines)
