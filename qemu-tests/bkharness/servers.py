"""Web servers the guests fetch from: ``bootkit serve-http`` (the product's own) and nginx (a stock one).

Both bind to 127.0.0.1 only; the guest reaches them through QEMU's user network as 10.0.2.2:PORT. Each is a
context manager yielding a :class:`WebServer` and stopping the server (by PID) on exit.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bkharness.guest import HOST_FROM_GUEST
from bkharness.pieces import MissingPiece, require_command
from bootkit.run import spawn


@dataclass(frozen=True)
class WebServer:
    """A running web server for ``root``: ``url`` for the host, ``guest_url`` for a QEMU guest."""

    root: Path
    port: int
    log_path: Path
    #: the server's process, for :meth:`stop`
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def stop(self) -> None:
        """Stop the server now, under a running guest (stream mode's test); leaving the context is then a no-op."""
        if self.process is None:
            raise RuntimeError(f"the server on port {self.port} cannot be stopped early")
        _stop(self.process)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def guest_url(self) -> str:
        return f"http://{HOST_FROM_GUEST}:{self.port}"

    def requests_log(self) -> str:
        """What the server logged so far (its access log), for asserting which files a guest asked for."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not listening on 127.0.0.1:{port} after {timeout:.0f} s") from None
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


_PORT_RE = re.compile(r"(?:127\.0\.0\.1|localhost|\[::1\]|::1|0\.0\.0\.0):(\d+)")


@contextmanager
def http_server(root: Path, *, log_dir: Path) -> Iterator[WebServer]:
    """``bootkit serve-http ROOT`` on an ephemeral loopback port (it prints its base URL on stdout)."""
    require_command("serve-http")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "serve-http.log"
    cmd = [
        sys.executable, "-m", "bootkit",
        "-v",  # every request is logged (to log_path): tests check which ranges a guest asked for
        "serve-http",
        "--bind", "127.0.0.1:0",
        str(root),
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        proc = spawn(cmd, stdout=subprocess.PIPE, stderr=log_file)
    try:
        port = _read_port(proc, timeout=30)
        _wait_listening(port, proc, 30, "bootkit serve-http")
        yield WebServer(root, port, log_path, proc)
    finally:
        _stop(proc)
        if proc.stdout is not None:
            with log_path.open("ab") as f:
                f.write(proc.stdout.read() or b"")
            proc.stdout.close()


def _read_port(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The port a server announced on stdout (``... 127.0.0.1:PORT ...``)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
            m = _PORT_RE.search(line.decode(errors="replace"))
            if m:
                return int(m.group(1))
        elif proc.poll() is not None:
            break
    raise MissingPiece(
        "bootkit serve-http announcing its address on stdout (it printed: "
        f"{seen.decode(errors='replace').strip()!r})"
    )


def free_port() -> int:
    """A loopback port free right now (for servers that cannot be told port 0, like nginx)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
user root root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    types {{ application/octet-stream qcow2; }}
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


@contextmanager
def nginx_server(root: Path, *, log_dir: Path) -> Iterator[WebServer]:
    """A stock nginx serving ``root`` (range requests, HEAD, ETag as any web server would)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise MissingPiece("nginx (Debian package nginx-light)")
    log_dir.mkdir(parents=True, exist_ok=True)
    prefix = Path(tempfile.mkdtemp(prefix="nginx.", dir=log_dir))
    for attempt in range(5):
        port = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(prefix=prefix, port=port, root=root.resolve()))
        proc = spawn([nginx, "-p", str(prefix), "-c", str(conf)], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
        try:
            _wait_listening(port, proc, 30, "nginx")
        except RuntimeError:
            _stop(proc)
            if attempt == 4:
                raise
            continue  # the port was taken between free_port() and nginx's bind: try another
        try:
            yield WebServer(root, port, prefix / "access.log", proc)
        finally:
            _stop(proc)
        return
