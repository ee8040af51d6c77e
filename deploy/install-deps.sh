#!/usr/bin/env bash
# Installs the host packages berth needs to run and to be tested. Idempotent: only what is
# missing is installed, so a second run costs one dpkg query.
set -euo pipefail

PACKAGES=(
  runc                          # default OCI runtime
  crun                          # alternative OCI runtime
  libseccomp-dev                # links the in-process runtime (libcontainer) with libseccomp
  pkg-config                    # finds libseccomp when building
  containernetworking-plugins   # CNI reference plugins (orchestrator path)
  iptables                      # published ports, isolation
  iproute2                      # ip netns in tests
  busybox-static                # test images
  docker-registry               # a real registry on loopback for tests
  skopeo                        # copies test images into that registry
  apache2-utils                 # htpasswd for the auth tests
  containerd                    # ctr: containerd as a real snapshotter client in tests
  hyperfine                     # make bench
  curl
  openssl                       # test certificates (TLS tests)
  procps
  python3
  python3-venv                  # the test venv with docker-py (deploy/pyvenv.sh)
  docker-compose                # docker-compose 1.29 as a real client in tests
  uidmap                        # rootless mode: newuidmap/newgidmap map the subordinate ids
  slirp4netns                   # rootless mode: the stack's network namespace reaches out
  podman                        # make bench: rootless docker run beside rootless Podman
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

export DEBIAN_FRONTEND=noninteractive
updated=0
apt_update() {
  if [ "$updated" -eq 0 ]; then
    apt-get update -qq
    updated=1
  fi
}

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
elif [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing ${missing[*]}; run as root to install them" >&2
  exit 1
else
  echo "install-deps: installing ${missing[*]}"
  apt_update
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts services from packages it installs; berth's tests run their own instances on
  # their own sockets, so the system ones are stopped to keep the machine quiet.
  for svc in containerd docker-registry; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
      systemctl stop "$svc" || true
      systemctl disable "$svc" >/dev/null 2>&1 || true
    fi
  done
fi

# --- berth-vm: QEMU (bookworm-backports), the guest kernel package, virtiofsd and
# vhost-device-vsock (crates.io). Each step checks first, so a second run changes nothing.
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: skipping the berth-vm dependencies (run as root)" >&2
  exit 0
fi

# QEMU 10 from bookworm-backports: bookworm's 7.2 conflicts with backports' qemu-utils, and
# microvm/virtio-fs work better in the newer one.
BACKPORTS=/etc/apt/sources.list.d/bookworm-backports.sources
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  cat >"$BACKPORTS" <<'EOF_SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF_SOURCES
  updated=0
  echo "install-deps: added $BACKPORTS"
fi
if ! installed qemu-system-x86; then
  apt_update
  apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
  echo "install-deps: installed qemu-system-x86 from bookworm-backports"
fi
# virtiofsd's build needs libcap-ng and libseccomp (above) through pkg-config.
if ! installed libcap-ng-dev; then
  apt_update
  apt-get install -y -qq --no-install-recommends libcap-ng-dev >/dev/null
fi

# The guest kernel: the versioned package the cloud metapackage points at, downloaded (not
# installed) into the cache the berth-vm runtime reads.
VM_CACHE=/var/cache/berth/vm
mkdir -p "$VM_CACHE"
kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
  awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
if [ -z "$kernel_pkg" ]; then
  apt_update
  kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
fi
if ! ls "$VM_CACHE/${kernel_pkg}"_*.deb >/dev/null 2>&1; then
  (cd "$VM_CACHE" && apt-get download -qq "$kernel_pkg")
  echo "install-deps: downloaded $kernel_pkg into $VM_CACHE"
fi

# virtiofsd and vhost-device-vsock have no bookworm packages: build them from crates.io.
# Pinned: the versions berth-vm is tested with.
for crate in virtiofsd@1.14.0 vhost-device-vsock@0.3.0; do
  tool=${crate%@*}
  if ! command -v "$tool" >/dev/null 2>&1; then
    if ! command -v cargo >/dev/null 2>&1; then
      echo "install-deps: $tool is missing and cargo is not installed" >&2
      exit 1
    fi
    cargo install --locked --root /usr/local "$crate"
  fi
done
echo "install-deps: done"
