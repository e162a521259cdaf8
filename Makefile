# make train | make test | make bench — each sets the environment up on first use.
# VENV=path puts the virtualenv elsewhere (CI shares one, keyed by the hash of constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_HASH := $(shell cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)
DEPS_STAMP := $(VENV)/.deps-$(DEPS_HASH)

.PHONY: setup train test test-fast bench lint clean

setup: $(DEPS_STAMP)
	@# the package itself is installed editable from this checkout (a shared venv may have pointed elsewhere);
	@# checked from / so that the checkout on the path of `python -c` does not answer for the install
	@(cd / && $(abspath $(PY)) -c "import autoglm_train, pathlib, sys; sys.exit(pathlib.Path(autoglm_train.__file__).parent.parent != pathlib.Path('$(CURDIR)'))") 2>/dev/null \
		|| $(PY) -m pip install -q --no-deps --no-build-isolation -e .

$(DEPS_STAMP): constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.deps-*
	touch $@

train: setup
	$(PY) -m autoglm_train $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) bench/step_overhead.py

lint: setup
	$(PY) -m ruff check autoglm_train tests bench
	$(PY) -m ruff format --check autoglm_train tests bench

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache
