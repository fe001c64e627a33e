# The front door. Every target installs what it needs into a local virtualenv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test unit integration sanity deploy-check crash need-root need-kubectl system-deps \
	proto lint bench bench-deps clean

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
# their tests would only skip, so they refuse instead. test runs all three, and
# deploy-check first (tests/deploy, left out of its own run so that nothing runs twice).
test: system-deps deploy-check
	$(PY) -m pytest tests --ignore=tests/deploy $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: system-deps $(STAMP)
	$(PY) -m pytest tests/integration tests/backend $(PYTEST_ARGS)

sanity: system-deps $(STAMP)
	$(PY) -m pytest tests/sanity $(PYTEST_ARGS)

# deploy/ checked without a cluster (tests/deploy): `kubectl kustomize` of the base, the
# overlays and the monitoring component; every object and example validated against the
# newest Kubernetes schemas (kubernetes-validate, strict); hadolint on the Dockerfile; and,
# as root, the real `strata serve` started with the kind DaemonSet's args, env, ports and
# paths, driven through each example's kubelet calls.
deploy-check: need-kubectl $(STAMP)
	$(PY) -m pytest tests/deploy $(PYTEST_ARGS)

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

# kubectl is not a Debian package (bookworm's kubernetes-client is 1.20, whose kustomize
# predates components and `labels`): it has to be on the machine already.
need-kubectl:
	@command -v kubectl >/dev/null 2>&1 || { echo "make $(MAKECMDGOALS): needs kubectl (1.27+, with its built-in kustomize v5) on PATH; install it from the Kubernetes release (https://kubernetes.io/docs/tasks/tools/)" >&2; exit 1; }
	@v=$$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v//p'); \
	[ "$${v%%.*}" -ge 5 ] 2>/dev/null || { echo "make $(MAKECMDGOALS): kubectl's built-in kustomize is $${v:-missing}; deploy/ needs v5+ (kubectl 1.27+)" >&2; exit 1; }

need-root:
	@[ "$$(id -u)" = 0 ] || { echo "make $(MAKECMDGOALS): needs root (mounts, mknod, lchown, trusted.* xattrs); make unit runs without" >&2; exit 1; }

proto: $(STAMP)
	$(PY) scripts/genproto.py csi/proto

lint: $(STAMP)
	$(VENV)/bin/ruff check csi tests scripts bench
	$(VENV)/bin/lint-imports

# The benchmarks need root (mounts, dropping the page cache) and, beyond the tests' packages,
# those of scripts/bench-deps.sh (containerd, debootstrap, ...: the peers bench/peers.py
# measures strata against, and the realistic image it builds at bench time).
bench-deps: need-root
	bash scripts/bench-deps.sh

bench: bench-deps $(STAMP)
	$(PY) bench/publish.py
	$(PY) bench/size_limit.py
	$(PY) bench/unpack.py
	$(PY) bench/pull.py
	$(PY) bench/volatile.py
	$(PY) bench/release_probe.py
	$(PY) bench/metrics.py
	$(PY) bench/cow.py
	$(PY) bench/peers.py

clean:
	rm -rf $(VENV) .pytest_cache
