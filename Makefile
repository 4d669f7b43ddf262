# wsdrain — newcomer entry points. Every target installs what it needs (scripts/setup-deps.sh).
SHELL := /bin/bash
CARGO ?= cargo
# rustup installs into ~/.cargo/bin; later recipe lines need it on PATH too.
export PATH := $(HOME)/.cargo/bin:$(PATH)
export CARGO_TERM_COLOR ?= never
# `wsdrain version` prints it (empty outside a git checkout: "unknown").
export WSDRAIN_GIT_COMMIT ?= $(shell git describe --always --dirty --abbrev=12 2>/dev/null)
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
BENCH_BINS := $(TARGET_DIR)/bench-bins

.PHONY: all build deps test unit fuzz demo bench bench-bins bench-image lint fmt image-binary clean

all: build

deps:
	@bash scripts/setup-deps.sh

build: deps
	$(CARGO) build

# The whole suite: format and lints, unit tests, real-process e2e tests, manifest
# validation, and the slim sidecar (no lab, no echo app) still builds cleanly.
test: deps
	if command -v rustup >/dev/null; then rustup component add rustfmt clippy 2>/dev/null; fi
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) build --all-targets
	$(CARGO) test --no-fail-fast -- --test-threads=2
	$(CARGO) clippy --no-default-features --bin wsdrain -- -D warnings
	bash scripts/validate-manifests.sh

unit:
	$(CARGO) test --lib

# Every parser's property tests (frames, agent HTTP, admin answers, AdmissionReview, YAML,
# annotations, hint templates, durations, peers' /status, sock_diag events) with many
# more cases than `make test` runs (tens of minutes). FUZZ_CASES=… to change.
FUZZ_CASES ?= 20000
fuzz: deps
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --release --lib
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --release --test inject -- properties

demo: deps
	$(CARGO) build
	bash scripts/demo.sh

# Figures, not assertions: counting speed, hook release latency, RSS (slim sidecar vs
# full build vs a hyper "hello" floor), webhook latency.
bench: deps bench-bins
	$(CARGO) bench --bench count
	WSDRAIN_BENCH_BIN=$(BENCH_BINS)/wsdrain-slim \
	WSDRAIN_BENCH_FULL_BIN=$(BENCH_BINS)/wsdrain-full \
	WSDRAIN_BENCH_FLOOR_BIN=$(BENCH_BINS)/hyper-floor \
	$(CARGO) bench --bench agent
	$(CARGO) bench --bench webhook
	$(CARGO) bench --bench proxy

# The three binaries the agent bench compares, all in the release profile. Copied out
# because the two wsdrain builds share one output path.
bench-bins:
	mkdir -p $(BENCH_BINS)
	$(CARGO) build --release --bin wsdrain
	cp $(TARGET_DIR)/release/wsdrain $(BENCH_BINS)/wsdrain-full
	$(CARGO) build --release --no-default-features --bin wsdrain
	cp $(TARGET_DIR)/release/wsdrain $(BENCH_BINS)/wsdrain-slim
	$(CARGO) build --release --example hyper_floor
	cp $(TARGET_DIR)/release/examples/hyper_floor $(BENCH_BINS)/hyper-floor

# The agent bench on the static musl binary the Dockerfile ships (fat LTO: ~9 min cold).
bench-image: deps bench-bins
	WSDRAIN_BENCH_BIN=$$(bash scripts/image-binary.sh | tail -n 1) \
	WSDRAIN_BENCH_FULL_BIN=$(BENCH_BINS)/wsdrain-full \
	WSDRAIN_BENCH_FLOOR_BIN=$(BENCH_BINS)/hyper-floor \
	$(CARGO) bench --bench agent

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
