#!/usr/bin/env bash
# Runs critest (cri-tools v1.32, the CRI conformance suite) against a berth stack of this tree,
# offline, in one command:
#
#   deploy/critest.sh [critest flags...]        e.g. --ginkgo.focus='image' or --ginkgo.skip=...
#
# What it does, all on temp dirs under $CRITEST_TMP (default /var/tmp):
#   1. a loopback registry (../shared/testimages/registry.sh) holding the stand-ins of every image
#      critest's Linux specs use (../shared/testimages/criimages.py);
#   2. a hosts.toml directory ([images] registry_config_path) that sends gcr.io, registry.k8s.io
#      and every other registry (_default) to that registry, so nothing leaves the machine;
#   3. a CNI conflist (bridge + host-local + portmap, from /usr/lib/cni) in its own
#      [network] cni_conf_dir, on its own bridge and subnet;
#   4. `target/debug/berth up` with its own root, state dir, bridge and cgroup parent;
#   5. critest on <state>/cri.sock for both endpoints, with JUnit and JSON reports;
#   6. totals (specs, ran, passed, failed, skipped) and every failed spec with the first line of
#      its failure; the reports stay in $RESULTS (default target/critest/<timestamp>).
# Everything it started or made (stack, shims, runc containers, mounts, registry, bridges,
# iptables chains, cgroups, temp dirs) is removed on exit, also when it fails or is interrupted.
#
# critest: $CRITEST (default /var/tmp/critest-bin/critest). It is a ginkgo test binary; build it
# from a cri-tools v1.32.0 checkout with Go 1.23 (Debian bookworm-backports: golang-1.23-go):
#   cd cri-tools && GOFLAGS=-mod=vendor /usr/lib/go-1.23/bin/go test -c -o /var/tmp/critest-bin/critest ./cmd/critest
# or set CRI_TOOLS_SRC=<that checkout> and this script builds it there when it is missing.
# crictl ($CRICTL, default beside critest; `go build -o ... ./cmd/crictl`), when present, removes
# the pods an interrupted run leaves before the runtime is stopped.
#
# RUNTIME=containerd runs the same suite, images, mirrors and CNI config against Debian's
# containerd 1.6 CRI plugin instead (its own root, state and socket): the reference.
#
# Environment: RUNTIME, RESULTS, CRITEST, CRI_TOOLS_SRC, CRITEST_TMP, KEEP=1 (leave the temp dir for
# inspection; the stack, registry and kernel objects are still removed).
# Exit status: critest's (0 when every spec that ran passed).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=$ROOT/../shared
BIN=$ROOT/target/debug
CRITEST=${CRITEST:-/var/tmp/critest-bin/critest}
CRICTL=${CRICTL:-$(dirname "$CRITEST")/crictl}
RUNTIME=${RUNTIME:-berth}
case "$RUNTIME" in berth | containerd) ;; *) echo "RUNTIME is berth or containerd" >&2; exit 2 ;; esac
RESULTS=${RESULTS:-$ROOT/target/critest/$RUNTIME-$(date -u +%Y%m%dT%H%M%SZ)}

