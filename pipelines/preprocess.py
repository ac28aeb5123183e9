"""LeRobot dataset -> token shards for pi0.5-KI training.

    python -m pipelines.preprocess REPO_ID [--root DIR] [--output DIR] [--action-horizon 50] [--max-token-len 200]
        [--text-tokenizer PATH] [--fast-tokenizer DIR] [--cameras NAME ...] [--episodes 0-9 12 ...] [--workers N]
        [--executor local|ray|slurm] [--tasks N] [--ray-address ADDR] [--slurm-partition P --slurm-time T ...]

Reads through `lerobot` (the hub when online; `$HF_LEROBOT_HOME/<repo_id>` or --root offline) and writes
manifest.json, norm_stats.json, tokenizer/, shards/*.parquet and a dataset card (README.md: the directory opens with
`datasets.load_dataset`) into --output (default ./shards/<repo_id>). Pass 2 runs as DataTrove tasks on this machine
(--executor local), a Ray cluster (--executor ray) or a Slurm job array (--executor slurm writes the job and says
how to submit it). Started again after an interruption, on any executor, it reuses the finished shards.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ki_data.console import library_output_to, log_file
from ki_data.images import DEFAULT_IMAGE_FORMAT, IMAGE_FORMATS
from ki_data.lerobot_source import DatasetFormatError, DatasetNotFoundError
from ki_data.preprocess import (
    EXECUTORS,
    ExecutorConfig,
    PreprocessConfig,
    PreprocessError,
    SlurmJob,
    describe_rows,
    run_preprocess,
    write_slurm_preprocess,
)
from ki_data.manifest import ManifestError
from ki_data.prompt import DEFAULT_LAYOUT, LAYOUTS


def _episodes(tokens: list[str]) -> tuple[int, ...]:
    """'3', '0-9' (inclusive) or '0:10' (exclusive end), possibly comma separated."""
    out: list[int] = []
    for token in (t for arg in tokens for t in arg.split(",") if t):
        try:
            if "-" in token[1:]:
                a, b = token.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif ":" in token:
                a, b = token.split(":", 1)
                out.extend(range(int(a), int(b)))
            else:
                out.append(int(token))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad episode selection '{token}' (use 3, 0-9 or 0:10)") from None
    return tuple(sorted(set(out)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.preprocess", description=__doc__.split("\n\n")[0])
    d = " (default: %(default)s)"
    p.add_argument("repo_id", help="LeRobot dataset id, e.g. lerobot/pusht or ki/pusht_demo")
    p.add_argument("--root", help="dataset directory (default: $HF_LEROBOT_HOME/<repo_id>, else the hub)")
    p.add_argument("--output", help="output directory (default: ./shards/<repo_id>)")
    p.add_argument("--action-horizon", type=int, default=50, help="action chunk length H" + d)
    p.add_argument("--max-token-len", type=int, default=200, help="tokenized prompt length, never truncated" + d)
    p.add_argument("--max-text-len", type=int, default=128, help="text prefix length" + d)
    p.add_argument("--image-size", type=int, default=224, help="images are resized with padding to this square" + d)
    p.add_argument("--image-format", choices=IMAGE_FORMATS, default=DEFAULT_IMAGE_FORMAT,
                   help="shard image encoding: jpeg (quality 95) or png (lossless)" + d)
    p.add_argument("--text-tokenizer", help="a SentencePiece .model (e.g. PaliGemma's); default: train one offline")
    p.add_argument("--fast-tokenizer", help="a FAST tokenizer directory; default: fit one on this dataset")
    p.add_argument("--text-vocab-size", type=int, default=1024, help="vocabulary of the offline text tokenizer" + d)
    p.add_argument("--text-split-digits", action="store_true",
                   help="the offline text tokenizer writes numbers digit by digit, as PaliGemma's does")
    p.add_argument("--fast-vocab-size", type=int, default=1024, help="vocabulary of the fitted FAST tokenizer" + d)
    p.add_argument("--fast-scale", type=float, default=10.0, help="FAST DCT coefficient scale" + d)
    p.add_argument("--cameras", nargs="+", help="camera names or feature keys to keep, in order (default: all)")
    p.add_argument("--state-keys", default="observation.state",
                   help="LeRobot features concatenated into the model's state, comma-separated, e.g. "
                        "observation.state,observation.environment_state" + d)
    p.add_argument("--delta-actions", default=None, metavar="MASK",
                   help="action dimensions stored relative to the state: openpi's counts (6,-1,6,-1: six relative, "
                        "one absolute, ...) or action feature names (x,y); each against the state dimension of the "
                        "same name, else the same index (default: all absolute)")
    p.add_argument("--episodes", nargs="+", help="episodes to use: 3, 0-9 (inclusive), 0:10 (default: all)")
    p.add_argument("--workers", type=int, default=0,
                   help="pass-2 tasks run at once: local processes (0: one per CPU core), Ray tasks or Slurm array "
                   "tasks (0: no limit)" + d + "; the shards do not depend on it")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of episodes held out for validation" + d)
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split" + d)
    p.add_argument("--shard-rows", type=int, default=1000, help="target rows per shard, whole episodes" + d)
    p.add_argument("--norm-mode", choices=("quantile", "zscore"), default="quantile", help="normalization" + d)
    p.add_argument("--prompt-layout", choices=LAYOUTS, default=DEFAULT_LAYOUT,
                   help="pi05: openpi's pi0.5 prefix (... State: ...;\\nAction: ), fast: pi0-FAST's (lower-cased task, "
                   "'Action: ' opens the postfix)" + d)
    e = p.add_argument_group("executor (where pass 2 runs; the shards do not depend on it)")
    e.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: DataTrove's LocalPipelineExecutor here; ray: Ray tasks (each running DataTrove's "
                   "executor for its task) on --ray-address or a local cluster started for the run; slurm: write "
                   "a DataTrove Slurm job array and say how to submit it" + d)
    e.add_argument("--tasks", type=int, default=0, help="DataTrove tasks, each a group of whole shards; 0: one per "
                   "shard" + d)
    e.add_argument("--ray-address", help="a running Ray cluster, e.g. auto or HEAD_IP:6379 (default: start one with "
                   "--workers CPUs)")
    e.add_argument("--slurm-partition", help="Slurm partition (needed with --executor slurm)")
    e.add_argument("--slurm-time", default="24:00:00", help="Slurm time limit per task" + d)
    e.add_argument("--slurm-cpus-per-task", type=int, default=1, help="CPUs per Slurm task" + d)
    e.add_argument("--mem-per-cpu-gb", type=float, default=2.0, help="memory per task CPU on Ray and Slurm" + d)
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad rows instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace a finished output directory")
    p.add_argument("--show-rows", type=int, default=0, metavar="N", help="print N decoded rows at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    return PreprocessConfig(
        repo_id=args.repo_id,
        root=args.root,
        output=args.output,
        action_horizon=args.action_horizon,
        max_token_len=args.max_token_len,
        max_text_len=args.max_text_len,
        image_size=args.image_size,
        image_format=args.image_format,
        text_tokenizer=args.text_tokenizer,
        fast_tokenizer=args.fast_tokenizer,
        text_vocab_size=args.text_vocab_size,
        text_split_digits=args.text_split_digits,
        fast_vocab_size=args.fast_vocab_size,
        fast_scale=args.fast_scale,
        cameras=tuple(args.cameras) if args.cameras else None,
        state_keys=tuple(k.strip() for k in args.state_keys.split(",") if k.strip()),
        delta_actions=args.delta_actions,
        episodes=_episodes(args.episodes) if args.episodes else None,
        workers=args.workers,
        val_fraction=args.val_fraction,
        seed=args.seed,
        shard_rows=args.shard_rows,
        norm_mode=args.norm_mode,
        prompt_layout=args.prompt_layout,
        skip_bad_rows=args.skip_bad_rows,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        executor=ExecutorConfig(
            kind=args.executor,
            tasks=args.tasks,
            ray_address=args.ray_address,
            slurm_partition=args.slurm_partition,
            slurm_time=args.slurm_time,
            slurm_cpus_per_task=args.slurm_cpus_per_task,
            mem_per_cpu_gb=args.mem_per_cpu_gb,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    log = log_file("preprocess", cfg.output_dir)
    try:
        # DataTrove's task logs, lerobot's and ffmpeg's messages go to the log; the bars and the summary stay here.
        with library_output_to(log):
            logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
            result = write_slurm_preprocess(cfg) if cfg.executor.kind == "slurm" else run_preprocess(cfg)
    except (PreprocessError, DatasetNotFoundError, DatasetFormatError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the finished shards", file=sys.stderr)
        return 130
    if isinstance(result, SlurmJob):
        print(result.instructions())
        return 0
    print(result.summary_text())
    print(f"  library logs: {log}")
    if args.show_rows:
        print(describe_rows(result.out_dir, args.show_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
