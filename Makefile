# pgwarden: `make demo` runs the gateway on its embedded defaults; `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help

STATE   := .pgwarden
TOOLS   := $(STATE)/tools
UV      := $(TOOLS)/bin/uv
UV_VERSION := 0.13.9
BIN     := $(STATE)/bin
OPA     := $(BIN)/opa
OPA_VERSION := v1.22.3
HELM    := $(BIN)/helm
HELM_VERSION := v4.3.2
VENV    := .venv
PY      := $(VENV)/bin/python

export UV_PYTHON_DOWNLOADS := never
export PGWARDEN_OPA_BINARY := $(abspath $(OPA))
export PGWARDEN_HELM_BINARY := $(abspath $(HELM))
# Compiled modules are cached (__pycache__ is ignored by git), whatever the caller's
# environment says: the suite and the demo start many Python processes (gateways, audit
# children, the CLI), and each would compile every module from source again (pgwarden
# --help: 6.2 s without the cache, 3.8 s with it, on the 2-core CI machine).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: help deps python-deps postgres xmlsec1 chromium opa helm helm-check demo test rego-check lint bench

help:
	@echo "make demo   - run pgwarden on its embedded defaults (local PostgreSQL, OPA, SQLite audit)"
	@echo "make test   - install what is needed, start the services and run the whole suite"
	@echo "make bench  - pgbench through the gateway vs direct (and pgbouncer when installed)"

deps: python-deps postgres xmlsec1 opa

# Python dependencies, exactly as locked, into a project-local virtualenv.
$(UV):
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q "uv==$(UV_VERSION)"

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --quiet
	@touch $@

python-deps: $(VENV)/.synced

# PostgreSQL server binaries from Debian's packages when initdb/pg_ctl are missing.
postgres:
	@bash scripts/ensure-postgres.sh

# xmlsec1 from Debian's packages when missing: pysaml2 checks SAML signatures with it.
xmlsec1:
	@bash scripts/ensure-xmlsec1.sh

# The real OPA binary, built from the Go module proxy into a project-local bin folder.
$(OPA):
	mkdir -p $(BIN)
	CGO_ENABLED=0 GOBIN=$(abspath $(BIN)) go install github.com/open-policy-agent/opa@$(OPA_VERSION)

opa: $(OPA)

# Chromium from Debian's packages for the console's browser tests (Playwright drives it).
chromium:
	@bash scripts/ensure-chromium.sh

# Helm, for checking the chart in deploy/helm (built once, like OPA; the first build is slow).
$(HELM):
	mkdir -p $(BIN)
	CGO_ENABLED=0 GOBIN=$(abspath $(BIN)) go install helm.sh/helm/v4/cmd/helm@$(HELM_VERSION)

helm: $(HELM)

# The chart lints and renders; tests/deploy/test_helm.py renders it again and reads the objects.
helm-check: helm
	$(HELM) lint --strict deploy/helm/pgwarden
	$(HELM) template pgwarden deploy/helm/pgwarden > $(STATE)/helm-template.yaml

rego-check: opa
	@test -z "$$($(OPA) fmt --list rego)" || { echo "opa fmt: unformatted files:"; $(OPA) fmt --list rego; exit 1; }
	$(OPA) check --strict rego bundles --ignore '*.tar.gz'
	$(OPA) test --coverage --threshold 90 rego bundles --ignore '*.tar.gz' > $(STATE)/rego-coverage.json || { cat $(STATE)/rego-coverage.json | head -50; exit 1; }
	@$(PY) -c "import json;print('rego coverage: %.1f%%' % json.load(open('$(STATE)/rego-coverage.json'))['coverage'])"
	$(OPA) test rego bundles --ignore '*.tar.gz'

# mypy --strict covers what pyproject.toml's [tool.mypy] files names: the code, its tests, the benches.
lint: python-deps
	$(VENV)/bin/ruff check gateway cli tests bench
	$(VENV)/bin/ruff format --check gateway cli tests bench
	$(VENV)/bin/mypy

test: deps chromium rego-check lint helm-check
	$(VENV)/bin/pytest

demo: deps
	$(VENV)/bin/pgwarden demo

# pgbouncer is the yardstick of the throughput targets: Debian's package when missing.
bench: deps
	@command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || \
		{ $$(command -v sudo) apt-get install -y pgbouncer || echo "pgbouncer not installed: its column is skipped"; }
	$(PY) bench/relay.py --mode prepared --mode simple --group admins --group ai-agents --variant bare
