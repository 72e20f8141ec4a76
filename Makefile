# llamagate — `make run` serves, `make test` tests; both set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CUDA ?= 0
LLAMA_SERVER := $(shell CUDA=$(CUDA) bash scripts/build_llama_server.sh --print-path)
DATA_DIR ?= ./data
PYTEST_ARGS ?=

export LLAMA_SERVER_PATH ?= $(LLAMA_SERVER)
export DATA_DIR

.PHONY: help setup native run test bench lint typecheck llama-server test-model docker docker-cpu clean lock

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

# the locked versions, each checked against its hash, then the project itself (--no-deps: an
# editable directory cannot be hash-checked); `make lock` rewrites the locks from pyproject.toml
$(STAMP): pyproject.toml requirements.lock requirements-dev.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

lock: ## rewrite requirements.lock (runtime) and requirements-dev.lock (tests, tools) with hashes
	bash scripts/lock.sh

# the request path compiled with mypyc; the script compares its digest of the sources with the
# build's, so it runs every time (a new, edited or deleted module rebuilds) and returns at once
# when nothing changed; where it cannot compile it warns, once per version of the sources
native: $(STAMP) ## compile the request path with mypyc into .build/native (scripts/build_native.py)
	@$(PY) scripts/build_native.py

$(LLAMA_SERVER):
	CUDA=$(CUDA) PYTHON=$(PY) bash scripts/build_llama_server.sh

setup: $(STAMP) native $(LLAMA_SERVER) ## virtualenv, dependencies, compiled request path, llama-server (cached)

llama-server: $(LLAMA_SERVER) ## build llama-server (CUDA=1 for GPU) into ~/.cache/llamagate
	@echo $(LLAMA_SERVER)

test-model: $(STAMP) ## write the tiny demo/test model to $(DATA_DIR)/demo/llamagate-tiny.gguf
	$(PY) scripts/make_test_model.py $(DATA_DIR)/demo/llamagate-tiny.gguf

run: setup ## serve on :8000 (health on :8001); .env is read when present
	@set -a; [ -f .env ] && . ./.env; set +a; exec $(VENV)/bin/llamagate serve

test: setup ## the whole suite against a real llama-server
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup ## gateway overhead vs direct llama-server (scripts/benchmark.py)
	$(PY) scripts/benchmark.py

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .

typecheck: $(STAMP) ## mypy
	$(VENV)/bin/mypy core fleet llamagate gateway health backend keys scripts tests

docker: ## CUDA image
	docker build -t llamagate:cuda -f Dockerfile .

docker-cpu: ## CPU image
	docker build -t llamagate:cpu -f docker/Dockerfile.cpu .

clean: ## remove the virtualenv and caches (not the llama-server cache)
	rm -rf $(VENV) .build .pytest_cache .mypy_cache .ruff_cache *.egg-info
