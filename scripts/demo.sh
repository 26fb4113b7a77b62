#!/usr/bin/env bash
# The demo: network-boots a small busybox system from a compressed QCOW2 image in QEMU (TCG) on this
# machine — PXE, iPXE, bootkit's initramfs, the image over HTTP, bootkit's reader and NBD server, the root
# under a tmpfs overlay — streams the serial console and ends with one SUCCESS or FAILURE line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
PYTHONPATH=qemu-tests exec python -m bkharness.demo "$@"
