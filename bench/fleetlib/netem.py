"""An emulated boot network in network namespaces: a switch, an origin with a shaped uplink, a rack cache,
and one namespace per client.

Every namespace is named ``bkf<PID>-...`` (so two benchmarks, or a crashed one, never collide), every address
is private to these namespaces (``10.201.0.0/16`` on the switch's bridge), and :class:`Testbed` removes
them all on exit -- also on an error or Ctrl-C (``finally``). Deleting a namespace deletes its veth ends.

Topology (one bridge in the switch namespace, a veth pair per host)::

    origin (10.201.0.1) --uplink: htb RATE + netem DELAY-- [bridge in sw] -- client i (10.201.1+i/250.x)
    rack cache (10.201.0.2) --same shaping as the uplink--/

The uplink's shaping is on the origin's egress (what it sends: the image) -- an htb class at the uplink rate
with a netem child adding the one-way delay (the RTT; acknowledgements are not delayed), or a byte FIFO of
``queue_ms`` where the kernel has no netem. Either queue is bounded (``queue_ms`` of the rate). The rack cache's link
is shaped the same way (one machine like the origin, in the rack). Client links are not shaped: in a boot
storm the shared uplink is the bottleneck, not each machine's port.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from bootkit.run import run

NETNS_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000
SUBNET = "10.201.0.0/16"
ORIGIN_ADDR = "10.201.0.1"
CACHE_ADDR = "10.201.0.2"


@dataclass(frozen=True)
class Shaping:
    """The uplink: ``rate_mbit`` (Mbit/s, shared by every client), ``delay_ms`` (one way, = the RTT; needs
    the kernel's netem qdisc) and ``queue_ms``, the bound of the queue in front of it (a short FIFO)."""

    rate_mbit: float
    delay_ms: float = 1.0
    #: the queue in front of the uplink, in milliseconds of its rate
    queue_ms: float = 20.0

    @property
    def bytes_per_s(self) -> float:
        return self.rate_mbit * 1e6 / 8


@dataclass(frozen=True)
class Client:
    """One client's namespace, address and MAC (the MAC names it in ``bootkit fleet status``)."""

    index: int
    netns: str
    addr: str
    mac: str


def prefix_for(pid: int) -> str:
    return f"bkf{pid}"


def namespaces(prefix: str) -> list[str]:
    """The network namespaces whose names start with ``prefix`` (left-overs, for the test)."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix + "-"))


def enter(netns: str) -> None:
    """Move the calling thread (in a forked client: the process) into network namespace ``netns``."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def client_addr(index: int) -> str:
    return f"10.201.{1 + index // 250}.{1 + index % 250}"


def _ip(*args: str) -> None:
    run(["ip", *args])


class Testbed:
    """The namespaces and links of one benchmark; ``with Testbed(shaping, clients) as tb:``.

    ``tb.origin`` and ``tb.cache`` are namespace names, ``tb.clients`` the clients; :meth:`exec` prefixes a
    command to run it in a namespace.
    """

    def __init__(self, shaping: Shaping, clients: int, *, prefix: str | None = None) -> None:
        self.shaping = shaping
        self.prefix = prefix or prefix_for(os.getpid())
        self.switch = f"{self.prefix}-sw"
        self.origin = f"{self.prefix}-origin"
        self.cache = f"{self.prefix}-cache"
        self.clients = [
            Client(i, f"{self.prefix}-c{i}", client_addr(i), f"52:54:00:fb:{i // 256:02x}:{i % 256:02x}")
            for i in range(clients)
        ]
        self._made: list[str] = []
        #: why the RTT could not be added (no netem in the kernel), or None
        self.delay_missing: str | None = None

    def __enter__(self) -> Testbed:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exec(self, netns: str, cmd: list[str]) -> list[str]:
        """``cmd`` run inside ``netns`` (``ip netns exec``)."""
        return ["ip", "netns", "exec", netns, *cmd]

    def _netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _host(self, netns: str, port: str, addr: str, mac: str | None = None) -> None:
        """A veth pair: ``port`` on the bridge in the switch namespace, ``eth0`` (``addr``) in ``netns``."""
        peer = ["peer", "name", "eth0", "netns", netns]
        if mac:
            peer[3:3] = ["address", mac]
        _ip("-n", self.switch, "link", "add", port, "type", "veth", *peer)
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", netns, "addr", "add", f"{addr}/16", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")

    def _shape(self, netns: str) -> None:
        rate = f"{self.shaping.rate_mbit}mbit"
        tc = ["ip", "netns", "exec", netns, "tc"]
        run([*tc, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10"])
        run([*tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb",
             "rate", rate, "ceil", rate])  # fmt: skip
        # the queue in front of the link: a real switch port or a server NIC (fq_codel) keeps it short; an
        # unbounded FIFO (htb's default leaf, 1000 GSO packets = tens of MB) would make every request of a
        # machine wait behind seconds of other machines' bulk transfers -- bufferbloat, not the link
        limit = max(64 << 10, int(self.shaping.bytes_per_s * self.shaping.queue_ms / 1000))
        if self.shaping.delay_ms > 0:
            done = run([*tc, "qdisc", "add", "dev", "eth0", "parent", "1:10", "handle", "10:", "netem",
                        "delay", f"{self.shaping.delay_ms}ms",
                        "limit", str(max(16, limit // 1500))], check=False)  # fmt: skip
            if done.returncode == 0:
                return
            # some kernels (this benchmark's CI VM among them) are built without sch_netem: run without the
            # added delay and say so in the table's head, rather than not at all
            self.delay_missing = done.stderr.decode(errors="replace").strip()[:200]
        run([*tc, "qdisc", "add", "dev", "eth0", "parent", "1:10", "handle", "10:", "bfifo", "limit", str(limit)])

    def _build(self) -> None:
        self._netns(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for netns, port, addr in ((self.origin, "p-origin", ORIGIN_ADDR), (self.cache, "p-cache", CACHE_ADDR)):
            self._netns(netns)
            self._host(netns, port, addr)
            self._shape(netns)
        for c in self.clients:
            self._netns(c.netns)
            self._host(c.netns, f"p-c{c.index}", c.addr, c.mac)

    def close(self) -> None:
        """Delete every namespace this testbed made (their veth ends and qdiscs go with them)."""
        for name in reversed(self._made):
            run(["ip", "netns", "del", name], check=False)
        self._made.clear()


@contextmanager
def testbed(shaping: Shaping, clients: int, *, prefix: str | None = None) -> Iterator[Testbed]:
    with Testbed(shaping, clients, prefix=prefix) as tb:
        yield tb
