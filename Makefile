# The two commands of the README:
#   make up    — install into .venv and run the whole system on embedded defaults
#   make test  — install what the tests need, lint, type-check and run the suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch; on a CUDA host use e.g. `make up TORCH=torch==2.13.0 DEVICE=cuda`
# with pip's default index (PyPI's torch wheels are CUDA builds).
TORCH  ?= torch==2.13.0
DEVICE ?= cpu
ARGS   ?=

.PHONY: up test install install-test lint typecheck pytest clean compose-env

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

up: install
	$(BIN)/aegaeon up --device $(DEVICE) $(ARGS)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install-test
	$(BIN)/python tools/typecheck.py

pytest: install-test
	$(BIN)/pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) build dist .mypy_tree

# docker compose reads .env: generated passwords for NATS, Redis and Grafana (kept if present).
compose-env:
	@test -e .env && echo ".env exists: kept" || ( umask 077; $(PYTHON) -c "import secrets; print('\\n'.join(f'{k}={secrets.token_hex(16)}' for k in ('AEGAEON_NATS_PASSWORD', 'AEGAEON_REDIS_PASSWORD', 'GRAFANA_ADMIN_PASSWORD')))" > .env && echo "wrote .env (0600)" )
