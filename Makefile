# `make demo` and `make test` each set up the virtual environment they need (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sonocl demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# The formatter, the linter and the type checker (pyproject.toml [tool.ruff], [tool.mypy]); .ci/run runs this before
# the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
