"""A private LAN for several guests at once: a network namespace with a bridge and one tap per guest, and the
servers of a real PXE site (dnsmasq, nginx, ``bootkit fleet collect``) started inside it.

QEMU's user network gives every guest its own DHCP and TFTP server and NATs it to the host's loopback, so
guests booted that way never share a server. Here they do, as machines on one switch do::

    with lan(3) as net, net_dnsmasq(net, conf, log_dir=d) as dhcp, net_nginx(net, www, site, log_dir=d) as web:
        with lan_guest(net, 0, mac=MAC0, log_dir=d) as vm0, lan_guest(net, 1, mac=MAC1, log_dir=d) as vm1:
            ...

The namespace is named after this process (``bk-<pid>-<n>``) and deleted on exit; every process in it is
started through ``ip netns exec`` (which execs, so the PID is the server's or QEMU's own) and stopped by PID
before. Nothing here touches the host's own network: the only addresses are on the namespace's bridge.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bkharness.guest import Firmware, Guest, qemu_command
from bkharness.pieces import MissingPiece
from bootkit.run import run, spawn

#: the server's address on the bridge; the guests' pool is 10.77.0.100-10.77.0.199 (pxe-config [dhcp])
SERVER_IP = "10.77.0.1"
PREFIX_LEN = 24
_numbers = itertools.count()


@dataclass(frozen=True)
class Lan:
    """A network namespace holding bridge ``br0`` (``server_ip`` on it) and the taps ``tap0``.. on it."""

    netns: str
    server_ip: str
    taps: tuple[str, ...]

    def inside(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """``argv`` run in the namespace (``ip netns exec`` execs it: the PID stays the command's)."""
        return ["ip", "netns", "exec", self.netns, *(os.fspath(a) for a in argv)]

    def netdev(self, index: int) -> str:
        """QEMU's ``-netdev`` value (id ``n0``) for guest ``index``: its tap, opened by QEMU in the namespace."""
        return f"tap,id=n0,ifname={self.taps[index]},script=no,downscript=no"


@contextmanager
def lan(guests: int, *, server_ip: str = SERVER_IP) -> Iterator[Lan]:
    """A new namespace with a bridge and ``guests`` taps; deleted (with everything in it) on exit."""
    if shutil.which("ip") is None:
        raise MissingPiece("ip (Debian package iproute2)")
    if os.geteuid() != 0:
        raise MissingPiece("root, to create a network namespace")
    name = f"bk-{os.getpid()}-{next(_numbers)}"
    run(["ip", "netns", "add", name])
    try:
        taps = tuple(f"tap{i}" for i in range(guests))
        # STP off and no forwarding delay: a port forwards as soon as QEMU opens its tap (iPXE's first DHCP)
        commands = [
            ["link", "set", "lo", "up"],
            ["link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"],
            *(step for tap in taps for step in (
                ["tuntap", "add", "dev", tap, "mode", "tap"],
                ["link", "set", tap, "master", "br0", "up"],
            )),
            ["addr", "add", f"{server_ip}/{PREFIX_LEN}", "dev", "br0"],
            ["link", "set", "br0", "up"],
        ]  # fmt: skip
        for args in commands:
            run(["ip", "-n", name, *args])
        yield Lan(name, server_ip, taps)
    finally:
        run(["ip", "netns", "delete", name], check=False)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_for(
    what: str, ready: re.Pattern[str], log_path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0
) -> None:
    """Wait until ``log_path`` shows ``ready``; the process must not exit before."""
    deadline = time.monotonic() + timeout
    while not ready.search(log_path.read_text(errors="replace")):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}: {log_path.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)


