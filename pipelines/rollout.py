"""Closed-loop evaluation of a checkpoint in gym-pusht, beside the scripted expert and hold-still:
`python -m pipelines.rollout --checkpoint DIR [--head flow|fast] [--episodes 20] [--seed S] [--replan K]
[--delay D] [--rtc on|off] [--flow-samples N] [--start random|behind] [--output DIR]`."""

from __future__ import annotations

import argparse
import sys

from ki_model.checkpoint import CheckpointError
from ki_model.learning_curves import RunError, load_run
from ki_sim.pusht import STARTS
from ki_sim.rollout import RolloutConfig, RolloutError, format_table, run_rollout


def describe_training(checkpoint: str) -> str:
    """Which training produced the policy (insulation, loss weights, steps, where it started), for the table."""
    try:
        return load_run(checkpoint).describe()
    except RunError:
        return "no metrics.jsonl: training not recorded"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.rollout", description=__doc__.split(":")[0])
    p.add_argument("--checkpoint", required=True, help="training checkpoint directory (pipelines.train --checkpoint-dir)")
    p.add_argument("--head", choices=("flow", "fast"), default="flow",
                   help="the policy's head: flow (the action expert) or fast (the backbone alone, greedy constrained "
                        "FAST decoding, π0-FAST style) (default: %(default)s)")
    p.add_argument("--episodes", type=int, default=20, help="initial states, never the recording's (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="picks the initial states and the flow noise")
    p.add_argument("--replan", type=int, default=None,
                   help="actions executed from each inferred chunk before observing again (default: half the horizon)")
    p.add_argument("--delay", type=int, default=0,
                   help="the policy's latency in control steps: while a chunk is computed the robot executes the old "
                        "chunk's next D actions, and the new chunk is executed from index D (default: %(default)s)")
    p.add_argument("--rtc", choices=("on", "off"), default="off",
                   help="real-time chunking: the flow is guided to continue the chunk being executed (flow head "
                        "only) (default: %(default)s)")
    p.add_argument("--flow-samples", type=int, default=1,
                   help="the flow head executes the mean of N chunks sampled for each observation (one batch): the "
                        "flow's estimate of the expected chunk (default: %(default)s, one sample as openpi)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="episode limit at 10 fps (default: the recording's, else 150)")
    p.add_argument("--start", choices=STARTS, default=None,
                   help="initial states: random (gym-pusht's) or behind (the agent behind the block, on the line from "
                        "the goal through it) (default: the recording's)")
    p.add_argument("--video-episodes", type=int, default=3, help="episodes shown in the GIF (default: %(default)s)")
    p.add_argument("--output", default=None, help="report directory (default: <checkpoint>/rollout)")
    p.add_argument("--fast-compile", action="store_true",
                   help="CPU: compile without XLA backend optimisation (quicker start, slower inference)")
    a = p.parse_args(argv)
    cfg = RolloutConfig(episodes=a.episodes, seed=a.seed, replan=a.replan, max_steps=a.max_steps,
                        video_episodes=a.video_episodes, head=a.head, delay=a.delay, rtc=a.rtc == "on", start=a.start,
                        flow_samples=a.flow_samples)
    suffix = ("" if a.head == "flow" else f"_{a.head}") + (f"_delay{a.delay}" if a.delay else "") + (
        "_rtc" if cfg.rtc else "") + (f"_mean{a.flow_samples}" if a.flow_samples > 1 else "")
    output = a.output or f"{a.checkpoint.rstrip('/')}/rollout{suffix}"
    try:
        r = run_rollout(a.checkpoint, output, cfg, fast_compile=a.fast_compile)
    except (RolloutError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = r["setup"]
    latency = (f", {s['delay']} steps of latency" if s["delay"] else "") + (
        f", real-time chunking (β {s['max_guidance_weight']:g})" if s["rtc"] else "")
    print(f"{s['episodes']} episodes from unseen initial states ({s['start']} start), at most {s['max_steps']} steps, "
          f"the policy replanning every {s['replan']} of its {s['horizon']} actions{latency} ({s['seconds']:.0f} s)")
    print(f"policy: {a.checkpoint} ({describe_training(a.checkpoint)})")
    print(format_table(r))
    print(f"report: {r['report_path']}")
    print(f"plot:   {r['plot_path']}")
    if r["video_path"]:
        print(f"video:  {r['video_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
