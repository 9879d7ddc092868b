# Two commands for a fresh machine:  make demo  and  make test.
# TORCH picks the torch build. The default is the CPU wheel on these machines; see README.md for
# a CPU-only machine elsewhere (TORCH_INDEX) and for CUDA.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PG_TEST_URL ?= postgresql://postgres@127.0.0.1:5432/test
ARGS ?=
BIN := $(VENV)/bin

.PHONY: install install-test demo test lint clean

# install: what running tuneq needs (the demo's path); install-test adds the test tools, the
# browser driver and the trackers (about a minute more of downloads and unpacking).
install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -e ".[test]"
	touch $@

demo: install
	$(BIN)/tuneq demo $(ARGS)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy schemas worker cli ui

# The whole suite on SQLite, then its database tests (but the minutes-long real-model ones) on
# PostgreSQL; tests/conftest.py deselects the rest there.
test: install-test lint
	$(BIN)/pytest
	TUNEQ_DATABASE_URL=$(PG_TEST_URL) $(BIN)/pytest -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
