# FetchML: `make run` starts the embedded system, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 9101
WORKERS ?= 1

.PHONY: run test test-sqlite test-postgres lint format migrate clean

$(VENV)/bin/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "FetchML needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.base-installed: requirements/base.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements/base.txt
	touch $@

# `make run` starts a local worker too, so it installs what a worker needs (Jupyter for services).
$(VENV)/.worker-installed: requirements/base.txt requirements/worker.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements/worker.txt
	touch $(VENV)/.base-installed $@

$(VENV)/.dev-installed: requirements/base.txt requirements/worker.txt requirements/dev.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements/dev.txt
	touch $(VENV)/.base-installed $(VENV)/.worker-installed $@

migrate: $(VENV)/.base-installed
	$(PY) manage.py migrate --noinput

run: migrate $(VENV)/.worker-installed
	$(PY) manage.py bootstrap_local
	$(PY) manage.py serve --host $(HOST) --port $(PORT) --workers $(WORKERS)

# The whole suite on SQLite; with DATABASE_URL set, on PostgreSQL + Redis as well. The two runs go
# side by side (much of each is waiting on servers and child processes), each one's report printed
# once both have ended; the target fails if either does.
test: $(VENV)/.dev-installed
	@if [ -z "$$DATABASE_URL" ]; then exec env -u REDIS_URL $(PY) -m pytest $(PYTEST_ARGS); fi; \
	reports=$$(mktemp -d); \
	echo "--- on SQLite, and on PostgreSQL ($${DATABASE_URL%%@*}@...) + Redis ($${REDIS_URL:-none}) beside it"; \
	env -u DATABASE_URL -u REDIS_URL $(PY) -m pytest $(PYTEST_ARGS) >$$reports/sqlite 2>&1 & sqlite=$$!; \
	DJANGO_SECRET_KEY=$${DJANGO_SECRET_KEY:-test-only-secret} $(PY) -m pytest $(PYTEST_ARGS) >$$reports/postgresql 2>&1 & postgresql=$$!; \
	wait $$sqlite; sqlite_status=$$?; wait $$postgresql; postgresql_status=$$?; \
	echo "--- on SQLite (exit status $$sqlite_status)"; cat $$reports/sqlite; \
	echo "--- on PostgreSQL + Redis (exit status $$postgresql_status)"; cat $$reports/postgresql; \
	rm -rf $$reports; \
	[ $$sqlite_status -eq 0 ] && [ $$postgresql_status -eq 0 ]

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.dev-installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
