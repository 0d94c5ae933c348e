#!/usr/bin/env bash
# pipeline.sh -- submit a run's whole notebook pipeline to SLURM as a dependency graph of jobs.
#
#   slurm/pipeline.sh params/<run>.yaml [options]
#
# One job per notebook that has a section in the params file, each `afterok` the notebooks whose files it reads
# (lib.pipeline.steps.PARENTS; a sharded notebook counts as done when its merge job is):
#   01 extract (GPU)
#   ├─ 02 PhiID (CPU) ─┬─ 03 diagnostics (CPU) ── 04 ranking (CPU; after 02 and 03)
#   │                  │                            ├─ 05 ablation array (GPU, shard i/N) -> 05 merge (CPU)
#   │                  │                            ├─ 09 task behaviour (GPU; greedy replies under head perturbation)
#   │                  │                            └─ 10 head fine-tuning
#   │                  ├─ 08 topology (CPU)
#   │                  └─ 11 local synergy (CPU)
#   ├─ 06 neuron array (GPU) -> 06 merge (CPU)
#   └─ 07 QK-OV (GPU)
#   report (index.html; CPU, `afterany` every job, so it also shows a failed or cancelled pipeline)
# A notebook without a PARENTS entry waits for every notebook submitted before it. A failed job cancels only the
# jobs that depend on it: 06 and 07 still run when 05 fails.
# A notebook is shardable when it declares a `shard` parameter. Every job has --kill-on-invalid-dep=yes: when a
# job fails, the jobs that depend on it are cancelled instead of pending forever. Array tasks are --requeue'able and the
# notebooks checkpoint, so a requeued or resubmitted shard continues where it stopped; notebooks already done
# with the same parameters are skipped by the runner, except that every notebook after the first one with work to
# do gets --force (the runner's own rule within one call; here each job is a separate call).
#
# Options
#   --dry-run              print the sbatch commands, submit nothing
#   --set KEY=VALUE        passed to every runner call (python -m lib.run --set ...), e.g. --set out_dir=/scratch/x
#   --shards N             array size for every shardable notebook (default: the section's `shards:` key in the
#                          params file, else 4; 1 = one unsharded job); overrides the params file
#   --shards NB=N          array size for one notebook, e.g. --shards 05_ablation=8
#   --from NB              start at notebook NB (earlier ones are assumed done), e.g. after a failure
#   --after JOBID          make the jobs whose parents are not submitted by this call wait for JOBID (afterok)
#   --force                rerun notebooks even when the runner finds them up to date
#   --gpu-args "ARGS"      sbatch arguments for GPU notebooks   (default: --gres=gpu:1 --cpus-per-task=4 --mem=32G)
#   --cpu-args "ARGS"      sbatch arguments for CPU notebooks   (default: --cpus-per-task=8 --mem=32G)
#   --sbatch-args "ARGS"   sbatch arguments for every job, e.g. "--account=abc --partition=short --time=04:00:00"
# GPU notebooks: $HEADINFO_GPU_NOTEBOOKS (default: the stages declared with device "GPU" in lib/pipeline/stages.py: 01, 05,
# 06, 07, 09, 10); every other notebook gets CPU resources. sbatch also reads SBATCH_ACCOUNT,
# SBATCH_PARTITION, SBATCH_TIMELIMIT, ... from the environment.
#
# Output: one line per job ("submitted <notebook> <jobid> ...", then "  after <parent notebooks>" when it waits for
# some), then "JOBS <id> <id> ...", and where the logs go (<out_dir>/logs/, created before submission). The cost
# estimate of lib/pipeline/cost.py (forwards, tokens, GPU-hours, memory per notebook) goes to stderr before submission;
# --dry-run prints it, and the model cache check, on stdout as "# " lines.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

