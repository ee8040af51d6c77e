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
STACK=$BENCH_TMP/berth           # berth_stop's layout: $BENCH_TMP/<name>/{state,root,up.pid,bridge}
REG=$BENCH_TMP/registry
CNI_BRIDGE=bcp$TAG               # the pods' bridge (CNI)
CGROUP_PARENT=berth-critest-$TAG
POD_SUBNET=${POD_SUBNET:-10.233.0.0/16}

# portmap's top-level chains are shared and never removed by the plugin: drop them at the end
# only when this run made them.
PORTMAP_CHAINS_BEFORE=0
iptables -w 5 -t nat -S CNI-HOSTPORT-DNAT >/dev/null 2>&1 && PORTMAP_CHAINS_BEFORE=1

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
  if [ -f "$BENCH_TMP/containerd/pid" ]; then
    stop_pid "$(cat "$BENCH_TMP/containerd/pid")" 25
    # its shims outlive it by design; theirs name its socket on their command line
    for pid in $(pids_with_arg "$BENCH_TMP/containerd/containerd.sock"); do kill -KILL "$pid"; done
    runc_root_cleanup "$BENCH_TMP/containerd/runc/k8s.io"
  fi
  "$SHARED/testimages/registry.sh" stop "$REG" >/dev/null 2>&1
  # Pods' CNI leftovers: the bridge plugin's bridge and veths, portmap's per-pod chains.
  delete_bridge "$CNI_BRIDGE"
  iptables_delete nat "berth-critest-$TAG" "^CNI-DN-.*berth-critest-$TAG"
  if [ "$PORTMAP_CHAINS_BEFORE" = 0 ] && [ -z "$(iptables -w 5 -t nat -S CNI-HOSTPORT-DNAT 2>/dev/null | grep '^-A')" ]; then
    iptables_delete nat "CNI-HOSTPORT-" "^CNI-HOSTPORT-"
  fi
  ip -all netns list 2>/dev/null | awk '{print $1}' | grep -F "$TAG" | while read -r ns; do
    ip netns del "$ns"
  done
  for c in /sys/fs/cgroup/$CGROUP_PARENT /sys/fs/cgroup/*/$CGROUP_PARENT; do
    [ -d "$c" ] || continue
    find "$c" -mindepth 1 -depth -type d -exec rmdir {} \; 2>/dev/null
    rmdir "$c" 2>/dev/null
  done
  unmount_under "$BENCH_TMP"
  if [ "${KEEP:-0}" = 1 ]; then say "kept $BENCH_TMP"; else rm -rf "$BENCH_TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. registry + stand-in images ---------------------------------------------------------------
PORT=$(free_port)
"$SHARED/testimages/registry.sh" start "$PORT" "$REG" >/dev/null
say "registry on 127.0.0.1:$PORT; pushing the critest stand-ins"
python3 "$SHARED/testimages/criimages.py" --out "$BENCH_TMP/images" --push "127.0.0.1:$PORT" \
  > "$BENCH_TMP/images.txt"

# 2. hosts.toml: every registry critest names (and any other: _default) is the loopback one.
CERTS=$BENCH_TMP/certs.d
for host in gcr.io registry.k8s.io _default; do
  mkdir -p "$CERTS/$host"
  cat > "$CERTS/$host/hosts.toml" <<TOML
# The loopback registry is the mirror and the server too, so a missing image fails here and
# never reaches the network. (With only a server, containerd 1.6.20's CRI still went to
# https://gcr.io here: it needs the [host] entry.)
server = "http://127.0.0.1:$PORT"

[host."http://127.0.0.1:$PORT"]
  capabilities = ["pull", "resolve"]
TOML
done

# 3. CNI ---------------------------------------------------------------------------------------
CNI_DIR=$BENCH_TMP/net.d
mkdir -p "$CNI_DIR"
cat > "$CNI_DIR/10-berth-critest.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "berth-critest-$TAG",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$CNI_BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "$POD_SUBNET" }]],
        "routes": [{ "dst": "0.0.0.0/0" }],
        "dataDir": "$BENCH_TMP/cni-ipam"
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
JSON

# 4. the runtime under test -------------------------------------------------------------------
if [ "$RUNTIME" = containerd ]; then
  # Debian's containerd with its CRI plugin, on its own root, state, socket, CNI dir and mirrors:
  # the reference the stand-in images and this script are checked against.
  CTD=$BENCH_TMP/containerd
  mkdir -p "$CTD"
  cat > "$CTD/config.toml" <<TOML
version = 2
root = "$CTD/root"
state = "$CTD/state"
[grpc]
  address = "$CTD/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$CTD/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$CNI_DIR"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$CERTS"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      Root = "$CTD/runc"
TOML
  containerd --config "$CTD/config.toml" > "$CTD/containerd.log" 2>&1 &
  echo $! > "$CTD/pid"
  for _ in $(seq 1 1200); do [ -S "$CTD/containerd.sock" ] && break; sleep 0.05; done
  [ -S "$CTD/containerd.sock" ] || { say "containerd did not start:"; tail -20 "$CTD/containerd.log" >&2; exit 1; }
  SOCK=unix://$CTD/containerd.sock
  RUNTIME_LOG=$CTD/containerd.log
else
  mkdir -p "$STACK"
  echo "bcs$TAG" > "$STACK/bridge"
  cat > "$STACK/berth.toml" <<TOML
[images]
registry_config_path = "$CERTS"

[network]
bridge = "bcs$TAG"
bip = "10.234.0.1/24"
default_address_pools = [{ base = "10.235.0.0/16", size = 24 }]
cni_conf_dir = "$CNI_DIR"
cni_bin_dirs = ["/usr/lib/cni"]

[engine]
cgroup_parent = "$CGROUP_PARENT"
TOML
  "$BIN/berth" up --config "$STACK/berth.toml" --root "$STACK/root" --state-dir "$STACK/state" \
    > "$STACK/up.out" 2> "$STACK/up.log" &
  echo $! > "$STACK/up.pid"
  for _ in $(seq 1 1200); do
    grep -q "berth is up" "$STACK/up.out" 2>/dev/null && break
    kill -0 "$(cat "$STACK/up.pid")" 2>/dev/null || { say "berth did not start:"; tail -20 "$STACK/up.log" >&2; exit 1; }
    sleep 0.05
  done
  grep -q "berth is up" "$STACK/up.out" || { say "berth not up after 60 s"; exit 1; }
  SOCK=unix://$STACK/state/cri.sock
  RUNTIME_LOG=$STACK/up.log
fi
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
