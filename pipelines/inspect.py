"""Show one shard row's tokens in the terminal: text_prompt and tokenized_prompt side by side with the four masks,
the FAST ids, and the prefix/postfix boundary.

    python -m pipelines.inspect SHARDS [--episode E [--frame F] | --index I] [--limit N] [--stats]
"""

from __future__ import annotations

import argparse
import sys

from ki_data import inspect as ki_inspect
from ki_data.inspect_render import print_token_table, row_header_lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", help="a preprocessing output directory (holds manifest.json)")
    p.add_argument("--episode", type=int, help="episode index (default: the first row of the first shard)")
    p.add_argument("--frame", type=int, help="frame index within --episode (default: the episode's first)")
    p.add_argument("--index", type=int, help="the dataset-global frame index instead of --episode/--frame")
    p.add_argument("--limit", type=int, help="show at most N positions of the table")
    p.add_argument("--pad-rows", type=int, default=1, help="padding positions to show after the real tokens")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="auto: a coloured rich table on a terminal, plain text otherwise")
    p.add_argument("--stats", action="store_true", help="also print dataset-wide token counts and rows near the limit")
    p.add_argument("--check", action="store_true", help="exit 1 unless the row is consistent (masks, prefix = text_prompt, FAST round trip, build_prompt)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        shards = ki_inspect.open_shards(args.shards)
        row = ki_inspect.load_row(shards, episode=args.episode, frame=args.frame, index=args.index)
    except ki_inspect.InspectError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    records = ki_inspect.token_table(shards, row)
    try:
        decode = ki_inspect.decode_fast_postfix(shards, row)
    except ValueError as err:  # FastDecodeError: shown, not fatal; --check reports it too
        print(f"FAST postfix does not decode: {err}", file=sys.stderr)
        decode = None
    header = row_header_lines(ki_inspect.row_summary(shards, row), ki_inspect.decoded_segments(shards, row), decode)
    print_token_table(records, header, color=args.color, limit=args.limit, pad_rows=args.pad_rows)

    problems = ki_inspect.row_problems(shards, row)
    print("row check: " + ("consistent" if not problems else "PROBLEMS\n  - " + "\n  - ".join(problems)))
    if args.stats:
        stats = ki_inspect.dataset_token_stats(shards)
        print("dataset tokens:", ki_inspect.to_json(stats.summary()))
        near = stats.near_limit()
        print(f"rows within 10% of max_token_len ({shards.manifest.max_token_len}): {len(near) or 'none'}")
        for r in near:
            print(f"  episode {r['episode_index']} frame {r['frame_index']} (index {r['index']}): "
                  f"{r['prompt_length']} tokens, {r['free']} free")
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
