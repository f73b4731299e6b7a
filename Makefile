# Two commands on a fresh machine: `make demo` (offline pipeline) and `make test`.
VENV ?= .venv
PYTHON ?= python3
EXTRAS ?= dev               # `make install EXTRAS=dev,gpu` on a GPU machine (CUDA from PyPI)
comma := ,
# One stamp per set of extras: `make install EXTRAS=dev,gpu` after `make demo` installs the GPU extra.
STAMP := $(VENV)/.installed-$(subst $(comma),+,$(strip $(EXTRAS)))
# DVC runs each stage's `python ...` through the shell: put the venv first on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: help install data demo test lint ui serve gpu-wheels

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

ui: install  ## MLflow's UI on the project's store (mlflow.db), http://127.0.0.1:5000
	mlflow ui --backend-store-uri sqlite:///mlflow.db

serve: install  ## the registered champion over HTTP on 127.0.0.1:5001 (cxr serve)
	cxr serve

# uv installs the locked set 3x faster than pip (47 s against 152 s from an empty cache on the
# 2-core Intel Xeon, byte code compiled as pip does): the install is part of a newcomer's
# first `make demo`.
UV_VERSION := 0.13.9
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(VENV)/bin/python \
		-c requirements.lock -e ".[$(strip $(EXTRAS))]"
	touch $@

install: $(STAMP)  ## the locked environment in .venv (uv)

# git keeps no empty folder: make data/ (the user's own images, tracked by data.dvc) and put
# its (empty) listing in the DVC cache, which `dvc exp run --temp` checks out from.
data: install  ## the empty data/ folder that data.dvc tracks (your own images go there)
	mkdir -p data
	dvc commit -f -q data.dvc

demo: data  ## the whole pipeline offline on synthetic phantoms (cxr demo)
	cxr demo

# Two pytest workers (pytest-xdist, a test file per worker at a time; tests/conftest.py): an
# end-to-end test keeps one core busy (process start-ups, DVC, MLflow), so two fill the 2-core
# CI machine (memory in use peaked at 9.8 GiB). More workers want about 4.5 GiB each:
# `make test TEST_WORKERS=4`.
TEST_WORKERS ?= 2
PYTEST := pytest -n $(TEST_WORKERS) --dist loadfile
# Then the training, evaluation and serving tests again on Keras' JAX backend (unit level;
# each pytest run prints its time).
JAX_TESTS := tests/test_augment.py tests/test_backends.py tests/test_fit.py \
	tests/test_checkpoint.py tests/test_models.py tests/test_serving.py
test: data  ## the tests, as CI runs them
	$(PYTEST)
	KERAS_BACKEND=jax $(PYTEST) -m "not e2e" $(JAX_TESTS)

lint: install  ## ruff
	ruff check .
	ruff format --check .

# Wheels that benchmarks/gpu_check.py needs on a GPU machine without TensorFlow (Python 3.12, JAX with CUDA,
# no Keras): Keras and what it imports that such a machine may lack, at the locked versions.
gpu-wheels: install  ## wheels for benchmarks/gpu_check.py on a GPU machine (docs/benchmarks.md)
	$(VENV)/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -c requirements.lock \
		-d .gpu-wheels keras namex optree pyyaml typing_extensions rich markdown-it-py mdurl \
		pygments absl-py
