#!/usr/bin/env bash
# First run: builds the release binaries, starts the mock LLM upstream on 127.0.0.1:8001 and
# llmproxyd on its embedded default config (forward :3000 → mock, admin 127.0.0.1:9000), sends
# one streamed chat completion through the proxy, then keeps the proxy in the foreground
# (Ctrl-C stops both).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)"; exit 1; }
command -v curl >/dev/null || { command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq curl) >/dev/null; }
# jemalloc (the default allocator) is built from C sources: it needs make and a C compiler.
command -v make >/dev/null && command -v cc >/dev/null || { command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq make gcc) >/dev/null; }
cargo build --release --locked --bins
./target/release/llmproxy-mock --listen 127.0.0.1:8001 --ttft-ms 100 --gap-ms 50 --tokens 12 > /tmp/llmproxy-mock.log 2>&1 &
MOCK=$!
./target/release/llmproxyd &
PROXY=$!
trap 'kill $PROXY $MOCK 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 50); do curl -fs http://127.0.0.1:9000/health >/dev/null 2>&1 && break; sleep 0.1; done
echo "--- a streamed chat completion through the proxy (curl -N http://127.0.0.1:3000/v1/chat/completions):"
curl -sN http://127.0.0.1:3000/v1/chat/completions \
  -H 'content-type: application/json' \
  -d '{"model":"mock","stream":true,"messages":[{"role":"user","content":"hello"}]}'
echo "--- the proxy keeps running on :3000 (metrics: curl http://127.0.0.1:9000/metrics). Ctrl-C to stop."
wait $PROXY
