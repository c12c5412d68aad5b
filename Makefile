# make run          - set up .venv (first time) and run the default pipeline (offline demo, CPU)
# make test         - set up .venv (first time) and run the tests (what CI runs)
# make lint         - ruff + mypy
# make system-deps  - the Debian packages some tests need (CI runs it; tests skip without them elsewhere)
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup run test lint clean system-deps
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: setup
	$(PY) run.py --pipeline finetune

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# chromium + chromium-driver: the dashboard test's headless browser; cron: the local orchestrator's scheduler
system-deps:
	$(SUDO) apt-get update -q
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		chromium chromium-driver cron

clean:
	rm -rf outputs assets .pytest_cache .mypy_cache .ruff_cache
