"""Check a shard directory against its manifest: `python -m pipelines.verify SHARDS [--quick]`.

Exit code 0: every shard listed in manifest.json is there with its recorded size and sha256; 1: some are damaged or
missing (each is named); 2: SHARDS is not a finished pipelines.preprocess output.
"""

from __future__ import annotations

import argparse
import sys

from ki_data.manifest import ManifestError
from ki_data.verify import verify_shards


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="pipelines.preprocess output directory (has manifest.json)")
    p.add_argument("--quick", action="store_true", help="compare file sizes only (no hashing)")
    p.add_argument("--workers", type=int, default=4, help="files hashed at once")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        report = verify_shards(a.shards, quick=a.quick, progress=not a.no_progress, workers=a.workers)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
