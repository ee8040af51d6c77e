#!/usr/bin/env bash
# VM-isolated containers (`--runtime berth-vm`, docs/vm-runtime.md) beside runc on one berth
# stack: `docker run --rm … busybox true` (bridged and `--network none`), `docker exec c true`
# into a running container, and the host memory one running container adds (RSS and PSS of the
# shim and, for the VM, everything the shim started for it: qemu-system-x86_64, virtiofsd,
# vhost-device-vsock, the vm-relay processes). The accelerator berth-vm uses (`docker info`:
# kvm or tcg) is named in every row. Prints a markdown section.
#
#   bench/vm.sh                                   # release binaries from target/release
#   VM_RUNS=5 RUNS=20 BERTH_BIN_DIR=... bench/vm.sh
#
# Knobs: RUNS (30, hyperfine runs of each runc command), VM_RUNS (10, of each berth-vm command:
# seconds each under TCG), BERTH_BIN_DIR, SHARED_DIR, DOCKER, VM_OUT (a directory for the raw
# hyperfine JSON; default: dropped with the temp dir).
#
# Its own stack (bridge bbench2, 10.219.24.1/22, pools in 10.219.32.0/21, cgroup parent
# berth-bench-vm) on a temp dir under /var/tmp; the guest image is built on first use into
# berth-vm's default cache (/var/cache/berth/vm/guest), by an untimed warm-up run. Everything is
# stopped by PID and removed on exit, also on failure. Needs root, qemu-system-x86_64, virtiofsd,
# vhost-device-vsock, the guest kernel package (deploy/install-deps.sh), hyperfine, python3.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED_DIR:-$ROOT/../shared}
BIN=$(cd "${BERTH_BIN_DIR:-$ROOT/target/release}" && pwd)
RUNS=${RUNS:-30}
VM_RUNS=${VM_RUNS:-10}
DOCKER=${DOCKER:-$(command -v docker || true)}

[ "$(id -u)" = 0 ] || { echo "bench/vm.sh: needs root" >&2; exit 1; }
for t in qemu-system-x86_64 virtiofsd vhost-device-vsock hyperfine python3; do
  command -v "$t" >/dev/null || { echo "bench/vm.sh: $t is not installed (make deps)" >&2; exit 1; }
done
[ -n "$DOCKER" ] || { echo "bench/vm.sh: the docker CLI is missing" >&2; exit 1; }
[ -x "$BIN/berth-agent" ] || { echo "bench/vm.sh: $BIN/berth-agent is not built" >&2; exit 1; }
ls /var/cache/berth/vm/linux-image-*.deb >/dev/null 2>&1 \
  || { echo "bench/vm.sh: no guest kernel package in /var/cache/berth/vm (make deps)" >&2; exit 1; }

