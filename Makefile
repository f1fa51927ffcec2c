# wasmq: `make demo` runs the real thing end to end, `make test` runs every
# test. Both install what is missing on a fresh machine (the wasm32-wasip2
# target; redis-server, PostgreSQL, openssl, promtool and chromium via
# apt-get when absent and we are root).

CARGO ?= cargo
GUEST_TARGET := wasm32-wasip2
GUEST_DIR := target/guests
GUESTS := noop onboard thumbnail scrape hostile other-world typed task-v010 flowstep secrets db
GUEST_FLAGS := --release --target $(GUEST_TARGET) --target-dir $(GUEST_DIR) $(addprefix -p ,$(GUESTS))

.PHONY: all setup target redis postgres promtool browser python node guests py-tools py-guests py-guests-if-pypi js-guests js-guests-if-npm build test demo bench lint fmt clean

all: build guests

setup: target redis postgres promtool browser python node

target:
	@rustup target list --installed 2>/dev/null | grep -qx $(GUEST_TARGET) || rustup target add $(GUEST_TARGET)

redis:
	@if command -v redis-server >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "redis-server not found: installing it with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	else \
		echo "redis-server not found: install it (e.g. 'sudo apt-get install redis-server') and re-run"; exit 1; \
	fi

# PostgreSQL's server binaries (/usr/lib/postgresql/*/bin): the tests of
# the postgres interface and `make demo` start their own server on a free
# port (tests/common/postgres.rs), never the machine's; the TLS test makes
# its certificates with the openssl tool.
postgres:
	@if ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "PostgreSQL or openssl not found: installing Debian's postgresql and openssl with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql openssl >/dev/null; \
	else \
		echo "PostgreSQL or openssl not found: install them (e.g. 'sudo apt-get install postgresql openssl') and re-run"; exit 1; \
	fi

# promtool (Debian's prometheus package) checks the /metrics text in the tests.
promtool:
	@if command -v promtool >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "promtool not found: installing Debian's prometheus package with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else \
		echo "promtool not found: install it (e.g. 'sudo apt-get install prometheus') and re-run"; exit 1; \
	fi

# Headless Chromium and its WebDriver (Debian's chromium and
# chromium-driver) drive the dashboard in the browser tests.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "chromium or chromedriver not found: installing Debian's chromium and chromium-driver with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; \
	else \
		echo "chromium or chromedriver not found: install them (e.g. 'sudo apt-get install chromium chromium-driver') and re-run"; exit 1; \
	fi

# python3 with venv (Debian's python3-venv) makes the project virtualenv
# componentize-py is installed into; node and npm install componentize-js.
# Where they cannot be installed, the Python or JavaScript tasks are
# skipped, saying so, and so are the tests that need them.
python:
	@if $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "python3 with venv not found: installing Debian's python3-venv with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null; \
	else \
		echo "python3 with venv not found: install it (e.g. 'sudo apt-get install python3-venv'); the Python tasks are skipped until then"; \
	fi

node:
	@if command -v $(NPM) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "npm not found: installing Debian's nodejs and npm with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null; \
	else \
		echo "npm not found: install it (e.g. 'sudo apt-get install nodejs npm'); the JavaScript tasks are skipped until then"; \
	fi

# Example tasks and test guests, as WebAssembly components.
guests: target
	$(CARGO) build $(GUEST_FLAGS)

# Python tasks, as components: a project virtualenv (.venv/, gitignored)
# with the pinned componentize-py (`make py-tools`, what `wasmq build`
# finds), then each tasks/*-py built with `wasmq build` (the Python SDK in
# guest-sdk/python/ and its world, embedded in the binary) into
# target/guests/py/. Needs python3 with venv and PyPI (`make
# py-guests-if-pypi` skips, saying so, where it is unreachable).
PYTHON ?= python3
VENV := .venv
COMPONENTIZE_PY_VERSION := 0.25.1
COMPONENTIZE_PY := $(VENV)/bin/componentize-py
# Installed once per pinned version (a bump reinstalls).
PY_TOOLS := $(VENV)/componentize-py-$(COMPONENTIZE_PY_VERSION).installed
PY_GUEST_DIR := $(GUEST_DIR)/py
# The no-op, and the Python twins of the Rust onboard and scrape (the
# tests shared by both languages run them when built).
PY_GUESTS := noop-py onboard-py scrape-py

py-guests: $(addprefix $(PY_GUEST_DIR)/,$(addsuffix .wasm,$(PY_GUESTS)))

py-tools: $(PY_TOOLS)

