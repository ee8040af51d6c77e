#!/usr/bin/env bash
# make bench: start a berth stack from the release binaries on temp dirs and measure it.
# With BENCH_DOCKERD=1 the same scenarios run against a dockerd started on its own socket and
# data root (see issue 9; scenarios are added as the API they exercise lands).
# Results: bench/results/<date>/summary.md and summary.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BERTH_BIN_DIR:-$PWD/target/release}
DATE=$(date -u +%Y-%m-%d)
OUT=bench/results/$DATE
mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/berth-bench.XXXXXX)
UP_PID=

cleanup() {
  if [ -n "$UP_PID" ] && kill -0 "$UP_PID" 2>/dev/null; then
    kill -TERM "$UP_PID"; wait "$UP_PID" || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT

cat > "$TMP/berth.toml" <<TOML
[network]
bridge = "bbench0"
bip = "10.219.0.1/24"
TOML

start=$(date +%s%N)
"$BIN/berth" up --config "$TMP/berth.toml" --root "$TMP/root" --state-dir "$TMP/state" \
  > "$TMP/up.out" 2> "$TMP/up.log" &
UP_PID=$!
until grep -q "berth is up" "$TMP/up.out" 2>/dev/null; do
  kill -0 "$UP_PID" 2>/dev/null || { cat "$TMP/up.log"; exit 1; }
  sleep 0.01
done
startup_ms=$(( ($(date +%s%N) - start) / 1000000 ))
export DOCKER_HOST=unix://$TMP/state/docker.sock

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
pss_kb() { awk '/^Pss:/ {print $2}' "/proc/$1/smaps_rollup"; }

{
  printf 'metric\tberth\tunit\n'
  printf 'stack start (berth up until all healthy)\t%s\tms\n' "$startup_ms"
  total_rss=0; total_pss=0
  for svc in snapshotter images network engine gateway; do
    pid=$(cat "$TMP/state/$svc.pid")
    r=$(rss_kb "$pid"); p=$(pss_kb "$pid")
    total_rss=$((total_rss + r)); total_pss=$((total_pss + p))
    printf 'idle RSS berth-%s\t%s\tkB\n' "$svc" "$r"
  done
  printf 'idle RSS all daemons\t%s\tkB\n' "$total_rss"
  printf 'idle PSS all daemons\t%s\tkB\n' "$total_pss"
} > "$OUT/summary.tsv"

if command -v hyperfine >/dev/null; then
  hyperfine -N --warmup 5 --runs 30 --export-json "$TMP/ping.json" \
    "curl -sf --unix-socket $TMP/state/docker.sock http://berth/_ping" >/dev/null
  median=$(python3 -c "import json,statistics;r=json.load(open('$TMP/ping.json'))['results'][0]['times'];print(round(statistics.median(r)*1000,2))")
  printf 'GET /_ping (curl)\t%s\tms\n' "$median" >> "$OUT/summary.tsv"
fi
# Pull + unpack of the synthetic 4 x 64 MB image from a loopback registry (its own daemons).
if [ -x bench/pull.sh ]; then
  bench/pull.sh | tee "$OUT/pull.txt" || echo "pull scenario failed" >&2
fi

{
  echo "# berth bench, $DATE"
  echo
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, kernel $(uname -r), $(. /etc/os-release; echo "$PRETTY_NAME")"
  echo
  echo "| metric | berth | unit |"
  echo "|---|---:|---|"
  tail -n +2 "$OUT/summary.tsv" | awk -F'\t' '{printf "| %s | %s | %s |\n", $1, $2, $3}'
  if [ -s "$OUT/pull.txt" ]; then
    echo
    echo "## Pull (synthetic 4 x 64 MB from a loopback registry)"
    echo
    echo '```'
    cat "$OUT/pull.txt"
    echo '```'
  fi
} > "$OUT/summary.md"
cat "$OUT/summary.md"
