# One entry point for people and CI. `make test` works on a fresh machine: it builds .venv itself.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU wheel; on a GPU host pick the CUDA build, e.g. `make TORCH=torch==2.13.0+cu128 serve`.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install serve test lint

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[worker,dev]'
	touch $@

install: $(STAMP)

serve: install
	$(VENV)/bin/vdiff

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy vdiff_common vdiff_api vdiff_worker
