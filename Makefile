# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= data/synthetic
RUNS ?= runs
# Demo set: patients x slices of synthetic head CT (see `python -m training synth --help`); the pipeline
# holds out 20% of the patients as its test set, so 180 train and validate (the quick preset's phase 1
# uses a third of them, phase 2 all).
SYNTH_PATIENTS ?= 225
SYNTH_SLICES ?= 10
PORT ?= 8000
PRESET ?= quick
# Every package of the runtime and the tests, pinned with hashes; `make lock` writes it.
LOCK := requirements.lock
PIP_TOOLS ?= pip-tools==7.7.0
LOCK_VENV := build/lock-tools
LOCK_ARGS ?=

.PHONY: venv test-deps demo dashboard pipeline test lint bench bench-gpu lock

# One install for the demo and the tests, exactly the lock (a newer lock reinstalls); the package itself
# goes in without dependencies, so nothing is resolved past the lock.
$(BIN)/.installed: $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(BIN)/.installed

test-deps: $(BIN)/.installed
	@# Debian's Chromium for the browser tests (Playwright cannot download its own browser here).
	@test -x /usr/bin/chromium || { echo "installing Debian chromium"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || sudo sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium'; }
	@# Orthanc + its DICOMweb plugin for tests/test_pacs.py; dicom3tools' dciodvfy checks the SR.
	@{ test -x /usr/sbin/Orthanc && test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so && command -v dciodvfy >/dev/null; } \
	  || { echo "installing Debian orthanc, orthanc-dicomweb, dicom3tools"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb dicom3tools >/dev/null) \
	  || sudo sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb dicom3tools'; }

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

# After editing requirements*.txt: re-resolve them into $(LOCK) with pip-compile (pip-tools), which uses
# pip's own resolver and pip's configuration (indexes, find-links), for this Python (3.11) on Linux x86_64.
# Pins that still satisfy the files are kept; `make lock LOCK_ARGS=--upgrade` moves every package to the
# newest allowed, `LOCK_ARGS="--upgrade-package shiny"` one. pip-tools lives in its own venv so that
# $(VENV) holds exactly the lock. Takes a few minutes (hashes for every file of every pinned release).
lock:
	test -x $(LOCK_VENV)/bin/python || $(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip $(PIP_TOOLS)
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe \
	  --strip-extras --no-emit-index-url --no-emit-find-links $(LOCK_ARGS) \
	  --output-file $(LOCK) requirements.txt requirements-test.txt

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
