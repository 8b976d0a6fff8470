# labvault developer entry points. See docs/development.md.
#
#   make venv        create .venv and install labvault editable with the test extra
#   make run         initialise $(DATA_DIR) and seed/print the demo world
#   make test        run pytest against a throwaway PostgreSQL (scripts/with-postgres)
#   make lint        ruff (and shellcheck on the shell scripts, when installed)
#   make clean       remove .venv and build artefacts (keeps $(DATA_DIR))
#   make clean-data  remove $(DATA_DIR)

PYTHON ?= python3
VENV ?= .venv
DATA_DIR ?= var
PYTEST_ARGS ?=

# Build requirements from pyproject's [build-system].requires: the editable install and
# tests/test_packaging.py (pip wheel --no-build-isolation) build with the venv's own tools.
BUILD_REQUIREMENTS ?= 'setuptools>=68' wheel

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

STAMP := $(VENV)/.installed
SHELL_SCRIPTS := scripts/with-postgres .ci/run

.PHONY: help venv install run test lint clean clean-data

help:
	@sed -n 's/^#   make /make /p' $(firstword $(MAKEFILE_LIST))

venv install: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Re-install whenever pyproject.toml changes (dependencies, package list, entry points).
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --disable-pip-version-check --upgrade $(BUILD_REQUIREMENTS)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -e '.[test]'
	@# an editable install skips pyproject's data-files: enable the server extension by hand
	mkdir -p $(VENV)/etc/jupyter/jupyter_server_config.d
	cp extension/jupyter-config/jupyter_server_config.d/labvault.json $(VENV)/etc/jupyter/jupyter_server_config.d/
	touch $@

# configurable-http-proxy from npm: JupyterHub's proxy (the PyPI re-implementation buffers
# whole bodies and fails above 100 MiB). Pinned by package-lock.json.
NODE_STAMP := node_modules/.installed
$(NODE_STAMP): package.json package-lock.json
	@command -v npm >/dev/null || { echo "make: npm (Node.js) is needed for configurable-http-proxy" >&2; exit 1; }
	npm ci --no-audit --no-fund
	touch $@

# The embedded default: data directory, environment catalogue, demo world, then JupyterHub
# (which starts the datastore service and the local mailbox). Ctrl-C stops everything.
PORT ?= 8000
run: $(STAMP) $(NODE_STAMP)
	$(VENV)/bin/labvault init --data-dir $(DATA_DIR)
	$(VENV)/bin/labvault demo --data-dir $(DATA_DIR)
	$(VENV)/bin/labvault environment sync --data-dir $(DATA_DIR)
	@echo
	@echo "labvault: JupyterHub at http://127.0.0.1:$(PORT)/ -- sign in as alice (PI), bob, carol, frank (facility staff),"
	@echo "labvault: vera (vendor) or admin with the demo password above; mail (confirmation links) is printed here."
	@echo
	LABVAULT_DATA_DIR=$(abspath $(DATA_DIR)) LABVAULT_PORT=$(PORT) PATH="$(abspath $(VENV))/bin:$$PATH" \
		$(VENV)/bin/jupyterhub -f jupyterhub_config/jupyterhub_config.py

# Two pytest invocations: jupyter_server's fixtures (pytest-jupyter) and the Hub tests cannot
# share a process. The second runs tests/extension; exit status 5 (PYTEST_ARGS selected none of
# its tests) is not a failure.
test: $(STAMP) $(NODE_STAMP)
	scripts/with-postgres $(VENV)/bin/python -m pytest $(PYTEST_ARGS)
	scripts/with-postgres $(VENV)/bin/python -m pytest -p pytest_jupyter.jupyter_server tests/extension $(PYTEST_ARGS) || test $$? -eq 5

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	@if command -v shellcheck >/dev/null 2>&1; then \
		echo "shellcheck $(SHELL_SCRIPTS)"; shellcheck $(SHELL_SCRIPTS); \
	else \
		echo "lint: shellcheck not installed, skipping the shell scripts"; \
	fi

clean:
	rm -rf $(VENV) node_modules build dist *.egg-info .pytest_cache .ruff_cache .hypothesis test-artifacts
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

clean-data:
	@case "$(DATA_DIR)" in ""|/|.|..) echo "refusing to remove DATA_DIR='$(DATA_DIR)'" >&2; exit 1;; esac
	rm -rf -- $(DATA_DIR)

#   make bench       run the benchmarks (benchmarks/README.md) at small sizes; 1M: see there
BENCH_SIZES ?= 10000,100000
BENCH_SECONDS ?= 5

.PHONY: bench
bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_policy.py
	scripts/with-postgres $(VENV)/bin/python benchmarks/bench_listing.py --sizes $(BENCH_SIZES)
	scripts/with-postgres $(VENV)/bin/python benchmarks/bench_audit.py --seconds $(BENCH_SECONDS)

#   make soak        the long fuzzing run: >= 1,000 random API cases per database (docs/hardening.md)
SOAK_EXAMPLES ?= 40
SOAK_REPORT ?= test-artifacts/fuzz-soak.jsonl

.PHONY: soak
soak: $(STAMP) $(NODE_STAMP)
	mkdir -p $(dir $(SOAK_REPORT)) && rm -f $(SOAK_REPORT)
	LABVAULT_FUZZ_EXAMPLES=$(SOAK_EXAMPLES) LABVAULT_FUZZ_SEED=random LABVAULT_FUZZ_REPORT=$(abspath $(SOAK_REPORT)) \
		scripts/with-postgres $(VENV)/bin/python -m pytest tests/test_fuzz_api.py -q $(PYTEST_ARGS)
	@cat $(SOAK_REPORT)
