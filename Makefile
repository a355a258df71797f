# One entry point for a newcomer: `make demo` (set up + run the main job), `make test` (set up + run the tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: setup demo test test-fast lint serve bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, the CPU build: anything that depends on torch installed before it would pull the CUDA build.
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[dev]'
	# Prometheus and promtool (Debian's package): the dashboard and alert-rule tests run them for real.
	command -v promtool >/dev/null || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null && \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } || \
	  echo "note: prometheus not installed (needs root and apt-get); the Prometheus-backed tests will skip and say so"
	# Postgres (Debian's package): the Batch API's shared-queue test starts a real server; without it that test fails.
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null && \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; } || \
	  echo "note: postgresql not installed (needs root and apt-get); tests/runtime/test_batch_postgres.py will fail until it is"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/piggyback demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy  # strict, on the packages [tool.mypy] files lists in pyproject.toml
	$(VENV)/bin/hadolint Dockerfile

test: lint
	$(VENV)/bin/pytest -q

# The unit tests only (no processes, servers, Prometheus or long runs): about a minute of CPU, where the whole
# suite takes tens of minutes. CI runs `make test`.
test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/engine_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
