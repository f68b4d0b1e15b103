# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create and reuse a local virtualenv in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test fuzz lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "benchsync needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/benchsync demo --nodes 3

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

# Full-count fuzzing (>= 10,000 inputs per decoder); the default test run fuzzes fewer.
fuzz: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m fuzz $(FUZZ_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check benchsync storage protocol daemon tests bench
	$(BIN)/mypy benchsync storage protocol daemon

bench: $(BIN)/.installed
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
