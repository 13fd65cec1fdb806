# `make eval` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup eval test lint

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements-ci.txt
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $(STAMP)

eval: $(STAMP)
	$(VENV)/bin/ats eval
	$(VENV)/bin/ats eval --model reference-cluttered --limit 2000

test: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts
