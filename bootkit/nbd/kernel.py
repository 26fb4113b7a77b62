"""Attach an image to the kernel's NBD driver over socketpairs, and keep serving it from a daemon.

The kernel never negotiates (NBDP; drivers/block/nbd.c): userspace hands it connected sockets and it speaks
only the transmission phase. ``attach`` makes one ``socketpair`` per connection, serves one end in this
process (``NBDServer.serve_connection(handshake=False)``) and gives the other to the kernel.

Configuration goes through generic netlink (family "nbd", NetworkBlockDevice/nbd nbd-netlink.h), not the
ioctls, because netlink
- takes the size as a u64 (``fcntl.ioctl`` passes a C int, so NBD_SET_SIZE breaks beyond 2 GiB),
- takes every socket in one NBD_CMD_CONNECT and returns at once: no thread parked in NBD_DO_IT, and no
  "all NBD_SET_SOCK calls from one task" rule to satisfy with several connections,
- picks a free device itself when none is asked for, and disconnects by index from any process
  (``bootkit detach``), which is what nbd-client does by default too.
Generic netlink is plain ``AF_NETLINK`` datagrams: the standard library's ``socket`` is enough.

The process that serves the device is a root storage daemon: see ``bootkit.daemon``.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import threading
import time
from typing import Dict, List, Optional, Sequence

from bootkit.errors import NBDError
from bootkit.log import log
from bootkit.nbd.protocol import KERNEL_FLAGS
from bootkit.nbd.server import DEFAULT_POLL_US, Image, NBDServer
from bootkit.nbd.transport import tune
from bootkit.run import CommandFailed, run

# -- netlink (linux/netlink.h, linux/genetlink.h) ------------------------------------------------------------

NETLINK_GENERIC = 16
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLA_F_NESTED = 0x8000
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
GENLMSGHDR = struct.Struct("=BBH")  # command, version, reserved
NLATTR = struct.Struct("=HH")  # length, type
NLMSGERR = struct.Struct("=i")

# -- NBD generic netlink family (nbd-netlink.h) ---------------------------------------------------------------

NBD_GENL_FAMILY_NAME = "nbd"
NBD_GENL_VERSION = 1
NBD_CMD_CONNECT = 1
NBD_CMD_DISCONNECT = 2
NBD_ATTR_INDEX = 1
NBD_ATTR_SIZE_BYTES = 2
NBD_ATTR_BLOCK_SIZE_BYTES = 3
NBD_ATTR_TIMEOUT = 4
NBD_ATTR_SERVER_FLAGS = 5
NBD_ATTR_CLIENT_FLAGS = 6
NBD_ATTR_SOCKETS = 7
NBD_ATTR_DEAD_CONN_TIMEOUT = 8
NBD_ATTR_BACKEND_IDENTIFIER = 10
NBD_SOCK_ITEM = 1
NBD_SOCK_FD = 1

#: logical block size given to the kernel: partition tables in images are laid out for 512-byte sectors
BLOCK_SIZE = 512
BLKRRPART = 0x125F


class NBDModuleUnavailable(NBDError):
    """The kernel has no NBD driver and it cannot be loaded (exit status 2: nothing to retry)."""

    exit_status = 2


# -- generic netlink ----------------------------------------------------------------------------------------


def _nla(type_: int, payload: bytes) -> bytes:
    data = NLATTR.pack(NLATTR.size + len(payload), type_) + payload
    return data + bytes(-len(data) % 4)


def _nla_u32(type_: int, value: int) -> bytes:
    return _nla(type_, struct.pack("=I", value))


def _nla_u64(type_: int, value: int) -> bytes:
    return _nla(type_, struct.pack("=Q", value))


def _parse_attrs(data: bytes) -> Dict[int, bytes]:
    attrs: Dict[int, bytes] = {}
    pos = 0
    while pos + NLATTR.size <= len(data):
        length, type_ = NLATTR.unpack_from(data, pos)
        if length < NLATTR.size:
            break
        attrs[type_ & ~NLA_F_NESTED] = data[pos + NLATTR.size : pos + length]
        pos += (length + 3) & ~3
    return attrs


class GenericNetlink:
    """A minimal generic netlink client: resolve a family, send a command, collect replies until the ACK."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self.sock.bind((0, 0))
        self._seq = int(time.time())

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> GenericNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, family: int, cmd: int, version: int, attrs: bytes) -> List[Dict[int, bytes]]:
        """Send one command with NLM_F_ACK; the attributes of each reply message. OSError on a NACK."""
        self._seq += 1
        seq = self._seq
        body = GENLMSGHDR.pack(cmd, version, 0) + attrs
        self.sock.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), family, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body)
        replies: List[Dict[int, bytes]] = []
        while True:
            data = self.sock.recv(65536)
            pos = 0
            while pos + NLMSGHDR.size <= len(data):
                length, type_, _flags, rseq, _pid = NLMSGHDR.unpack_from(data, pos)
                if length < NLMSGHDR.size:
                    raise NBDError(f"netlink: malformed reply (message length {length})")
                msg = data[pos + NLMSGHDR.size : pos + length]
                pos += (length + 3) & ~3
                if rseq != seq:
                    continue
                if type_ == NLMSG_ERROR:
                    (err,) = NLMSGERR.unpack_from(msg, 0)
                    if err:
                        raise OSError(-err, os.strerror(-err))
                    return replies
                replies.append(_parse_attrs(msg[GENLMSGHDR.size :]))

    def family_id(self, name: str) -> Optional[int]:
        """The id of a generic netlink family; None when the kernel has no such family."""
        try:
            query = _nla(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0")
            replies = self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, query)
        except FileNotFoundError:
            return None
        for attrs in replies:
            if CTRL_ATTR_FAMILY_ID in attrs:
                return int(struct.unpack("=H", attrs[CTRL_ATTR_FAMILY_ID][:2])[0])
        return None


