#!/usr/bin/env bash
# Rootless benchmark: `docker run --rm busybox true` (bridged and `--network none`) against a
# rootless berth (`berth up --rootless`) beside rootless Podman (Debian's podman, with runc),
# both run by the same ordinary user made for the run, timed by hyperfine running as that user
# (so neither side pays for a user switch). Prints a markdown section: medians and ratio.
#
#   bench/rootless.sh                       # release binaries from target/release, 30 runs
#   RUNS=20 BERTH_BIN_DIR=... bench/rootless.sh
#
# Needs root (it makes the user, its subordinate ranges and opens /dev/net/tun to it for
# slirp4netns), uidmap, slirp4netns, podman, hyperfine, python3 and ../shared/testimages.
# Everything is removed on exit, also on failure: the user's processes (by PID), the user, its
# home and ranges, /run/user/UID, and /dev/net/tun's mode.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${SHARED_DIR:-$here/../shared}
runs=${RUNS:-30}
bin=$(cd "${BERTH_BIN_DIR:-$here/target/release}" && pwd)

[ "$(id -u)" = 0 ] || { echo "bench/rootless.sh: needs root (it makes the bench user)" >&2; exit 1; }
for p in newuidmap slirp4netns podman hyperfine python3; do
  command -v "$p" >/dev/null || { echo "bench/rootless.sh: $p is not installed" >&2; exit 1; }
done

user=brb$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
tun_mode=$(stat -c %a /dev/net/tun)
tmp=$(mktemp -d /var/tmp/berth-rootless-bench.XXXXXX)
uid=
cleanup() {
  set +e
  if [ -n "$uid" ]; then
    sub=$(awk -F: -v u="$user" '$1 == u {print $2, $3; exit}' /etc/subuid)
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      pids=$(ps -eo pid=,uid= | awk -v u="$uid" -v s="${sub% *}" -v c="${sub#* }" \
        '$2 == u || (s != "" && $2 >= s && $2 < s + c) {print $1}')
      [ -z "$pids" ] && break
      kill -9 $pids 2>/dev/null
      sleep 0.2
    done
    if [ -n "$sub" ]; then
      usermod --del-subuids "${sub% *}-$(( ${sub% *} + ${sub#* } - 1 ))" "$user" 2>/dev/null
      gsub=$(awk -F: -v u="$user" '$1 == u {print $2, $3; exit}' /etc/subgid)
      [ -n "$gsub" ] && usermod --del-subgids "${gsub% *}-$(( ${gsub% *} + ${gsub#* } - 1 ))" "$user" 2>/dev/null
    fi
    rm -rf "/run/user/$uid"
  fi
  userdel --remove --force "$user" 2>/dev/null
  chmod "$tun_mode" /dev/net/tun
  rm -rf "$tmp"
}
trap cleanup EXIT

useradd --create-home --shell /bin/sh --user-group -K SUB_UID_COUNT=65536 -K SUB_GID_COUNT=65536 "$user"
uid=$(id -u "$user")
home=$(getent passwd "$user" | cut -d: -f6)
mkdir -p "/run/user/$uid" && chown "$user:" "/run/user/$uid" && chmod 700 "/run/user/$uid"
chmod 666 /dev/net/tun
mkdir -p "$home/bin"
for b in berth berth-snapshotter berth-images berth-network berth-engine berth-gateway berth-shim; do
  cp "$bin/$b" "$home/bin/"
done
python3 "$shared/testimages/mkimage.py" busybox --out "$tmp/images" >/dev/null
cp "$tmp/images/busybox/image.tar" "$home/busybox.tar"
chown -R "$user:" "$home"

as_user() {
  runuser -u "$user" -- env -i HOME="$home" USER="$user" XDG_RUNTIME_DIR="/run/user/$uid" \
    PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
    DOCKER_HOST="unix:///run/user/$uid/berth/docker.sock" "$@"
}

as_user "$home/bin/berth" up --rootless > "$tmp/up.log" 2>&1 &
for _ in $(seq 1 300); do
  as_user docker version >/dev/null 2>&1 && break
  sleep 0.1
done
as_user docker version >/dev/null 2>&1 || { echo "berth up --rootless did not start:" >&2; cat "$tmp/up.log" >&2; exit 1; }
as_user docker load -q -i "$home/busybox.tar" >/dev/null
as_user podman load -q -i "$home/busybox.tar" >/dev/null

measure() { # name, then the two commands
  local name=$1 berth_cmd=$2 podman_cmd=$3
  as_user hyperfine -N --style none --warmup 3 --runs "$runs" \
    --export-json "$home/$name.json" "$berth_cmd" "$podman_cmd" >/dev/null
  cp "$home/$name.json" "$tmp/$name.json"
}
measure run "docker run --rm busybox true" "podman --runtime runc run --rm busybox true"
measure run_none "docker run --rm --network none busybox true" \
  "podman --runtime runc run --rm --network none busybox true"

python3 - "$tmp" "$runs" "$(podman --version)" "$(runc --version | head -1)" <<'PY'
import json, statistics, sys
tmp, runs, podman, runc = sys.argv[1:5]
print("## Rootless: berth beside Podman")
print()
print(f"The same ordinary user runs `berth up --rootless` and rootless {podman} (`--runtime runc`, "
      f"{runc}); hyperfine runs as that user, {runs} runs per command after 3 warm-ups; medians. "
      "Podman's default rootless network is a slirp4netns per container; berth's containers sit "
      "on a bridge in the stack's own network namespace. Target: ≤ 0.5 × Podman.")
print()
print("| what | berth ms | Podman ms | berth/Podman |")
print("|---|---:|---:|---:|")
for name, label in [("run", "`docker run --rm busybox true`"),
                    ("run_none", "`docker run --rm --network none busybox true`")]:
    res = json.load(open(f"{tmp}/{name}.json"))["results"]
    b, p = (statistics.median(r["times"]) * 1000 for r in res)
    print(f"| rootless {label} | {b:.1f} | {p:.1f} | {b / p:.2f} |")
PY
