#!/usr/bin/env bash
# User-space instructions per proxied request, from callgrind: the release llmproxyd (1 shard) in
# front of the release mock, a warm-up, counters zeroed, then exactly N requests from
# perf/fixed_load.py over 1 connection and over 64, each dumped separately. Instruction counts do
# not depend on how loaded the machine is, so they compare builds where wall-clock cannot.
#
# c1: N/2 requests on one connection, GAP_US (1000) after each answer, so each request finds the
# proxy idle (as a real client's next request does: callgrind slows the proxy ~50x) and takes
# the same path every run. c64: N requests over 64 connections back to back; how many requests
# one wakeup serves varies a little from run to run, so compare c64 over several runs. The stats
# tick is set to 10 s so that time-driven work stays out of the counts (idle shows what is left).
#
#   perf/instructions.sh              # N=20000
#   N=5000 DRIVER=epoll perf/instructions.sh
#   KEEP=dir perf/instructions.sh     # keep the callgrind dumps (callgrind_annotate them)
#   PROXY=path/to/llmproxyd perf/instructions.sh   # measure another build
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-20000}
DRIVER=${DRIVER:-auto}
PROXY=${PROXY:-./target/release/llmproxyd}
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
cargo build --release --locked --bins >/dev/null 2>&1

WORK=${KEEP:-$(mktemp -d)}
mkdir -p "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  # Give the proxy its 1 s shutdown, then make sure nothing is left holding the ports.
  for _ in $(seq 50); do
    alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.2
  done
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

read -r MOCK LLMP ADMIN < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(3)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')
./target/release/llmproxy-mock --listen 127.0.0.1:$MOCK >/dev/null 2>&1 &
PIDS+=($!)
up() { for _ in $(seq 300); do curl -fs -o /dev/null -X POST "http://127.0.0.1:$1/v1/chat/completions" -d '{}' && return 0; sleep 0.2; done; echo "port $1 never answered" >&2; exit 1; }
up $MOCK
cat >"$WORK/llmproxy.yaml" <<EOF
http_server:
  forwards:
    - {name: bench, address: 127.0.0.1, port: $LLMP, upstream_group: g}
  admin: {address: 127.0.0.1, port: $ADMIN}
upstreams:
  - {name: mock, url: "http://127.0.0.1:$MOCK/v1"}
upstream_groups:
  - {name: g, upstreams: [{name: mock}]}
runtime: {tick_ms: 10000}
EOF
valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p" --dump-instr=no \
  "$PROXY" -c "$WORK/llmproxy.yaml" --shards 1 --driver "$DRIVER" \
  --log-level warn --shutdown-timeout 1 2>"$WORK/valgrind.log" &
VG=$!
PIDS+=($VG)
up $LLMP
python3 perf/fixed_load.py $LLMP 2000 64 >/dev/null

measure() { # label requests conns gap_us
  callgrind_control -z $VG >/dev/null
  local t0 t1
  t0=$(date +%s.%N)
  python3 perf/fixed_load.py $LLMP "$2" "$3" "$4" >/dev/null
  t1=$(date +%s.%N)
  callgrind_control -d "$1" $VG >/dev/null
  sleep 0.5
  local f ir
  f=$(ls -t "$WORK"/cg.$VG.* | head -1)
  ir=$(awk '/^summary:/ {print $2}' "$f")
  [ -n "$KEEP" ] && cp "$f" "$WORK/$1.callgrind"
  printf '%-8s %6d requests  %12d Ir  %7.0f Ir/request  (%.1f s under valgrind)\n' \
    "$1" "$2" "$ir" "$(echo "$ir / $2" | bc -l)" "$(echo "$t1 - $t0" | bc -l)"
}
KEEP=${KEEP:-}
measure c1 $((N / 2)) 1 "${GAP_US:-1000}"
measure c64 "$N" 64 0
# What the runtime and the control thread burn without requests, over the same kind of window.
callgrind_control -z $VG >/dev/null
sleep 2
callgrind_control -d idle $VG >/dev/null
sleep 0.5
f=$(ls -t "$WORK"/cg.$VG.* | head -1)
printf '%-8s %29d Ir in 2 s\n' idle "$(awk '/^summary:/ {print $2}' "$f")"