def nbd_family(nl: GenericNetlink, *, load: bool = True) -> int:
    """The "nbd" family id, loading the module (``modprobe nbd``) when needed and allowed."""
    family = nl.family_id(NBD_GENL_FAMILY_NAME)
    if family is None and load:
        # max_part: without it older kernels create no partition devices (default 0 before 5.x)
        why = _modprobe(["modprobe", "nbd", "max_part=16"])
        family = nl.family_id(NBD_GENL_FAMILY_NAME)
        if family is None:
            raise NBDModuleUnavailable(f"nbd module not available: {why or 'loaded, but no nbd netlink family'}")
    if family is None:
        raise NBDModuleUnavailable("nbd module not available: the kernel has no nbd netlink family")
    return family


def _modprobe(cmd: Sequence[str]) -> str:
    """Run modprobe; '' on success, else why it failed (one line)."""
    try:
        run(cmd, capture=True, timeout=60)
    except CommandFailed as e:
        return str(e)
    return ""


def device_index(device: str) -> int:
    """'/dev/nbd3' or 'nbd3' -> 3."""
    m = re.fullmatch(r"(?:/dev/)?nbd(\d+)", device)
    if not m:
        raise NBDError(f"{device}: not an NBD device name (expected /dev/nbdN)")
    return int(m.group(1))


# -- attach / detach ----------------------------------------------------------------------------------------


