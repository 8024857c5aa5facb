# The two commands of the README: `make test` and `make demo`.
# Both create .venv on first use; nothing beyond Python (with headers) and a C compiler is needed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.oobleck-installed
PYTEST_ARGS ?=
NATIVE := $(wildcard native/src/*.c native/src/*.h native/include/*.h) native/build.py native/planner.cdef

.PHONY: test test-fast lint install clean demo

$(PY):
	$(PYTHON) -m venv $(VENV)

# Editable install: compiles native/ into the cffi extension; redone when the C sources or
# the package metadata change.
$(STAMP): $(PY) pyproject.toml setup.py $(NATIVE)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The edit loop: the suite without the multi-process cluster tests (pytest -m "not slow", ~1 min).
test-fast: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# A local cluster (master + 5 agents of 1 CPU slot) trains examples/demo.yaml; one node is
# killed with SIGKILL at step $(DEMO_KILL_AT_STEP) and the job goes on from the templates.
DEMO_KILL_AT_STEP ?= 200
demo: $(STAMP)
	$(VENV)/bin/oobleck-launch --local 5 --config examples/demo.yaml \
		--kill-node-at-step $(DEMO_KILL_AT_STEP) --timeout-s 900

clean:
	rm -rf $(VENV) build *.egg-info native/planner/_native*.so native/planner/_native.c
