# Sourced by deploy/critest.sh and bench/cri.sh (after bench/lib/stack.sh): the offline CRI
# environment both need, and the two CRI runtimes compared, each on its own temp dirs, socket,
# bridge, subnet and cgroup parent.
#
# Needs: BENCH_TMP, BIN (berth binaries), SHARED (../shared), TAG (4 hex digits, unique per run).
# Sets: CNI_BRIDGE, CGROUP_PARENT, POD_SUBNET, CERTS, CNI_DIR, and per started runtime
# CRI_SOCK_<runtime> / CRI_LOG_<runtime>.

CNI_BRIDGE=bcp$TAG               # the pods' bridge (CNI)
CGROUP_PARENT=berth-critest-$TAG
POD_SUBNET=${POD_SUBNET:-10.233.0.0/16}
CERTS=$BENCH_TMP/certs.d
CNI_DIR=$BENCH_TMP/net.d

# portmap's top-level chains are shared and never removed by the plugin: drop them at the end
# only when this run made them.
PORTMAP_CHAINS_BEFORE=0
iptables -w 5 -t nat -S CNI-HOSTPORT-DNAT >/dev/null 2>&1 && PORTMAP_CHAINS_BEFORE=1

# cri_registry REGDIR: a loopback registry holding the stand-ins of every image critest's Linux
# specs use (../shared/testimages/criimages.py); prints its host:port.
cri_registry() {
  local reg=$1 port
  port=$(free_port)
  "$SHARED/testimages/registry.sh" start "$port" "$reg" >/dev/null
  python3 "$SHARED/testimages/criimages.py" --out "$BENCH_TMP/images" --push "127.0.0.1:$port" \
    > "$BENCH_TMP/images.txt"
  echo "127.0.0.1:$port"
}

# cri_mirrors HOST:PORT: hosts.toml under $CERTS that sends gcr.io, registry.k8s.io and every
# other registry (_default) to the loopback one, so nothing leaves the machine.
cri_mirrors() {
  local addr=$1 host
  for host in gcr.io registry.k8s.io _default; do
    mkdir -p "$CERTS/$host"
    cat > "$CERTS/$host/hosts.toml" <<TOML
# The loopback registry is the mirror and the server too, so a missing image fails here and
# never reaches the network. (With only a server, containerd 1.6.20's CRI still went to
# https://gcr.io here: it needs the [host] entry.)
server = "http://$addr"

[host."http://$addr"]
  capabilities = ["pull", "resolve"]
TOML
  done
}

# cri_conflist: a CNI conflist (bridge + host-local + portmap, from /usr/lib/cni) in $CNI_DIR.
cri_conflist() {
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
}

# cri_containerd_start: Debian's containerd with its CRI plugin, on its own root, state, socket,
# CNI dir and mirrors (pidfile $BENCH_TMP/containerd/pid).
cri_containerd_start() {
  local ctd=$BENCH_TMP/containerd
  mkdir -p "$ctd"
  cat > "$ctd/config.toml" <<TOML
version = 2
root = "$ctd/root"
state = "$ctd/state"
[grpc]
  address = "$ctd/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$ctd/opt"
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
      Root = "$ctd/runc"
TOML
  containerd --config "$ctd/config.toml" > "$ctd/containerd.log" 2>&1 &
  echo $! > "$ctd/pid"
  for _ in $(seq 1 1200); do [ -S "$ctd/containerd.sock" ] && break; sleep 0.05; done
  [ -S "$ctd/containerd.sock" ] || { log "containerd did not start:"; tail -20 "$ctd/containerd.log" >&2; return 1; }
  CRI_SOCK_containerd=$ctd/containerd.sock
  CRI_LOG_containerd=$ctd/containerd.log
}

# cri_containerd_stop: containerd, its shims (they outlive it by design; theirs name its socket
# on their command line) and their runc state.
cri_containerd_stop() {
  local ctd=$BENCH_TMP/containerd pid
  [ -f "$ctd/pid" ] || return 0
  stop_pid "$(cat "$ctd/pid")" 25
  for pid in $(pids_with_arg "$ctd/containerd.sock"); do kill -KILL "$pid"; done
  runc_root_cleanup "$ctd/runc/k8s.io"
  rm -f "$ctd/pid"
}

# cri_berth_start: `$BIN/berth up` with its own root, state dir, bridge and cgroup parent, the
# mirrors and the CNI dir (berth_stop's layout: $BENCH_TMP/berth/{state,root,up.pid,bridge}).
cri_berth_start() {
  local stack=$BENCH_TMP/berth
  mkdir -p "$stack"
  echo "bcs$TAG" > "$stack/bridge"
  cat > "$stack/berth.toml" <<TOML
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
  "$BIN/berth" up --config "$stack/berth.toml" --root "$stack/root" --state-dir "$stack/state" \
    > "$stack/up.out" 2> "$stack/up.log" &
  echo $! > "$stack/up.pid"
  for _ in $(seq 1 1200); do
    grep -q "berth is up" "$stack/up.out" 2>/dev/null && break
    kill -0 "$(cat "$stack/up.pid")" 2>/dev/null || { log "berth did not start:"; tail -20 "$stack/up.log" >&2; return 1; }
    sleep 0.05
  done
  grep -q "berth is up" "$stack/up.out" || { log "berth not up after 60 s"; return 1; }
  CRI_SOCK_berth=$stack/state/cri.sock
  CRI_LOG_berth=$stack/up.log
}

# cri_cleanup REGDIR: the registry and the pods' CNI leftovers (the bridge plugin's bridge and
# veths, portmap's chains), netns, cgroups and mounts. The runtimes are stopped before.
cri_cleanup() {
  "$SHARED/testimages/registry.sh" stop "$1" >/dev/null 2>&1
  delete_bridge "$CNI_BRIDGE"
  iptables_delete nat "berth-critest-$TAG" "^CNI-DN-.*berth-critest-$TAG"
  if [ "$PORTMAP_CHAINS_BEFORE" = 0 ] && [ -z "$(iptables -w 5 -t nat -S CNI-HOSTPORT-DNAT 2>/dev/null | grep '^-A')" ]; then
    iptables_delete nat "CNI-HOSTPORT-" "^CNI-HOSTPORT-"
  fi
  ip -all netns list 2>/dev/null | awk '{print $1}' | grep -F "$TAG" | while read -r ns; do
    ip netns del "$ns"
  done
  local c
  for c in /sys/fs/cgroup/$CGROUP_PARENT /sys/fs/cgroup/*/$CGROUP_PARENT; do
    [ -d "$c" ] || continue
    find "$c" -mindepth 1 -depth -type d -exec rmdir {} \; 2>/dev/null
    rmdir "$c" 2>/dev/null
  done
  unmount_under "$BENCH_TMP"
}
