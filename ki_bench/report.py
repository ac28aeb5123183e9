"""The benchmark's outputs from the figure records: the JSON document, the table and the notes."""

from __future__ import annotations

from typing import Any

from ki_bench.figures import Figure, Raw, directions, targets

# The JSON's keys that are not figures; every other top-level key is a figure (a number).
META_KEYS = ("targets", "directions", "met", "not_measured", "spread", "machine", "settings", "raw", "wall_s", "mode")


def document(raw: Raw, figures: list[Figure]) -> dict[str, Any]:
    """The JSON's figures (key -> value), their targets and directions, whether each measured one is met, and the
    figures not measured (key -> why)."""
    measured = [f for f in figures if f.needs is None]
    doc: dict[str, Any] = {f.key: f.value(raw) for f in measured}
    for f in measured:
        if f.floor is not None and doc[f.key] < f.floor:
            raise ValueError(f"{f.key} = {doc[f.key]} is below its floor {f.floor}: its phase must clamp each round")
    doc["targets"] = targets(figures)
    doc["directions"] = directions(figures)
    doc["met"] = {f.key: f.met(doc[f.key]) for f in measured if f.target is not None}
    doc["not_measured"] = {f.key: f.needs for f in figures if f.needs is not None}
    # The spread of every timed figure measured in rounds (the per-round ratios stay in raw).
    doc["spread"] = {f.key: {k: v for k, v in f.spread(raw).items() if k != "ratios"}
                     for f in measured if f.spread is not None}
    return doc


def _spread_text(f: Figure, doc: dict[str, Any]) -> tuple[str, str, str]:
    """(interquartile range, 95 % interval of the median, rounds) of a figure, as the table shows them."""
    if f.key in doc["spread"]:
        sp = doc["spread"][f.key]
        return (f"{sp['q1']:.2f}-{sp['q3']:.2f}", f"{sp['ci_low']:.2f}-{sp['ci_high']:.2f}",
                f"{sp['n']}" + ("" if sp["settled"] else "*"))
    return ("one run", "", "1") if f.single_run else ("", "", "")


def table(doc: dict[str, Any], figures: list[Figure]) -> str:
    """One line per figure: the two measurements (a, b), a / b, the target and whether it is met; then the peak
    memories."""
    raw = doc["raw"]
    ratios = [f for f in figures if f.section == "ratios"]
    w = max(len(f.key) for f in figures) + 2
    spread_head = f"{'IQR':<12}{'95% CI':<12}{'n':<5}"
    lines = [f"{'figure':<{w}}{'a':<36}{'b':<44}{'a / b':>8}  {spread_head}{'target':<8}met"]
    if not any(f.section == "memory" for f in figures):  # the GPU mode: values, no memory section
        lines[0] = f"{'figure':<{w}}{'a':<36}{'b':<44}{'value':>8}  {spread_head}{'target':<8}met"
    for f in ratios:
        tgt = "-" if f.target is None else f"{f.direction} {f.target:g}"
        if f.needs is not None:
            lines.append(f"{f.key:<{w}}{'not measured (' + f.needs + ')':<80}{'':>8}  {'':<29}{tgt:<8}-")
            continue
        b = f.context if f.b is None else f"{f.b.text(raw)} {f.context}".strip()
        met = f.met(doc[f.key])
        mark = "-" if met is None else ("yes" if met else "no")
        iqr, ci, n = _spread_text(f, doc)
        lines.append(f"{f.key:<{w}}{f.a.text(raw):<36}{b:<44}{doc[f.key]:>8.2f}  {iqr:<12}{ci:<12}{n:<5}{tgt:<8}"
                     f"{mark}")
    lines += ["", "a / b of a figure with a spread: the median of its interleaved rounds' ratios a_i / b_i (a and b "
              "are the medians of each); IQR: their interquartile range; 95% CI: of the median (order statistics); "
              "n: rounds, * = stopped at the cap on rounds or seconds before the interval cleared the goal", ""]
    for f in figures:
        if f.section == "memory":
            lines.append(f"{f.key:<{w}}{f.a.label:<36}{doc[f.key]:>8.0f} MB peak RSS")
    return "\n".join(lines)


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%"


