# wsdrain — newcomer entry points. Every target installs what it needs (scripts/setup-deps.sh).
SHELL := /bin/bash
CARGO ?= cargo
# rustup installs into ~/.cargo/bin; later recipe lines need it on PATH too.
export PATH := $(HOME)/.cargo/bin:$(PATH)
export CARGO_TERM_COLOR ?= never

.PHONY: all build deps test unit fuzz demo bench bench-image lint fmt image-binary clean

all: build

deps:
	@bash scripts/setup-deps.sh

build: deps
	$(CARGO) build

# The whole suite: unit tests, real-process e2e tests, manifest validation.
test: deps
	$(CARGO) build --all-targets
	$(CARGO) test --no-fail-fast -- --test-threads=2
	bash scripts/validate-manifests.sh

unit:
	$(CARGO) test --lib

# The WebSocket frame parser's property tests with 100k cases each instead of 200 (minutes).
fuzz:
	PROPTEST_CASES=100000 $(CARGO) test --release --lib proxy::frame

demo: deps
	$(CARGO) build
	bash scripts/demo.sh

# Figures, not assertions: counting speed, hook release latency, RSS, webhook latency.
bench: deps
	$(CARGO) bench --bench count
	$(CARGO) bench --bench agent
	$(CARGO) bench --bench webhook
	$(CARGO) bench --bench proxy

# The agent bench on the static musl binary the Dockerfile ships (fat LTO: ~9 min cold).
bench-image: deps
	WSDRAIN_BENCH_BIN=$$(bash scripts/image-binary.sh | tail -n 1) $(CARGO) bench --bench agent

lint: deps
	if command -v rustup >/dev/null; then rustup component add rustfmt clippy; fi
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	bash scripts/lint-manifests.sh

fmt:
	$(CARGO) fmt

image-binary:
	bash scripts/image-binary.sh

clean:
	$(CARGO) clean
	rm -rf .venv .venv-lint tests/node/node_modules

# 20 rolling restarts with 2000 clients: abnormal closes, lost messages, agent RSS growth, fd leak.
soak: deps
	$(CARGO) run --release -- lab soak --rounds 20 --clients 2000 --grace 30s --json --quiet
