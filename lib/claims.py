"""The claims scorecard's command: (re)write a run's claims.json from its artifacts.

    python -m lib.claims outputs/<run> [--surrogates N]

Only argument parsing; the claims, their rules and the scorecard are in lib.pipeline.claims (its docstring gives
every claim's test).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.pipeline.claims import load_claims, write_claims

__all__ = ["main"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.claims", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="a run folder, e.g. outputs/smollm2-135m")
    parser.add_argument("--surrogates", type=int, default=20, help="circular-shift surrogates for C1-C3")
    args = parser.parse_args(argv)
    if not Path(args.out_dir).is_dir():
        print(f"error: run folder {args.out_dir!r} does not exist", file=sys.stderr)
        return 2
    from lib.pipeline.bookkeeping import stale_notebooks
    path = write_claims(args.out_dir, args.surrogates, stale=stale_notebooks(args.out_dir))
    for c in load_claims(args.out_dir):
        print(f"{c['id']}  {c['verdict']:<14} {c['statistic'][:60]}  {c['value']}")
    print(f"[claims] {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
