#!/usr/bin/env bash
# Pull benchmark: the synthetic image (4 x 64 MB incompressible layers on busybox) from a real
# registry on loopback into berth-images + berth-snapshotter, timed end to end (resolve,
# download, verify, unpack, commit). Prints wall time and MB/s per run and the median.
#
#   bench/pull.sh                 # 5 runs, release binaries from target/release
#   RUNS=3 LAYERS=4 SIZE_MB=64 BERTH_BIN_DIR=... bench/pull.sh
#   BENCH_DOCKERD=1 bench/pull.sh # also time `docker pull` of the same image (dockerd must be
#                                 # running; DOCKER_HOST honoured), interleaved with berth's runs
#
# Needs root (mounts), docker-registry, skopeo, python3. Everything it starts is stopped by PID
# and every temp dir removed on exit, also on failure.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${SHARED_DIR:-$here/../shared}
runs=${RUNS:-5}
layers=${LAYERS:-4}
size_mb=${SIZE_MB:-64}
bin=${BERTH_BIN_DIR:-$here/target/release}

[ "$(id -u)" = 0 ] || { echo "bench/pull.sh: needs root (snapshot mounts)" >&2; exit 1; }
for p in docker-registry skopeo python3; do
  command -v "$p" >/dev/null || { echo "bench/pull.sh: $p is not installed" >&2; exit 1; }
done
if [ -z "${BERTH_BIN_DIR:-}" ]; then
  # Always (re)build: a stale binary would measure old code. A no-op when up to date.
  (cd "$here" && cargo build --release -q -p berth-images -p berth-snapshotter --bins)
fi
(cd "$here" && cargo build --release -q -p berth-images --example pull)
client=$here/target/release/examples/pull

tmp=$(mktemp -d /var/tmp/berth-bench-pull.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  { grep " $tmp/" /proc/self/mounts || true; } | awk '{print $2}' | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

echo "building synthetic image: $layers x $size_mb MB" >&2
python3 "$shared/testimages/mkimage.py" synthetic --layers "$layers" --size-mb "$size_mb" --out "$tmp/images" >/dev/null

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$tmp/reg/storage"
cat > "$tmp/reg/config.yml" <<YML
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $tmp/reg/storage}, delete: {enabled: true}}
http: {addr: "127.0.0.1:$port"}
YML
docker-registry serve "$tmp/reg/config.yml" > "$tmp/reg/log" 2>&1 &
pids+=($!)
for _ in $(seq 1 200); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.05
done
skopeo copy --quiet --dest-tls-verify=false "oci:$tmp/images/synthetic/oci:latest" "docker://127.0.0.1:$port/synthetic:latest"
ref="127.0.0.1:$port/synthetic:latest"

start_berth() { # $1 = run dir
  local d=$1
  mkdir -p "$d/root" "$d/state"
  printf 'root = "%s"\nstate_dir = "%s"\n[telemetry]\nlog_level = "warn"\n' "$d/root" "$d/state" > "$d/berth.toml"
  "$bin/berth-snapshotter" --config "$d/berth.toml" > "$d/snapshotter.log" 2>&1 &
  pids+=($!); snap_pid=$!
  "$bin/berth-images" --config "$d/berth.toml" > "$d/images.log" 2>&1 &
  pids+=($!); images_pid=$!
  for _ in $(seq 1 400); do
    [ -S "$d/state/images.sock" ] && [ -S "$d/state/snapshotter.sock" ] && return 0
    sleep 0.025
  done
  echo "berth did not start; see $d" >&2; return 1
}
stop_berth() { # $1 = run dir
  kill "$images_pid" "$snap_pid" 2>/dev/null || true
  wait "$images_pid" "$snap_pid" 2>/dev/null || true
  { grep " $1/" /proc/self/mounts || true; } | awk '{print $2}' | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$1"
}

berth_walls=()
docker_walls=()
for i in $(seq 1 "$runs"); do
  d="$tmp/run$i"
  start_berth "$d"
  out=$("$client" "$d/state/images.sock" "$ref")
  echo "berth  run $i: $(echo "$out" | tail -1)"
  berth_walls+=("$(echo "$out" | tail -1 | awk '{print $2}')")
  stop_berth "$d"
  if [ "${BENCH_DOCKERD:-}" = 1 ]; then
    docker rmi -f "$ref" >/dev/null 2>&1 || true
    t0=$(date +%s.%N)
    docker pull -q "$ref" >/dev/null
    t1=$(date +%s.%N)
    w=$(echo "$t1 - $t0" | bc)
    echo "docker run $i: wall $w s"
    docker_walls+=("$w")
    docker rmi -f "$ref" >/dev/null 2>&1 || true
  fi
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
total_mb=$(du -sm --apparent-size "$tmp/images/synthetic/oci/blobs" | awk '{print $1}')
bm=$(median "${berth_walls[@]}")
echo "pull synthetic ${layers}x${size_mb}MB: berth median wall ${bm} s, $(echo "scale=1; $total_mb / $bm" | bc) MB/s"
if [ ${#docker_walls[@]} -gt 0 ]; then
  dm=$(median "${docker_walls[@]}")
  echo "pull synthetic ${layers}x${size_mb}MB: dockerd median wall ${dm} s; berth/dockerd = $(echo "scale=2; $bm / $dm" | bc)"
fi