$(PY_TOOLS):
	@[ -x $(VENV)/bin/pip ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet componentize-py==$(COMPONENTIZE_PY_VERSION)
	@touch $@

PY_SDK := $(wildcard guest-sdk/python/wasmq/*.py guest-sdk/python/wit/*.wit guest-sdk/python/wit/deps/*/*.wit wit/*.wit wit/deps/*/*.wit)

$(PY_GUEST_DIR)/%.wasm: tasks/%/app.py $(PY_SDK) $(PY_TOOLS)
	@mkdir -p $(PY_GUEST_DIR)
	WASMQ_COMPONENTIZE_PY=$(COMPONENTIZE_PY) $(CARGO) run -q -p wasmq -- build tasks/$*/app.py -o $@

# JavaScript tasks, as components: the componentize-js that
# js/package.json pins (every dependency locked by js/package-lock.json),
# installed with `npm ci` into .node/ (gitignored), then each tasks/*-js
# built from its app.js against wit/ (world `task`) into
# target/guests/js/. Needs node and npm with the npm registry
# (`make js-guests-if-npm` skips, saying so, where they are missing).
NPM ?= npm
NODE_DIR := .node
COMPONENTIZE_JS := $(NODE_DIR)/node_modules/.bin/componentize-js
# Installed once per lockfile (an edited package.json or lock reinstalls).
JS_TOOLS := $(NODE_DIR)/tools.installed
JS_GUEST_DIR := $(GUEST_DIR)/js
JS_GUESTS := hello-js

js-guests: $(addprefix $(JS_GUEST_DIR)/,$(addsuffix .wasm,$(JS_GUESTS)))

$(JS_TOOLS): js/package.json js/package-lock.json
	@mkdir -p $(NODE_DIR)
	cp js/package.json js/package-lock.json $(NODE_DIR)/
	cd $(NODE_DIR) && $(NPM) ci --no-audit --no-fund --loglevel=error
	@touch $@

$(JS_GUEST_DIR)/%.wasm: tasks/%/app.js $(wildcard wit/*.wit wit/deps/*/*.wit) $(JS_TOOLS)
	@mkdir -p $(JS_GUEST_DIR)
	$(COMPONENTIZE_JS) tasks/$*/app.js --wit wit --world-name task -o $@

build:
	$(CARGO) build -p wasmq

# Every test, with the Python and JavaScript tasks built first (where
# their registries answer; otherwise their tests print a skip).
test: setup guests py-guests-if-pypi js-guests-if-npm
	$(CARGO) test

# The Python tasks: built when componentize-py can be installed; where
# PyPI (or python3's venv) is unavailable, said so, and the tests that need
# them print a skip naming `make py-guests` or `make py-tools`. A build
# that fails for any other reason fails.
py-guests-if-pypi:
	@if [ -f $(PY_TOOLS) ] || { { [ -x $(VENV)/bin/pip ] || $(PYTHON) -m venv $(VENV); } && \
		$(VENV)/bin/pip install --quiet componentize-py==$(COMPONENTIZE_PY_VERSION); }; then \
		touch $(PY_TOOLS); $(MAKE) --no-print-directory py-guests; \
	else \
		echo "skipping the Python tasks: pip could not install componentize-py==$(COMPONENTIZE_PY_VERSION) (are python3-venv and PyPI there?)"; \
	fi

# The JavaScript tasks: built where npm can
# install the pinned componentize-js; where npm is missing or the registry
# unreachable, said so, and the tests that need them print a skip naming
# `make js-guests`. A build that fails once the tools are in fails.
js-guests-if-npm:
	@if command -v $(NPM) >/dev/null 2>&1 && $(MAKE) --no-print-directory -s $(JS_TOOLS); then \
		$(MAKE) --no-print-directory js-guests; \
	else \
		echo "skipping the JavaScript tasks: npm could not install the componentize-js that js/package.json pins into $(NODE_DIR)/ (is npm installed and its registry reachable?)"; \
	fi

demo: setup guests build py-guests-if-pypi
	$(CARGO) run -q -p wasmq --example demo

# Figures for the closing notes: release build, nothing else running.
bench: setup guests
	$(CARGO) run --release -p wasmq -- bench --local --jobs 200000
	$(CARGO) bench -p wasmq --bench cpu
	$(CARGO) bench -p wasmq --bench compile
	$(CARGO) test --release -p wasmq --test postgres db_jobs_per_second -- --nocapture

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy -p wasmq -p wasmq-guest --all-targets -- -D warnings
	$(CARGO) clippy $(GUEST_FLAGS) -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
