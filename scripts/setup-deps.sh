#!/usr/bin/env bash
# Installs what the tests, demo and lab need on a fresh Debian machine. Idempotent; runs as
# root (or with sudo) for apt. Python tools go into .venv, Node's `ws` into tests/node.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
# A C compiler and linker: rustc links with `cc`, and ring compiles C and assembly.
command -v cc >/dev/null || need_apt+=(gcc libc6-dev)
command -v haproxy >/dev/null || need_apt+=(haproxy)
# nginx: the proxy bench's second reference proxy (benches/proxy.rs).
command -v nginx >/dev/null || need_apt+=(nginx-light)
command -v ss >/dev/null || need_apt+=(iproute2)
command -v ip >/dev/null || need_apt+=(iproute2)
# nsenter (lab --netns) and setpriv (unprivileged counting/lab tests).
{ command -v nsenter && command -v setpriv; } >/dev/null || need_apt+=(util-linux)
command -v curl >/dev/null || need_apt+=(curl)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  # RUNLEVEL=1: don't start the haproxy/nginx system services; tests run their own.
  $SUDO env RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Rust >= 1.95 (edition 2024, rust-version in Cargo.toml). Debian's own cargo is older:
# then rustup provides the toolchain. The Makefile puts ~/.cargo/bin first on PATH.
export PATH="$HOME/.cargo/bin:$PATH"
cargo_ok() {
  command -v cargo >/dev/null &&
    cargo --version | awk '{ split($2, v, "."); exit !(v[1] > 1 || (v[1] == 1 && v[2] >= 95)) }'
}
if ! cargo_ok; then
  if command -v rustup >/dev/null; then
    echo "setup: rustup toolchain install stable"
    rustup toolchain install stable --profile minimal -c rustfmt -c clippy
    rustup default stable
  else
    echo "setup: installing Rust with rustup"
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt -c clippy
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import websockets, kubernetes_validate, promql_parser' 2>/dev/null; then
  echo "setup: pip install websockets kubernetes-validate promql-parser"
  .venv/bin/pip install -q --disable-pip-version-check -r scripts/requirements.txt
fi

if [ ! -d tests/node/node_modules/ws ]; then
  echo "setup: npm install ws"
  (cd tests/node && npm install --silent --no-audit --no-fund >/dev/null)
fi

# The overlay test renders deploy/ with `kubectl kustomize`. Debian has no kubectl
# package; the machine images this project runs on ship one. Say so early if missing.
if ! command -v kubectl >/dev/null; then
  echo "setup: warning: kubectl not found; tests/webhook.rs renders the kustomize overlays with it" >&2
fi
