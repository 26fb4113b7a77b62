"""The benchmark's servers: stock nginx as origin and as rack cache, configured with the blocks of
docs/deploy-nginx.md marked ``<!-- tested: ... -->`` (the ones tests/test_deploy_nginx.py runs), only the
listen address, paths and log format changed; and ``bootkit fleet collect`` for the clients' reports.

Each server runs in the foreground as our child (in a namespace through ``ip netns exec``, or on the host for
the trace boot) and is stopped by its PID. The origin's log line carries what the benchmark needs: the end
time (``$msec``), the request's duration, the body bytes sent and the ``Range`` header.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bootkit.run import spawn

DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy-nginx.md"

#: the log format of the origin (and of the trace boot's server): one request per line
LOG_FORMAT = 'log_format fleet \'$msec $request_time $status $body_bytes_sent "$request_method $uri" "$http_range"\';'

_HEAD = """\
user root;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    {log_format}
    access_log {prefix}/access.log fleet;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type application/octet-stream;
{body}
}}
"""


class ServerError(RuntimeError):
    """A server of the benchmark did not start."""


def doc_block(name: str, doc: Path = DOC) -> str:
    """The nginx block of docs/deploy-nginx.md marked ``<!-- tested: NAME -->``."""
    m = re.search(rf"<!-- tested: {re.escape(name)} -->\n```nginx\n(.*?)```", doc.read_text(), re.S)
    if not m:
        raise ServerError(f"{doc}: no block marked <!-- tested: {name} -->")
    return m.group(1)


def substitute(text: str, changes: dict[str, str]) -> str:
    """``text`` with each of ``changes`` applied; each must apply (the document must not drift)."""
    for old, new in changes.items():
        if old not in text:
            raise ServerError(f"{old!r} is not in the documented nginx configuration any more")
        text = text.replace(old, new)
    return text


def origin_conf(listen: str, docroot: Path) -> str:
    """The documented origin (images under ``/images/`` of ``docroot``), listening on ``listen``."""
    return substitute(doc_block("origin"), {"listen 80;": f"listen {listen};", "/srv/bootkit": str(docroot)})


def cache_conf(listen: str, origin: str, store: Path, logs: Path) -> str:
    """The documented rack cache in front of ``origin`` (host:port), its cache in ``store``."""
    return substitute(doc_block("rack-cache"), {
        "listen 80;": f"listen {listen};",
        "origin.example:80": origin,
        "/var/cache/nginx/bootkit": str(store),
        "/var/log/nginx/": str(logs) + "/",
    })  # fmt: skip


@dataclass(frozen=True)
class Request:
    """One line of the origin's log: ``start`` (s, wall clock), duration, status, bytes sent, Range."""

    start: float
    duration: float
    status: int
    sent: int
    method: str
    uri: str
    range: str


_LINE = re.compile(r'^([\d.]+) ([\d.]+) (\d{3}) (\d+) "(\S+) (\S+)" "([^"]*)"$')


def read_log(path: Path) -> list[Request]:
    """The requests of an access log in the ``fleet`` format (other lines are skipped)."""
    out = []
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            end, duration = float(m.group(1)), float(m.group(2))
            out.append(Request(end - duration, duration, int(m.group(3)), int(m.group(4)), m.group(5),
                               m.group(6), m.group(7)))  # fmt: skip
    return out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise ServerError(f"{what} exited with status {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise ServerError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.05)


@contextmanager
def nginx(prefix: Path, body: str, *, netns_cmd: Sequence[str] = (), workers: int = 2) -> Iterator[Path]:
    """nginx with ``body`` inside ``http { }``, its pid, logs and temp files under ``prefix``; yields the
    access log. nginx writes its pid file after it has bound its listen sockets: that is the readiness sign
    (it also works inside a namespace, where we cannot connect from here)."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        raise ServerError("nginx is not installed (Debian package nginx-light)")
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(_HEAD.format(prefix=prefix, body=body, workers=workers, log_format=LOG_FORMAT))
    err = (prefix / "stderr.log").open("wb")
    proc = spawn([*netns_cmd, binary, "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"],
                 stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
    try:
        try:
            _wait_for(prefix / "nginx.pid", proc, f"nginx ({conf})")
        except ServerError as e:
            raise ServerError(f"{e}: {(prefix / 'stderr.log').read_text(errors='replace').strip()[-400:]}") from None
        yield prefix / "access.log"
    finally:
        _stop(proc)
        err.close()


@contextmanager
def collector(directory: Path, bind: str, *, netns_cmd: Sequence[str] = ()) -> Iterator[Path]:
    """``bootkit fleet collect --bind BIND DIRECTORY`` (the clients' reports land in ``directory``)."""
    import sys

    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory.parent / (directory.name + ".collect.log")
    with log_path.open("wb") as log_file:
        proc = spawn([*netns_cmd, sys.executable, "-m", "bootkit", "fleet", "collect", "--bind", bind,
                      str(directory)], stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        # ready when it logged its address (it prints the URL it listens on)
        deadline = time.monotonic() + 30
        while bind.rsplit(":", 1)[1] not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ServerError(f"bootkit fleet collect did not start: {log_path.read_text(errors='replace')}")
            time.sleep(0.05)
        yield directory
    finally:
        _stop(proc)
