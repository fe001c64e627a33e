# shellcheck shell=bash
# Sourced by scripts/system-deps.sh and scripts/bench-deps.sh: install, with apt, the Debian
# packages whose commands are missing.
#   install_missing STATUS WHAT TOOL:PACKAGE...
# STATUS is the exit status when packages are missing and cannot be installed here (not
# root, no apt); WHAT says who needs them, for that message. Extra packages to install
# may be given in the array `also` (set before calling).
install_missing() {
  local status=$1 what=$2 t
  shift 2
  local missing=("${also[@]}")
  for t in "$@"; do
    command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}")
  done
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u | sed '/^$/d')
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "missing system packages: ${missing[*]} (install them as root; $what)" >&2
    return "$status"
  fi
  echo "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Packages like prometheus and containerd start a service on install where an init
  # system runs; neither the tests nor the benchmarks use one (they start their own, on
  # ports and sockets of their own), so policy-rc.d forbids starting services during this
  # install only, when no policy of the machine's own exists.
  local policy=/usr/sbin/policy-rc.d made=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made=1
  fi
  local rc=0
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
  [ -n "$made" ] && rm -f "$policy"
  return "$rc"
}
