#!/usr/bin/env bash
# bench/quick.sh: a berth-only subset of the bench, for working on one stage at a time. Each SLOT
# (0-9) has its own temp dirs, bridge (bq<SLOT>), subnets (10.<230+SLOT>.0.0/16) and cgroup parent,
# so several can run at once (their timings then disturb each other: compare before/after on the
# same slot under the same load, and take the figures that count from `make bench`).
#
#   SLOT=1 SCENARIOS=run_rm,exec_true bench/quick.sh
#   SLOT=2 SCENARIOS=parallel20 PARALLEL_ROUNDS=3 bench/quick.sh
#   SLOT=3 SCENARIOS=idle_memory,density DENSITY=50 bench/quick.sh
#
# Scenarios (bench/lib/measure.py): startup idle_memory cli_floor run_rm run_rm_none exec_true
# runc_floor parallel20 density idle_after. Knobs: RUNS (20), ROUNDS (2), DENSITY (50),
# PARALLEL_ROUNDS (3), BERTH_BIN_DIR (default target/release, built unless NO_BUILD=1),
# KEEP=1 (leave the stack up until Enter is pressed, to poke at it).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED_DIR:-$ROOT/../shared}
BIN=$(cd "${BERTH_BIN_DIR:-$ROOT/target/release}" && pwd)
SLOT=${SLOT:-0}
SCENARIOS=${SCENARIOS:-run_rm,exec_true}
RUNS=${RUNS:-20}
ROUNDS=${ROUNDS:-2}
DENSITY=${DENSITY:-50}
PARALLEL_ROUNDS=${PARALLEL_ROUNDS:-3}
DOCKER=${DOCKER:-$(command -v docker)}
[[ $SLOT =~ ^[0-9]$ ]] || { echo "bench/quick.sh: SLOT must be 0-9" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "bench/quick.sh: needs root" >&2; exit 1; }

# shellcheck source=bench/lib/stack.sh
source "$ROOT/bench/lib/stack.sh"

if [ -z "${BERTH_BIN_DIR:-}" ] && [ "${NO_BUILD:-}" != 1 ]; then
  log "building release binaries"
  (cd "$ROOT" && cargo build --release -q --workspace --bins)
fi

BENCH_TMP=$(mktemp -d "/var/tmp/berth-quick$SLOT.XXXXXX")
NET=$((230 + SLOT))
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  berth_stop q
  local c
  for c in /sys/fs/cgroup/*/berth-quick$SLOT /sys/fs/cgroup/berth-quick$SLOT; do
    [ -d "$c" ] || continue
    find "$c" -mindepth 1 -depth -type d -exec rmdir {} \; 2>/dev/null
    rmdir "$c" 2>/dev/null
  done
  rm -rf "$BENCH_TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

python3 "$SHARED/testimages/mkimage.py" busybox --out "$BENCH_TMP/images" >/dev/null
BENCH_CGROUP_PARENT=berth-quick$SLOT berth_start q "bq$SLOT" "10.$NET.0.1/22" "10.$NET.8.0/21"
"$DOCKER" -H "unix://$BENCH_TMP/q/state/docker.sock" load -i "$BENCH_TMP/images/busybox/image.tar" >/dev/null

python3 - "$BENCH_TMP" > "$BENCH_TMP/sides.json" <<PY
import json, sys
tmp = sys.argv[1]
pid = lambda p: int(open(p).read().strip())
state = f"{tmp}/q/state"
json.dump({"docker": "$DOCKER", "tmp": tmp, "runs": $RUNS, "rounds": $ROUNDS, "warmup": 3,
           "density": $DENSITY, "parallel_rounds": $PARALLEL_ROUNDS, "registry_ref": None,
           "busybox_tar": f"{tmp}/images/busybox/image.tar", "scenarios": "$SCENARIOS",
           "sides": {"berth": {
               "host": f"unix://{state}/docker.sock",
               "startup_ms": int(open(f"{tmp}/q/startup_ms").read()),
               "daemons": {"berth up": pid(f"{tmp}/q/up.pid"),
                           **{f"berth-{s}": pid(f"{state}/{s}.pid")
                              for s in ("snapshotter", "images", "network", "engine", "gateway")}},
               "bundle_config": f"{state}/bundles/{{id}}/config.json",
               "shim_match": ["berth-shim", " serve ", f"--state-dir {state} "]}}},
          sys.stdout, indent=1)
PY
python3 "$ROOT/bench/lib/measure.py" measure --config "$BENCH_TMP/sides.json" \
  --out "$BENCH_TMP/results.json" --raw "$BENCH_TMP/raw"
if [ "${KEEP:-}" = 1 ]; then
  log "stack up: DOCKER_HOST=unix://$BENCH_TMP/q/state/docker.sock; press Enter to stop it"
  read -r _
fi
