# Sourced by bench/run.sh: start and stop what the bench measures, each on its own temp dirs,
# socket, bridge, subnet, cgroup parent and iptables chains, so nothing collides with a system
# docker/containerd, with berth's test stacks, or between berth and dockerd. Everything is stopped
# by the PID we started, and every kernel object we made (bridges, veths, iptables rules, mounts,
# cgroups) is removed, also when the bench fails half-way (run.sh calls bench_cleanup from a trap).
#
# Needs: BENCH_TMP (a temp dir), BIN (release binaries), ROOT (the workspace).

# ---------------------------------------------------------------------------------------------
# small helpers

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# wait_pid PID SECONDS: wait for a process we started to exit; SIGKILL it after SECONDS.
stop_pid() {
  local pid=$1 secs=${2:-15} sig=${3:-TERM}
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  local i
  for ((i = 0; i < secs * 20; i++)); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.05
  done
  log "pid $pid did not stop after ${secs}s; SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# Unmounts every mount point at or below DIR, deepest first.
unmount_under() {
  local dir=$1 m _
  for _ in 1 2 3; do
    local points
    points=$(awk -v d="$dir" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | awk '{print length, $0}' | sort -rn | cut -d' ' -f2-)
    [ -n "$points" ] || return 0
    while read -r m; do umount -l "$m" 2>/dev/null || true; done <<< "$points"
  done
}

# PIDs of processes whose command line contains STRING (our temp dir paths are unique, so this
# only ever matches processes this bench started, directly or through its daemons).
pids_with_arg() {
  local needle=$1 p
  for p in /proc/[0-9]*; do
    [ -r "$p/cmdline" ] || continue
    if tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -qF -- "$needle"; then
      echo "${p#/proc/}"
    fi
  done
}

# Deletes a bridge and every port enslaved to it.
delete_bridge() {
  local br=$1 port
  ip link show "$br" >/dev/null 2>&1 || return 0
  for port in $(ip -o link show master "$br" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
    ip link del "$port" 2>/dev/null || true
  done
  ip link del "$br" 2>/dev/null || true
}

# iptables_delete TABLE REGEX_RULE REGEX_CHAIN: deletes the rules of TABLE whose text matches
# REGEX_RULE (outside the chains to drop), then flushes and deletes the chains matching
# REGEX_CHAIN. One iptables-restore --noflush transaction per table.
iptables_delete() {
  local table=$1 rule_re=$2 chain_re=$3
  command -v iptables-save >/dev/null || return 0
  local script
  script=$(iptables-save -t "$table" 2>/dev/null | awk -v rre="$rule_re" -v cre="$chain_re" '
    /^:/ { c = substr($1, 2); if (c ~ cre) chains[++n] = c; next }
    /^-A / { if ($2 !~ cre && $0 ~ rre) { sub(/^-A /, "-D "); print } }
    END { for (i = 1; i <= n; i++) print "-F " chains[i]; for (i = 1; i <= n; i++) print "-X " chains[i] }')
  [ -n "$script" ] || return 0
  printf '*%s\n%s\nCOMMIT\n' "$table" "$script" | iptables-restore -w 5 --noflush 2>/dev/null \
    || log "iptables cleanup of $table left something behind"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# ---------------------------------------------------------------------------------------------
# berth

# berth_start NAME BRIDGE BIP POOL [EXTRA_TOML]: a release stack under $BENCH_TMP/NAME; sets
# BERTH_<NAME>_UP_PID and prints the start-up time in ms to $BENCH_TMP/NAME/startup_ms.
berth_start() {
  local name=$1 bridge=$2 bip=$3 pool=$4 extra=${5:-}
  local d=$BENCH_TMP/$name
  mkdir -p "$d"
  echo "$bridge" > "$d/bridge"
  cat > "$d/berth.toml" <<TOML
[network]
bridge = "$bridge"
bip = "$bip"
default_address_pools = [{ base = "$pool", size = 24 }]
[engine]
cgroup_parent = "${BENCH_CGROUP_PARENT:-berth-bench}"
$extra
TOML
  local start end
  start=$(date +%s%N)
  "$BIN/berth" up --config "$d/berth.toml" --root "$d/root" --state-dir "$d/state" \
    > "$d/up.out" 2> "$d/up.log" &
  local pid=$!
  echo "$pid" > "$d/up.pid"
  until grep -q "berth is up" "$d/up.out" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "berth ($name) did not start:"; tail -20 "$d/up.log" >&2; return 1
    fi
    if (( ($(date +%s%N) - start) / 1000000000 > 60 )); then
      log "berth ($name) not up after 60 s"; tail -20 "$d/up.log" >&2; return 1
    fi
    sleep 0.005
  done
  end=$(date +%s%N)
  echo $(( (end - start) / 1000000 )) > "$d/startup_ms"
  log "berth ($name) up in $(cat "$d/startup_ms") ms: unix://$d/state/docker.sock"
}

berth_stop() {
  local name=$1
  local d=$BENCH_TMP/$name
  [ -d "$d" ] || return 0
  local sock=$d/state/docker.sock up_pid
  up_pid=$(cat "$d/up.pid" 2>/dev/null || true)
  if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null && [ -S "$sock" ]; then
    local ids
    ids=$(timeout 20 "$DOCKER" -H "unix://$sock" ps -aq 2>/dev/null || true)
    # shellcheck disable=SC2086
    [ -z "$ids" ] || timeout 120 "$DOCKER" -H "unix://$sock" rm -f $ids >/dev/null 2>&1 || true
  fi
  stop_pid "$up_pid" 25
  # Shims outlive every daemon by design: stop the ones this stack started, by their PID files.
  local f pid
  for f in "$d"/state/bundles/*/shim.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f" 2>/dev/null || true)
    [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
  done
  # And any shim of this stack whose bundle is already gone (its command line names our state dir).
  for pid in $(pids_with_arg "--state-dir $d/state "); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  runc_root_cleanup "$d/state/runtime/runc"
  unmount_under "$d"
  local bridge
  bridge=$(cat "$d/bridge" 2>/dev/null || true)
  if [ -n "$bridge" ]; then
    delete_bridge "$bridge"
    local up
    up=$(echo "$bridge" | tr '[:lower:]' '[:upper:]')
    iptables_delete nat "\"berth-$bridge:" "^BERTH-$up-"
    iptables_delete filter "\"berth-$bridge:" "^BERTH-$up-"
  fi
}

# Deletes (killing first) every container left in a runc --root.
runc_root_cleanup() {
  local root=$1 id
  [ -d "$root" ] || return 0
  for id in $(runc --root "$root" list -q 2>/dev/null); do
    runc --root "$root" delete --force "$id" >/dev/null 2>&1 || true
  done
}

# Container cgroups of every bench stack (cgroup_parent = berth-bench), once all stacks stopped.
berth_cgroups_cleanup() {
  local c
  for c in /sys/fs/cgroup/*/berth-bench /sys/fs/cgroup/berth-bench; do
    [ -d "$c" ] || continue
    find "$c" -mindepth 1 -depth -type d -exec rmdir {} \; 2>/dev/null || true
    rmdir "$c" 2>/dev/null || true
  done
}

# ---------------------------------------------------------------------------------------------
# dockerd (Debian's docker.io) with its own containerd

# Installs docker.io when missing (idempotent) without letting the package start its services,
# then makes sure the system docker and containerd are stopped and disabled.
docker_install() {
  if ! dpkg-query -W -f='${Status}' docker.io 2>/dev/null | grep -q "install ok installed"; then
    log "installing Debian's docker.io"
    local guard=
    # A policy-rc.d that says 101 keeps invoke-rc.d and deb-systemd-invoke from starting the
    # services the package ships; ours is removed again if we placed it.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
      chmod +x /usr/sbin/policy-rc.d
      guard=1
    fi
    local rc=0
    (export DEBIAN_FRONTEND=noninteractive
     apt-get update -qq && apt-get install -y -qq --no-install-recommends docker.io >/dev/null) || rc=$?
    [ -z "$guard" ] || rm -f /usr/sbin/policy-rc.d
    [ "$rc" = 0 ] || { log "apt-get install docker.io failed ($rc)"; return "$rc"; }
  fi
  local svc
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    for svc in docker.socket docker.service containerd.service; do
      if systemctl is-active --quiet "$svc" 2>/dev/null; then
        log "stopping the system $svc"
        systemctl stop "$svc" || true
      fi
      systemctl disable --quiet "$svc" 2>/dev/null || true
    done
  else
    # No systemd: the package's sysvinit scripts, if one is running.
    for svc in docker containerd; do
      if [ -x "/etc/init.d/$svc" ] && "/etc/init.d/$svc" status >/dev/null 2>&1; then
        log "stopping the system $svc"
        "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
      fi
      command -v update-rc.d >/dev/null && update-rc.d "$svc" disable >/dev/null 2>&1 || true
    done
    # Also drop the systemd enablement links the package made, for when this machine boots
    # with systemd.
    rm -f /etc/systemd/system/multi-user.target.wants/docker.service \
          /etc/systemd/system/sockets.target.wants/docker.socket 2>/dev/null || true
  fi
}

# dockerd_start BRIDGE CIDR: containerd and dockerd under $BENCH_TMP/dockerd.
dockerd_start() {
  local bridge=$1 cidr=$2
  local d=$BENCH_TMP/dockerd
  mkdir -p "$d/containerd" "$d/data" "$d/exec"
  # What we change outside our dirs, to put back exactly.
  {
    echo "bridge=$bridge"
    echo "ip_forward=$(cat /proc/sys/net/ipv4/ip_forward)"
    echo "forward_policy=$(iptables -S FORWARD 2>/dev/null | awk '$1 == "-P" {print $3}')"
    local f
    for f in bridge-nf-call-iptables bridge-nf-call-ip6tables; do
      [ -r "/proc/sys/net/bridge/$f" ] && echo "${f//-/_}=$(cat "/proc/sys/net/bridge/$f")"
    done
    [ -e /etc/docker/key.json ] && echo "had_key_json=1"
    [ -e /run/docker ] && echo "had_run_docker=1"
    [ -e /run/containerd ] && echo "had_run_containerd=1"
    for f in /sys/fs/cgroup/*/docker /sys/fs/cgroup/docker; do
      [ -d "$f" ] && echo "had_cgroup=$f"
    done
    # A DOCKER chain already there belongs to someone else: then dockerd runs without iptables
    # rather than sharing (and later deleting) it.
    if iptables -S DOCKER >/dev/null 2>&1 || iptables -t nat -S DOCKER >/dev/null 2>&1; then
      echo "iptables=false"
    else
      echo "iptables=true"
    fi
  } > "$d/host.before"
  local ipt
  ipt=$(awk -F= '$1 == "iptables" {print $2}' "$d/host.before")
  [ "$ipt" = true ] || log "DOCKER iptables chains exist already: dockerd runs with --iptables=false"

  ip link add name "$bridge" type bridge
  ip addr add "$cidr" dev "$bridge"
  ip link set "$bridge" up

  cat > "$d/containerd/config.toml" <<TOML
version = 2
root = "$d/containerd/root"
state = "$d/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$d/containerd/containerd.sock"
[ttrpc]
  address = "$d/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$d/containerd/opt"
TOML
  echo '{}' > "$d/daemon.json"
  local start end
  start=$(date +%s%N)
  containerd --config "$d/containerd/config.toml" > "$d/containerd.log" 2>&1 &
  echo $! > "$d/containerd.pid"
  local i
  for ((i = 0; i < 400; i++)); do
    [ -S "$d/containerd/containerd.sock" ] && break
    kill -0 "$(cat "$d/containerd.pid")" 2>/dev/null || { tail "$d/containerd.log" >&2; return 1; }
    sleep 0.025
  done
  dockerd --config-file "$d/daemon.json" \
    --host "unix://$d/docker.sock" \
    --data-root "$d/data" --exec-root "$d/exec" --pidfile "$d/docker.pid" \
    --containerd "$d/containerd/containerd.sock" \
    --bridge "$bridge" --iptables="$ipt" --ip6tables=false \
    --storage-driver overlay2 \
    > "$d/dockerd.log" 2>&1 &
  echo $! > "$d/dockerd.pid.mine"
  until curl -sf --unix-socket "$d/docker.sock" http://d/_ping >/dev/null 2>&1; do
    if ! kill -0 "$(cat "$d/dockerd.pid.mine")" 2>/dev/null; then
      log "dockerd did not start:"; tail -20 "$d/dockerd.log" >&2; return 1
    fi
    if (( ($(date +%s%N) - start) / 1000000000 > 60 )); then
      log "dockerd not up after 60 s"; tail -20 "$d/dockerd.log" >&2; return 1
    fi
    sleep 0.005
  done
  end=$(date +%s%N)
  echo $(( (end - start) / 1000000 )) > "$d/startup_ms"
  log "dockerd $(dockerd --version | awk '{print $3}' | tr -d ,) up in $(cat "$d/startup_ms") ms (containerd + dockerd): unix://$d/docker.sock"
}

dockerd_stop() {
  local d=$BENCH_TMP/dockerd
  [ -d "$d" ] || return 0
  local sock=$d/docker.sock dpid cpid
  dpid=$(cat "$d/dockerd.pid.mine" 2>/dev/null || true)
  cpid=$(cat "$d/containerd.pid" 2>/dev/null || true)
  if [ -n "$dpid" ] && kill -0 "$dpid" 2>/dev/null && [ -S "$sock" ]; then
    local ids
    ids=$(timeout 20 "$DOCKER" -H "unix://$sock" ps -aq 2>/dev/null || true)
    # shellcheck disable=SC2086
    [ -z "$ids" ] || timeout 120 "$DOCKER" -H "unix://$sock" rm -f $ids >/dev/null 2>&1 || true
  fi
  stop_pid "$dpid" 30
  stop_pid "$cpid" 15
  # Shims of our containerd (they carry its socket path on their command line).
  local pid
  for pid in $(pids_with_arg "$d/containerd/containerd.sock"); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  unmount_under "$d"
  [ -f "$d/host.before" ] || return 0
  local before=$d/host.before
  val() { awk -F= -v k="$1" '$1 == k {print substr($0, length(k) + 2); exit}' "$before"; }
  delete_bridge "$(val bridge)"
  if [ "$(val iptables)" = true ]; then
    local br
    br=$(val bridge)
    iptables_delete filter "(-j DOCKER|$br)" "^DOCKER"
    iptables_delete nat "(-j DOCKER|$br)" "^DOCKER"
    local pol
    pol=$(val forward_policy)
    [ -z "$pol" ] || iptables -P FORWARD "$pol" 2>/dev/null || true
  fi
  local v
  v=$(val ip_forward); [ -z "$v" ] || echo "$v" > /proc/sys/net/ipv4/ip_forward 2>/dev/null || true
  for f in bridge-nf-call-iptables bridge-nf-call-ip6tables; do
    v=$(val "${f//-/_}"); [ -z "$v" ] || echo "$v" > "/proc/sys/net/bridge/$f" 2>/dev/null || true
  done
  [ -n "$(val had_key_json)" ] || rm -f /etc/docker/key.json
  [ -n "$(val had_run_docker)" ] || rm -rf /run/docker
  if [ -z "$(val had_run_containerd)" ] && [ -d /run/containerd ]; then
    find /run/containerd -depth -type d -empty -delete 2>/dev/null || true
  fi
  local c
  for c in /sys/fs/cgroup/*/docker /sys/fs/cgroup/docker; do
    [ -d "$c" ] || continue
    grep -qxF "had_cgroup=$c" "$before" && continue
    find "$c" -mindepth 1 -depth -type d -exec rmdir {} \; 2>/dev/null || true
    rmdir "$c" 2>/dev/null || true
  done
}

# ---------------------------------------------------------------------------------------------
# loopback registry with busybox, and the OTLP collector

registry_start() {
  local d=$BENCH_TMP/registry port
  port=$(free_port)
  "$SHARED/testimages/registry.sh" start "$port" "$d" >/dev/null
  skopeo copy --quiet --dest-tls-verify=false \
    "oci:$BENCH_TMP/images/busybox/oci:latest" "docker://127.0.0.1:$port/busybox:latest"
  echo "127.0.0.1:$port/busybox:latest" > "$BENCH_TMP/registry_ref"
  log "registry on 127.0.0.1:$port with busybox"
}

registry_stop() {
  [ -d "$BENCH_TMP/registry" ] || return 0
  local pid
  pid=$(cat "$BENCH_TMP/registry/registry.pid" 2>/dev/null || true)
  stop_pid "$pid" 5
  rm -f "$BENCH_TMP/registry/registry.pid"
}
