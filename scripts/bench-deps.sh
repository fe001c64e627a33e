#!/usr/bin/env bash
# Debian packages the benchmarks need beyond the tests' (scripts/system-deps.sh). Installs only
# what is missing, so `make bench` stays fast once they are there. Used by `make bench`.
#   containerd (brings ctr): the containerd peer of bench/peers.py, started by the bench with
#   a root, state dir, socket and config of its own, never the packaged service
#   debootstrap: the realistic image's base layer (bench/realistic.py), from the mirror apt uses
#   umoci: packs that image, and the skopeo+umoci peer and the layer-unpack peer
#   skopeo, docker-registry: the loopback registry the peers pull from, and the push to it
#   tar: GNU tar, the layer-unpack peer
set -euo pipefail
tools=(containerd:containerd ctr:containerd debootstrap:debootstrap umoci:umoci skopeo:skopeo
       docker-registry:docker-registry tar:tar)
also=()
# shellcheck source=scripts/lib/apt.sh
source "$(dirname "$0")/lib/apt.sh"
install_missing 1 "benchmarks that need them fail" "${tools[@]}"
