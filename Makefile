# `make eval` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup eval test lint wheel-check

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

# Build the wheel, install it into a fresh virtual environment and run the commands from there (CI runs it).
WHEEL_VENV := build/wheel-venv
wheel-check: $(STAMP)
	rm -rf dist build
	$(VENV)/bin/pip wheel --quiet --no-deps -w dist .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install --quiet -c requirements-ci.txt "$$(ls dist/ats_vit-*.whl)[hf]"
	cd build && wheel-venv/bin/ats eval --limit 8 --repeats 1
	cd build && wheel-venv/bin/ats bench --model deit_tiny_patch16_224 --batch-size 2 --repeats 1