def notes(doc: dict[str, Any]) -> str:
    """How each figure was measured, and the split of each cost that says what bounds the ratio."""
    raw, s, m = doc["raw"], doc["settings"], doc["machine"]
    lines = [
        f"machine: {m['cpus_usable']} CPUs, jax {m['jax_backend']} ({m['device']}), load average "
        f"{m['load_average_start'][0]:.1f} -> {m['load_average_end'][0]:.1f}; mode {s['mode']}, {doc['wall_s']:.0f} s",
    ]
    if "gpu" in raw:
        g = raw["gpu"]
        sa, tr = g["sampling"], g["train"]
        return "\n".join(lines + [
            f"GPU mode: preset {g['preset']}, cameras {g['cameras']}, random weights; sampling batch 1, medians of "
            f"{sa['repeats']} after compilation: sample_actions ({sa['flow_steps']} flow steps) "
            f"{sa['sample_actions_s'] * 1e3:.1f} ms, sample_fast_tokens {sa['sample_fast_tokens_s'] * 1e3:.1f} ms "
            f"({max(sa['fast_tokens_decoded'])} tokens); train step batch {tr['batch_size']} x {tr['steps']} steps: "
            f"{tr['samples_per_s']:.1f} samples/s on one {g['device']} ({g['device_count']} visible)",
        ])
    for name, pre_key, loop_key in (("ALOHA-like", "preprocess", "lerobot_loop"),
                                    ("pusht", "preprocess_pusht", "lerobot_loop_pusht")):
        pre, loop = raw[pre_key], raw[loop_key]
        img, frames = pre["image_cost_ms"], pre["frames"]
        cams = pre["cameras"]
        per_frame = pre["preprocess_cpu_s"] * 1e3 / frames
        decode = pre["decode_only_cpu_s"] * 1e3 / frames
        image = cams * (img["resize_ms"] + img[f"{pre['image_format']}_encode_ms"])
        pass1 = pre["pass1_s"] * 1e3 / frames
        lines += [
            f"{name}: {s['datasets'][pre_key]}, {frames} frames x {cams} cameras {img['source_shape'][:2]} -> "
            f"{pre['image_size']} px {pre['image_format'].upper()}, horizon {pre['action_horizon']}; one core each "
            f"(CPU seconds; lerobot import {pre['import_s']:.1f} s off the clock)",
            f"  preprocess {per_frame:.2f} CPU-ms/frame = video decode {decode:.2f} ({_pct(decode, per_frame)}) + "
            f"resize and encode {image:.2f} ({_pct(image, per_frame)}) + pass 1 {pass1:.2f} + the rest "
            f"{per_frame - decode - image - pass1:.2f} (tokens, parquet); medians of {len(pre['preprocess_cpu_s_all'])} "
            f"interleaved rounds of decode only, preprocess and the loop",
            f"  LeRobotDataset[i] loop: {1e3 / pre['loop_fps_cpu']:.2f} CPU-ms/item ({pre['loop_backend']}, "
            f"{pre['loop_frames']} "
            f"items, a {pre['action_horizon']}-step action chunk each; construction {loop['open_seconds']:.1f} s not "
            f"counted): it decodes every item's frames from the last keyframe, preprocessing decodes each frame once",
            f"  per camera-frame: resize {img['resize_ms']:.2f} ms (PIL {img['resize_pil_ms']:.2f}; largest pixel "
            f"difference {img['resize_max_abs_diff']}, mean {img['resize_mean_abs_diff']:.2f}); JPEG encode "
            f"{img['jpeg_encode_ms']:.2f} / decode {img['jpeg_decode_ms']:.2f} ms, {img['jpeg_kb']:.1f} kB; PNG encode "
            f"{img['png_encode_ms']:.2f} / decode {img['png_decode_ms']:.2f} ms, {img['png_kb']:.1f} kB",
        ]
    w = raw["workers"]
    cd = w["camera_decode"]
    lines.append(
        f"workers (ALOHA-like, wall, all cores): 1 worker {w['workers_1_s']:.1f} s, 2 workers {w['workers_2_s']:.1f} s "
        f"over {w['shards']} shards (a worker takes whole shards); decoding alone uses {w['decode_cpu_over_wall']:.2f} "
        f"CPU-s per wall-s; cameras of an episode decoded in parallel threads {cd['parallel_s']:.2f} s vs in turn "
        f"{cd['sequential_s']:.2f} s")
    p2 = raw["pass2_worker"]
    st = p2["stage_cpu_ms_per_frame"]
    staged = sum(v for k, v in st.items() if k != "process")
    lines.append(
        f"one pass-2 worker (ALOHA-like, {p2['frames']} frames x {p2['cameras']} cameras, {p2['shards']} shards, all "
        f"cores): peak RSS {p2['peak_rss_mb_own']:.0f} MB ({p2['rss_at_start_mb']:.0f} MB at start); CPU-ms per frame "
        f"by stage: " + ", ".join(f"{k} {v:.2f}" for k, v in st.items() if k != "process") +
        f" (staged {staged:.2f} of the process's {st.get('process', float('nan')):.2f}); wall: pass 2 "
        f"{p2['pass2_s']:.2f} s vs decoding alone {p2['decode_only_s']:.2f} s (medians of {p2['repeats']})")
    fc = raw["flow_cost"]
    k_step = fc[f"ki_k{fc['k']}_step_s"]
    lines.append(
        f"KI cost ({fc['preset']} preset, batch {fc['batch_size']}, {fc['repeats']} interleaved rounds): KI step "
        f"{fc['ki_step_s']:.3f} s, flow-only {fc['flow_only_step_s']:.3f} s, K={fc['k']} "
        f"{k_step:.3f} s; extra flow sample cost {fc['extra_flow_sample_cost']:.3f} "
        f"(unclamped median {fc['extra_flow_sample_cost_unclamped']:.3f}; {fc['extra_flow_sample_rounds_clamped']} "
        f"rounds below the floor 0 were clamped: the K-sample step does all the 1-sample step's work and more)")
    cost = raw["memory"]["cost"]
    lines.append(
        f"KI vs flow-only at {raw['memory']['preset']} size (XLA cost analysis of the compiled loss + gradient, batch "
        f"{raw['memory']['batch_size']}): {cost['ki']['gflop'] / 1e3:.1f} vs {cost['flow_only']['gflop'] / 1e3:.1f} "
        f"TFLOP ({cost['flops_ki_over_flow_only']:.3f}), bytes accessed {cost['ki']['bytes_accessed_gib']:.0f} vs "
        f"{cost['flow_only']['bytes_accessed_gib']:.0f} GiB ({cost['bytes_ki_over_flow_only']:.3f})")
    cl = raw["core_loader"]
    ours, theirs = cl["ours"], cl["lerobot"]
    lines.append(
        f"loaders, one core each, {cl['cameras']} cameras at {cl['image_size']} px, augmentation on: ours "
        f"{1e3 / ours['samples_per_cpu_s']:.2f} CPU-ms/sample ({cl['image_format'].upper()} decode + augment), "
        f"LeRobotDataset + DataLoader {1e3 / theirs['samples_per_cpu_s']:.2f} CPU-ms/sample (video decode at the "
        f"source resolution + resize + the same augmentation)")
    mem = raw["memory"]
    lines.append(
        f"XLA memory at {mem['preset']} (batch {mem['batch_size']}, {len(mem['cameras'])} cameras, remat "
        f"{mem['remat']}, {mem['dtype']}, vocabulary {mem['vocab_size']}): KI loss + grad temporaries "
        f"{mem['train_step']['temp_gib']:.2f} GiB (arguments {mem['train_step']['argument_gib']:.2f}, outputs "
        f"{mem['train_step']['output_gib']:.2f}) with each layer in {mem['layer_chunks']} chunks of the batch, "
        f"{mem['train_step_unchunked']['temp_gib']:.2f} GiB unchunked; FAST loss part "
        f"{mem['fast_ce']['temp_gib']:.2f} GiB")
    for name, ft in mem["fine_tune"].items():
        lines.append(
            f"  {name} train step (batch {ft['batch_size']}, grad-accum {ft['grad_accum']}, layer chunks "
            f"{ft['layer_chunks']}, LoRA {ft['lora'] or 'off'}, EMA off): params {ft['params_gib']:.2f} + optimizer "
            f"state {ft['opt_state_gib']:.2f} + temporaries {ft['temp_gib']:.2f} = {ft['total_gib']:.2f} GiB")
    for key, why in doc["not_measured"].items():
        lines.append(f"{key}: not measured ({why})")
    loader = raw["loader"]
    lines.append(f"pusht loader: {loader['num_batches']} batches of {loader['batch_size']} after warm-up, "
                 f"{loader['num_workers']} worker processes, image decode + augmentation")
    for z in s["sizes"]:
        t = raw[f"train_{z['label']}"]
        lines.append(f"train step {z['label']}: preset {z['preset']}, batch {z['train_batch']}, {t['steps']} timed steps "
                     f"after compilation: {t['step_s']:.2f} s/step")
    for label in s["model_sizes"]:
        mm = raw[f"model_{label}"]
        c, ts, sa, ca, fl, rt = mm["config"], mm["train_step"], mm["sampling"], mm["cache"], mm["flops"], mm["rtc"]
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
            f"  real-time chunking: {rt['flow_steps']} guided flow steps "
            f"{(rt['rtc_s'] - ca['prefix_s']) * 1e3 / rt['flow_steps']:.1f} ms each vs plain "
            f"{(rt['plain_s'] - ca['prefix_s']) * 1e3 / rt['flow_steps']:.1f} (a VJP through the action expert per "
            f"step; the prefix pass runs once either way)",
        ]
    for preset in s["flops_presets"]:
        fl = raw[f"flops_{preset}"]
        lines.append(f"FLOPs at {preset} (batch {fl['batch_size']}): two-pass / single = "
                     f"{fl['two_pass_over_single_pass_flops']:.2f}")
    return "\n".join(lines)
