# The front door. Every target installs what it needs into a local virtualenv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test unit integration sanity proto lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/strata demo

test: $(STAMP)
	bash scripts/system-deps.sh
	$(PY) -m pytest tests $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

proto: $(STAMP)
	$(PY) scripts/genproto.py csi/proto

lint: $(STAMP)
	$(VENV)/bin/ruff check csi tests scripts bench
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) bench/publish.py
	$(PY) bench/unpack.py
	$(PY) bench/pull.py

clean:
	rm -rf $(VENV) .pytest_cache
