#!/usr/bin/env bash
# Makes the Python virtualenv the integration tests drive berth with (docker-py from PyPI, and
# websocket-client for the websocket attach test, the Kubernetes client for the CRI streaming
# test, rotel's wheel for the OTLP collector of the trace test). Idempotent: a venv whose recorded
# requirements match is left alone. Usage: deploy/pyvenv.sh [DIR] (default target/pyvenv).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-target/pyvenv}"
req="deploy/pyvenv-requirements.txt"
if [ -x "$dir/bin/python" ] && cmp -s "$req" "$dir/.requirements" 2>/dev/null; then
  echo "pyvenv: $dir up to date"
  exit 0
fi
rm -rf "$dir"
# Debian's interpreter, so the venv does not depend on whichever python3 is first on PATH.
python=/usr/bin/python3
[ -x "$python" ] || python=python3
"$python" -m venv "$dir"
"$dir/bin/pip" install --quiet --disable-pip-version-check -r "$req"
cp "$req" "$dir/.requirements"
echo "pyvenv: $dir ready ($("$dir/bin/python" -c 'import docker; print("docker-py", docker.__version__)'))"
