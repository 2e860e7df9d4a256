# Set-up is two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch first, pinned to the CPU wheel this kind of machine keeps in its local wheel folder; an
# unpinned torch would pull several GB of CUDA packages. GPU clusters install their own torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: help venv test test-all lint demo bench-engine clean

help:
	@echo "make demo          run the engine demo (creates .venv on first use)"
	@echo "make test          lint + fast tests (what CI runs)"
	@echo "make bench-engine  engine benchmark: none vs vispruner on LLaVA-1.5 geometry"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q -m "not slow"

test-all: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) jobs/demo_engine.py

bench-engine: $(STAMP)
	$(PY) jobs/bench_engine.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
