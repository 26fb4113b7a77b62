"""The fleet view, server side: receive the boot reports of ``rd.qcow2.report=`` and show one line per machine.

:func:`serve_reports` is ``bootkit fleet collect``: a small HTTP server that takes ``POST /report`` only,
bodies of at most :data:`~bootkit.boot.report.MAX_REPORT` bytes, checks every field of the JSON object
(:func:`parse_report`: a body is hostile until proven otherwise; anything else gets ``400``) and writes one
file per machine, atomically, named after the machine's MAC address or host name only once that has matched
a strict pattern. Its connections are bounded as serve-http's are (bootkit.host.httpconns): a client that
sends its request slowly holds a socket, not a thread, and at most the timeout; when too many are held the one
that has waited longest is refused (503). :func:`read_reports` and :func:`format_fleet` are ``bootkit fleet
status``.

Host side (not in the initramfs), standard library only.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import io
import json
import math
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bootkit.boot.report import MAX_REPORT, MAX_STAGES, REPORT_VERSION
from bootkit.errors import BootkitError, UsageError
from bootkit.host.httpconns import Connections, drain
from bootkit.log import log, safe_text

#: seconds a client has for its request, head and body (a slow or dead one holds a worker at most this long)
REQUEST_TIMEOUT = 10.0
#: connections held at once (waiting for their request head, queued, being answered)
MAX_CONNECTIONS = 256
#: threads answering requests (a connection still sending its request head holds none)
WORKERS = 4
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}")
_STAGE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_TEXT = re.compile(r"[\x20-\x7e]{0,400}")
_MODES = ("ram", "lazy", "stream")
_FIELDS = {"version", "mac", "hostname", "image", "mode", "result", "stages", "uptime", "stage", "cause",
           "time_to_root"}  # fmt: skip


class BadReport(BootkitError):
    """A report body that is not what ``rd.qcow2.report`` sends; the message names the field."""

    exit_status = 2


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BadReport(f"{name}: expected a non-negative number")
    return float(value)


def _text(name: str, value: Any, pattern: re.Pattern[str] = _TEXT) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise BadReport(f"{name}: expected {'printable ASCII' if pattern is _TEXT else 'a name'} text")
    return value


def parse_report(body: bytes) -> dict[str, Any]:
    """The report in ``body``, every field checked; :class:`BadReport` naming the first bad field."""
    if len(body) > MAX_REPORT:
        raise BadReport(f"body: {len(body)} bytes, more than {MAX_REPORT}")
    try:
        data = json.loads(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadReport("body: not ASCII JSON") from None
    if not isinstance(data, dict):
        raise BadReport("body: not a JSON object")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise BadReport(f"{safe_text(unknown[0], 40)}: unknown field")
    if data.get("version") != REPORT_VERSION:
        raise BadReport(f"version: expected {REPORT_VERSION}")
    mac, host = data.get("mac"), data.get("hostname")
    if mac is not None:
        _text("mac", mac, _MAC)
    if host is not None:
        _text("hostname", host, _HOSTNAME)
    if mac is None and host is None:
        raise BadReport("mac, hostname: the machine names neither")
    report: dict[str, Any] = {"version": REPORT_VERSION, "mac": mac, "hostname": host}
    report["image"] = _text("image", data.get("image"))
    report["mode"] = _text("mode", data.get("mode"))
    if report["mode"] not in _MODES:
        raise BadReport(f"mode: expected one of {', '.join(_MODES)}")
    result = data.get("result")
    if result not in ("ok", "failed"):
        raise BadReport("result: expected ok or failed")
    report["result"] = result
    stages = data.get("stages")
    if not isinstance(stages, dict) or len(stages) > MAX_STAGES:
        raise BadReport(f"stages: expected an object of at most {MAX_STAGES} stages")
    report["stages"] = {_text("stages", k, _STAGE): _number(f"stages.{k}", v) for k, v in stages.items()}
    report["uptime"] = _number("uptime", data.get("uptime"))
    misplaced = ("time_to_root",) if result == "failed" else ("stage", "cause")
    for name in misplaced:
        if name in data:
            raise BadReport(f"{name}: not part of a report whose result is {result}")
    if result == "failed":
        stage = data.get("stage")
        report["stage"] = None if stage is None else _text("stage", stage, _STAGE)
        report["cause"] = _text("cause", data.get("cause"))
    elif data.get("time_to_root") is not None:
        report["time_to_root"] = _number("time_to_root", data.get("time_to_root"))
    return report


def machine_file(report: dict[str, Any]) -> str:
    """The file name of a checked report's machine: ``<mac with dashes>.json``, else ``host-<name>.json``."""
    if report.get("mac"):
        return str(report["mac"]).replace(":", "-") + ".json"
    return f"host-{report['hostname']}.json"


