#!/usr/bin/env bash
# make bench: berth measured against the scenarios of ../shared/BENCHMARKS.md, and with
# BENCH_DOCKERD=1 side by side with Debian's dockerd in the same run. See docs/bench.md.
#
#   bench/run.sh                      # berth alone
#   BENCH_DOCKERD=1 bench/run.sh      # berth and dockerd, ratio table
#   DENSITY=50 RUNS=10 BENCH_DOCKERD=1 bench/run.sh   # a quick run
#
# Knobs (environment): RUNS (30, hyperfine runs per side and command), ROUNDS (3, interleaved
# blocks those runs are cut into), DENSITY (200 sleep containers; 0 skips), PARALLEL_ROUNDS (5,
# repetitions of the 20-parallel scenario), BREAKDOWN (1: traced stage breakdown of `docker run`),
# BREAKDOWN_RUNS (20), PULL (1: bench/pull.sh, synthetic 4 x 64 MB), PULL_RUNS (5),
# ROOTLESS (1: bench/rootless.sh, rootless berth beside rootless Podman, RUNS runs),
# VM (bench/vm.sh, berth-vm beside runc; default 1 when QEMU, virtiofsd, vhost-device-vsock and
# the guest kernel package are present, else 0), VM_RUNS (10, runs of each berth-vm command),
# BENCH_OUT (results directory), BERTH_BIN_DIR (use these binaries, no build), DOCKER (the docker CLI), SCENARIOS (comma-separated
# names of bench/lib/measure.py's scenarios to run, e.g. build,run_rm; empty = all).
#
# Everything runs on temp dirs under /var/tmp with its own sockets, bridges (bbench0, bbench1,
# dbench0), subnets (10.219.0.0/16, 10.220.0.0/22), cgroup parents and iptables chains; all of
# it is stopped by PID and removed on exit, also on failure. Needs root.
# Results: bench/results/<date>/summary.md and summary.tsv (raw data in raw/, not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SHARED=${SHARED_DIR:-$ROOT/../shared}
BIN=$(cd "${BERTH_BIN_DIR:-$ROOT/target/release}" && pwd)
RUNS=${RUNS:-30}
ROUNDS=${ROUNDS:-3}
DENSITY=${DENSITY:-200}
PARALLEL_ROUNDS=${PARALLEL_ROUNDS:-5}
BREAKDOWN=${BREAKDOWN:-1}
BREAKDOWN_RUNS=${BREAKDOWN_RUNS:-20}
PULL=${PULL:-1}
PULL_RUNS=${PULL_RUNS:-5}
ROOTLESS=${ROOTLESS:-1}
# The VM part only runs where berth-vm can: its tools and kernel come from deploy/install-deps.sh.
vm_default=1
for t in qemu-system-x86_64 virtiofsd vhost-device-vsock; do command -v "$t" >/dev/null || vm_default=0; done
ls /var/cache/berth/vm/linux-image-*.deb >/dev/null 2>&1 || vm_default=0
VM=${VM:-$vm_default}
VM_RUNS=${VM_RUNS:-10}
BENCH_DOCKERD=${BENCH_DOCKERD:-}
DATE=$(date -u +%Y-%m-%d)
OUT=${BENCH_OUT:-$ROOT/bench/results/$DATE}
RAW=$OUT/raw

# shellcheck source=bench/lib/stack.sh
source "$ROOT/bench/lib/stack.sh"

[ "$(id -u)" = 0 ] || { echo "bench/run.sh: needs root (mounts, namespaces, bridges)" >&2; exit 1; }
for t in hyperfine curl python3 skopeo docker-registry iptables-save; do
  command -v "$t" >/dev/null || { echo "bench/run.sh: $t is missing; run deploy/install-deps.sh (make deps)" >&2; exit 1; }
