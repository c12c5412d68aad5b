# make run   - set up .venv (first time) and run the default pipeline (offline demo, CPU)
# make test  - set up .venv (first time) and run the tests (what CI runs)
# make lint  - ruff + mypy
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test lint clean
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

clean:
	rm -rf outputs assets .pytest_cache .mypy_cache .ruff_cache
