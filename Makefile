# Two entry points: `make demo` (install + run the quickstart) and `make test` (install + the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: demo test install install-all lint bench faults clean

$(VENV)/.core: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt "setuptools<81" wheel
	$(PIP) install -c constraints.txt -e .
	touch $@

$(VENV)/.all: $(VENV)/.core
	$(PIP) install -c constraints.txt -e ".[all,dev]"
	touch $@

install: $(VENV)/.core
install-all: $(VENV)/.all

demo: install
	$(VENV)/bin/facefoundry run examples/quickstart.yaml --output runs/quickstart

test: install-all
	$(PY) -m pytest -q

faults: install-all
	$(PY) -m pytest -q -m faults

lint: install-all
	$(VENV)/bin/ruff check .

bench: install-all
	$(PY) bench/run_all.py

clean:
	rm -rf runs .pytest_cache
