# Two entry points: `make demo` (install + run the quickstart) and `make test` (install + the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: demo test install install-all browser lint bench faults clean

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

# The report test draws the page in a real headless Chromium from the system packages.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium || \
	      { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }; \
	    else echo "chromium not installed and no apt-get as root: the browser test will skip"; fi; }

test: install-all browser
	$(PY) -m pytest -q

faults: install-all
	$(PY) -m pytest -q -m faults

lint: install-all
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: install-all
	$(PY) bench/run_all.py

clean:
	rm -rf runs .pytest_cache
