"""Where NBD clients come from: a Unix socket, TCP, or sockets passed by systemd-style socket activation.

Socket activation follows sd_listen_fds(3): ``LISTEN_PID`` names this process, ``LISTEN_FDS`` counts the
listening sockets starting at fd 3. libnbd's ``nbd_connect_systemd_socket_activation`` (``nbdcopy -- [ CMD ]``)
starts the server that way.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import os
import selectors
import socket
import stat
import threading
from typing import Callable, List, Optional, Sequence, Tuple

from bootkit.errors import NBDError, UsageError
from bootkit.log import log

#: sd_listen_fds(3): the first passed descriptor
SD_LISTEN_FDS_START = 3
DEFAULT_PORT = 10809
#: socket buffers large enough for a 1 MiB reply in one go (the kernel clamps to its maximum)
_SOCKET_BUFFER = 4 * 1024 * 1024


def unix_listener(path: str) -> socket.socket:
    """Listen on a Unix socket at ``path``, replacing a stale socket file left there."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise NBDError(f"{path}: cannot listen: {e.strerror}") from e
    return sock


def parse_hostport(text: str) -> Tuple[str, int]:
    """'HOST:PORT', '[::1]:PORT', ':PORT' or 'PORT' -> (host, port); the host defaults to 127.0.0.1."""
    host, sep, port_s = text.rpartition(":")
    if not sep:
        host, port_s = "", text
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_s)
    except ValueError:
        raise UsageError(f"--tcp {text}: expected HOST:PORT") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"--tcp {text}: port {port} out of range")
    return host or "127.0.0.1", port


def tcp_listener(host: str, port: int) -> socket.socket:
    """Listen on TCP ``host:port`` (port 0: an ephemeral port, see ``getsockname()``)."""
    try:
        family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise NBDError(f"{host}: cannot resolve: {e}") from e
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise NBDError(f"{host}:{port}: cannot listen: {e.strerror}") from e
    return sock


def activation_listeners(environ: Optional[dict[str, str]] = None) -> List[socket.socket]:
    """Sockets passed by socket activation (empty when there are none or they are for another process)."""
    env = os.environ if environ is None else environ
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if pid != os.getpid() or count < 1:
        return []
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    # not for our children (sd_listen_fds(unset_environment=1))
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    return socks


def describe(sock: socket.socket) -> str:
    """An NBD URI for a listening socket: nbd+unix:///?socket=PATH or nbd://HOST:PORT/."""
    addr = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"nbd+unix:///?socket={addr}"
    host = f"[{addr[0]}]" if sock.family == socket.AF_INET6 else addr[0]
    return f"nbd://{host}:{addr[1]}/"


def tune(sock: socket.socket) -> None:
    """Per-connection socket options: no Nagle delay on TCP, buffers that take a large reply at once."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
        except OSError:
            pass


class Acceptor:
    """Accepts connections on listening sockets and hands each to ``serve`` in its own thread.

    ``run()`` blocks until ``stop()`` (from another thread) or, with ``once``, until the first client has
    come and gone (what socket activation by a single client wants).
    """

    def __init__(
        self, listeners: Sequence[socket.socket], serve: Callable[[socket.socket], None], *, once: bool = False
    ) -> None:
        self.listeners = list(listeners)
        self.serve = serve
        self.once = once
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopped = False
        self._active = 0
        self._served = 0
        self._lock = threading.Lock()

    def stop(self) -> None:
        self._stopped = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def run(self) -> None:
        with selectors.DefaultSelector() as sel:
            for ls in self.listeners:
                ls.setblocking(False)
                sel.register(ls, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopped:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        self._wake_r.recv(64)
                        continue
                    try:
                        conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as e:
                        log.warning("nbd: accept failed: %s", e)
                        continue
                    conn.setblocking(True)
                    tune(conn)
                    with self._lock:
                        self._active += 1
                        self._served += 1
                    threading.Thread(target=self._serve, args=(conn,), name="nbd-conn", daemon=True).start()
        self._wake_r.close()
        self._wake_w.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.serve(conn)
        finally:
            with self._lock:
                self._active -= 1
                last = self._active == 0
            if self.once and last:
                self.stop()
