# Set-up on a fresh machine: `make demo` runs the example flows on the bundled demo API,
# `make test` runs the checks and the tests. Both create the virtual environment first.
VENV   := .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-api test lint typecheck validate bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,fast]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

# The demo API alone, on a fixed port, for running the example flows by hand.
demo-api: $(STAMP)
	$(BIN)/python -m runner.demo_api --port 8787

lint: $(STAMP)
	$(BIN)/ruff check runner tests benchmarks
	$(BIN)/ruff format --check runner tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy runner

validate: $(STAMP)
	$(BIN)/runner validate flows

# The example flows' own offline tests (flows/tests/) first: a broken example fails here.
test: lint typecheck validate
	$(BIN)/runner test flows
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	bash benchmarks/run.sh

clean:
	rm -rf $(VENV) out build *.egg-info .pytest_cache .mypy_cache .ruff_cache
