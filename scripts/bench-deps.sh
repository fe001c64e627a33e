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
missing=()
for t in "${tools[@]}"; do
  command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}")
done
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u | sed '/^$/d')
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "missing system packages: ${missing[*]} (install them as root; benchmarks that need them fail)" >&2
  exit 1
fi
echo "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# containerd's package starts its service on install where an init system runs; the benchmarks
# start their own containerd (own root and socket), so policy-rc.d forbids starting services
# during this install only, when no policy of the machine's own exists.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