class Attachment:
    """An image served to the kernel as ``device``; ``wait()`` until it is detached, ``close()`` to detach."""

    def __init__(self, index: int, server: NBDServer, threads: List[threading.Thread]) -> None:
        self.index = index
        self.device = f"/dev/nbd{index}"
        self.server = server
        self._threads = threads

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the kernel has dropped every connection; True if it has."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def close(self) -> None:
        """Disconnect the device (the kernel sends NBD_CMD_DISC) and wait for the serving threads."""
        if any(t.is_alive() for t in self._threads):
            try:
                detach(self.device)
            except NBDError as e:
                log.warning("%s: %s", self.device, e)
            if not self.wait(30):
                self.server.shutdown_connections()
                self.wait(10)

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(
    image: Image,
    *,
    device: Optional[str] = None,
    connections: int = 1,
    timeout: int = 0,
    dead_conn_timeout: int = 0,
    threads: int = 4,
    poll_us: int = DEFAULT_POLL_US,
    load_module: bool = True,
    scan_partitions: bool = True,
) -> Attachment:
    """Serve ``image`` read-only as ``device`` (``/dev/nbdN``; None: the kernel picks a free one).

    ``timeout`` (seconds, 0: none) is the kernel's per-request timeout; ``threads`` and ``poll_us`` are
    NBDServer's. Returns once the device is usable and its partitions are scanned.
    """
    size = image.virtual_size
    if size % BLOCK_SIZE:
        raise NBDError(f"virtual size {size} is not a multiple of {BLOCK_SIZE}: the kernel would drop the tail")
    if connections < 1:
        raise NBDError(f"connections: must be at least 1, not {connections}")
    index = None if device is None else device_index(device)
    # the kernel reads its replies; dropping one of its connections would fail the device
    server = NBDServer(image, threads=threads, poll_us=poll_us, buffer_wait=None)
    with GenericNetlink() as nl:
        family = nbd_family(nl, load=load_module)
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(connections)]
        for _, ours in pairs:
            tune(ours)
        serving = []
        for i, (_, ours) in enumerate(pairs):
            t = threading.Thread(
                target=server.serve_connection, args=(ours,), kwargs={"handshake": False}, name=f"nbd-kernel-{i}"
            )
            t.start()
            serving.append(t)
        socks = b"".join(
            _nla(NBD_SOCK_ITEM | NLA_F_NESTED, _nla_u32(NBD_SOCK_FD, theirs.fileno())) for theirs, _ in pairs
        )
        attrs = (
            (b"" if index is None else _nla_u32(NBD_ATTR_INDEX, index))
            + _nla_u64(NBD_ATTR_SIZE_BYTES, size)
            + _nla_u64(NBD_ATTR_BLOCK_SIZE_BYTES, BLOCK_SIZE)
            + _nla_u64(NBD_ATTR_SERVER_FLAGS, KERNEL_FLAGS)
            + (_nla_u64(NBD_ATTR_TIMEOUT, timeout) if timeout else b"")
            + (_nla_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout) if dead_conn_timeout else b"")
            + _nla(NBD_ATTR_SOCKETS | NLA_F_NESTED, socks)
        )
        try:
            replies = nl.request(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, attrs)
        except OSError as e:
            for theirs, ours in pairs:
                theirs.close()
                ours.shutdown(socket.SHUT_RDWR)
            for t in serving:
                t.join()
            where = "a free device" if index is None else f"/dev/nbd{index}"
            raise NBDError(f"nbd: connecting {where} failed: {e.strerror}") from e
        finally:
            # the kernel holds its own references to its ends now
            for theirs, _ in pairs:
                theirs.close()
    for attrs_ in replies:
        if NBD_ATTR_INDEX in attrs_:
            index = int(struct.unpack("=I", attrs_[NBD_ATTR_INDEX][:4])[0])
    if index is None:
        raise NBDError("nbd: the kernel connected a device but did not say which")
    attachment = Attachment(index, server, serving)
    log.info("%s: attached, %d bytes, %d connection(s), read-only", attachment.device, size, connections)
    if scan_partitions:
        _scan_partitions(attachment.device)
    return attachment


def _scan_partitions(device: str, wait: float = 10.0) -> None:
    """Open the device once: the kernel reads the partition table on the first open after a size change."""
    deadline = time.monotonic() + wait
    while not os.path.exists(device) and time.monotonic() < deadline:
        time.sleep(0.05)  # devtmpfs creates the node asynchronously for a new index
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        log.warning("%s: cannot open to scan partitions: %s", device, e.strerror)
        return
    try:
        import fcntl

        fcntl.ioctl(fd, BLKRRPART)
    except OSError as e:
        log.debug("%s: BLKRRPART: %s", device, e.strerror)
    finally:
        os.close(fd)


def detach(device: str) -> None:
    """Disconnect ``/dev/nbdN``: the kernel sends NBD_CMD_DISC to the server and drops the sockets."""
    index = device_index(device)
    with GenericNetlink() as nl:
        family = nbd_family(nl, load=False)
        try:
            nl.request(family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, _nla_u32(NBD_ATTR_INDEX, index))
        except OSError as e:
            raise NBDError(f"{device}: disconnect failed: {e.strerror}") from e