DRY=0 FORCE=0 FROM="" AFTER="" DEFAULT_SHARDS=4 SHARDS_GIVEN=0
GPU_ARGS="--gres=gpu:1 --cpus-per-task=4 --mem=32G"
CPU_ARGS="--cpus-per-task=8 --mem=32G"
ALL_ARGS=""
declare -A SHARDS=()
SETS=()
PARAMS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --force) FORCE=1 ;;
        --set) SETS+=(--set "$2"); shift ;;
        --set=*) SETS+=(--set "${1#--set=}") ;;
        --shards)
            case "$2" in
                *=*) SHARDS[${2%%=*}]=${2#*=} ;;
                *) DEFAULT_SHARDS=$2 SHARDS_GIVEN=1 ;;
            esac
            shift ;;
        --from) FROM=$2; shift ;;
        --after) AFTER=$2; shift ;;
        --gpu-args) GPU_ARGS=$2; shift ;;
        --cpu-args) CPU_ARGS=$2; shift ;;
        --sbatch-args) ALL_ARGS=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [ -z "$PARAMS" ] || { echo "error: one params file only (got $PARAMS and $1)" >&2; exit 2; }
           PARAMS=$1 ;;
    esac
    shift
done
[ -n "$PARAMS" ] || { usage >&2; exit 2; }
for n in "$DEFAULT_SHARDS" "${SHARDS[@]}"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "error: --shards needs a positive integer, got '$n'" >&2; exit 2; }
done

HEADINFO_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
export HEADINFO_REPO
# the params file: relative to the current directory, else to the repository
[ -f "$PARAMS" ] || [ "${PARAMS:0:1}" = / ] || PARAMS=$HEADINFO_REPO/$PARAMS
[ -f "$PARAMS" ] || { echo "error: params file '$PARAMS' not found" >&2; exit 2; }
PARAMS=$(cd "$(dirname "$PARAMS")" && pwd -P)/$(basename "$PARAMS")
source "$HEADINFO_REPO/slurm/env.sh"
cd "$REPO"
if [ "$DRY" = 0 ] && ! command -v sbatch >/dev/null 2>&1; then
    echo "error: sbatch not found: run this on a SLURM login node (or use --dry-run)" >&2; exit 2
fi

