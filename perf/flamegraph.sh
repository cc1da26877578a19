#!/usr/bin/env bash
# Flamegraphs of llmproxyd under the bench scenarios: runs the harness with `--perf-record`
# (perf record -F 999 --call-graph dwarf on the proxy during each measured window), then for each
# recording writes perf/results/flame/<scenario>-llmproxyd.svg (inferno) and the top of
# `perf report --no-children` as .txt next to it. The numbers of a profiled run are skewed by
# perf itself; measure with `cargo bench`, profile with this.
#
#   perf/flamegraph.sh                 # scenarios a, b and c
#   perf/flamegraph.sh a_json_64c      # one scenario
#
# Needs perf (Debian: linux-perf) and inferno (`cargo install inferno`, from crates.io); installs
# them when missing. Uses the `cycles` event when the machine has hardware counters (checked with
# `perf stat -e instructions true`), else the `cpu-clock` software timer.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v perf >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
fi
if ! command -v inferno-flamegraph >/dev/null; then
  cargo install --locked inferno
fi
if perf stat -e instructions -x, true 2>&1 >/dev/null | grep -q '^[0-9]'; then
  export LLMPROXY_PERF_EVENT=cycles
else
  export LLMPROXY_PERF_EVENT=cpu-clock
  echo "no hardware counters here (perf stat -e instructions: not supported): sampling cpu-clock"
fi
# Kernel symbols and unprivileged access to them, where allowed.
echo 0 >/proc/sys/kernel/kptr_restrict 2>/dev/null || true
echo -1 >/proc/sys/kernel/perf_event_paranoid 2>/dev/null || true
OUT=perf/results/flame
mkdir -p "$OUT"
rm -f "$OUT"/*.perf.data
[ $# -gt 0 ] || set -- a_json_64c b_seq_1c c_sse
cargo bench --locked --bench proxy -- --perf-record "$OUT" --out flame-run "$@"
for data in "$OUT"/*-llmproxyd.perf.data; do
  [ -e "$data" ] || continue
  name=$(basename "$data" .perf.data)
  perf script -i "$data" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph --title "llmproxyd: $name ($LLMPROXY_PERF_EVENT)" >"$OUT/$name.svg"
  {
    echo "# perf report --no-children --sort dso, $name, event $LLMPROXY_PERF_EVENT"
    perf report -i "$data" --no-children -g none --sort dso --stdio 2>/dev/null | grep '%' | grep -v '^#' | sed -E 's/ +- +- *$//' | head -8
    echo "# perf report --no-children --dsos llmproxyd --sort symbol (share of all samples)"
    perf report -i "$data" --no-children -g none --dsos llmproxyd --sort symbol --percent-limit 0.3 --stdio 2>/dev/null | grep '%' | grep -v '^#' | sed -E 's/ +- +- *$//' | head -15
    echo "# perf report --no-children --sort dso,symbol"
    perf report -i "$data" --no-children -g none --sort dso,symbol --percent-limit 0.7 --stdio 2>/dev/null | grep -v '^$' | grep -v '^#' | grep '%' | sed -E 's/ +- +- *$//' | head -40
  } >"$OUT/$name.txt"
  rm -f "$data"
  echo "wrote $OUT/$name.svg and $OUT/$name.txt"
done
rm -f perf/results/flame-run.json perf/results/flame-run.txt perf/results/flame-run.svg
