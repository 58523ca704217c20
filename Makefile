# Two commands matter: `make run` (the example service) and `make test` (the whole suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: run test lint clean

$(STAMP): requirements/base.txt requirements/dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements/dev.txt
	@touch $@

run: $(STAMP)  ## the API, the admin and a Celery worker on $(HOST):$(PORT)
	HOST=$(HOST) PORT=$(PORT) bash scripts/run.sh

test: $(STAMP) lint  ## linters, then every test (service tests need DATABASE_URL=postgres://...)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy idempotency orders project

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
