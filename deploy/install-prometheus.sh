#!/usr/bin/env bash
# Install Prometheus and promtool from Debian's packages, for the monitoring tests
# (tests/test_monitoring*.py) and for running a local Prometheus without docker.
# Idempotent: does nothing when both binaries are already on PATH.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi

as_root=()
if [ "$(id -u)" -ne 0 ]; then
    as_root=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive

# The package would start a system-wide prometheus service on :9090; the tests start their own on a
# free port, so forbid service starts during the install (policy-rc.d exit 101, as Docker images do),
# unless the machine already has a policy of its own.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee "$policy" >/dev/null
    "${as_root[@]}" chmod 755 "$policy"
    trap '"${as_root[@]}" rm -f "$policy"' EXIT
fi

"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null
prometheus --version 2>&1 | head -n 1
promtool --version 2>&1 | head -n 1
