#!/usr/bin/env bash
# The CRI bench: berth's CRI and Debian's containerd 1.6 CRI plugin side by side in one run, each
# on its own root, state, socket and cgroup parent, with the same CNI conflist (bridge +
# host-local + portmap), the same mirrors and the same images from a loopback registry
# (bench/lib/cri.sh, shared with deploy/critest.sh). One client drives both:
# cri/examples/cri_bench.rs, so no CLI start-up is measured. See docs/bench.md.
#
#   bench/cri.sh                 # RUNS=30 ROUNDS=3 PODS=20
#
# Knobs (environment): RUNS (per side and scenario), ROUNDS (interleaved blocks), PODS (pods held
# for the memory figure), BERTH_BIN_DIR (berth binaries; default target/release, built when
# missing), CRI_BENCH_CLIENT (a built cri_bench; default: built in release), BENCH_OUT (results
# directory; default bench/results/<date>-cri).
# Everything it started or made is stopped by PID and removed on exit, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SHARED=${SHARED_DIR:-$ROOT/../shared}
BIN=$(cd "${BERTH_BIN_DIR:-$ROOT/target/release}" && pwd)
RUNS=${RUNS:-30}
ROUNDS=${ROUNDS:-3}
PODS=${PODS:-20}
OUT=${BENCH_OUT:-$ROOT/bench/results/$(date -u +%Y-%m-%d)-cri}
RAW=$OUT/raw

# shellcheck source=bench/lib/stack.sh
source "$ROOT/bench/lib/stack.sh"

[ "$(id -u)" = 0 ] || { echo "bench/cri.sh: needs root" >&2; exit 1; }
for t in containerd runc docker-registry skopeo python3; do
  command -v "$t" >/dev/null || { echo "bench/cri.sh: $t is missing; run deploy/install-deps.sh (make deps)" >&2; exit 1; }
done
[ -x "$BIN/berth" ] || cargo build --release --workspace --bins
CLIENT=${CRI_BENCH_CLIENT:-}
if [ -z "$CLIENT" ]; then
  cargo build --release -q -p berth-cri --example cri_bench
  CLIENT=$ROOT/target/release/examples/cri_bench
fi

DOCKER=$(command -v docker || echo false)  # berth_stop asks it for nothing CRI needs
mkdir -p "$RAW"
BENCH_TMP=$(mktemp -d /var/tmp/berth-cribench.XXXXXX)
chmod 0755 "$BENCH_TMP"
TAG=$(printf '%04x' $((RANDOM % 65536)))
REG=$BENCH_TMP/registry
# shellcheck source=bench/lib/cri.sh
source "$ROOT/bench/lib/cri.sh"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  log "cleaning up"
  cp "${CRI_LOG_berth:-/dev/null}" "$RAW/berth.log" 2>/dev/null
  cp "${CRI_LOG_containerd:-/dev/null}" "$RAW/containerd.log" 2>/dev/null
  berth_stop berth
  cri_containerd_stop
  cri_cleanup "$REG"
  rm -rf "$BENCH_TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "registry and the CRI test images"
ADDR=$(cri_registry "$REG")
SHARED_DIR=$SHARED python3 "$ROOT/bench/lib/pause_image.py" --registry "$ADDR" --work "$BENCH_TMP/pause" >/dev/null
cri_mirrors "$ADDR"
cri_conflist
cri_containerd_start
cri_berth_start
log "containerd: $CRI_SOCK_containerd; berth: $CRI_SOCK_berth"

python3 - > "$BENCH_TMP/sides.json" <<PY
import json, platform, subprocess
def out(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:
        return "n/a"
commit = out("git", "-C", "$ROOT", "rev-parse", "--short", "HEAD")
print(json.dumps({
    "client": "$CLIENT", "image": "registry.k8s.io/e2e-test-images/busybox:1.29-2",
    "runs": $RUNS, "rounds": $ROUNDS, "pods": $PODS, "log_dir": "$BENCH_TMP/logs",
    "facts": {
        "date": "$(date -u '+%Y-%m-%d %H:%M') UTC",
        "machine": f"{__import__('os').cpu_count()} cores, kernel {platform.release()}",
        "berth": f"{commit} (binaries: $BIN)",
        "containerd": out("containerd", "--version") + " (CRI plugin, runc v2 shim, pause image registry.k8s.io/pause:3.10)",
        "runc": out("runc", "--version"),
        "pod config": "kubelet's defaults: network and IPC per pod, PID per container; CNI bridge + host-local + portmap",
        "pause image": "bench/lib/pause.c built static (what Kubernetes' pause does, at its size), pushed over critest's stand-in",
        "load average (1/5/15 min) at the start": "$LOAD_START",
    },
    "sides": {
        "berth": {"socket": "$CRI_SOCK_berth", "roots": [int(open("$BENCH_TMP/berth/up.pid").read())],
                  "shim_match": ["berth-shim", " serve ", "--state-dir $BENCH_TMP/berth/state "]},
        "containerd": {"socket": "$CRI_SOCK_containerd", "roots": [int(open("$BENCH_TMP/containerd/pid").read())],
                       "shim_match": ["containerd-shim-runc-v2", "$BENCH_TMP/containerd/containerd.sock"]},
    }}, indent=1))
PY
mkdir -p "$BENCH_TMP/logs"
python3 "$ROOT/bench/lib/cri_measure.py" --config "$BENCH_TMP/sides.json" \
  --md "$OUT/summary.md" --tsv "$OUT/summary.tsv" --raw "$RAW"