say() { printf '[critest %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

[ "$(id -u)" = 0 ] || { say "needs root (berth runs containers and CNI)"; exit 2; }
for b in berth berth-engine berth-gateway; do
  [ "$RUNTIME" = containerd ] || [ -x "$BIN/$b" ] || { say "missing $BIN/$b: run 'cargo build --workspace --bins' first"; exit 2; }
done
for c in docker-registry skopeo runc python3; do
  command -v "$c" >/dev/null || { say "missing $c: run deploy/install-deps.sh"; exit 2; }
done

if [ ! -x "$CRITEST" ]; then
  if [ -n "${CRI_TOOLS_SRC:-}" ]; then
    say "building critest from $CRI_TOOLS_SRC"
    mkdir -p "$(dirname "$CRITEST")"
    (cd "$CRI_TOOLS_SRC" && GOFLAGS=-mod=vendor GOTOOLCHAIN=local \
      GOCACHE=${GOCACHE:-/var/tmp/gocache} GOMODCACHE=${GOMODCACHE:-/var/tmp/gomodcache} \
      sh -c '"$0" test -c -o "$1" ./cmd/critest && "$0" build -o "$2" ./cmd/crictl' \
      "${GO:-/usr/lib/go-1.23/bin/go}" "$CRITEST" "$CRICTL")
  else
    say "no critest at $CRITEST: set CRITEST, or CRI_TOOLS_SRC to a cri-tools v1.32.0 checkout"
    exit 2
  fi
fi

# The helpers the bench uses to stop a berth stack and remove what it made.
BENCH_TMP=$(mktemp -d "${CRITEST_TMP:-/var/tmp}/berth-critest.XXXXXX")
chmod 0755 "$BENCH_TMP"
DOCKER=$(command -v docker || echo false)
# shellcheck source=../bench/lib/stack.sh
. "$ROOT/bench/lib/stack.sh"
log() { say "$@"; }

TAG=$(printf '%04x' $((RANDOM % 65536)))
REG=$BENCH_TMP/registry
# shellcheck source=../bench/lib/cri.sh
. "$ROOT/bench/lib/cri.sh"

cleanup() {
  local rc=$?
  set +e
  say "cleaning up"
  stop_pid "${CRITEST_PID:-}" 10
  # Pods an interrupted spec left: removed through the CRI, so the runtime tears down their
  # networks (CNI DEL) before it stops.
  if [ -n "${SOCK:-}" ] && [ -x "$CRICTL" ]; then
    timeout 60 "$CRICTL" --runtime-endpoint "$SOCK" --timeout 20s rmp --all --force >/dev/null 2>&1
  fi
  berth_stop berth
  cri_containerd_stop
  cri_cleanup "$REG"
  if [ "${KEEP:-0}" = 1 ]; then say "kept $BENCH_TMP"; else rm -rf "$BENCH_TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1-3. registry and stand-in images, mirrors, CNI (bench/lib/cri.sh) ------------------------
say "starting a loopback registry and pushing the critest stand-ins"
ADDR=$(cri_registry "$REG")
say "registry on $ADDR"
cri_mirrors "$ADDR"
cri_conflist

# 4. the runtime under test -------------------------------------------------------------------
# RUNTIME=containerd: Debian's containerd with its CRI plugin, the reference the stand-in images
# and this script are checked against.
cri_"$RUNTIME"_start
SOCK_VAR=CRI_SOCK_$RUNTIME LOG_VAR=CRI_LOG_$RUNTIME
SOCK=unix://${!SOCK_VAR}
RUNTIME_LOG=${!LOG_VAR}
say "$RUNTIME up: $SOCK"

# 5. critest -----------------------------------------------------------------------------------
mkdir -p "$RESULTS"
say "critest $(basename "$CRITEST") -> $RESULTS"
# In the background and waited for, so a TERM or INT to this script runs the cleanup at once.
(cd "$BENCH_TMP" && exec "$CRITEST" \
  --runtime-endpoint "$SOCK" --image-endpoint "$SOCK" \
  --ginkgo.junit-report "$RESULTS/junit.xml" --ginkgo.json-report "$RESULTS/report.json" \
  --ginkgo.no-color --ginkgo.timeout 2h "$@") > "$RESULTS/critest.log" 2>&1 &
CRITEST_PID=$!
set +e
wait "$CRITEST_PID"
CRITEST_RC=$?
CRITEST_PID=
set -e
cp "$RUNTIME_LOG" "$RESULTS/$RUNTIME.log" 2>/dev/null || true

# 6. totals ------------------------------------------------------------------------------------
if [ -f "$RESULTS/report.json" ]; then
  python3 - "$RESULTS/report.json" <<'PY' | tee "$RESULTS/summary.txt"
import collections, json, re, sys
specs = [s for r in json.load(open(sys.argv[1])) for s in r.get("SpecReports") or []
         if s.get("LeafNodeType") == "It"]
def name(s):
    return " ".join(s.get("ContainerHierarchyTexts") or []) + " " + s.get("LeafNodeText", "")
count = lambda states: sum(1 for s in specs if s["State"] in states)
failed = [s for s in specs if s["State"] not in ("passed", "skipped", "pending")]
conf = [s for s in specs if "[Conformance]" in name(s) and s["State"] not in ("skipped", "pending")]
print(f"specs {len(specs)}  ran {len(specs) - count(('skipped', 'pending'))}  "
      f"passed {count(('passed',))}  failed {len(failed)}  skipped {count(('skipped', 'pending'))}  "
      f"[Conformance] passed {sum(1 for s in conf if s['State'] == 'passed')} of {len(conf)} run")
def cause(s):
    msg = " ".join((s.get("Failure") or {}).get("Message", "").split())
    msg = re.sub(r"<\*?[\w.]+ \| 0x[0-9a-f]+>: ", "", msg)
    msg = re.sub(r"^Unexpected error: ", "", msg)
    return re.split(r" \{ s: | Unexpected error: ", msg)[0][:200]  # drop gomega's value dumps
by_cause = collections.Counter(re.sub(r"RuntimeService\.\w+", "RuntimeService.*", cause(s))
                               for s in failed)
if failed:
    print("failures by cause:")
    for c, n in by_cause.most_common():
        print(f"  {n:3d}  {c}")
for s in failed:
    print(f"FAIL [{s['State']}] {name(s)}\n     {cause(s)}")
PY
else
  say "critest wrote no report; see $RESULTS/critest.log"
  tail -20 "$RESULTS/critest.log" >&2
fi
say "reports: $RESULTS (critest.log, junit.xml, report.json, summary.txt, $RUNTIME.log)"
exit "$CRITEST_RC"
