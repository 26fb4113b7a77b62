"""A hostile web server: every answer carries shell code, for a boot's failure path to (not) run it.

Anyone on the path of plain HTTP can answer like this. The image URL gets a 302 whose ``Location`` is shell
code; that target gets a ``404`` whose reason phrase is shell code; every answer has headers whose values are
shell code. bootkit quotes the server in its one failure line; the boot must end there, with nothing run.

The payloads print ``PWNED$((6*7))<tag>``: only a shell that evaluates them prints ``PWNED42<tag>``, which no
quoting, escaping or sanitising of the literal text can produce (:data:`EXECUTED`). Each uses a different way
into a shell: ``$(...)``, backquotes, and a ``;`` after closing a double or a single quote. The Location
spells blanks as ``${IFS}``: a request target cannot hold a space, and a client refusing it would stop the
boot before the reason phrase is tried.

Runs in a thread of the test process on 127.0.0.1 (the guest: 10.0.2.2 through QEMU's user network).
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bkharness.guest import HOST_FROM_GUEST

#: what any of the payloads prints when a shell runs it (the literal payloads say PWNED$((6*7)))
EXECUTED = r"PWNED42"


def _run(tag: str, blank: str = " ") -> list[str]:
    """Ways into a shell, each printing PWNED42<tag><n> on the console when run."""
    echo = f"echo{blank}PWNED$((6*7)){tag}"
    return [
        f"$({echo}1{blank}>/dev/console)",
        f"`{echo}2{blank}>/dev/console`",
        f'";{echo}3{blank}>/dev/console;"',
        f"';{echo}4{blank}>/dev/console;'",
    ]


#: the redirect target (no blanks: see the module docstring)
LOCATION = "/x" + "".join(_run("L", "${IFS}")) + ".qcow2"
#: the reason phrase of the 404 the redirect target gets
REASON = "Not Found " + " ".join(_run("R"))
#: header values of every answer
HEADERS = {
    "Server": " ".join(_run("S")),
    "Content-Type": "text/plain; " + " ".join(_run("T")),
    "ETag": '"' + " ".join(_run("E")) + '"',
    "X-Error": " ".join(_run("X")),
}


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def _answer(self, body: bool) -> None:
        self.server.record(f"{self.command} {self.path}")
        if self.path == self.server.image_path:
            status, reason, extra = 302, "Found", {"Location": LOCATION}
        else:
            status, reason, extra = 404, REASON, {}
        text = f"{status} {reason}\n".encode("latin-1")
        # written raw: the status line and headers exactly as given, nothing quoted or checked on the way
        head = f"HTTP/1.1 {status} {reason}\r\n"
        for name, value in {**HEADERS, **extra}.items():
            head += f"{name}: {value}\r\n"
        head += f"Content-Length: {len(text)}\r\nConnection: close\r\n\r\n"
        self.wfile.write(head.encode("latin-1") + (text if body else b""))
        self.close_connection = True

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def log_message(self, format: str, *args: object) -> None:
        pass  # record() keeps the requests


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, image_path: str, log_path: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.image_path = image_path
        self.log_path = log_path
        self.requests: list[str] = []
        self._lock = threading.Lock()

    def record(self, line: str) -> None:
        with self._lock:
            self.requests.append(line)
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")


@dataclass(frozen=True)
class HostileServer:
    """The running server: ``image_url`` for the guest's ``root=qcow2:``, and the requests it answered."""

    port: int
    image_path: str
    log_path: Path
    _server: _Server = field(repr=False)

    @property
    def image_url(self) -> str:
        return f"http://{HOST_FROM_GUEST}:{self.port}{self.image_path}"

    def requests(self) -> list[str]:
        """``METHOD target`` of every request so far, in order."""
        with self._server._lock:
            return list(self._server.requests)


@contextmanager
def hostile_server(*, log_dir: Path, image_path: str = "/disk.qcow2") -> Iterator[HostileServer]:
    """Serve the hostile answers on an ephemeral loopback port until the block ends."""
    log_dir.mkdir(parents=True, exist_ok=True)
    server = _Server(image_path, log_dir / "hostile-http.log")
    thread = threading.Thread(target=server.serve_forever, name="hostile-http", daemon=True)
    thread.start()
    try:
        yield HostileServer(server.server_address[1], image_path, server.log_path, server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
