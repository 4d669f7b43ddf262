#!/usr/bin/env bash
# Builds the static musl binary the Dockerfile ships (`make image-binary`), without a
# container engine: installs the musl target (rustup) and musl-gcc (apt) when missing,
# builds the slim sidecar (`--no-default-features`: no lab, no echo app) with the `image`
# profile (fat LTO, ~9 min on 2 cores), checks the result is static and runs, and prints
# its path.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-musl
if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi
if ! command -v musl-gcc >/dev/null || ! command -v file >/dev/null; then
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo=sudo
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq musl-tools file
fi

export CC_x86_64_unknown_linux_musl=musl-gcc
# `wsdrain version` prints it.
WSDRAIN_GIT_COMMIT=${WSDRAIN_GIT_COMMIT:-$(git describe --always --dirty --abbrev=12 2>/dev/null || true)}
export WSDRAIN_GIT_COMMIT
cargo build --locked --profile image --target "$target" --no-default-features --bin wsdrain

bin=${CARGO_TARGET_DIR:-target}/$target/image/wsdrain
if file "$bin" | grep -q 'dynamically linked'; then
    echo "image-binary: $bin is dynamically linked" >&2
    exit 1
fi
"$bin" version >&2
ls -l "$bin"
echo "$bin"
