"""Helpers for the pxe-config tests: a logged HTTP server, the golden descriptions, the CLI run in-process."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bootkit.host.cli import main

GOLDEN = Path(__file__).resolve().parent / "golden" / "pxe"


@dataclass
class LoggedServer:
    """A static HTTP server on 127.0.0.1 that records every request line it answers."""

    root: Path
    port: int
    requests: list[tuple[str, str]] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def guest_url(self) -> str:
        """The same server as a QEMU user-network guest reaches it."""
        return f"http://10.0.2.2:{self.port}/"

    def record(self, method: str, path: str) -> None:
        with self._changed:
            self.requests.append((method, path))
            self._changed.notify_all()

    def paths(self, method: str = "GET") -> list[str]:
        with self._changed:
            return [p for m, p in self.requests if m == method]

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds, re-checked on every request and at least once a second."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 1.0))
        return True


class _Handler(http.server.SimpleHTTPRequestHandler):
    server_log: LoggedServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self.server_log.record(self.command, self.path)


@contextlib.contextmanager
def logged_http_server(root: Path) -> Iterator[LoggedServer]:
    """Serve ``root`` on 127.0.0.1 at an ephemeral port, in a thread; stopped on exit."""
    log = LoggedServer(root=root, port=0)
    handler = type("Handler", (_Handler,), {"server_log": log})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    log.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    try:
        yield log
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``bootkit ARGV`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        status = main(list(argv))
    except SystemExit as e:  # argparse errors
        status = int(e.code or 0)
    out, err = capsys.readouterr()
    return status, out, err
