#!/usr/bin/env bash
# Debian packages the tests need beside the virtualenv. Installs only what is missing, so
# `make test` stays fast once they are there. Used by `make test` and by .ci/run.
#   make, util-linux (umount; nsenter, which starts the deploy drift test's server in a
#   network namespace of its own), python3-venv: the front door and its virtualenv
#   umoci: the reference unpacker for the differential test
#   docker-registry, skopeo, apache2-utils (htpasswd -B), openssl: the real registry the
#   pull tests run against, the push tool, and the auth/TLS material for it
#   e2fsprogs (mkfs.ext4): the filesystem image of a size-limited publication (the plugin
#   needs it on the node too); xfsprogs (mkfs.xfs): the project-quota tests' filesystems
#   btrfs-progs (mkfs.btrfs): the store on btrfs in the tests (tests/storefs.py), where
#   overlay's copy-up clones extents and the btrfs backend makes subvolume snapshots
#   prometheus (brings promtool): the dashboard and alert checks, and the real Prometheus
#   the monitoring integration test scrapes strata with (on a free port of its own)
# Not from here: kubectl (1.21+, for its built-in kustomize), which tests/deploy renders
# deploy/ with. It is no Debian package (bookworm's kubernetes-client is 1.20); it is said
# below when missing, and `make deploy-check` (so `make test` and .ci/run) refuses without it.
set -euo pipefail
command -v kubectl >/dev/null 2>&1 ||
  echo "kubectl not found: tests/deploy needs it (make need-kubectl says more)" >&2
tools=(make:make umount:util-linux nsenter:util-linux umoci:umoci docker-registry:docker-registry
       skopeo:skopeo htpasswd:apache2-utils openssl:openssl mkfs.ext4:e2fsprogs
       mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs prometheus:prometheus promtool:prometheus)
also=()
python3 -c 'import ensurepip, venv' 2>/dev/null || also+=(python3-venv)
# shellcheck source=scripts/lib/apt.sh
source "$(dirname "$0")/lib/apt.sh"
install_missing 0 "tests that need them skip" "${tools[@]}"
