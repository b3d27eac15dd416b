# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create/reuse .venv and install what they need. torch==2.13.0 is installed first,
# alone: an unpinned torch (or one pulled in by peft/transformers) is a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
HYPOTHESIS_PROFILE ?= ci

.PHONY: demo test lint conformance venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/jaxlora switch-demo
	$(BIN)/jaxlora demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q --hypothesis-profile=$(HYPOTHESIS_PROFILE)

conformance: $(STAMP)
	$(BIN)/python -m conformance --driver reference
	$(BIN)/python -m conformance --driver jaxlora

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
