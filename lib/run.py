"""The runner: executes the notebook pipeline of one run with papermill.

    python -m lib.run --params params/<run>.yaml [--only <notebook> ...] [--set key=value ...] [--force]

A params file holds shared keys (top level: injected into every notebook that declares them) and one section per
notebook (a top-level key named like the notebook, e.g. `<NN_name>:`); the notebooks with a section form the run's
pipeline, in file-name order. The run's name, and so its output folder outputs/<run>/, is the params file's stem.

Before anything runs, every key is checked against the notebook's declared parameters (its `parameters` cell,
read by papermill.inspect_notebook) and against the type of the declared default. A section of a shardable notebook
(one that declares `shard`) may also set `shards: N`, the SLURM array size of slurm/pipeline.sh; it is not passed to
the notebook. --check also prints the run's cost estimate (lib/pipeline/cost.py). Each notebook is executed with
the repository root as working directory into outputs/<run>/NN_name.ipynb and rendered to
outputs/<run>/html/NN_name.html (report view, no code).

    python -m lib.run --params params/<run>.yaml --explain     # what would run and why, per notebook; runs nothing

A notebook is up to date, and skipped, when its parameters, its inputs (every run-folder file it read, by sha256),
every one of its outputs, and its code and environment (lib.pipeline.provenance: its code cells, the lib modules it imports,
as syntax trees, so comments and formatting do not count; the numeric packages' versions; the weights) are unchanged
since it last succeeded, and no notebook it reads from (PARENTS, and theirs) ran since; otherwise it reruns (the log
says why), and so does everything that reads from it. --force reruns anyway. One runner at a time holds a run folder
(single-notebook runs, e.g. SLURM jobs and shards, may run at once beside each other, never beside a whole run); see
lib.storage.store.run_lock.

Only argument parsing; the work is in lib.pipeline: steps (params file -> steps), bookkeeping (manifest records, the
up-to-date rule), execution (one notebook), scheduler (--jobs), runner (run_pipeline, --explain, --check) and
interrupts (Ctrl-C).
"""
from __future__ import annotations

import argparse
import sys

from lib.pipeline.interrupts import INTERRUPTS, StderrGate, on_interrupt
from lib.pipeline.notebook_params import ParamsError
from lib.pipeline.runner import check_run, explain, run_pipeline
from lib.pipeline.scheduler import default_jobs
from lib.storage.store import ArtifactError

__all__ = ["main", "without_iri_grammar"]


def without_iri_grammar() -> None:
    """papermill and nbconvert import nbformat, which imports jsonschema, whose optional IRI format check imports
    rfc3987_syntax (installed with jupyter's jsonschema[format-nongpl]); that module compiles a grammar on import:
    ~1.6 s of CPU in every runner process. No notebook schema uses the IRI format: the runner does without it."""
    sys.modules.setdefault("rfc3987_syntax", None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", required=True, help="params/<run>.yaml")
    parser.add_argument("--only", nargs="+", default=None, help="notebook names to run (default: the whole pipeline)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a shared key, or NN_notebook.key for one notebook (repeatable)")
    parser.add_argument("--force", action="store_true", help="rerun notebooks even when their outputs are up to date")
    parser.add_argument("--check", action="store_true", help="validate the params file and exit")
    parser.add_argument("--quiet", action="store_true", help="do not stream cell outputs to the log")
    parser.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                        help="notebooks run at once, each after those it reads from (default: $HEADINFO_JOBS, else "
                             "min(2, CPUs)); 1 runs them one after another")
    parser.add_argument("--explain", action="store_true",
                        help="print what would run and why, per notebook, and exit (runs nothing)")
    args = parser.parse_args(argv)
    without_iri_grammar()
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))    # scancel / requeue: record "failed", then stop
    signal.signal(signal.SIGINT, on_interrupt)
    try:
        if args.explain:
            print("\n".join(explain(args.params, args.only, args.overrides)))
            return 0
        if args.check:
            steps = check_run(args.params, args.only, args.overrides)
            print(f"[run] {args.params}: valid; pipeline {[s.name for s in steps]} -> {steps[0].params['out_dir']}")
            from lib.pipeline.cost import cost_table
            print(cost_table(steps))
            return 0
        with StderrGate():
            run_pipeline(args.params, args.only, args.overrides, args.force, log_output=not args.quiet,
                         jobs=args.jobs if args.jobs is not None else default_jobs())
    except (ParamsError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 130 if INTERRUPTS else 1
    except KeyboardInterrupt:
        return 130
    return 130 if INTERRUPTS else 0


if __name__ == "__main__":
    sys.exit(main())
