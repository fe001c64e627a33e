# The front door. Every target installs what it needs into a local virtualenv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test unit integration sanity crash need-root system-deps proto lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/strata demo

# Test tiers. unit is pure logic and runs as any user. integration (real overlay and bind
# mounts, mknod, lchown, trusted.* xattrs, a real `strata serve`, a local registry; with it
# tests/backend, the conformance suite every storage backend must pass) and
# sanity (csi-sanity against `strata serve`) need root and the Debian packages of
# scripts/system-deps.sh (installed first: they include python3-venv); as anyone else
# their tests would only skip, so they refuse instead. test runs all three.
test: system-deps $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: system-deps $(STAMP)
	$(PY) -m pytest tests/integration tests/backend $(PYTEST_ARGS)

sanity: system-deps $(STAMP)
	$(PY) -m pytest tests/sanity $(PYTEST_ARGS)

# The kill -9 loop of tests/integration/test_crash.py at full length (make test runs a
# short one): CRASH_ROUNDS rounds; STRATA_CRASH_SEED=N replays a run, and
# STRATA_CRASH_TALLY=FILE writes its tally as JSON.
CRASH_ROUNDS ?= 1000
crash: system-deps $(STAMP)
	STRATA_CRASH_ROUNDS=$(CRASH_ROUNDS) $(PY) -m pytest -s \
		tests/integration/test_crash.py::test_kill_9_at_random_moments_leaves_every_pod_intact_and_nothing_behind \
		$(PYTEST_ARGS)

system-deps: need-root
	bash scripts/system-deps.sh

need-root:
	@[ "$$(id -u)" = 0 ] || { echo "make $(MAKECMDGOALS): needs root (mounts, mknod, lchown, trusted.* xattrs); make unit runs without" >&2; exit 1; }

proto: $(STAMP)
	$(PY) scripts/genproto.py csi/proto

lint: $(STAMP)
	$(VENV)/bin/ruff check csi tests scripts bench
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) bench/publish.py
	$(PY) bench/size_limit.py
	$(PY) bench/unpack.py
	$(PY) bench/pull.py
	$(PY) bench/volatile.py
	$(PY) bench/release_probe.py
	$(PY) bench/metrics.py

clean:
	rm -rf $(VENV) .pytest_cache
