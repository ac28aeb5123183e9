"""LeRobot dataset -> token shards for pi0.5-KI training.

    python -m pipelines.preprocess REPO_ID [--root DIR] [--output DIR] [--action-horizon 50] [--max-token-len 200]
        [--text-tokenizer PATH] [--fast-tokenizer DIR] [--cameras NAME ...] [--episodes 0-9 12 ...] [--workers N]

Reads through `lerobot` (the hub when online; `$HF_LEROBOT_HOME/<repo_id>` or --root offline) and writes
manifest.json, norm_stats.json, tokenizer/ and shards/*.parquet into --output (default ./shards/<repo_id>).
Started again after an interruption, it reuses the finished shards.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ki_data.lerobot_source import DatasetFormatError, DatasetNotFoundError
from ki_data.preprocess import PreprocessConfig, PreprocessError, describe_rows, run_preprocess
from ki_data.schema import ManifestError


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
    p.add_argument("--text-tokenizer", help="a SentencePiece .model (e.g. PaliGemma's); default: train one offline")
    p.add_argument("--fast-tokenizer", help="a FAST tokenizer directory; default: fit one on this dataset")
    p.add_argument("--text-vocab-size", type=int, default=1024, help="vocabulary of the offline text tokenizer" + d)
    p.add_argument("--text-split-digits", action="store_true",
                   help="the offline text tokenizer writes numbers digit by digit, as PaliGemma's does")
    p.add_argument("--fast-vocab-size", type=int, default=1024, help="vocabulary of the fitted FAST tokenizer" + d)
    p.add_argument("--fast-scale", type=float, default=10.0, help="FAST DCT coefficient scale" + d)
    p.add_argument("--cameras", nargs="+", help="camera names or feature keys to keep, in order (default: all)")
    p.add_argument("--episodes", nargs="+", help="episodes to use: 3, 0-9 (inclusive), 0:10 (default: all)")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes for pass 2, 0: one per CPU core" + d + "; the shards do not depend on it")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of episodes held out for validation" + d)
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split" + d)
    p.add_argument("--shard-rows", type=int, default=1000, help="target rows per shard, whole episodes" + d)
    p.add_argument("--norm-mode", choices=("quantile", "zscore"), default="quantile", help="normalization" + d)
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
        text_tokenizer=args.text_tokenizer,
        fast_tokenizer=args.fast_tokenizer,
        text_vocab_size=args.text_vocab_size,
        text_split_digits=args.text_split_digits,
        fast_vocab_size=args.fast_vocab_size,
        fast_scale=args.fast_scale,
        cameras=tuple(args.cameras) if args.cameras else None,
        episodes=_episodes(args.episodes) if args.episodes else None,
        workers=args.workers,
        val_fraction=args.val_fraction,
        seed=args.seed,
        shard_rows=args.shard_rows,
        norm_mode=args.norm_mode,
        skip_bad_rows=args.skip_bad_rows,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_preprocess(cfg)
    except (PreprocessError, DatasetNotFoundError, DatasetFormatError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the finished shards", file=sys.stderr)
        return 130
    print(result.summary_text())
    if args.show_rows:
        print(describe_rows(result.out_dir, args.show_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
