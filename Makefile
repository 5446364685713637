# Edge Model Agent -- `make test` and `make demo` set up everything they need on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
UV_VERSION := 0.13.8
UV := .tools/uv/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS := --extra cpu --extra openvino --extra tflite --extra build --extra systemd --extra dev
# systemd: systemd-journald for the journald test (not run as PID 1 here).
# nats-server: the broker cluster of tests/test_cluster.py (three nodes the test starts itself).
# chromium: the browser the dashboard's tests drive headless (through Playwright).
DEB_PACKAGES := mosquitto mosquitto-clients libsystemd-dev pkg-config curl systemd nats-server chromium
# Debian's packaging tools and the package's build dependencies: for `make deb`, and for the
# test that builds, lints and installs the package (tests/test_deb.py).
DEB_BUILD_PACKAGES := build-essential debhelper lintian python3-systemd
# make deb FLAVOUR=cpu|openvino|cuda|jetson [DEB_VERSION=...]
FLAVOUR ?= cpu
# Never let uv fetch an interpreter: use the system's.
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(shell command -v $(PYTHON))

.PHONY: test demo docs lint typecheck unit bench sysdeps deb-sysdeps venv deb clean

test: venv lint typecheck unit

sysdeps: SYSDEPS = $(DEB_PACKAGES) $(DEB_BUILD_PACKAGES)
deb-sysdeps: SYSDEPS = $(DEB_BUILD_PACKAGES)
sysdeps deb-sysdeps:
	@missing=""; for p in $(SYSDEPS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get install -y -q --no-install-recommends $$missing >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$missing >/dev/null; }; \
	  else \
	    echo "missing Debian packages:$$missing (run 'sudo make $@')" >&2; exit 1; \
	  fi; \
	fi

$(UV):
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target .tools/uv uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock | $(UV) sysdeps
	$(UV) sync --frozen $(EXTRAS)
	touch $@

venv: sysdeps $(VENV)/.synced

lint: venv
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/ruff format --check agent tests bench

typecheck: venv
	$(VENV)/bin/mypy

# The tests run in TEST_WORKERS processes (pytest-xdist), one module to a worker at a time, so
# a module's fixtures (a broker, a built package) stay in one process; tests/conftest.py puts the
# slowest modules first. TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= 3
unit: venv
	$(VENV)/bin/pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# dist/edge-model-agent_<version>_<arch>.deb (see packaging/README.md)
deb: deb-sysdeps | $(UV)
	packaging/build-deb.sh --flavour $(FLAVOUR) $(if $(DEB_VERSION),--version $(DEB_VERSION))

demo: venv
	bash docs/demo.sh

docs: venv
	$(PY) -m agent.transport.protocol_doc > docs/protocol.md

bench: venv
	$(PY) bench/verify.py
	$(PY) bench/transfer.py
	$(PY) bench/fleet.py
	$(PY) bench/serve.py
	$(PY) bench/swap.py
	$(PY) bench/footprint.py
	$(PY) bench/dashboard.py

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache .hypothesis dist build demo-out
