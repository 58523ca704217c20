# Two commands matter: `make run` (the example service) and `make test` (the whole suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000

# The fault-injection suite runs on PostgreSQL (a database of its own), RabbitMQ and Redis.
FAULTS_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/idempotency_faults

.PHONY: run test lint clean faults soak dist nox docs conformance

$(STAMP): requirements/base.txt requirements/test.txt requirements/dev.txt requirements/docs.txt
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
	  FAULTS_REPORT_MERGE=0 FAULTS_COMMAND="make faults" $(BIN)/pytest -m faults tests/faults

soak: $(STAMP)  ## 10,000 events under kills, a broker restart and a database outage (minutes); its section of docs/reliability.md
	DATABASE_URL=$(FAULTS_DATABASE_URL) REQUIRE_SERVICES=1 FAULTS_REPORT=docs/reliability.md \
	  FAULTS_REPORT_SECTION=soak FAULTS_COMMAND="make soak$(if $(SOAK_EVENTS), SOAK_EVENTS=$(SOAK_EVENTS))" \
	  $(BIN)/pytest -m soak tests/faults

docs: $(STAMP)  ## the documentation site into var/site/ (strict: a broken link fails)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy idempotency orders project

# The wheel (the app only) and the sdist (the app, the whole test suite and the example project)
# in dist/, checked as the package index will render them.
dist: $(STAMP)  ## build the wheel and the sdist into dist/ and check them with twine
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist .
	$(BIN)/twine check --strict dist/*

# Every (Python, Django) pair of docs/versions.md on SQLite and PostgreSQL; ARGS='-t ci' for
# the oldest and the newest only, ARGS='-s mariadb' for MariaDB.
NOX_POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/idempotency
nox: $(STAMP)  ## the version matrix (about 5 minutes per database of a session)
	NOX_POSTGRES_URL=$(NOX_POSTGRES_URL) $(BIN)/nox $(ARGS)

# schemathesis (every check, bounded examples, a fixed seed) against gunicorn on PostgreSQL.
conformance: $(STAMP)  ## the API against its OpenAPI schema, live (about 30 s); CONFORMANCE_SEED, CONFORMANCE_EXAMPLES
	REQUIRE_SERVICES=1 $(BIN)/pytest -m conformance -s tests/conformance

clean:
	rm -rf $(VENV) var dist .nox .pytest_cache .mypy_cache .ruff_cache

# The purge benchmark needs PostgreSQL; it fills and empties the inbox of the database it is given.
# A DATABASE_URL naming a database whose name ends in _bench is used as it is (the benchmarks
# drop and create it afresh, so they never touch another). BENCH_AMQP_URL and BENCH_REDIS_URL
# name the brokers (bench/celery_e2e.py).
BENCH_DATABASE_URL ?= $(if $(filter %_bench,$(DATABASE_URL)),$(DATABASE_URL),postgres://postgres@127.0.0.1:5432/idempotency_bench)

.PHONY: bench
bench: $(STAMP)  ## every benchmark (the scale and steady sections add about 10 minutes): docs/benchmarks.md, .png, steady.png; ARGS=--quick for a smoke run
	DATABASE_URL=$(BENCH_DATABASE_URL) $(BIN)/python -m bench $(ARGS)

.PHONY: bench-purge
bench-purge: $(STAMP)  ## purge rate, claim latency during a purge, bytes per record (minutes)
	DATABASE_URL=$(BENCH_DATABASE_URL) $(BIN)/python -m bench.purge
