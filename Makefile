# Two commands do everything on a fresh clone:
#   make demo   create .venv, install the project, run the embedded default (tiny model, CPU)
#   make test   the same install plus the web apps' extra (.[dev,app]) if needed, then the test suite (CI runs exactly this)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APP_STAMP := $(VENV)/.installed-app

.PHONY: install demo test test-slow lint clean

install: $(STAMP)

# Re-installs when pyproject.toml changes. torch/torchvision are pinned in pyproject.toml.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

# The study and demo web apps' extra (Flask) on top: `make test` needs it, `make demo` stays as lean as the core.
$(APP_STAMP): $(STAMP)
	$(PY) -m pip install -e ".[dev,app]"
	touch $(APP_STAMP)

demo: $(STAMP)
	$(PY) run.py

# The import layers (pyproject.toml [tool.importlinter], docs/ARCHITECTURE.md) first, then the suite.
# pytest exits 5 when it collects no test: reported and kept as a failure, never a silent pass.
test: $(APP_STAMP)
	$(VENV)/bin/lint-imports
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

test-slow: $(APP_STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check stem run.py scripts tests
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
