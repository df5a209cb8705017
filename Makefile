# The two commands of the README: `make repro` and `make test`. Both set up .venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.twilbert-installed
TORCH_SPEC ?= torch==2.13.0
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup repro baseline exp queue compare lint ui test test-fast params check-params acceptance clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	@# An already-installed torch (e.g. your CUDA build) is kept: torch is installed only when missing.
	@# pip's progress stays visible: the set-up takes minutes.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --progress-bar on "$(TORCH_SPEC)"
	$(PY) -m pip install --progress-bar on -c constraints.txt -e ".[test]"
	@touch $(STAMP)

setup: $(STAMP)

## params.yaml is the composition of conf/ (DVC composes it itself under `dvc exp run`).
params: setup
	$(PY) -m twilbert.cli compose --out params.yaml

check-params: setup
	$(PY) -m twilbert.cli compose --check params.yaml

## The whole pipeline; the run is kept as the DVC experiment `baseline` (what `make compare` measures
## against, and what `make baseline` brings back after other experiments)
## MLflow's parent runs follow DVC's state (pipeline/mlflow_sync.py): after every target that changes it,
## whether or not DVC skipped stages; a store that cannot be synced is a warning there (`make ui` refuses it)
SYNC := $(PY) -m twilbert.pipeline.mlflow_sync --warn

repro: setup check-params
	dvc repro
	@$(PY) -m twilbert.pipeline.experiments save baseline
	@$(SYNC)
	@echo
	@cat results/results.md

## Back to the `baseline` run of `make repro`: its params, dvc.lock and results, and its models from DVC's cache.
## Refused (exit 2, naming the files) while a tracked file holds edits that no commit or experiment keeps.
baseline: setup
	@$(PY) -m twilbert.pipeline.experiments restore baseline
	@$(SYNC)

## A DVC experiment with the project's dvc, from any shell: make exp ARGS='-n enc4 -S model.n_encoders=4'
exp: setup
	dvc exp run $(ARGS)
	@$(SYNC)

## Run the queued experiments (`dvc exp run --queue ...`) with JOBS workers, from any shell. DVC's queue
## starts its workers and each run as `dvc ...` found on PATH, so `.venv/bin/dvc queue start` from a shell
## without the venv fails ('dvc' not found); the PATH exported above puts the venv's dvc there.
JOBS ?= 1
queue: setup
	dvc queue start -j $(JOBS)

## The workspace and every experiment: the params that differ and the headline metrics, then each one's Δ
## against `baseline`, or against any other: make compare ARGS='--reference enc4'
compare: setup
	$(PY) -m twilbert.reports.compare $(ARGS)

## ruff, configured in pyproject.toml
lint: setup
	$(VENV)/bin/ruff check src stages tests scripts benchmarks

## MLflow's UI on the project's store (mlflow.db), synced with DVC first, opening on the experiments
## compared: one row per DVC experiment with the params that differ, each task's test score, Δ and verdict
PORT ?= 5000
ui: setup
	@$(PY) -m twilbert.pipeline.mlflow_sync --ui --port $(PORT)

# One pytest-xdist worker per core; whole files per worker, as the e2e tests share one project.
PYTEST_WORKERS ?= auto
test: setup lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile

test-fast: setup lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m "not slow and not network"

## TWilBert's 11 sample tasks finetuned end to end -> results/acceptance/results.md
SAMPLES ?= ../shared/data/twilbert-samples
acceptance: setup check-params
	$(PY) scripts/acceptance.py --samples "$(SAMPLES)"

## Removes the pipeline's outputs, committed results/ included: refused while results/ holds edits that no
## commit or experiment keeps (as `make baseline` is for any tracked file)
clean:
	@if [ -x $(PY) ]; then $(PY) -m twilbert.pipeline.experiments guard "make clean" results; fi
	rm -rf data models results/tasks results/curves results/plots results/*.md results/*.csv results/*.json \
		.dvc/cache mlflow.db mlartifacts dvc_plots
