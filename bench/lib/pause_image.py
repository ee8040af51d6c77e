#!/usr/bin/env python3
"""Builds bench/lib/pause.c static and pushes it as <registry>/pause:3.10, over critest's stand-in
(a busybox shell), so containerd's pods in bench/cri.sh run a pause of the real size.

    pause_image.py --registry 127.0.0.1:PORT --work DIR
"""
import argparse
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
shared = os.environ.get("SHARED_DIR") or os.path.join(here, "..", "..", "..", "shared")
sys.path.insert(0, os.path.join(shared, "testimages"))
from mkimage import Layer, build  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", required=True)
    ap.add_argument("--work", required=True)
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    binary = os.path.join(a.work, "pause")
    subprocess.run(["gcc", "-static", "-Os", "-s", "-o", binary, os.path.join(here, "pause.c")], check=True)
    layer = Layer()
    layer.file("pause", open(binary, "rb").read(), 0o755)
    build(a.work, "pause", "3.10", [layer.finish()], cmd=("/pause",), history_note="bench pause")
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                    f"oci:{a.work}/pause-3.10/oci:3.10", f"docker://{a.registry}/pause:3.10"], check=True)


if __name__ == "__main__":
    main()
