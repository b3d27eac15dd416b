# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create/reuse .venv and install what they need, each behind its own stamp (so `make test`
# after `make demo` still installs the test extra). The test install puts torch==2.13.0 first,
# alone: an unpinned torch (or one pulled in by peft/transformers) is a multi-GB CUDA build.
# `make -k test` (what .ci/run does) runs every check even when an earlier one fails.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYPROJECT_SUM := $(shell cksum < pyproject.toml | cut -d' ' -f1)
TEST_STAMP := $(VENV)/.installed-test-$(PYPROJECT_SUM)
DEMO_STAMP := $(VENV)/.installed-demo-$(PYPROJECT_SUM)
HYPOTHESIS_PROFILE ?= ci
# pytest worker processes (pytest-xdist); a file's tests stay in one worker (module fixtures
# are built once). `make test TEST_JOBS=0` runs them in this process.
TEST_JOBS ?= 2

.PHONY: demo test lint check-types check-tests check-doctests check-wheel conformance venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(TEST_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# The demo needs the package alone: no extra (the wheel check shows it runs without them).
$(DEMO_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

venv: $(TEST_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/jaxlora demo

# Fast checks first. The import-graph check (tests/test_import_graph.py) is part of check-tests.
test: lint check-types check-tests check-doctests check-wheel

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pyright on jaxlora/ ([tool.pyright] in pyproject.toml), with the venv's packages
check-types: $(TEST_STAMP)
	$(BIN)/pyright --pythonpath $(BIN)/python

check-tests: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=30 \
		--hypothesis-profile=$(HYPOTHESIS_PROFILE)

# The examples in the docstrings of jaxlora/ and conformance/; conformance/test_clauses.py is
# the suite itself (`make conformance`), not a doctest.
check-doctests: $(TEST_STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -n $(TEST_JOBS) --doctest-modules jaxlora conformance \
		--ignore=conformance/test_clauses.py

# The wheel, installed without extras into a fresh venv: `python -m jaxlora --help`,
# `jaxlora demo`, and no `benchmarks` (tools/check_wheel.py)
check-wheel: $(TEST_STAMP)
	$(BIN)/python tools/check_wheel.py

conformance: $(TEST_STAMP)
	$(BIN)/python -m conformance --driver reference
	$(BIN)/python -m conformance --driver jaxlora

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
