# Every target here is what CI or a developer runs; `make test` is what CI calls.
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: deps deps-extra demo test msrv check-fmt fmt lint unit doc bench bench-build bench-e2e soak test-tansu

## Installs (as root) or names the system packages the build and tests need.
deps:
	@scripts/ensure-system-deps.sh

## The same, plus what the comparison benches and the tansu run need.
deps-extra:
	@scripts/ensure-system-deps.sh extra

## Runs the main job on an embedded default and prints a summary.
demo: deps
	$(CARGO) run --release -p spans-pipeline -- demo

## Formatting, lints, every test, and the docs: what CI runs.
test: deps check-fmt lint unit doc

check-fmt:
	$(CARGO) fmt --all -- --check

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace --no-fail-fast

doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps

## Builds every target with the oldest Rust the workspace declares (`rust-version`).
MSRV := $(shell sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
msrv: deps
	rustup toolchain install $(MSRV) --profile minimal
	$(CARGO) +$(MSRV) check --workspace --all-targets

## Criterion benches (quote medians; the machines are shared and noisy), with the side-by-side
## comparison against sentry_arroyo (the `arroyo` feature, which builds a second librdkafka).
bench: deps-extra
	$(CARGO) bench -p benches --features arroyo

bench-build: deps-extra
	$(CARGO) bench -p benches --features arroyo --no-run

## The consumer end to end on the reference workload (200k spans, production flush timeouts,
## mock Kafka in a child process, a local redis-server) against the replay of the same workload,
## alternating; prints a summary of medians. `make bench-e2e E2E_ARGS="--spans 40000 --runs 1"`
## for a quick run. Not part of `test`.
E2E_ARGS ?=
bench-e2e: deps
	$(CARGO) bench -p benches --bench e2e -- $(E2E_ARGS)

## The soak test (release build, about 3 minutes): two minutes of load through the `run` binary;
## memory flat, Redis empty at the end, every span out exactly once. Not part of `test`.
soak: deps
	$(CARGO) test --release -p spans-pipeline --test soak -- --ignored --nocapture

## The end-to-end pipeline tests on tansu, a second Kafka broker; installs it when missing (about
## 15 minutes the first time). Not part of `test`.
test-tansu: deps-extra
	CARGO="$(CARGO)" scripts/test-tansu.sh
