# Two commands for a new developer: `make run` and `make test`.
# Both create .venv and install the pinned dependencies on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run test lint format clean

$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $@

install: $(BIN)/.installed

# The server (started the way the container starts it) on the embedded defaults (SQLite file, in-process state, offline
# storyteller) unless DATABASE_URL / REDIS_URL / provider keys are set.
run: install
	HOST=$(HOST) PORT=$(PORT) $(BIN)/python -m app

# Unit, integration and chaos tests. Tests needing Redis (127.0.0.1:6379) or
# PostgreSQL (127.0.0.1:5432) skip with the reason when those are absent,
# except under CI=true, where their absence fails the run.
test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
