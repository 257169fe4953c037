# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= data/synthetic
RUNS ?= runs
# Demo set: patients x slices of synthetic head CT (see `python -m training synth --help`); the pipeline
# holds out 20% of the patients as its test set, so 60 train and validate as before.
SYNTH_PATIENTS ?= 75
SYNTH_SLICES ?= 10
PORT ?= 8000
PRESET ?= quick

.PHONY: venv test-deps demo dashboard pipeline test lint bench bench-gpu

$(BIN)/.installed: requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(BIN)/.installed

$(BIN)/.test-installed: $(BIN)/.installed requirements-test.txt
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

test-deps: $(BIN)/.test-installed
	@# Debian's Chromium for the browser tests (Playwright cannot download its own browser here).
	@test -x /usr/bin/chromium || { echo "installing Debian chromium"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || sudo sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium'; }

demo: venv
	@BIN=$(BIN) DATA=$(DATA) RUNS=$(RUNS) PORT=$(PORT) SYNTH_PATIENTS=$(SYNTH_PATIENTS) SYNTH_SLICES=$(SYNTH_SLICES) \
	  bash scripts/demo.sh

# The dashboard alone, over the runs that exist.
dashboard: venv
	HEMORRHAGE_RUNS_DIR=$(RUNS) $(BIN)/python -m shiny run --host 127.0.0.1 --port $(PORT) app.py

# The two-phase recipe on a data set of your own, e.g. `make pipeline DATA=/data/rsna PRESET=full`.
pipeline: venv
	$(BIN)/python -m training pipeline --data $(DATA) --preset $(PRESET) --runs-dir $(RUNS)

test: test-deps
	$(BIN)/python -m pytest

lint: test-deps
	$(BIN)/ruff check hemorrhage_core training tests benchmarks scripts app.py

# Each benchmark prints ratios against a baseline measured in the same run (docs/benchmarks.md).
# About 10 min on a 2-core CPU; training throughput at the full sizes with few steps.
bench: venv
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_inference.py
	$(BIN)/python benchmarks/bench_train.py --sizes quick --steps 3 --warmup 1
	$(BIN)/python benchmarks/bench_train.py --sizes full --steps 2 --warmup 1
	$(BIN)/python benchmarks/bench_demo.py
	$(BIN)/python benchmarks/bench_runs_folder.py

# On a CUDA machine: training (AMP, channels_last), loader and Predictor, a few minutes; the summary
# (with the card's name) goes to build/bench-gpu/gpu_bench.{json,md}.
bench-gpu: venv
	$(BIN)/python benchmarks/gpu_bench.py --out build/bench-gpu
