PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup test test-unit test-slow demo bench soak soak-overlap clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# one process, no server, not slow (markers: tests/conftest.py); under a minute
test-unit: setup
	$(PY) -m pytest -m "unit and not slow" -p no:cacheprovider $(PYTEST_ARGS)

# tests marked slow (long multi-rank runs); .ci/run runs them after `make test`
test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

demo: setup
	$(PY) examples/demo.py

bench: setup
	$(PY) benchmarks/run_all.py

soak: setup
	$(PY) -m pytest -m soak tests/faults

# the soak with overlapped staging (SOAK_ASYNC also takes staged or true)
soak-overlap: setup
	SOAK_ASYNC=overlap $(PY) -m pytest -m soak tests/faults

clean:
	rm -rf $(VENV) build *.egg-info