BENCH_TMP=$(mktemp -d /var/tmp/berth-vm-bench.XXXXXX)
export BENCH_CGROUP_PARENT=berth-bench-vm
# shellcheck source=bench/lib/stack.sh
source "$ROOT/bench/lib/stack.sh"

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  berth_stop vm
  # What a killed shim may leave behind: its VM's processes name the stack's state dir.
  local pid
  for pid in $(pids_with_arg "$BENCH_TMP/vm/state"); do
    [ "$pid" = $$ ] || kill -KILL "$pid" 2>/dev/null
  done
  unmount_under "$BENCH_TMP"
  local c
  for c in /sys/fs/cgroup/*/berth-bench-vm /sys/fs/cgroup/berth-bench-vm; do
    [ -d "$c" ] || continue
    find "$c" -mindepth 1 -depth -type d -exec rmdir {} \; 2>/dev/null
    rmdir "$c" 2>/dev/null
  done
  [ -z "${VM_OUT:-}" ] || { mkdir -p "$VM_OUT"; cp "$BENCH_TMP"/*.json "$VM_OUT/" 2>/dev/null; }
  rm -rf "$BENCH_TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

python3 "$SHARED/testimages/mkimage.py" busybox --out "$BENCH_TMP/images" >/dev/null
berth_start vm bbench2 10.219.24.1/22 10.219.32.0/21 >&2
export DOCKER_HOST=unix://$BENCH_TMP/vm/state/docker.sock
"$DOCKER" load -q -i "$BENCH_TMP/images/busybox/image.tar" >/dev/null
"$DOCKER" info --format '{{json .Runtimes}}' > "$BENCH_TMP/runtimes.json"

# Untimed: the first berth-vm run builds the guest image (kernel + initramfs) into the cache.
log "warm-up: the first berth-vm container (builds the guest image when it is not cached)"
start=$(date +%s%N)
"$DOCKER" run --rm --runtime berth-vm busybox true
echo $(( ($(date +%s%N) - start) / 1000000 )) > "$BENCH_TMP/first_vm_ms"

# hyperfine NAME RUNS WARMUP COMMAND...
measure() {
  local name=$1 runs=$2 warmup=$3
  shift 3
  log "$name: $runs runs"
  hyperfine -N --style none --warmup "$warmup" --runs "$runs" \
    --export-json "$BENCH_TMP/$name.json" "$@" >/dev/null
}
measure run_runc "$RUNS" 3 "docker run --rm --runtime runc busybox true"
measure run_vm "$VM_RUNS" 1 "docker run --rm --runtime berth-vm busybox true"
measure run_none_runc "$RUNS" 3 "docker run --rm --runtime runc --network none busybox true"
measure run_none_vm "$VM_RUNS" 1 "docker run --rm --runtime berth-vm --network none busybox true"

# Running containers: exec latency, then host memory while both sit idle.
"$DOCKER" run -d --runtime runc --name bench-runc busybox sleep 3000 >/dev/null
"$DOCKER" run -d --runtime berth-vm --name bench-vm busybox sleep 3000 >/dev/null
measure exec_runc "$RUNS" 3 "docker exec bench-runc true"
measure exec_vm "$VM_RUNS" 2 "docker exec bench-vm true"
sleep 3   # let the guest settle after the execs (their relays exit)
for c in bench-runc bench-vm; do
  "$DOCKER" inspect -f '{{.Id}}' "$c" > "$BENCH_TMP/$c.id"
done

python3 - "$BENCH_TMP" "$RUNS" "$VM_RUNS" "$(qemu-system-x86_64 --version | head -1)" \
  "$(runc --version | head -1)" <<'PY'
import json, os, statistics, sys
tmp, runs, vm_runs, qemu, runc = sys.argv[1:6]
state = f"{tmp}/vm/state"

rt = json.load(open(f"{tmp}/runtimes.json")).get("berth-vm", {})
accel = (rt.get("status") or {}).get("accelerator", "unknown")

def ms(name):
    return statistics.median(json.load(open(f"{tmp}/{name}.json"))["results"][0]["times"]) * 1000

procs = {}  # pid -> (ppid, comm, cmdline)
for p in os.listdir("/proc"):
    if not p.isdigit():
        continue
    try:
        stat = open(f"/proc/{p}/stat").read()
        cmd = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        continue
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    ppid = int(stat[stat.rindex(")") + 2:].split()[1])
    procs[int(p)] = (ppid, comm, cmd.strip())

def tree(pid):
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        out.append(q)
        todo += [c for c, (pp, _, _) in procs.items() if pp == q]
    return out

def mem(pid):
    rss = pss = 0
    for line in open(f"/proc/{pid}/smaps_rollup"):
        k, *v = line.split()
        if k == "Rss:":
            rss = int(v[0])
        elif k == "Pss:":
            pss = int(v[0])
    return rss / 1024, pss / 1024

def role(pid):
    _, comm, cmd = procs[pid]
    if "vm-relay" in cmd:
        return "berth-shim vm-relay"
    if comm.startswith("berth-shim"):
        return "berth-shim"
    if comm.startswith("qemu-system"):
        return "qemu-system-x86_64"
    if comm.startswith("virtiofsd"):
        return "virtiofsd"
    if comm.startswith("vhost-device"):
        return "vhost-device-vsock"
    return comm

rows, qemu_cmd = {}, ""
for name in ("bench-runc", "bench-vm"):
    cid = open(f"{tmp}/{name}.id").read().strip()
    shim = int(open(f"{state}/bundles/{cid}/shim.pid").read().strip())
    pids = tree(shim)
    if name == "bench-runc":
        # The container's own `sleep` is the workload, not what berth adds: the shim alone.
        pids = [shim]
    agg = {}
    for pid in pids:
        r = role(pid)
        if r == "qemu-system-x86_64":
            qemu_cmd = procs[pid][2]
        rss, pss = mem(pid)
        n, a, b = agg.get(r, (0, 0.0, 0.0))
        agg[r] = (n + 1, a + rss, b + pss)
    rows[name] = agg

args = qemu_cmd.split()
guest_mib = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "-m"), "?").rstrip("M")
machine = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "-machine"), "")
accel_arg = next((o for o in machine.split(",") if o.startswith("accel=")), "accel=?")
vcpus = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "-smp"), "?")
first = int(open(f"{tmp}/first_vm_ms").read())

print(f"## VM-isolated containers: berth-vm ({accel}) beside runc")
print()
print(f"One berth stack; `--runtime runc` ({runc}) and `--runtime berth-vm` (accelerator **{accel}**, "
      f"from `docker info`; QEMU `{accel_arg}`, {qemu}; guest: {guest_mib} MiB, {vcpus} vCPU). "
      f"hyperfine `-N`, medians; runc: {runs} runs after 3 warm-ups; berth-vm: {vm_runs} runs after "
      f"1–2 warm-ups (after an untimed first VM run that took {first} ms and builds the guest "
      f"image when it is not cached).")
if accel == "tcg":
    print(" Under TCG QEMU emulates the guest CPU in software: a guest kernel boots in seconds. "
          "With KVM the boot, every guest syscall and the exec path would be far faster, and "
          "QEMU's RSS smaller (no translation cache).")
print()
print(f"| what | runc ms | berth-vm ({accel}) ms | berth-vm/runc |")
print("|---|---:|---:|---:|")
for key, label in [("run", "`docker run --rm busybox true`"),
                   ("run_none", "`docker run --rm --network none busybox true`"),
                   ("exec", "`docker exec c true` (running container)")]:
    r, v = ms(f"{key}_runc"), ms(f"{key}_vm")
    print(f"| {label} [{accel}] | {r:.1f} | {v:.1f} | {v / r:.1f} |")
print()
print(f"Host memory one running container adds (`sleep 3000`, idle; /proc/PID/smaps_rollup). "
      f"RSS counts shared pages in every process that maps them — QEMU's guest RAM is a memfd "
      f"that virtiofsd and vhost-device-vsock map too — so the PSS sum is the real cost. "
      f"Guest memory configured: {guest_mib} MiB.")
print()
print(f"| process | runc container: n | RSS MB | PSS MB | berth-vm ({accel}) container: n | RSS MB | PSS MB |")
print("|---|---:|---:|---:|---:|---:|---:|")
order = ["berth-shim", "qemu-system-x86_64", "virtiofsd", "vhost-device-vsock", "berth-shim vm-relay"]
roles = order + sorted(set(rows["bench-vm"]) - set(order))
tot = {k: [0, 0.0, 0.0] for k in rows}
for r in roles:
    cells = []
    for k in ("bench-runc", "bench-vm"):
        n, rss, pss = rows[k].get(r, (0, 0.0, 0.0))
        tot[k][0] += n; tot[k][1] += rss; tot[k][2] += pss
        cells += [str(n), f"{rss:.1f}", f"{pss:.1f}"] if n else ["–", "–", "–"]
    print(f"| {r} | " + " | ".join(cells) + " |")
cells = []
for k in ("bench-runc", "bench-vm"):
    cells += [str(tot[k][0]), f"**{tot[k][1]:.1f}**", f"**{tot[k][2]:.1f}**"]
print(f"| total [{accel}] | " + " | ".join(cells) + " |")
PY
