# The two commands of the README: `make demo` and `make test`. Both create the project's virtual
# environment (.venv) on first use, with the versions CI tests (pyproject.toml's lower bounds). On a GPU
# cluster, set TORCH to the CUDA build of the same torch and torchvision, e.g.
#   make venv TORCH="torch==2.14.1+cu128 torchvision==0.29.1+cu128 --extra-index-url <your torch index>"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test lint format demo bench clean

CONSTRAINTS := $(VENV)/constraints.txt

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	# The tested versions: every `name>=X` of pyproject.toml (dependencies and dev) as `name==X`, except
	# torch and torchvision, which TORCH installed above (a GPU cluster's CUDA build).
	$(PY) -c 'import re, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	  reqs = [re.split(r"[;\s]", r)[0] for r in p["dependencies"] + p["optional-dependencies"]["dev"]]; \
	  print("\n".join(r.replace(">=", "==") for r in reqs if re.split("[<>=]", r)[0] not in ("torch", "torchvision")))' \
	  > $(CONSTRAINTS)
	# DeepSpeed is source-only; building it in isolation would pull another torch.
	$(PY) -m pip install -q --no-build-isolation -c $(CONSTRAINTS) -e '.[dev]'
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
