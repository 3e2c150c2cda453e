# Two entry points, each sets itself up first, in either order:
#   make demo   the main job: prepare the default corpus if needed, train the tiny model on Ray
#   make test   lint, then the whole test suite (fast unit tests + slow end-to-end runs on a real local Ray)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# On a machine without an NVIDIA GPU, take the CPU build of torch from local disk first;
# otherwise the package's torch range lets pip choose the (CUDA) build.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo torch==2.13.0)

.PHONY: setup demo tune lint test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH))
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,plots,optuna,hf,lmeval,mlflow,wandb]'
	# mup, the µP reference tests/test_mup.py checks against, without its declared torchvision and
	# seaborn (it needs neither for what is checked; torchvision would pull another torch build)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps mup==1.0.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raygpt train --config jobs/pretrain.yaml

tune: $(STAMP)
	$(VENV)/bin/raygpt tune --config jobs/tune.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(VENV)/bin/raygpt bench --preset tiny
	$(VENV)/bin/raygpt bench prepare

clean:
	rm -rf $(VENV) data runs *.egg-info
