#!/usr/bin/env bash
# The user's story (3 -> 6 -> 3 pods, 20 + 20 clients) with and without wsdrain, behind
# a keep ingress, a reset-all gateway, and a reset-all gateway in front of a stable tier;
# then the scale-up story (3 pods with 300 clients, 3 more pods) without and with
# rebalancing: how unbalanced the pods are before and after.
# Prints progress on stderr and two tables on stdout. Needs haproxy (scripts/setup-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${WSDRAIN_BIN:-target/debug/wsdrain}
[ -x "$bin" ] || cargo build --quiet
exec "$bin" lab demo "$@"
