"""Model timing report: train step of the single KI pass vs the two-pass reference, and sample_actions vs
sample_fast_tokens latency, each pair measured in one run on the same model and batch.

    python -m pipelines.model_report [--preset small|tiny] [--batch-size 2] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import jax

from ki_bench.model import report_setup, time_sampling, time_train_step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.model_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("small", "tiny"), default="small",
                   help="small: width 256, depth 4, two 224-pixel cameras (default); tiny: the test model")
    p.add_argument("--batch-size", type=int, default=2, help="train-step batch size")
    p.add_argument("--sample-batch-size", type=int, default=1, help="inference batch size")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after compilation (median reported)")
    p.add_argument("--horizon", type=int, default=10, help="action horizon")
    p.add_argument("--action-dim", type=int, default=7, help="action dimension")
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = report_setup(args.preset, action_horizon=args.horizon, action_dim=args.action_dim)
    cfg = setup.config
    print(
        f"config: {args.preset} | backbone {cfg.backbone_variant} (width {cfg.backbone.width}, depth "
        f"{cfg.backbone.depth}) | expert {cfg.expert_variant} (width {cfg.expert.width}) | vision "
        f"{cfg.vision_variant} | {len(setup.cameras)} cameras x {cfg.image_size}px = "
        f"{cfg.tokens_per_image * len(setup.cameras)} image tokens | max_token_len {cfg.max_token_len} | "
        f"horizon {cfg.action_horizon} x dim {cfg.action_dim} | {cfg.dtype}"
    )
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {platform.machine()}")
    train = time_train_step(setup, batch_size=args.batch_size, repeats=args.repeats)
    sampling = time_sampling(setup, batch_size=args.sample_batch_size, repeats=args.repeats)
    print(f"\ntrain step (AdamW, batch {train['batch_size']}, {train['sequence_tokens']} tokens, median of "
          f"{train['repeats']}):")
    rows = [
        ("single pass (KI)", train["single_pass_step_s"], ""),
        ("two-pass reference", train["two_pass_step_s"], f"({train['two_pass_over_single']:.2f}x)"),
    ]
    for name, seconds, note in rows:
        print(f"  {name:<36}{seconds * 1e3:9.1f} ms   {note}".rstrip())
    print(f"\ninference latency (batch {sampling['batch_size']}, median of {sampling['repeats']}):")
    rows = [
        (f"sample_actions ({sampling['flow_steps']} flow steps)", sampling["sample_actions_s"], ""),
        ("sample_fast_tokens (constrained)", sampling["sample_fast_tokens_s"],
         f"({sampling['fast_over_flow']:.2f}x; tokens decoded {sampling['fast_tokens_decoded']}, "
         f"valid {sampling['fast_valid']})"),
    ]
    for name, seconds, note in rows:
        print(f"  {name:<36}{seconds * 1e3:9.1f} ms   {note}".rstrip())
    print(f"\ncompile (s): train {json.dumps({k: round(v, 1) for k, v in train['compile_s'].items()})}, "
          f"sampling {json.dumps({k: round(v, 1) for k, v in sampling['compile_s'].items()})}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg.to_dict(), "train_step": train, "sampling": sampling}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
