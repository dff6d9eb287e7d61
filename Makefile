# The two commands of the README: `make run` and `make test`. Both set up everything they need.
VENV   := .venv
PY     := $(VENV)/bin/python
BROKER := $(VENV)/bin/broker

.PHONY: install run test lint unit services bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Migrates the database, then starts the broker with the embedded defaults (SQLite, in-process queue).
run: install
	$(BROKER) db upgrade
	BROKER_LOG_FORMAT=$${BROKER_LOG_FORMAT:-console} $(BROKER) run

# Starts PostgreSQL and Redis where they are not running, then lint, types and every test.
test: install services lint
	$(PY) -m pytest -q -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check broker workers tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

unit: install
	$(PY) -m pytest -q tests/unit

services:
	bash tests/ensure_services.sh

bench: install services
	$(PY) bench/hl7_throughput.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