def store_report(directory: Path, report: dict[str, Any], peer: str) -> Path:
    """Write a checked report as its machine's file, atomically (a reader never sees half a file)."""
    stored = {**report, "peer": peer, "received": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    path = directory / machine_file(report)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".report-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            json.dump(stored, f, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


class _Body(io.RawIOBase):
    """A request read from what the gate already has (``buffered``), then from the socket, all of it within
    one deadline: a client that sends its body a byte at a time cannot hold a worker longer than the timeout."""

    def __init__(self, buffered: bytes, sock: socket.socket, timeout: float) -> None:
        self._buffered = memoryview(buffered)
        self._sock = sock
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._buffered:
            n = min(len(b), len(self._buffered))
            b[:n] = self._buffered[:n]
            self._buffered = self._buffered[n:]
            return n
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive within the timeout")
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(b)
        finally:
            self._sock.settimeout(self._timeout)  # the answer's sends get the whole timeout again


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers the one request of a connection, from the bytes the gate read (``buffered``) and the socket."""

    server_version = "bootkit-fleet"
    server: _Server

    def __init__(self, request: Any, client_address: Any, server: _Server, buffered: bytes = b"") -> None:
        self._buffered = buffered
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_Body(self._buffered, self.connection, self.server.request_timeout))

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def _answer(self, status: int, text: str) -> None:
        body = (safe_text(text) + "\n").encode("ascii")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def do_POST(self) -> None:
        if self.path != "/report":
            self._answer(404, "only POST /report")
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or len(length) > 9:
            self._answer(411, "Content-Length required")
            return
        if int(length) > MAX_REPORT:
            self._answer(413, f"a report is at most {MAX_REPORT} bytes")
            return
        try:
            report = parse_report(self.rfile.read(int(length)))
        except BadReport as e:
            log.warning("fleet: refused a report from %s: %s", self.client_address[0], e)
            self._answer(400, f"bad report: {e}")
            return
        path = store_report(self.server.directory, report, str(self.client_address[0]))
        log.info("fleet: %s: %s", path.name, report["result"])
        self._answer(200, "stored")

    def do_GET(self) -> None:
        self._answer(405, "only POST /report")

    do_PUT = do_DELETE = do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("fleet: %s %s", self.client_address[0], safe_text(format % args))


class _Server(http.server.HTTPServer):
    """Accepts connections and hands them to bootkit.host.httpconns (the bounds of serve-http)."""

    # the listen backlog: a classroom's reports arrive within seconds of each other
    request_queue_size = 128

    def __init__(self, directory: Path, address: tuple[str, int], *, timeout: float, max_connections: int,
                 workers: int) -> None:  # fmt: skip
        self.directory = directory
        self.request_timeout = timeout
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.connections = Connections(self._answer, workers=workers, max_connections=max_connections,
                                       timeout=timeout, with_body=True)  # fmt: skip

    def process_request(self, request: Any, client_address: Any) -> None:
        # accept() only: the gate waits for the request head, a worker answers it
        self.connections.accept(request, client_address)

    def _answer(self, sock: socket.socket, client_address: Any, buffered: bytes | None) -> bool:
        assert buffered is not None  # no TLS here
        try:
            _Handler(sock, client_address, self, buffered)
        finally:
            drain(sock)  # what is left of a refused body
        return False

    def server_close(self) -> None:
        super().server_close()
        connections: Connections | None = getattr(self, "connections", None)
        if connections is not None:
            connections.close()


@contextlib.contextmanager
def serve_reports(
    directory: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    timeout: float = REQUEST_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    workers: int = WORKERS,
) -> Iterator[str]:
    """Receive reports into ``directory`` while the context lasts; yields the URL to give ``rd.qcow2.report``.

    Connections are bounded as serve-http's are (bootkit.host.httpconns): a request (head and body) must
    arrive within ``timeout`` seconds, at most ``max_connections`` are held (the one that has waited longest
    for its head is dropped with 503 when a new one comes), and ``workers`` threads answer.
    """
    if not directory.is_dir():
        raise UsageError(f"{directory}: not a directory")
    if not timeout > 0:
        raise UsageError(f"--timeout {timeout}: must be > 0")
    if max_connections < 1:
        raise UsageError(f"--max-connections {max_connections}: must be >= 1")
    if workers < 1:
        raise UsageError(f"workers={workers}: must be >= 1")
    try:
        server = _Server(directory, (host, port), timeout=timeout, max_connections=max_connections,
                         workers=workers)  # fmt: skip
    except OSError as e:
        raise UsageError(f"--bind {host}:{port}: {e.strerror}") from e
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), name="fleet-collect", daemon=True)
    thread.start()
    try:
        name, bound = str(server.server_address[0]), server.server_address[1]
        shown = f"[{name}]" if ":" in name else name
        yield f"http://{shown}:{bound}/report"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def read_reports(directory: Path) -> list[dict[str, Any]]:
    """Every machine's last report in ``directory``, newest first; files that do not parse are skipped."""
    reports = []
    for path in directory.glob("*.json"):
        try:
            data = json.loads(path.read_bytes())
            received = data.pop("received")
            peer = data.pop("peer")
            report = parse_report(json.dumps(data).encode("ascii"))
        except (OSError, ValueError, KeyError, AttributeError, BadReport) as e:
            log.warning("fleet: %s: skipped: %s", path.name, e)
            continue
        report["received"], report["peer"] = _text("received", received), _text("peer", peer)
        reports.append(report)
    reports.sort(key=lambda r: str(r["received"]), reverse=True)
    return reports


def format_fleet(reports: list[dict[str, Any]]) -> str:
    """One line per machine: who, when, ok/failed, time to root or the stage it failed at and why."""
    lines = []
    for r in reports:
        who = r["mac"] or r["hostname"]
        if r["hostname"] and r["mac"]:
            who += f" ({r['hostname']})"
        when = str(r["received"])[:19].replace("T", " ")
        if r["result"] == "ok":
            ttr = r.get("time_to_root")
            what = f"ok      root after {ttr:.1f} s" if ttr is not None else "ok"
        else:
            cause = str(r["cause"])
            # the cause is the console's FAILED line, which names the stage itself
            what = cause if cause.startswith("FAILED at ") else f"FAILED at {r.get('stage') or '?'}: {cause}"
        lines.append(f"{who}  {when}  {r['mode']}  {what}")
    return "".join(line + "\n" for line in lines)
