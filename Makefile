# Set-up on a fresh machine: `make demo` runs the example flows on the bundled demo API,
# `make test` runs the checks and the tests. Both create the virtual environment first.
VENV   := .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-api test test-airflow lint typecheck validate bench dist dist-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# A venv made before the distribution was renamed has it installed as `runner`.
	$(BIN)/pip uninstall --quiet --yes runner 2>/dev/null || true
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

# The demo API alone, on a fixed port, for running the example flows by hand.
demo-api: $(STAMP)
	$(BIN)/python -m runner.demo_api --port 8787

lint: $(STAMP)
	$(BIN)/ruff check runner tests benchmarks deploy
	$(BIN)/ruff format --check runner tests benchmarks deploy

typecheck: $(STAMP)
	$(BIN)/mypy runner

validate: $(STAMP)
	$(BIN)/runner validate flows examples

# The example flows' own offline tests (flows/tests/) first: a broken example fails here.
test: lint typecheck validate
	$(BIN)/runner test flows examples
	$(BIN)/python -m pytest -q

# The Airflow DAG of deploy/airflow imported and run by Airflow itself, in a venv of its own
# (Airflow pins much of what it installs; `make test` runs the same file against a stand-in).
# The warning ignored is Airflow's own: its subprocess hook leaves a pipe to the collector.
AIRFLOW_VENV    := .venv-airflow
AIRFLOW_VERSION ?= 2.10.5

$(AIRFLOW_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/pip install --quiet 'apache-airflow==$(AIRFLOW_VERSION)'
	$(AIRFLOW_VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

test-airflow: $(AIRFLOW_VENV)/.installed
	AIRFLOW_HOME=$$(mktemp -d) $(AIRFLOW_VENV)/bin/python -m pytest -q -p no:cacheprovider \
	  -W 'ignore::pytest.PytestUnraisableExceptionWarning' tests/test_deploy.py

bench: $(STAMP)
	bash benchmarks/run.sh

# The sdist and the wheel for PyPI (distribution runner-flows), checked by twine.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist
	$(BIN)/twine check --strict dist/*

# Builds both, checks them, installs each into a fresh venv and runs `runner --version` there
# (the same test runs in `make test`).
dist-check: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_packaging.py

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) out build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
