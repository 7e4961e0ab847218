# `make demo` runs the main job on the embedded synthetic data; `make test` runs the tests.
# Both create .venv and install the project on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo lint test test-slow test-unit test-integration clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

# the demo's temporary Prefect server sends no usage telemetry (its heartbeat also races the sqlite db)
demo: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/instseg flow run --config configs/demo.yaml

# `make test` keeps under 30 minutes on 2 cores; the longest end-to-end checks (marker `slow`) run in
# `make test-slow`, and .ci/run runs both
# formatting and lint (settings in pyproject.toml: 120 columns, sorted imports); `make test` runs it first
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -ra --durations=20 -m "not slow" tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -ra --durations=10 -m slow tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -ra tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest -ra tests/integration

clean:
	rm -rf data/synth mlflow.db mlartifacts ray_results
