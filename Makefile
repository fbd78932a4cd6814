# Two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_CPU_VERSION ?= 2.13.0
PYTEST_WORKERS ?= 2

.PHONY: setup test clean

setup: $(STAMP)

# Torch goes in first: anything that depends on it would otherwise pull a multi-GB CUDA build
# on a CPU machine. With a CUDA GPU visible the default (CUDA) wheel is the right one.
$(STAMP): pyproject.toml
	@if ! command -v mpicc >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing OpenMPI (needed by mpi4py)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin >/dev/null; \
	  else echo "warning: mpicc not found and not root; install OpenMPI for mpi4py" >&2; fi; \
	fi
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q torch; \
	else \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_CPU_VERSION)"; \
	fi
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q tests

clean:
	rm -rf $(VENV) build *.egg-info
