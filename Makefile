# Two commands matter: `make run` (the example service) and `make test` (the whole suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000

# The fault-injection suite runs on PostgreSQL (a database of its own), RabbitMQ and Redis.
FAULTS_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/idempotency_faults

.PHONY: run test lint clean faults soak

$(STAMP): requirements/base.txt requirements/dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements/dev.txt
	@touch $@

run: $(STAMP)  ## the API, the admin and a Celery worker on $(HOST):$(PORT)
	HOST=$(HOST) PORT=$(PORT) bash scripts/run.sh

test: $(STAMP) lint  ## linters, then every test (service tests need DATABASE_URL=postgres://...)
	$(BIN)/pytest

# FAULTS_DB_OUTAGE: seconds the database stays unreachable in scenario 15 (120; less for a quick
# local run). SOAK_EVENTS and SOAK_DB_OUTAGE shrink the soak.
faults: $(STAMP)  ## real workers killed, raced and cut off on RabbitMQ and Redis; writes docs/reliability.md
	DATABASE_URL=$(FAULTS_DATABASE_URL) REQUIRE_SERVICES=1 FAULTS_REPORT=docs/reliability.md \
	  FAULTS_COMMAND="make faults" $(BIN)/pytest -m faults tests/faults

soak: $(STAMP)  ## 10,000 events under kills, a broker restart and a database outage (minutes); its section of docs/reliability.md
	DATABASE_URL=$(FAULTS_DATABASE_URL) REQUIRE_SERVICES=1 FAULTS_REPORT=docs/reliability.md \
	  FAULTS_REPORT_SECTION=soak FAULTS_COMMAND="make soak$(if $(SOAK_EVENTS), SOAK_EVENTS=$(SOAK_EVENTS))" \
	  $(BIN)/pytest -m soak tests/faults

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy idempotency orders project

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

# The purge benchmark needs PostgreSQL; it fills and empties the inbox of the database it is given.
BENCH_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/idempotency_bench

.PHONY: bench
bench: $(STAMP)  ## every benchmark (under 10 minutes): docs/benchmarks.md and .png; ARGS=--quick for a smoke run
	DATABASE_URL=$(BENCH_DATABASE_URL) $(BIN)/python -m bench $(ARGS)

.PHONY: bench-purge
bench-purge: $(STAMP)  ## purge rate, claim latency during a purge, bytes per record (minutes)
	DATABASE_URL=$(BENCH_DATABASE_URL) $(BIN)/python -m bench.purge
