# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= data/synthetic
RUNS ?= runs
# Demo set: patients x slices of synthetic head CT (see `python -m training synth --help`).
SYNTH_PATIENTS ?= 60
SYNTH_SLICES ?= 10

.PHONY: venv test-deps demo test lint bench clean-demo

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

$(DATA)/stage_2_train.csv: | venv
	$(BIN)/python -m training synth --out $(DATA) --patients $(SYNTH_PATIENTS) --slices-per-patient $(SYNTH_SLICES) --seed 0

demo: venv $(DATA)/stage_2_train.csv
	$(BIN)/python -m training index --data $(DATA)

test: test-deps
	$(BIN)/python -m pytest

lint: test-deps
	$(BIN)/ruff check hemorrhage_core training tests benchmarks app.py

bench: venv
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_inference.py
