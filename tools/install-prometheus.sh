#!/usr/bin/env bash
# Install Debian's prometheus package for tests/test_prometheus.py (called by `make install-test`).
#
# Never fails: where prometheus cannot be installed (not root, no apt-get, no network…) it says
# why, writes that reason to $1 (the test skips with it) and exits 0. Quick when prometheus is
# already on PATH. The package's system service is neither started nor left enabled: the test
# runs its own Prometheus on a free port, and :9090 stays free.
set -uo pipefail

reason_file=${1:-}

unavailable() {
    echo "install-prometheus: not installed: $1" >&2
    if [[ -n $reason_file ]]; then echo "$1" >"$reason_file"; fi
    exit 0
}

if command -v prometheus >/dev/null; then
    if [[ -n $reason_file ]]; then rm -f "$reason_file"; fi
    exit 0
fi
command -v apt-get >/dev/null || unavailable "apt-get not found (not a Debian-like system)"
[[ $(id -u) == 0 ]] || unavailable "apt-get needs root (run as root, or install prometheus)"

# invoke-rc.d and deb-systemd-invoke ask policy-rc.d before starting a service: 101 = refused.
# A policy already there (container images ship one) is left as it is.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
apt=(apt-get -q -o Acquire::Retries=2 -o Acquire::http::Timeout=30)
apt_install() { "${apt[@]}" install -y --no-install-recommends prometheus; }
echo "install-prometheus: apt-get install --no-install-recommends prometheus" >&2
# Stale package lists name files the mirror no longer has: refresh them once and retry.
if ! apt_install && ! { "${apt[@]}" update && apt_install; }; then
    unavailable "apt-get install prometheus failed (see the output above)"
fi
command -v prometheus >/dev/null || unavailable "the package installed no prometheus on PATH"
# Leave no service enabled for the next boot either (deb-systemd-helper edits the unit links
# whether or not systemd runs; update-rc.d the SysV links).
deb-systemd-helper disable prometheus.service >/dev/null 2>&1 || true
update-rc.d prometheus disable >/dev/null 2>&1 || true
if [[ -n $reason_file ]]; then rm -f "$reason_file"; fi
echo "install-prometheus: $(prometheus --version 2>&1 | head -n 1)" >&2
