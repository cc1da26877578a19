#!/usr/bin/env bash
# Runs everything CI runs: format check, clippy, and the whole test suite (unit + integration
# tests that start the real llmproxyd and llmproxy-mock binaries on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)"; exit 1; }
command -v curl >/dev/null || { command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq curl) >/dev/null; }
# jemalloc (the default allocator) is built from C sources: it needs make and a C compiler.
command -v make >/dev/null && command -v cc >/dev/null || { command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq make gcc) >/dev/null; }
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked "$@"
