# `make eval` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup eval eval-full test test-slow lint wheel-check test-transformers4

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements-ci.txt
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $(STAMP)

# The default table (the paper's six configs, the recommended setting, its peer) on the first 1,000 test images
# and on the first 200 cluttered canvases; throughput timed on 32 of them. eval-full: every image, throughput on
# 64 (docs/results.md).
EVAL_LIMIT := 1000
CLUTTERED_LIMIT := 200
TIMING_IMAGES := 32

eval: $(STAMP)
	$(VENV)/bin/ats eval --limit $(EVAL_LIMIT) --repeats 3 --timing-images $(TIMING_IMAGES)
	$(VENV)/bin/ats eval --model reference-cluttered --limit $(CLUTTERED_LIMIT) --repeats 3 --timing-images $(TIMING_IMAGES)

eval-full: $(STAMP)
	$(VENV)/bin/ats eval --repeats 3
	$(VENV)/bin/ats eval --model reference-cluttered --repeats 3

# make test leaves out the tests marked slow (training runs, torch.compile, runs over several processes, long
# sweeps); make test-slow runs them, and CI (.ci/run) runs both.
test: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -n 2 -m "not slow"

test-slow: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -n 2 -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts

# Build the wheel, install it into a fresh virtual environment and run the commands from there (CI runs it).
WHEEL_VENV := build/wheel-venv
wheel-check: $(STAMP)
	rm -rf dist build
	$(VENV)/bin/pip wheel --quiet --no-deps -w dist .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install --quiet -c requirements-ci.txt "$$(ls dist/ats_vit-*.whl)[hf,onnx]"
	cd build && wheel-venv/bin/ats eval --limit 8 --repeats 1
	cd build && wheel-venv/bin/ats bench --model deit_tiny_patch16_224 --batch-size 2 --repeats 1
	cd build && wheel-venv/bin/ats export --onnx reference.onnx --multi-stage 0.7 --static --kept-tokens

# The Hugging Face adapters under transformers 4.x (CI runs it after make test): a second virtual environment with
# requirements-ci.txt's pins but requirements-transformers4.txt's transformers; the adapters' test files, and the
# compatibility tests of their families but torch.compile's (6 minutes here; make test runs them under 5.x).
VENV4 := .venv-transformers4
STAMP4 := $(VENV4)/.installed
HF_TESTS := tests/test_patch_hf.py tests/test_patch_hf_images.py tests/test_patch_hf_siglip2.py tests/test_patch_hf_video.py tests/test_patch_cvt.py

$(STAMP4): pyproject.toml requirements-ci.txt requirements-transformers4.txt
	$(PYTHON) -m venv $(VENV4)
	sed '/^transformers==/d' requirements-ci.txt | $(VENV4)/bin/pip install --quiet -r /dev/stdin \
		-r requirements-transformers4.txt
	$(VENV4)/bin/pip install --quiet --no-deps -e .
	touch $(STAMP4)

test-transformers4: $(STAMP4)
	$(VENV4)/bin/python -m pytest -q $(HF_TESTS)
	$(VENV4)/bin/python -m pytest -q tests/test_compatibility.py -k "not timm and not compile"
