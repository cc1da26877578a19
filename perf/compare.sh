#!/usr/bin/env bash
# Side by side in one run: the mock upstream directly, llmproxyd, nginx and HAProxy in front of
# the same mock, each proxy with one worker pinned to CPU 0 (the mock and wrk float on the other
# core). Same wrk load against each: a small JSON POST over 64 keep-alive connections, then one
# connection for the added latency. Prints a table and writes perf/results/compare.txt.
#
#   perf/compare.sh            # 5 s per run
#   DURATION=10 perf/compare.sh
#
# Installs nginx-light, haproxy and wrk from Debian's packages when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v haproxy >/dev/null || need+=(haproxy)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --locked --bins >/dev/null

WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

MOCK=18201 LLMP=18202 NGINX=18203 HAP=18204 ADMIN=18205
./target/release/llmproxy-mock --listen 127.0.0.1:$MOCK >/dev/null 2>&1 &
PIDS+=($!)

cat >"$WORK/llmproxy.yaml" <<EOF
http_server:
  forwards:
    - {name: bench, address: 127.0.0.1, port: $LLMP, upstream_group: g}
  admin: {address: 127.0.0.1, port: $ADMIN}
upstreams:
  - {name: mock, url: "http://127.0.0.1:$MOCK/v1"}
upstream_groups:
  - {name: g, upstreams: [{name: mock}]}
EOF
./target/release/llmproxyd -c "$WORK/llmproxy.yaml" --shards 1 --log-level warn &
PIDS+=($!)

cat >"$WORK/nginx.conf" <<EOF
worker_processes 1;
worker_cpu_affinity 01;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream mock { server 127.0.0.1:$MOCK; keepalive 128; }
  server {
    listen 127.0.0.1:$NGINX reuseport;
    keepalive_requests 10000000;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
EOF
nginx -c "$WORK/nginx.conf" -g 'daemon off;' &
PIDS+=($!)

cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  cpu-map 1/1 0
defaults
  mode http
  timeout connect 10s
  timeout client 60s
  timeout server 300s
  http-reuse always
frontend f
  bind 127.0.0.1:$HAP
  default_backend b
backend b
  server mock 127.0.0.1:$MOCK
EOF
haproxy -f "$WORK/haproxy.cfg" -q &
PIDS+=($!)

cat >"$WORK/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"model":"mock","messages":[{"role":"user","content":"Say hello in one short sentence."}]}'
wrk.headers["Content-Type"] = "application/json"
EOF

for port in $MOCK $LLMP $NGINX $HAP; do
  for _ in $(seq 50); do curl -fs -o /dev/null -X POST "http://127.0.0.1:$port/v1/chat/completions" -d '{}' && break; sleep 0.1; done
done

OUT=perf/results/compare.txt
mkdir -p perf/results
{
  echo "# perf/compare.sh, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, ${DURATION}s per run"
  echo "# $(nginx -v 2>&1), $(haproxy -v 2>&1 | head -1 | cut -d' ' -f1-3), llmproxyd $(./target/release/llmproxyd -V | cut -d' ' -f2)"
  printf '%-26s %10s %9s %9s %9s %9s\n' "target" "req/s" "p50" "p75" "p90" "p99"
} | tee "$OUT"
run() { # name port conns
  local r
  r=$(taskset -c 1 wrk -t1 -c"$3" -d"${DURATION}s" --latency -s "$WORK/post.lua" "http://127.0.0.1:$2/v1/chat/completions")
  printf '%-26s %10s %9s %9s %9s %9s\n' "$1" \
    "$(awk '/Requests\/sec/ {print $2}' <<<"$r")" \
    "$(awk '$1=="50%" {print $2}' <<<"$r")" "$(awk '$1=="75%" {print $2}' <<<"$r")" \
    "$(awk '$1=="90%" {print $2}' <<<"$r")" "$(awk '$1=="99%" {print $2}' <<<"$r")" | tee -a "$OUT"
}
for c in 64 1; do
  run "direct ($c conn)" $MOCK $c
  run "llmproxyd ($c conn)" $LLMP $c
  run "nginx ($c conn)" $NGINX $c
  run "haproxy ($c conn)" $HAP $c
done
echo "wrote $OUT"
