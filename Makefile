# The two commands of the README: `make demo` and `make test`. Both create the project's virtual
# environment (.venv) on first use. On a GPU cluster, set TORCH to the CUDA build you want, e.g.
#   make venv TORCH="torch==2.8.0 torchvision==0.23.0"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test lint format demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	# DeepSpeed is source-only; building it in isolation would pull another torch.
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo: $(STAMP)
	$(VENV)/bin/ldit demo configs/demo/default.yaml

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
