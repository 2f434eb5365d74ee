# Two commands on a fresh machine: `make run` (the service) and `make test` (the suite).
# Both build the virtual environment first; torch is pinned so that pip takes the local wheel
# where one exists instead of downloading a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[server,quant,dev]'
	touch $@

.PHONY: install run test bench
install: $(BIN)/.installed

run: $(BIN)/.installed
	$(BIN)/llamavid serve

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python bench/model_core.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/cache.py
	$(BIN)/python bench/kv_cache.py
	$(BIN)/python bench/structured.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/fleet.py
