# Conveyor: the only command surface. `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
UV_VERSION := 0.13.9
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
VENV := .venv
PY := $(VENV)/bin/python
BUF := tools/buf/node_modules/.bin/buf
# Our typed packages (mypy strict) and the paths ruff checks.
PACKAGES := conveyor_common conveyor_devstack conveyor_gateway conveyor_scheduler fake_replicate \
	conveyor_provider_adapter conveyor_notifier conveyor_client conveyor_testkit
PYTEST_ARGS ?=
# gRPC fork handlers misbehave in children forked by test processes (pexpect, pre-exec): off.
export GRPC_ENABLE_FORK_SUPPORT := false

.PHONY: help
help: ## Print this message
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: setup
setup: $(VENV)/.synced $(BUF) kafka-jars ## Create .venv (uv.lock), install buf, resolve the Kafka jars

.PHONY: k8s-tools
k8s-tools: ## Install promtool (Debian's prometheus package) for the alert-rule checks
	bash tools/k8s/install-tools.sh

# Setup is quiet on stdout (`eval "$$(make -s up)"` must only see export lines): tool output goes to stderr.
$(VENV)/.synced: pyproject.toml uv.lock $(wildcard libs/*/pyproject.toml services/*/pyproject.toml)
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet "uv==$(UV_VERSION)" >&2
	@$(UV) sync --all-packages --locked --quiet >&2
	@touch $@

# `npm ci` installs exactly package-lock.json and never rewrites it (the work tree stays clean).
$(BUF): tools/buf/package.json tools/buf/package-lock.json
	@cd tools/buf && npm ci --no-audit --no-fund --loglevel=error >&2
	@touch $@

.PHONY: kafka-jars
kafka-jars: $(VENV)/.synced ## Resolve Apache Kafka from Maven Central into the devstack cache
	@$(PY) -m conveyor_devstack fetch >/dev/null

.PHONY: protos
protos: $(VENV)/.synced ## Regenerate Python/gRPC/mypy stubs from protos/
	$(PY) scripts/gen_protos.py

.PHONY: protos-check
protos-check: $(VENV)/.synced ## Fail if the checked-in stubs differ from a fresh generation
	$(PY) scripts/gen_protos.py >/dev/null 2>&1
	@if [ -n "$$(git status --porcelain -- libs/conveyor-protos)" ]; then \
		git status --porcelain -- libs/conveyor-protos; \
		echo "generated stubs are stale: run 'make protos' and commit"; exit 1; fi
	@echo "protos-check: stubs up to date"

.PHONY: buf-lint
buf-lint: $(BUF) ## buf lint (STANDARD) on protos/
	cd protos && ../$(BUF) lint
	@echo "buf lint: ok"

.PHONY: lint
lint: $(VENV)/.synced ## ruff check + ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

.PHONY: fmt
fmt: $(VENV)/.synced ## Format and autofix with ruff
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

.PHONY: typecheck
typecheck: $(VENV)/.synced ## mypy --strict on our packages, tests and scripts
	$(VENV)/bin/mypy $(addprefix -p ,$(PACKAGES) $(EXTRA_PACKAGES))
	$(VENV)/bin/mypy tests scripts $(wildcard bench)

.PHONY: unit
unit: $(VENV)/.synced ## Unit tests (no devstack)
	$(VENV)/bin/pytest -m "not integration" $(PYTEST_ARGS)

.PHONY: docs
docs: $(VENV)/.synced ## Regenerate the README's settings table from the settings classes
	$(PY) scripts/settings_table.py --write

.PHONY: docs-check
docs-check: $(VENV)/.synced ## Fail if the README's settings table is stale
	$(PY) scripts/settings_table.py --check

.PHONY: check
check: lint typecheck protos-check buf-lint docs-check unit ## The gate: lint, types, protos, buf, docs, unit tests

.PHONY: integration
integration: setup k8s-tools ## Integration tests on the devstack (real PostgreSQL and Kafka)
	$(VENV)/bin/pytest -m "integration" $(PYTEST_ARGS)

.PHONY: e2e
e2e: setup ## End-to-end and chaos tests only (the whole system on the devstack)
	$(VENV)/bin/pytest -m "e2e" $(PYTEST_ARGS)

.PHONY: test
test: setup check integration ## The gate plus integration tests (the README's test command)

.PHONY: run
run: setup ## Start the whole stack with a live demo (see README)
	$(PY) -m conveyor_devstack demo

.PHONY: up
up: setup ## Start the stack in the background and print its endpoints
	$(PY) -m conveyor_devstack up --detach --state-file .devstack/state.json

.PHONY: down
down: ## Stop what `make up` started
	$(PY) -m conveyor_devstack down --state-file .devstack/state.json

.PHONY: bench-peers
bench-peers: ## Install what the BullMQ peer bench needs (redis-server, the harness's npm ci) when possible
	bash tools/bench/install-peers.sh

.PHONY: bench
bench: setup bench-peers ## Benchmarks: writes bench/results/*.json and prints ratios against baselines
	$(PY) bench/run_all.py

.PHONY: autoscale-demo
autoscale-demo: setup k8s-tools ## Provider-adapter autoscaling on the running stack with a real Prometheus (~8 min)
	$(PY) bench/autoscaling_demo.py

.PHONY: dist
dist: ## Build the wheels and sdists of the SDK (conveyor-client) and its stubs (conveyor-protos) into dist/
	@mkdir -p dist
	$(UV) build --quiet --out-dir dist libs/conveyor-protos
	$(UV) build --quiet --out-dir dist libs/conveyor-client
	@ls -1 dist

.PHONY: sdk-matrix
sdk-matrix: setup ## Install the built wheels on Python 3.11/3.12/3.13 and run the SDK checks on a live stack
	$(VENV)/bin/pytest -m integration tests/integration/test_sdk_matrix.py $(PYTEST_ARGS)

.PHONY: images
images: ## Build every service image (docker, podman or buildah; CONVEYOR_REGISTRY=..., PUSH=1 to push), tagged from git describe
	$(PYTHON) tools/k8s/images.py build $(if $(PUSH),--push,)

.PHONY: images-set
images-set: ## Set an overlay's kustomize images: to CONVEYOR_REGISTRY and the git version (OVERLAY=prod|dev)
	$(PYTHON) tools/k8s/images.py set --overlay $(or $(OVERLAY),prod)

.PHONY: clean
clean: ## Remove caches (keeps .venv and the Kafka jars)
	rm -rf .pytest_cache .mypy_cache .ruff_cache
