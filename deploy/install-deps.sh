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

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing ${missing[*]}; run as root to install them" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts services from packages it installs; berth's tests run their own instances on
# their own sockets, so the system ones are stopped to keep the machine quiet.
for svc in containerd docker-registry; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
    systemctl disable "$svc" >/dev/null 2>&1 || true
  fi
done
echo "install-deps: done"
