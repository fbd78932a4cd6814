# Two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The tested versions of every package (constraints.txt, written by `make lock`); torch's version
# comes from there too.
CONSTRAINTS := constraints.txt
TORCH_VERSION ?= $(shell sed -n 's/^torch==//p' $(CONSTRAINTS))
PYTEST_WORKERS ?= 2
# DeepSpeed JIT-builds a small C++ op at the first process group of every run; keep the build with
# the venv, so two checkouts on one machine do not rebuild it for each other (torch's default cache
# is per user and keyed by name only).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

# CPU launches go through the tuned allocator (tcmalloc / jemalloc / glibc settings; it says
# which on stderr). SCTD_ALLOCATOR=system runs them with the plain system allocator.
ALLOC = $(BIN)/python -m sctd_dist.allocator --

# Demo: ranks = visible GPUs, or 2 CPU processes.
DEMO_DIR ?= runs/demo
DEMO_RANKS ?= $(shell n=$$(nvidia-smi -L 2>/dev/null | wc -l); [ "$$n" -gt 0 ] && echo $$n || echo 2)
DEMO_CONFIG ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo ds_configs/zero2_bf16.json || echo ds_configs/cpu_tiny.json)
DEMO_PORT ?= $(shell $(PY) -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")

.PHONY: setup test demo bench quality clean docker lock

setup: $(STAMP)

# Torch goes in first, at constraints.txt's version: anything that depends on it would otherwise
# pull a multi-GB CUDA build on a CPU machine (here the CPU wheel comes from the local wheel
# folder). With a CUDA GPU visible the default (CUDA) wheel of that version is the right one.
# Everything else installs at the versions of constraints.txt; pyproject.toml keeps ranges.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@if ! command -v mpicc >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing OpenMPI (needed by mpi4py)"; \
	    { timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq libopenmpi-dev openmpi-bin >/dev/null; } \
	      || echo "warning: could not install OpenMPI (no package mirror?); mpirun launches need it, everything else runs without" >&2; \
	  else echo "warning: mpicc not found and not root; install OpenMPI for mpi4py" >&2; fi; \
	fi
	@# A tuned CPU allocator (sctd_dist/allocator.py); training still runs without it.
	@if ! ldconfig -p 2>/dev/null | grep -q -e libtcmalloc_minimal.so.4 -e libjemalloc.so.2; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing tcmalloc (tuned CPU allocator)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; } \
	      || echo "warning: could not install libtcmalloc-minimal4; glibc malloc settings will be used" >&2; \
	  else echo "note: no tcmalloc/jemalloc and not root; glibc malloc settings will be used" >&2; fi; \
	fi
	@# A real SLURM cluster on this machine for tests/launchers/test_slurm_cluster.py.
	@if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing slurm-wlm and munge (the real-cluster tests)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; \
	  else echo "warning: slurm-wlm/munge missing and not root with apt-get: the real-cluster tests will fail; install slurm-wlm and munge" >&2; fi; \
	fi
	@# `ip`, to bring up loopback in the network namespace of tests/benchmarks/test_gpu_offline_install.py.
	@if ! command -v ip >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing iproute2 (the offline-install test)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null; \
	  else echo "warning: ip (iproute2) missing and not root with apt-get: the offline-install test will fail; install iproute2" >&2; fi; \
	fi
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[test,bench]"
	touch $(STAMP)

# Rewrites constraints.txt from the venv after a deliberate upgrade (pip install -U ... into .venv,
# then `make test`): the exact versions CI, the Docker images and the SLURM instructions install.
# torch's local build label (+cpu) is dropped so that CUDA builds of the same version match.
lock:
	{ echo "# Tested versions (Python 3.11, CPU CI). Written by \`make lock\` from the venv; install with"; \
	  echo "# pip install -c constraints.txt -e '.[test,bench]' (torch first: see the Makefile)."; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } >$(CONSTRAINTS)

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q tests

# A real (tiny) ScTD pretraining job on the embedded sample corpus: train, checkpoint, export.
demo: setup
	rm -rf $(DEMO_DIR)
	OMP_NUM_THREADS=1 $(ALLOC) $(BIN)/deepspeed --num_gpus $(DEMO_RANKS) --master_port $(DEMO_PORT) \
	  sctd_dist/train.py --deepspeed_config $(DEMO_CONFIG) --model tiny --seq-length 128 \
	  --token-drop sctd --train-iters 200 --eval-interval 50 --eval-iters 4 \
	  --save $(DEMO_DIR)/checkpoints --save-interval 50 --log-dir $(DEMO_DIR)/logs
	$(BIN)/python -m sctd_dist.export --checkpoint $(DEMO_DIR)/checkpoints --out $(DEMO_DIR)/hf
	@echo
	@echo "demo done:"
	@echo "  metrics      $(DEMO_DIR)/logs/metrics.jsonl (TensorBoard: $(DEMO_DIR)/logs/tensorboard)"
	@echo "  checkpoints  $(DEMO_DIR)/checkpoints (restart: run the same command; it resumes)"
	@echo "  Hugging Face $(DEMO_DIR)/hf (transformers.BertForMaskedLM.from_pretrained)"

# Every CPU benchmark in one run (about 30 minutes on 2 cores), then one markdown page from
# the results: benchmarks/results/RESULTS.md. One thread per process where a script times arms
# side by side: the least load-sensitive setting on a small machine. train_vs_hf.py and
# allocator.py start their own processes with the allocator each arm needs.
bench: setup
	$(ALLOC) $(BIN)/python benchmarks/token_drop.py --threads 1 --layers 12 --repeats 3
	$(ALLOC) $(BIN)/python benchmarks/convergence.py --threads 2 --budget-s 100 --no-progress
	$(ALLOC) $(BIN)/python benchmarks/scaling.py
	$(ALLOC) $(BIN)/python benchmarks/zero_stages.py --steps 6
	$(ALLOC) $(BIN)/python benchmarks/model_step.py --threads 1 --repeats 5 --compile
	$(ALLOC) $(BIN)/python benchmarks/data_pipeline.py --repeats 2
	$(BIN)/python benchmarks/train_vs_hf.py --rounds 3
	$(BIN)/python benchmarks/allocator.py --rounds 3
	$(BIN)/python benchmarks/report.py

# The time-to-quality study (about an hour on 2 cores; not part of `make bench`): baseline, vanilla
# and ScTD pretrained from the same weights at an equal wall-clock budget, 3 seeds, fine-tuned on
# the offline suite; then RESULTS.md. One thread: the least load-sensitive setting on a shared box.
quality: setup
	$(BIN)/python benchmarks/quality.py --threads 1 --no-progress
	$(BIN)/python benchmarks/report.py

clean:
	rm -rf $(VENV) build *.egg-info

# Container image: the GPU image by default; `make docker DOCKERFILE=docker/Dockerfile.cpu
# IMAGE=sctd-dist:cpu` for the CPU one. BASE_IMAGE (GPU) picks another NGC PyTorch tag.
DOCKER ?= docker
DOCKERFILE ?= docker/Dockerfile
IMAGE ?= sctd-dist:latest
BASE_IMAGE ?=
docker:
	$(DOCKER) build -f $(DOCKERFILE) -t $(IMAGE) $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) .
