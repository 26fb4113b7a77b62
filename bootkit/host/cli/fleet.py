"""``bootkit fleet collect|status``: receive the boot reports of ``rd.qcow2.report=`` and show them per machine."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any

from bootkit.errors import UsageError
from bootkit.host.fleet import MAX_CONNECTIONS, REQUEST_TIMEOUT
from bootkit.log import log


def register(sub: Any) -> None:
    f = sub.add_parser("fleet", help="boot reports of many machines (rd.qcow2.report=URL)")
    fsub = f.add_subparsers(dest="fleet_command", metavar="ACTION", parser_class=type(f))
    fsub.required = True
    c = fsub.add_parser("collect", help="receive reports: POST /report, one JSON file per machine in DIR")
    c.add_argument("--bind", default="127.0.0.1:8070", metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:8070)")  # fmt: skip
    c.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT, metavar="S",
                   help=f"seconds a client may take to send its report (default {REQUEST_TIMEOUT:g})")  # fmt: skip
    c.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, metavar="N",
                   help="connections held at once; when full, the one waiting longest for its request is dropped "
                        f"(default {MAX_CONNECTIONS})")  # fmt: skip
    c.add_argument("dir", type=Path, metavar="DIR", help="directory the reports are written to")
    c.set_defaults(handler=_collect)
    s = fsub.add_parser("status", help="one line per machine: last boot ok/failed, time to root, cause")
    s.add_argument("dir", type=Path, metavar="DIR", help="directory of collected reports")
    s.add_argument("--json", action="store_true", help="print the reports as a JSON array, newest first")
    s.set_defaults(handler=_status)


def _bind(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--bind {text}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _collect(args: argparse.Namespace) -> int:
    from bootkit.host.fleet import serve_reports

    host, port = _bind(args.bind)
    with serve_reports(args.dir, host, port, timeout=args.timeout, max_connections=args.max_connections) as url:
        log.warning("fleet: receiving reports at %s into %s (give the machines rd.qcow2.report=%s)",
                    url, args.dir, url)  # fmt: skip
        threading.Event().wait()
    return 0


def _status(args: argparse.Namespace) -> int:
    from bootkit.host.fleet import format_fleet, read_reports

    if not args.dir.is_dir():
        raise UsageError(f"{args.dir}: not a directory")
    reports = read_reports(args.dir)
    if args.json:
        print(json.dumps(reports, indent=2, sort_keys=True))
    else:
        sys.stdout.write(format_fleet(reports))
    return 0