@dataclass(frozen=True)
class LanServer:
    """A server running in the namespace: where it listens (``url``) and the log it writes."""

    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def net_dnsmasq(net: Lan, conf: Path, *, log_dir: Path) -> Iterator[LanServer]:
    """dnsmasq with ``conf`` as written (DHCP and TFTP on the bridge), in the foreground, logging to a file."""
    if shutil.which("dnsmasq") is None:
        raise MissingPiece("dnsmasq (Debian package dnsmasq-base)")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "dnsmasq.log"
    cmd = [
        "dnsmasq",
        f"--conf-file={conf}",
        "--keep-in-foreground",
        "--log-facility=-",  # with --keep-in-foreground: to stderr, the log file below
        "--user=root",
        "--group=root",
        "--pid-file=",
        f"--dhcp-leasefile={log_dir / 'dnsmasq.leases'}",
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        proc = spawn(net.inside(cmd), stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_for("dnsmasq", re.compile(r"TFTP root is "), log_path, proc)
        yield LanServer(f"tftp://{net.server_ip}/", log_path)
    finally:
        _stop(proc)


#: nginx's frame around a site's ``server { }`` blocks; every request logged with its client, range and bytes
_NGINX = """\
daemon off;
master_process off;
worker_processes 1;
user root root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format storm '$remote_addr "$request" $status $body_bytes_sent range="$http_range"';
    access_log {prefix}/access.log storm;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type application/octet-stream;
{site}
}}
"""

#: one access-log line of :data:`_NGINX`
ACCESS_LINE = re.compile(
    r'^(?P<client>\S+) "(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?P<bytes>\d+) '
    r'range="(?P<range>[^"]*)"$'
)


@contextmanager
def net_nginx(net: Lan, site: str, *, log_dir: Path) -> Iterator[LanServer]:
    """A stock nginx with ``site`` (``server { }`` blocks listening on the server address, port 80) inside
    ``http { }``; its access log has one :data:`ACCESS_LINE` per request."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise MissingPiece("nginx (Debian package nginx-light)")
    log_dir.mkdir(parents=True, exist_ok=True)
    prefix = log_dir / "nginx"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(_NGINX.format(prefix=prefix, site=site))
    proc = spawn(net.inside([nginx, "-p", prefix, "-c", conf]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # nginx logs nothing when it listens: ask it, from inside the namespace
        probe = ("import socket,sys,time\n"
                 "for _ in range(300):\n"
                 "    try: socket.create_connection((sys.argv[1], 80), 1).close(); sys.exit(0)\n"
                 "    except OSError: time.sleep(0.1)\n"
                 "sys.exit(1)\n")  # fmt: skip
        if proc.poll() is not None or subprocess.run(net.inside([sys.executable, "-c", probe, net.server_ip]),
                                                     timeout=60).returncode != 0:  # fmt: skip
            raise RuntimeError(f"nginx not listening on {net.server_ip}:80: {(prefix / 'error.log').read_text()}")
        yield LanServer(f"http://{net.server_ip}", prefix / "access.log")
    finally:
        _stop(proc)


@contextmanager
def net_fleet_collect(net: Lan, reports: Path, *, log_dir: Path, port: int = 8070) -> Iterator[LanServer]:
    """``bootkit fleet collect`` on the server address, as a user runs it; yields its ``POST /report`` URL."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "fleet-collect.log"
    cmd: list[str | os.PathLike[str]] = [
        sys.executable, "-m", "bootkit", "-v", "fleet", "collect", "--bind", f"{net.server_ip}:{port}", reports,
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        proc = spawn(net.inside(cmd), stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_for("bootkit fleet collect", re.compile(r"receiving reports at "), log_path, proc)
        yield LanServer(f"http://{net.server_ip}:{port}/report", log_path)
    finally:
        _stop(proc)


@contextmanager
def lan_guest(
    net: Lan, index: int, *, mac: str, log_dir: Path, name: str, memory_mib: int = 512, boot_timeout: float = 600.0
) -> Iterator[Guest]:
    """A BIOS guest on tap ``index`` with ``mac``, booting from the network (QEMU's iPXE ROM)."""
    cmd = qemu_command(firmware=Firmware.bios, memory_mib=memory_mib, netdev=net.netdev(index), mac=mac)
    log_dir.mkdir(parents=True, exist_ok=True)
    guest = Guest(net.inside(cmd), name=name, log_path=log_dir / f"{name}.serial.log", boot_timeout=boot_timeout)
    try:
        yield guest
    finally:
        guest.close()