done
DOCKER=${DOCKER:-$(command -v docker || true)}
[ -n "$DOCKER" ] || { echo "bench/run.sh: the docker CLI is missing" >&2; exit 1; }

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
mkdir -p "$RAW"
rm -rf "$RAW"/vm
rm -f "$RAW"/*.json "$RAW"/*.txt "$RAW"/*.md "$RAW"/*.log 2>/dev/null || true
BENCH_TMP=$(mktemp -d /var/tmp/berth-bench.XXXXXX)
COLLECTOR_PID=

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  log "cleaning up"
  stop_pid "$COLLECTOR_PID" 5
  berth_stop trace
  berth_stop main
  dockerd_stop
  runc_root_cleanup "$BENCH_TMP/floor/runc"   # the runtime-floor scenario's bundles
  berth_cgroups_cleanup
  registry_stop
  # Logs worth keeping next to the results.
  for f in main/up.log trace/up.log dockerd/dockerd.log dockerd/containerd.log; do
    [ -f "$BENCH_TMP/$f" ] && cp "$BENCH_TMP/$f" "$RAW/${f//\//-}" 2>/dev/null
  done
  rm -rf "$BENCH_TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. Binaries. Always (re)build: a stale binary would measure old code; a no-op when up to date.
if [ -z "${BERTH_BIN_DIR:-}" ]; then
  log "building release binaries"
  cargo build --release -q --workspace --bins
fi

# 2. dockerd from Debian, when asked for.
DOCKERD_NOTE="not run (BENCH_DOCKERD unset)"
if [ "$BENCH_DOCKERD" = 1 ]; then
  if ! docker_install; then
    log "docker.io could not be installed: measuring berth alone"
    BENCH_DOCKERD= DOCKERD_NOTE="not run: apt-get install docker.io failed"
  fi
fi

# 3. Test images (offline) and a loopback registry holding busybox.
python3 "$SHARED/testimages/mkimage.py" busybox --out "$BENCH_TMP/images" >/dev/null
BUSYBOX_TAR=$BENCH_TMP/images/busybox/image.tar
registry_start || log "registry did not start: the pull scenario will fail"

# 4. Stage breakdown of `docker run --rm busybox true` on a traced stack (its own bridge), first,
#    on a quiet machine: after the density run the kernel is still tearing down hundreds of
#    namespaces for a while, which would show up in the traced times.
# $1: the default runtime of the traced stack (runc: the runtime binary path; libcontainer: in the
# shim), $2: where its markdown goes.
breakdown() {
  local runtime=$1 md=$2
  local t=$BENCH_TMP/tracing-$runtime
  mkdir -p "$t"
  local venv=$ROOT/target/bench-venv
  if ! "$venv/bin/python" -c 'import grpc, opentelemetry.proto' 2>/dev/null; then
    log "installing grpcio and opentelemetry-proto into target/bench-venv (PyPI)"
    python3 -m venv "$venv" && "$venv/bin/pip" install -q grpcio opentelemetry-proto || return 1
  fi
  cc -O2 -DREAL="\"$(command -v runc)\"" -DLOG="\"$t/exec.log\"" -DNAME='"runc"' \
    -o "$t/runc" "$ROOT/bench/lib/timewrap.c" || return 1
  cc -O2 -DREAL="\"$BIN/berth-shim\"" -DLOG="\"$t/exec.log\"" -DNAME='"berth-shim"' \
    -o "$t/berth-shim" "$ROOT/bench/lib/timewrap.c" || return 1
  "$venv/bin/python" "$ROOT/bench/lib/otlp_collector.py" --out "$t/spans.jsonl" \
    --ready-file "$t/port" > "$t/collector.log" 2>&1 &
  COLLECTOR_PID=$!
  local i
  for ((i = 0; i < 200; i++)); do [ -f "$t/port" ] && break; sleep 0.05; done
  [ -f "$t/port" ] || { log "the OTLP collector did not start"; cat "$t/collector.log" >&2; return 1; }
  berth_start trace bbench1 10.219.4.1/22 10.219.16.0/21 "$(cat <<TOML
default_runtime = "$runtime"
[engine.runtimes.runc]
path = "$t/runc"
args = []
[shim]
binary = "$t/berth-shim"
[telemetry]
otlp_endpoint = "http://127.0.0.1:$(cat "$t/port")"
TOML
)" || return 1
  local host=unix://$BENCH_TMP/trace/state/docker.sock
  "$DOCKER" -H "$host" load -i "$BUSYBOX_TAR" >/dev/null || return 1
  local bd=$ROOT/bench/lib/breakdown.py
  python3 "$bd" run --docker "$DOCKER" --host "$host" \
    --runs "$BREAKDOWN_RUNS" --out "$t/runs.json" || return 1
  # Where exec and the 20-container scenarios spend their time (spans summed per run).
  local names20 start20
  names20=$(printf 'r%s ' $(seq 1 20))
  start20='for i in $(seq 1 20); do {docker} -H {host} run -d --name r$i busybox sleep 300 >/dev/null & done; wait'
  "$DOCKER" -H "$host" run -d --name t1 busybox sleep 3000 >/dev/null \
    && python3 "$bd" profile-run --docker "$DOCKER" --host "$host" --runs 10 \
      --cmd '{docker} -H {host} exec t1 true' --out "$t/exec-runs.json" \
    || log "traced exec failed"
  "$DOCKER" -H "$host" rm -f t1 >/dev/null 2>&1
  python3 "$bd" profile-run --docker "$DOCKER" --host "$host" --runs 3 --warmup 1 --gap 1 \
    --cmd "$start20" --teardown "{docker} -H {host} rm -f $names20" --out "$t/par20-runs.json" \
    || log "traced 20 parallel runs failed"
  python3 "$bd" profile-run --docker "$DOCKER" --host "$host" --runs 3 --warmup 1 --gap 1 \
    --setup "$start20" --cmd "{docker} -H {host} rm -f $names20" --out "$t/rm20-runs.json" \
    || log "traced rm -f of 20 failed"
  # The daemons export in batches every 5 s and flush when they stop.
  sleep 6
  berth_stop trace
  stop_pid "$COLLECTOR_PID" 5
  COLLECTOR_PID=
  for f in spans.jsonl exec.log runs.json; do cp "$t/$f" "$RAW/$runtime-$f" 2>/dev/null || true; done
  python3 "$bd" analyze --runs "$t/runs.json" --spans "$t/spans.jsonl" \
    --exec "$t/exec.log" --out "$RAW/breakdown-$runtime.json" --md "$md" >/dev/null
  local label f
  for f in exec par20 rm20; do
    [ -s "$t/$f-runs.json" ] || continue
    case $f in
      exec) label="docker exec c1 true" ;;
      par20) label="20 parallel docker run -d … sleep 300" ;;
      rm20) label="docker rm -f of 20" ;;
    esac
    python3 "$bd" profile-analyze --label "$label" --runs "$t/$f-runs.json" --spans "$t/spans.jsonl" \
      --exec "$t/exec.log" --md "$t/$f.md" >/dev/null \
      && { echo; echo "#### Traced: $label"; echo; cat "$t/$f.md"; } >> "$md"
  done
}
if [ "$BREAKDOWN" = 1 ]; then
  : > "$RAW/breakdown.md"
  # Before (runc, a binary per call) and after (the shim's in-process runtime).
  for rt in runc libcontainer; do
    log "stage breakdown ($rt): $BREAKDOWN_RUNS traced runs of docker run --rm busybox true"
    if breakdown "$rt" "$RAW/breakdown-$rt.md"; then
      { echo; echo "### Default runtime: $rt"; echo; cat "$RAW/breakdown-$rt.md"; } >> "$RAW/breakdown.md"
    else
      log "stage breakdown ($rt) failed"
      echo "The traced run with $rt failed; see the bench output." >> "$RAW/breakdown.md"
    fi
    berth_stop trace
    sleep 3
  done
fi

# 5. The stacks.
# The metrics endpoint, for the density scenario's scrape (a free loopback port).
BENCH_METRICS_ADDR=127.0.0.1:$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
berth_start main bbench0 10.219.0.1/22 10.219.8.0/21 "[telemetry]
metrics_addr = \"$BENCH_METRICS_ADDR\""
"$DOCKER" -H "unix://$BENCH_TMP/main/state/docker.sock" load -i "$BUSYBOX_TAR" >/dev/null \
  || log "berth: docker load failed; its scenarios will fail"
if [ "$BENCH_DOCKERD" = 1 ]; then
  if dockerd_start dbench0 10.220.0.1/22; then
    "$DOCKER" -H "unix://$BENCH_TMP/dockerd/docker.sock" load -i "$BUSYBOX_TAR" >/dev/null \
      || log "dockerd: docker load failed; its scenarios will fail"
  else
    log "dockerd did not start: measuring berth alone"
    dockerd_stop
    BENCH_DOCKERD= DOCKERD_NOTE="not run: dockerd did not start (see raw/dockerd-dockerd.log)"
  fi
fi

# 6. The scenarios.
python3 - "$BENCH_TMP" "$DOCKER" "$BENCH_DOCKERD" > "$BENCH_TMP/sides.json" <<PY
import json, os, sys
tmp, docker, with_dockerd = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
pid = lambda p: int(open(p).read().strip())
state = f"{tmp}/main/state"
sides = {"berth": {
    "host": f"unix://{state}/docker.sock",
    "startup_ms": int(open(f"{tmp}/main/startup_ms").read()),
    "daemons": {"berth up": pid(f"{tmp}/main/up.pid"),
                **{f"berth-{s}": pid(f"{state}/{s}.pid")
                   for s in ("snapshotter", "images", "network", "engine", "gateway")}},
    "bundle_config": f"{state}/bundles/{{id}}/config.json",
    "metrics_addr": "$BENCH_METRICS_ADDR",
    "shim_match": ["berth-shim", " serve ", f"--state-dir {state} "]}}
if with_dockerd:
    d = f"{tmp}/dockerd"
    sides["dockerd"] = {
        "host": f"unix://{d}/docker.sock",
        "startup_ms": int(open(f"{d}/startup_ms").read()),
        "daemons": {"dockerd": pid(f"{d}/dockerd.pid.mine"), "containerd": pid(f"{d}/containerd.pid")},
        "bundle_config": f"{d}/containerd/state/io.containerd.runtime.v2.task/moby/{{id}}/config.json",
        "shim_match": ["containerd-shim-runc-v2", f"{d}/containerd/containerd.sock"]}
ref = open(f"{tmp}/registry_ref").read().strip() if os.path.exists(f"{tmp}/registry_ref") else None
json.dump({"docker": docker, "tmp": tmp, "runs": $RUNS, "rounds": $ROUNDS, "warmup": 3, "density": $DENSITY,
           "parallel_rounds": $PARALLEL_ROUNDS, "registry_ref": ref, "scenarios": "${SCENARIOS:-}",
           "busybox_tar": "$BUSYBOX_TAR", "sides": sides}, sys.stdout, indent=1)
PY
log "scenarios: RUNS=$RUNS ROUNDS=$ROUNDS DENSITY=$DENSITY${BENCH_DOCKERD:+ with dockerd}"
python3 "$ROOT/bench/lib/measure.py" measure --config "$BENCH_TMP/sides.json" \
  --out "$RAW/results.json" --raw "$RAW"

# 7. Pull + unpack of the synthetic 4 x 64 MB image (bench/pull.sh, its own daemons/registry).
if [ "$PULL" = 1 ]; then
  log "bench/pull.sh (synthetic 4 x 64 MB)"
  (
    export RUNS=$PULL_RUNS BERTH_BIN_DIR="$BIN" SHARED_DIR="$SHARED"
    if [ "$BENCH_DOCKERD" = 1 ]; then
      export BENCH_DOCKERD=1 DOCKER_HOST=unix://$BENCH_TMP/dockerd/docker.sock
    else
      unset BENCH_DOCKERD
    fi
    "$ROOT/bench/pull.sh"
  ) > "$RAW/pull.txt" 2> "$RAW/pull.log" || log "bench/pull.sh failed: $(tail -1 "$RAW/pull.log")"
fi

# 7b. Rootless berth beside rootless Podman (bench/rootless.sh, its own user and stack).
if [ "$ROOTLESS" = 1 ]; then
  log "bench/rootless.sh (rootless berth and Podman)"
  RUNS=$RUNS BERTH_BIN_DIR="$BIN" SHARED_DIR="$SHARED" "$ROOT/bench/rootless.sh" \
    > "$RAW/rootless.md" 2> "$RAW/rootless.log" \
    || log "bench/rootless.sh failed: $(tail -1 "$RAW/rootless.log")"
fi

# 7c. VM-isolated containers (bench/vm.sh, its own stack): berth-vm beside runc.
if [ "$VM" = 1 ]; then
  log "bench/vm.sh (berth-vm beside runc, $VM_RUNS VM runs)"
  RUNS=$RUNS VM_RUNS=$VM_RUNS BERTH_BIN_DIR="$BIN" SHARED_DIR="$SHARED" DOCKER="$DOCKER" \
    VM_OUT="$RAW/vm" "$ROOT/bench/vm.sh" > "$RAW/vm.md" 2> "$RAW/vm.log" \
    || log "bench/vm.sh failed: $(tail -1 "$RAW/vm.log")"
fi

# 8. Machine facts and the report.
ver() { "$@" 2>/dev/null | head -1 || true; }
python3 - > "$RAW/facts.json" <<PY
import json, os, platform, subprocess
def out(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:
        return "n/a"
osr = dict(l.strip().split("=", 1) for l in open("/etc/os-release") if "=" in l)
cg = "v2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else (
    "v1 hybrid (v2 at /sys/fs/cgroup/unified)" if os.path.isdir("/sys/fs/cgroup/unified") else "v1")
mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "n/a")
commit = out("git", "-C", "$ROOT", "rev-parse", "--short", "HEAD")
dirty = subprocess.run(["git", "-C", "$ROOT", "status", "--porcelain", "--untracked-files=no"],
                       capture_output=True, text=True).stdout.strip()
facts = {
    "date": "$DATE (UTC), generated $(date -u +%H:%M)",
    "machine": f"{os.cpu_count()} cores ({cpu}), {mem / 1024 / 1024:.1f} GiB",
    "kernel": platform.release(),
    "os": osr.get("PRETTY_NAME", "").strip('"'),
    "cgroups": cg,
    "berth": f"{commit}{' + uncommitted changes' if dirty else ''} (release build)",
    "dockerd": out("dockerd", "--version") if "$BENCH_DOCKERD" == "1" else "$DOCKERD_NOTE",
    "containerd": out("containerd", "--version"),
    "runc": out("runc", "--version"),
    "docker CLI": out("$DOCKER", "version", "--format", "{{.Client.Version}}"),
    "hyperfine": out("hyperfine", "--version"),
    "load average (1/5/15 min)": "$LOAD_START at the start, "
        + " ".join(open("/proc/loadavg").read().split()[:3]) + " at the end (other work on the machine shows here)",
    "settings": "RUNS=$RUNS ROUNDS=$ROUNDS DENSITY=$DENSITY PARALLEL_ROUNDS=$PARALLEL_ROUNDS BREAKDOWN_RUNS=$BREAKDOWN_RUNS PULL_RUNS=$PULL_RUNS VM=$VM VM_RUNS=$VM_RUNS",
}
import sys; json.dump(facts, sys.stdout, indent=1)
PY
python3 "$ROOT/bench/lib/measure.py" report --results "$RAW/results.json" --facts "$RAW/facts.json" \
  --breakdown "$RAW/breakdown.md" --pull "$RAW/pull.txt" --rootless "$RAW/rootless.md" --vm "$RAW/vm.md" \
  --md "$OUT/summary.md" --tsv "$OUT/summary.tsv"
cat "$OUT/summary.md"
