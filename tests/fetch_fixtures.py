"""Shared pieces of the fetch tests: nginx on a loopback port, a test CA with a server certificate, fast
retry settings, and deterministic test data.

nginx runs from a generated nginx.conf in a temporary prefix (pid, logs and temp paths inside it), in the
foreground (``daemon off``) as our child, and is stopped by its PID.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bootkit.fetch import FetchOptions
from bootkit.run import run


def fast_options(**overrides: Any) -> FetchOptions:
    """Options for tests: few retries, tiny backoff, short timeouts, progress lines at every block."""
    settings: dict[str, Any] = {
        "verify": "none",
        "retries": 3,
        "timeout": 10.0,
        "total_timeout": 60.0,
        "retry_delay": 0.01,
        "retry_delay_max": 0.05,
        "progress_interval": 0.05,
        "reserve_bytes": 0,
    }
    settings.update(overrides)
    return FetchOptions(**settings)


def make_data(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


#: an nginx configuration for the tests: ``{user}``, ``{prefix}`` and ``{body}`` (inside ``http { }``) to fill
NGINX_HEAD = """\
{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type application/octet-stream;
{body}
}}
"""

#: one static server: ``{listen}``, ``{root}`` and ``{extra}`` fill it besides the head's fields
NGINX_CONF = NGINX_HEAD.replace(
    "{body}",
    """\
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    server {{
        {listen}
        root {root};
        {extra}
    }}""",
)


@contextmanager
def nginx(root: Path, prefix: Path, extra: str = "", tls: str = "") -> Iterator[str]:
    """Serve ``root`` with nginx on a free loopback port; yields the base URL (``http://127.0.0.1:P``).

    ``tls``: a listen directive with ``{port}`` and the ssl_* directives, to serve HTTPS instead.
    """
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        pytest.skip("nginx is not installed (Debian package nginx-light)")
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    for _ in range(5):  # the free port may be taken between our probe and nginx's bind
        port = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                # workers must read files in pytest's 0700 temp directories
                user="user root;" if os.geteuid() == 0 else "",
                prefix=prefix,
                listen=(tls or "listen 127.0.0.1:{port};").format(port=port),
                root=root,
                extra=extra,
            )
        )
        proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if wait_for_port(port, proc):
            break
        proc.kill()
        _, err = proc.communicate()
        if b"Address already in use" not in err:
            raise RuntimeError(f"nginx did not start: {err.decode(errors='replace')}")
    else:
        raise RuntimeError("nginx: no free port after 5 tries")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def make_tls(directory: Path) -> dict[str, Path]:
    """A test CA and a server certificate for 127.0.0.1/localhost signed by it (openssl, EC P-256)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (Debian package openssl)")
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(
        [
            "openssl", "req", "-x509", *ec,
            "-keyout", d / "ca.key",
            "-out", d / "ca.pem",
            "-days", "2",
            "-subj", "/CN=bootkit test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ]
    )  # fmt: skip
    run(
        [
            "openssl", "req", *ec,
            "-keyout", d / "server.key",
            "-out", d / "server.csr",
            "-subj", "/CN=127.0.0.1",
        ]
    )  # fmt: skip
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    run(
        [
            "openssl", "x509", "-req",
            "-in", d / "server.csr",
            "-CA", d / "ca.pem",
            "-CAkey", d / "ca.key",
            "-CAcreateserial",
            "-out", d / "server.pem",
            "-days", "2",
            "-extfile", d / "ext.cnf",
        ]
    )  # fmt: skip
    # a second CA that signed nothing we serve: "unknown CA"
    run(
        [
            "openssl", "req", "-x509", *ec,
            "-keyout", d / "other-ca.key",
            "-out", d / "other-ca.pem",
            "-days", "2",
            "-subj", "/CN=some other CA",
        ]
    )  # fmt: skip
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key", "other_ca": d / "other-ca.pem"}
