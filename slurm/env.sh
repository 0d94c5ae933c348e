# slurm/env.sh -- sourced by the sbatch scripts and pipeline.sh (not run directly).
# Sets REPO (the repository root) and PY (the Python of the project's environment), and the environment of a
# compute node: offline model loading, unbuffered logs, thread counts from the allocation.
#
# Python, first match wins:
#   $HEADINFO_PYTHON              an explicit interpreter
#   $REPO/.venv/bin/python        the repository's venv (`make install`)
#   $CONDA_PREFIX/bin/python      an active conda env (sbatch passes the submitting shell's environment)
#   python3 on PATH               (a module-loaded Python, ...)
# The chosen interpreter must import the repository's `lib` (pip install -e .), else we stop with the fix.

headinfo_find_repo() {
    local c
    for c in "${HEADINFO_REPO:-}" "${SLURM_SUBMIT_DIR:-}" "$PWD"; do
        if [ -n "$c" ] && [ -f "$c/lib/run.py" ] && [ -d "$c/notebooks" ]; then
            (cd "$c" && pwd -P)
            return 0
        fi
    done
    echo "error: cannot find the repository (lib/run.py): submit from the repository root or set HEADINFO_REPO" >&2
    return 1
}

headinfo_find_python() {
    local c
    for c in "${HEADINFO_PYTHON:-}" "$REPO/.venv/bin/python" "${CONDA_PREFIX:+$CONDA_PREFIX/bin/python}" \
             "$(command -v python3 2>/dev/null || true)"; do
        [ -n "$c" ] && [ -x "$c" ] || continue
        if (cd "$REPO" && "$c" -c 'import lib.run' >/dev/null 2>&1); then
            echo "$c"
            return 0
        fi
        echo "note: $c cannot import lib.run, trying the next candidate" >&2
    done
    echo "error: no Python with this repository's package found (tried \$HEADINFO_PYTHON, $REPO/.venv," \
         "\$CONDA_PREFIX, python3). Create it on the login node: 'make install' (venv) or" \
         "'conda env create -f environment.yml && conda activate <env> && pip install -e .'" >&2
    return 1
}

REPO=$(headinfo_find_repo) || exit 2
PY=$(headinfo_find_python) || exit 2
export HEADINFO_REPO=$REPO

# compute nodes usually have no internet: models come from the HF cache filled on the login node
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export PYTHONUNBUFFERED=1
# no MPLBACKEND here: a kernel with MPLBACKEND=Agg would not put figures into the notebooks (inline backend)
if [ "${MPLBACKEND:-}" = Agg ] || [ "${MPLBACKEND:-}" = agg ]; then unset MPLBACKEND; fi
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}
    export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$SLURM_CPUS_PER_TASK}
fi

headinfo_job_header() {  # a few lines at the top of every job log
    echo "== $(date '+%F %T') job ${SLURM_JOB_ID:-local}${SLURM_ARRAY_TASK_ID:+ (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})}" \
         "on $(hostname -s) ${SLURM_RESTART_COUNT:+(restart ${SLURM_RESTART_COUNT})}"
    echo "== repo $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
    echo "== python $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
    echo "== cpus ${SLURM_CPUS_PER_TASK:-?}, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-(none)}, HF_HUB_OFFLINE=$HF_HUB_OFFLINE, HF_HOME=${HF_HOME:-~/.cache/huggingface}"
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | sed 's/^/== /' || true
    fi
}
