#!/usr/bin/env bash
# The user's story (3 -> 6 -> 3 pods, 20 + 20 clients) with and without wsdrain, behind
# a keep ingress, a reset-all gateway, and a reset-all gateway in front of a stable tier.
# Prints progress on stderr and one table on stdout. Needs haproxy (scripts/setup-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${WSDRAIN_BIN:-target/debug/wsdrain}
[ -x "$bin" ] || cargo build --quiet
exec "$bin" lab demo "$@"
