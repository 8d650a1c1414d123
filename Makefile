# chunkfold: `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KAFKA := $(BIN)/python deploy/kafka/kafka.py

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml schemas/pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ./schemas -e '.[test,rocksdb,faust]'
	touch $@

install: $(STAMP) ## create the virtualenv and install chunkfold with its test tools

lint: $(STAMP) ## ruff and mypy (strict)
	$(BIN)/ruff check worker schemas tests deploy
	$(BIN)/ruff format --check worker schemas tests deploy
	$(BIN)/mypy

test: $(STAMP) ## everything CI runs: lint, unit, conformance, integration and fault tests (starts Kafka itself)
	$(MAKE) lint
	$(BIN)/pytest -m "not bench" -q

test-fast: $(STAMP) ## unit and conformance tests only (no broker)
	$(BIN)/pytest -m "unit or conformance" -q

reliability: $(STAMP) ## print the README's reliability table from the last fault-test run (make test)
	@$(BIN)/python -m tests.reliability

bench: $(STAMP) ## benchmarks: engine vs openai-python, end to end vs a bare aiokafka pipe
	$(BIN)/python -m tests.bench

kafka-up: $(STAMP) ## start the local single-node Kafka broker (idempotent); prints its address
	@$(KAFKA) up

kafka-down: $(STAMP) ## stop the local Kafka broker
	@$(KAFKA) down

run: $(STAMP) ## broker (unless KAFKA_BOOTSTRAP_SERVERS is set) + worker + demo producer, with live progress
	$(BIN)/python -m tests.demo

clean: ## remove caches and local broker data
	-$(KAFKA) down
	rm -rf .cache .pytest_cache .mypy_cache .ruff_cache build dist

.PHONY: help install lint test test-fast reliability bench kafka-up kafka-down run clean
