#!/usr/bin/env bash
# The demo: builds a small disk image, compresses it to QCOW2 with qemu-img, and shows what bootkit's own
# reader sees in it (inspect, map, convert, compared byte for byte with qemu-img's decoding).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec python -m bootkit.demo "$@"
