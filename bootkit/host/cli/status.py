"""``bootkit status``: how the running system was booted, read from ``/run/bootkit/status.json``.

Runs on the booted system; the file is written by the NBD server the initramfs left behind
(:mod:`bootkit.boot.status`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    s = sub.add_parser("status", help="show how the running system was booted (/run/bootkit/status.json)")
    s.add_argument("--file", type=Path, default=None, metavar="PATH",
                   help="status file (default: /run/bootkit/status.json)")  # fmt: skip
    s.add_argument("--json", action="store_true", help="print the raw JSON")
    s.set_defaults(handler=_status)


def _status(args: argparse.Namespace) -> int:
    from bootkit.boot.status import STATUS_FILE, format_status, read_status

    data = read_status(args.file or Path(STATUS_FILE))
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        sys.stdout.write(format_status(data))
    return 0
