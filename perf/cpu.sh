#!/usr/bin/env bash
# Native-speed cost per proxied request, from software counters (this VM has no hardware
# counters): `perf stat -p` on llmproxyd (1 shard, pinned to CPU 0) while wrk (pinned to CPU 1)
# drives the small JSON POST for a fixed time, directly against the mock and then through each
# given proxy build, alternating. Prints per request: proxy CPU (task-clock), syscalls,
# io_uring_enter calls, recvfrom calls, context switches; plus throughput and latency.
#
#   perf/cpu.sh [PROXY_BIN ...]       # default: ./target/release/llmproxyd
#   CONNS="64 1" DURATION=5 ROUNDS=2 perf/cpu.sh old/llmproxyd new/llmproxyd
#
# CPU time per request still moves with the machine's load (caches, frequency): compare builds
# within one run, over several rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-2}
CONNS=${CONNS:-64 1}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
command -v perf >/dev/null || { apt-get update -qq && apt-get install -y -qq linux-perf >/dev/null; }
cargo build --release --locked --bins >/dev/null 2>&1
BINS=("$@")
[ ${#BINS[@]} -gt 0 ] || BINS=(./target/release/llmproxyd)

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
free_ports() {
  python3 -c '
import socket, sys
ss = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])' "$1"
}
up() { for _ in $(seq 100); do curl -fs -o /dev/null -X POST "http://127.0.0.1:$1/v1/chat/completions" -d '{}' && return 0; sleep 0.1; done; echo "port $1 never answered" >&2; exit 1; }

read -r MOCK < <(free_ports 1)
./target/release/llmproxy-mock --listen 127.0.0.1:$MOCK >/dev/null 2>&1 &
PIDS+=($!)
up $MOCK
cat >"$WORK/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"model":"mock","messages":[{"role":"user","content":"Say hello in one short sentence."}]}'
wrk.headers["Content-Type"] = "application/json"
EOF

declare -A PORT PID
i=0
for b in "${BINS[@]}"; do
  read -r P A < <(free_ports 2)
  cat >"$WORK/p$i.yaml" <<EOF
http_server:
  forwards:
    - {name: bench, address: 127.0.0.1, port: $P, upstream_group: g}
  admin: {address: 127.0.0.1, port: $A}
upstreams:
  - {name: mock, url: "http://127.0.0.1:$MOCK/v1"}
upstream_groups:
  - {name: g, upstreams: [{name: mock}]}
EOF
  "$b" -c "$WORK/p$i.yaml" --shards 1 --log-level warn --shutdown-timeout 1 &
  PID[$i]=$!
  PIDS+=($!)
  PORT[$i]=$P
  up "$P"
  i=$((i + 1))
done

run() { # label port conns [pid]
  local out stat reqs
  if [ -n "${4:-}" ]; then
    perf stat -x, -e task-clock,context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_recvfrom \
      -p "$4" -o "$WORK/stat" -- sleep "$((DURATION + 1))" &
    local ps=$!
    sleep 0.5
  fi
  out=$(taskset -c 1 wrk -t1 -c"$3" -d"${DURATION}s" --latency -s "$WORK/post.lua" "http://127.0.0.1:$2/v1/chat/completions")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  if [ -n "${4:-}" ]; then
    wait $ps || true
    # task-clock in ms; the window is DURATION+1 s but wrk only ran DURATION: the idle second
    # costs the proxy next to nothing (it is parked in io_uring_enter).
    awk -F, -v n="$reqs" -v l="$1" -v rps="$rps" -v p50="$p50" -v p99="$p99" '
      /task-clock/ {cpu=$1} /context-switches/ {cs=$1} /raw_syscalls/ {sc=$1}
      /io_uring_enter/ {ue=$1} /recvfrom/ {rf=$1}
      END { printf "%-34s %9.0f req/s  p50 %7s  p99 %7s  %6.2f us CPU/req  %5.2f syscalls/req  %5.2f uring_enter/req  %5.2f recvfrom/req  %5.3f cs/req\n",
            l, rps, p50, p99, cpu*1000/n, sc/n, ue/n, rf/n, cs/n }' "$WORK/stat"
  else
    printf '%-34s %9.0f req/s  p50 %7s  p99 %7s\n' "$1" "$rps" "$p50" "$p99"
  fi
}

echo "# perf/cpu.sh $(date -u +%Y-%m-%dT%H:%MZ), ${DURATION}s per run, load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$ROUNDS"); do
  for c in $CONNS; do
    run "direct ${c}c (round $r)" "$MOCK" "$c"
    for j in $(seq 0 $((i - 1))); do
      run "$(basename "$(dirname "${BINS[$j]}")")/$(basename "${BINS[$j]}") ${c}c" "${PORT[$j]}" "$c" "${PID[$j]}"
    done
  done
done
