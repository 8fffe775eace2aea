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

.PHONY: up test install install-test prometheus lint typecheck pytest clean compose-env

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
install-test: $(VENV)/.installed-test prometheus

# Debian's prometheus package for tests/test_prometheus.py, when apt-get can install it as root
# (its service neither started nor enabled); otherwise the reason goes to
# $(VENV)/prometheus-unavailable.txt and that test skips with it. Never fails; quick once
# prometheus is on PATH.
prometheus: $(BIN)/python
	@tools/install-prometheus.sh $(VENV)/prometheus-unavailable.txt

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

# docker compose reads .env: generated passwords for NATS (one per role of
# aegaeon/bus_permissions.py), Redis and Grafana. Passwords already there are kept; missing
# ones are added (an .env of an older version gains the per-role NATS passwords).
compose-env:
	@umask 077; $(PYTHON) -c "import pathlib, secrets, sys; env = pathlib.Path('.env'); text = env.read_text() if env.exists() else ''; have = {line.split('=', 1)[0] for line in text.splitlines()}; new = [f'{k}={secrets.token_hex(16)}\\n' for k in sys.argv[1:] if k not in have]; text = text if not text or text.endswith('\\n') else text + '\\n'; env.write_text(text + ''.join(new)); print(f'.env: wrote {len(new)} generated passwords (0600)' if new else '.env exists: kept')" \
		AEGAEON_NATS_GATEWAY_PASSWORD AEGAEON_NATS_SCHEDULER_PASSWORD AEGAEON_NATS_WORKER_PASSWORD \
		AEGAEON_NATS_MODEL_STORE_PASSWORD AEGAEON_NATS_OBSERVER_PASSWORD \
		AEGAEON_REDIS_PASSWORD GRAFANA_ADMIN_PASSWORD