# Validate the params file exactly as `python -m lib.run --check` does (types, values, models in the offline HF
# cache; --dry-run reports a missing model instead of stopping) before anything is submitted, and list the pipeline:
# "OUT_DIR <dir>" then "NB <name> <shardable 0/1> <stale 0/1> <shards stale 0/1> <shards>" per notebook, where
# stale means that the runner would (re)compute something of it: a step not done with these parameters (shards
# included), and "PARENTS <name> <parent>..." for the notebooks each reads the files of (lib.pipeline.steps.PARENTS; its
# afterok parents: absent from the run or before --from, they are done); "CACHE <ok | the problem>"; "COST <line>"
# for each line of the cost table.
SHARDS_JSON="{"
for nb in "${!SHARDS[@]}"; do SHARDS_JSON+="\"$nb\": ${SHARDS[$nb]}, "; done
SHARDS_JSON="${SHARDS_JSON%, }}"
PLAN=$("$PY" - "$PARAMS" "$DEFAULT_SHARDS" "$SHARDS_GIVEN" "$DRY" "$SHARDS_JSON" "${SETS[@]}" <<'PYEOF'
import json
import sys
from lib.run import without_iri_grammar
without_iri_grammar()                                 # as the runner: no IRI grammar compiled on import (~1 s)
from lib.pipeline.bookkeeping import is_up_to_date
from lib.pipeline.notebook_params import ParamsError, declared_parameters
from lib.pipeline.runner import cache_problem, check_run
from lib.pipeline.steps import PARENTS, Step, shard_suffix
from lib.pipeline.stages import gpu_stages
from lib.storage.store import ArtifactError
params, default_shards, shards_given, dry = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
shard_map = json.loads(sys.argv[5])
args = sys.argv[6:]
overrides = [args[i + 1] for i in range(0, len(args), 2)]
try:                                                  # types, values, and the offline model cache
    steps = check_run(params, None, overrides, require_cache=not dry)
except (ParamsError, ArtifactError) as e:
    sys.exit(f"error: {e}")
out = steps[0].output.parent
print("OUT_DIR", out)
print("CACHE", cache_problem(steps) or "ok")


def with_shard(step, shard):
    suffix = shard_suffix(shard)
    return Step(step.name, step.path, {**step.params, "shard": shard}, out / f"{step.name}{suffix}.ipynb",
                out / "html" / f"{step.name}{suffix}.html")


for s in steps:
    shardable = "shard" in declared_parameters(s.path)
    n = shard_map.get(s.name, default_shards if shards_given else s.shards or default_shards) if shardable else 1
    if n > 1:
        shards_stale = any(not is_up_to_date(with_shard(s, f"{i}/{n}")) for i in range(1, n + 1))
        stale = shards_stale or not is_up_to_date(with_shard(s, ""))
    else:
        shards_stale, stale = False, not is_up_to_date(s)
    print("NB", s.name, int(shardable), int(stale), int(shards_stale), n)
    if s.name in PARENTS:
        print("PARENTS", s.name, *PARENTS[s.name])
print("GPU", *gpu_stages())
try:
    from lib.pipeline.cost import cost_table
    table = cost_table(steps)
except Exception as e:                                # an estimate never blocks a submission
    table = f"cost estimate failed: {type(e).__name__}: {e}"
for line in table.splitlines():
    print("COST", line)
PYEOF
) || exit 2
OUT_DIR=$(awk '$1 == "OUT_DIR" {print $2}' <<<"$PLAN")
case "$OUT_DIR" in /*) ;; *) OUT_DIR=$REPO/$OUT_DIR ;; esac
mapfile -t NOTEBOOKS < <(awk '$1 == "NB" {print $2}' <<<"$PLAN")
declare -A SHARDABLE=() STALE=() SHARDS_STALE=() NSHARDS=() PARENTS=()
while read -r tag name parents; do
    if [ "$tag" = PARENTS ]; then PARENTS[$name]=$parents; fi
done <<<"$PLAN"
while read -r tag name sh st ss ns; do
    [ "$tag" = NB ] || continue
    SHARDABLE[$name]=$sh STALE[$name]=$st SHARDS_STALE[$name]=$ss NSHARDS[$name]=$ns
done <<<"$PLAN"
CACHE=$(sed -n 's/^CACHE //p' <<<"$PLAN")
COST=$(sed -n 's/^COST /# /p' <<<"$PLAN")
if [ -n "$FROM" ]; then
    found=0
    for nb in "${NOTEBOOKS[@]}"; do [ "$nb" = "$FROM" ] && found=1; done
    [ $found = 1 ] || { echo "error: --from $FROM is not in this run's pipeline: ${NOTEBOOKS[*]}" >&2; exit 2; }
fi
for nb in "${!SHARDS[@]}"; do
    [ "${SHARDABLE[$nb]:-0}" = 1 ] || { echo "error: --shards $nb=...: not a shardable notebook of this run" >&2; exit 2; }
done


RUN=$(basename "$PARAMS" .yaml)
LOG_DIR=$OUT_DIR/logs
GPU_NOTEBOOKS=${HEADINFO_GPU_NOTEBOOKS:-$(sed -n 's/^GPU //p' <<<"$PLAN")}      # default: the stages declared "GPU"
RUNNER_ARGS=("${SETS[@]}")
[ "$FORCE" = 1 ] && RUNNER_ARGS+=(--force)
# Each job is its own runner invocation, so "rerun what follows a notebook that ran" (the runner's rule within
# one invocation) is applied here along the graph: a notebook gets --force when a parent (or its parent...) has
# work to do; a merge gets --force when its shards have work to do.
declare -A RERUNS=()               # notebook -> 1 when its job will (re)compute something
COMMON=(--parsable --kill-on-invalid-dep=yes --chdir="$REPO" --export=ALL,HEADINFO_REPO="$REPO")
# shellcheck disable=SC2206
EXTRA_ALL=($ALL_ARGS)

resources() {  # $1 notebook -> sbatch arguments for its resources
    local words
    if [[ " $GPU_NOTEBOOKS " == *" $1 "* ]]; then words=$GPU_ARGS; else words=$CPU_ARGS; fi
    # shellcheck disable=SC2086
    printf '%s\n' $words
}

exec 3>&1                          # --dry-run prints the commands on the real stdout
JOB_IDS=()
submit() {  # $1 label, rest: sbatch arguments -> prints the job id (or a placeholder in --dry-run)
    local label=$1
    shift
    if [ "$DRY" = 1 ]; then
        { printf 'sbatch'; printf ' %q' "$@"; printf '\n'; } >&3
        echo "<${label// /-}>"
    else
        local out
        out=$(sbatch "$@") || { echo "error: sbatch failed for $label" >&2; return 1; }
        echo "${out%%;*}"
    fi
}
abort() {  # a submission failed: cancel what this call already submitted, so no half chain is left queued
    if [ "${#JOB_IDS[@]}" -gt 0 ] && [ "$DRY" = 0 ]; then
        echo "cancelling the jobs submitted so far: ${JOB_IDS[*]}" >&2
        scancel "${JOB_IDS[@]}" || true
    fi
    exit 1
}

if [ "$DRY" = 1 ]; then
    echo "# dry run: run $RUN, out_dir $OUT_DIR, logs $LOG_DIR (created on submission)"
    if [ "$CACHE" = ok ]; then
        echo "# model cache check: ok (every model of the run loads offline on the compute nodes)"
    else
        echo "# model cache check FAILED (a real submission stops here): $CACHE"
    fi
    echo "$COST"
else
    echo "$COST" >&2
    mkdir -p "$LOG_DIR"           # --output in a missing directory makes the job fail at start
fi
declare -A DONE_JOB=()             # notebook -> the job after which its files are complete (its merge when sharded)
parents_of() {  # $1 notebook -> its parents submitted by this call, one a line
    local p parents
    if [ "${PARENTS[$1]+listed}" = listed ]; then parents=${PARENTS[$1]}; else parents=${!DONE_JOB[*]}; fi
    for p in $parents; do [ -n "${DONE_JOB[$p]:-}" ] && echo "$p"; done
    return 0
}
started=$([ -z "$FROM" ] && echo 1 || echo 0)
for nb in "${NOTEBOOKS[@]}"; do
    [ "$nb" = "$FROM" ] && started=1
    [ "$started" = 1 ] || continue
    mapfile -t res < <(resources "$nb")
    read -ra cpu_res <<<"$CPU_ARGS"     # merge jobs run on CPU resources
    mapfile -t parents < <(parents_of "$nb")
    upstream_reruns=$FORCE
    for p in "${parents[@]}"; do [ "${RERUNS[$p]}" = 1 ] && upstream_reruns=1; done
    nb_args=("${RUNNER_ARGS[@]}")
    merge_args=("${RUNNER_ARGS[@]}")
    if [ "$upstream_reruns" = 1 ]; then
        [ "$FORCE" = 1 ] || { nb_args+=(--force); merge_args+=(--force); }
    elif [ "${SHARDS_STALE[$nb]}" = 1 ]; then
        merge_args+=(--force)
    fi
    note=""
    if [[ " ${nb_args[*]} " == *" --force "* ]]; then note=" (--force: reruns after a notebook it reads)"
    elif [ "${STALE[$nb]}" = 0 ]; then note=" (up to date: the job will skip it)"; fi
    RERUNS[$nb]=$([ "$upstream_reruns" = 1 ] || [ "${STALE[$nb]}" = 1 ] && echo 1 || echo 0)
    waits=()
    for p in "${parents[@]}"; do waits+=("${DONE_JOB[$p]}"); done
    [ "${#waits[@]}" = 0 ] && [ -n "$AFTER" ] && waits=("$AFTER")
    dep=()
    [ "${#waits[@]}" -gt 0 ] && dep=(--dependency="afterok:$(IFS=:; echo "${waits[*]}")")
    after_line=""
    [ "${#parents[@]}" -gt 0 ] && after_line="  after ${parents[*]}"
    [ "${#parents[@]}" = 0 ] && [ -n "$AFTER" ] && after_line="  after job $AFTER"
    n=${NSHARDS[$nb]}
    if [ "${SHARDABLE[$nb]}" = 1 ] && [ "$n" -gt 1 ]; then
        arr=$(submit "$nb shards" "${COMMON[@]}" "${res[@]}" "${EXTRA_ALL[@]}" "${dep[@]}" --array="1-$n" --requeue \
              --open-mode=append --job-name="$RUN:$nb:shard" --output="$LOG_DIR/$nb.shard-%a-of-$n.%A_%a.out" \
              slurm/run_shards.sbatch "$PARAMS" "$nb" "$n" "${nb_args[@]}") || abort
        JOB_IDS+=("$arr")
        echo "submitted $nb shards $arr array 1-$n$note"
        [ -z "$after_line" ] || echo "$after_line"
        merge=$(submit "$nb merge" "${COMMON[@]}" "${cpu_res[@]}" "${EXTRA_ALL[@]}" --dependency="afterok:$arr" \
                --job-name="$RUN:$nb:merge" --output="$LOG_DIR/$nb.merge.%j.out" \
                slurm/run_notebook.sbatch "$PARAMS" "$nb" --set "$nb.shard=\"\"" "${merge_args[@]}") || abort
        JOB_IDS+=("$merge")
        merge_note=$note
        [[ " ${merge_args[*]} " == *" --force "* ]] && merge_note=" (--force: merges freshly computed shards)"
        echo "submitted $nb merge $merge$merge_note"
        echo "  after $nb shards"
        echo "  resubmit one failed shard K: sbatch --array=K ${res[*]} --chdir=$REPO --output=$LOG_DIR/$nb.shard-%a-of-$n.%A_%a.out slurm/run_shards.sbatch $PARAMS $nb $n ${RUNNER_ARGS[*]}"
        DONE_JOB[$nb]=$merge
    else
        job=$(submit "$nb" "${COMMON[@]}" "${res[@]}" "${EXTRA_ALL[@]}" "${dep[@]}" --job-name="$RUN:$nb" \
              --output="$LOG_DIR/$nb.%j.out" slurm/run_notebook.sbatch "$PARAMS" "$nb" "${nb_args[@]}") || abort
        JOB_IDS+=("$job")
        echo "submitted $nb $job$note"
        [ -z "$after_line" ] || echo "$after_line"
        DONE_JOB[$nb]=$job
    fi
done
report_dep=()
[ "${#JOB_IDS[@]}" -gt 0 ] && report_dep=(--dependency="afterany:$(IFS=:; echo "${JOB_IDS[*]}")")
[ "${#JOB_IDS[@]}" = 0 ] && [ -n "$AFTER" ] && report_dep=(--dependency="afterany:$AFTER")
report=$(submit report "${COMMON[@]}" "${EXTRA_ALL[@]}" "${report_dep[@]}" --job-name="$RUN:report" \
         --output="$LOG_DIR/report.%j.out" slurm/report.sbatch "$OUT_DIR") || abort
JOB_IDS+=("$report")
echo "submitted report $report"
[ "${#report_dep[@]}" = 0 ] || echo "  after every job"
echo "JOBS ${JOB_IDS[*]}"
[ "$DRY" = 1 ] || echo "logs: $LOG_DIR   watch: squeue -u ${USER:-$(id -un)}   report: $OUT_DIR/html/index.html"
