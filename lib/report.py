"""The run index's command: (re)write outputs/<run>/html/index.html and list what is wrong with a run.

    python -m lib.report outputs/<run> [--check]        (also: make report RUN=<run>; the runner calls
                                                          write_index(out_dir) at the end of every invocation)

`--check` prints the problems of check_run and exits 1 when there are any. Only argument parsing; the page, the
Findings box and the checks are in lib.pipeline.report (its docstring describes the page).
"""
from __future__ import annotations

import argparse
import sys

from lib.pipeline.report import check_run, write_index

__all__ = ["main"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="a run folder, e.g. outputs/smollm2-135m")
    parser.add_argument("--check", action="store_true", help="also list problems; exit 1 when there are any")
    args = parser.parse_args(argv)
    from lib.run import without_iri_grammar
    without_iri_grammar()                          # as the runner: the notebooks' schema needs no IRI grammar
    try:
        path = write_index(args.out_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[report] {path}")
    if args.check:
        problems = check_run(args.out_dir)
        for p in problems:
            print(f"[report] problem: {p}")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
