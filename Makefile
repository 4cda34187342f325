# Two entry points (see README): `make demo` runs the main job, `make test` the whole test suite.
# Each creates the virtual environment it needs on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench-quality clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/captioning demo --out runs/demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest tests -n 2 --dist loadgroup --durations=15

bench-quality: $(VENV)/.installed
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf $(VENV) runs .pytest_cache
