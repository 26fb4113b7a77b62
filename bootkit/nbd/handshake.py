"""The fixed newstyle handshake: greeting, client flags, options, until the client picks the export.

References: NetworkBlockDevice/nbd doc/proto.md (NBDP) "Fixed newstyle negotiation", "Option types",
"Metadata querying". The kernel never negotiates; a socket handed to it starts in the transmission phase.

The whole negotiation has one deadline: a client that has not picked the export by then is dropped, however
it spends the time (silence, or one byte every few seconds), since it holds a thread all along.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, List, Optional, Tuple

from bootkit.log import log
from bootkit.nbd import protocol as p
from bootkit.nbd.receiver import Receiver
from bootkit.record import record

if TYPE_CHECKING:
    from bootkit.nbd.server import NBDServer

#: the id of base:allocation, the one metadata context there is
CONTEXT_ID = 1


@record
class Session:
    """What the client chose during the handshake, for the transmission phase."""

    structured: bool = False
    #: id of base:allocation once selected (BLOCK_STATUS needs it)
    meta_context: Optional[int] = None

    def transmission_flags(self) -> int:
        # DF only means something with structured replies (NBDP: MUST NOT be set otherwise)
        return p.SERVER_FLAGS if self.structured else p.KERNEL_FLAGS


def negotiate(server: NBDServer, sock: socket.socket, rx: Receiver, timeout: Optional[float]) -> Optional[Session]:
    """Negotiate with a new client; its Session once it entered the transmission phase, None when it aborted.

    Raises ProtocolError when the client broke the protocol or did not finish within ``timeout`` seconds
    (None: no limit); leaves the socket blocking, without a timeout.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        return _Negotiation(server, sock, rx, deadline).run()
    except socket.timeout:
        raise p.ProtocolError(f"the handshake did not finish within {timeout:g} s") from None
    finally:
        sock.settimeout(None)


class _Negotiation:
    def __init__(self, server: NBDServer, sock: socket.socket, rx: Receiver, deadline: Optional[float]) -> None:
        self.server = server
        self.sock = sock
        self.rx = rx
        self.deadline = deadline
        self.structured = False
        self.meta_context: Optional[int] = None

    def recv(self, n: int) -> bytes:
        return self.rx.recv_by(n, self.deadline)

    def send(self, data: bytes) -> None:
        if self.deadline is not None:
            # sendall's timeout bounds the whole call (Python >= 3.5): a client that reads nothing is caught
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            self.sock.settimeout(left)
        self.sock.sendall(data)

    def session(self) -> Session:
        return Session(self.structured, self.meta_context)

    def run(self) -> Optional[Session]:
        self.send(p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES))
        (cflags,) = p.CLIENT_FLAGS.unpack(self.recv(p.CLIENT_FLAGS.size))
        if cflags & ~p.KNOWN_CLIENT_FLAGS:
            raise p.ProtocolError(f"unknown client flags {cflags:#x}")
        no_zeroes = bool(cflags & p.NBD_FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = p.OPTION_HEADER.unpack(self.recv(p.OPTION_HEADER.size))
            if magic != p.IHAVEOPT:
                raise p.ProtocolError(f"bad option magic {magic:#x}")
            if length > p.MAX_OPTION_DATA:
                raise p.ProtocolError(f"option {opt}: {length} bytes of data is too long")
            data = self.recv(length) if length else b""
            if opt == p.NBD_OPT_EXPORT_NAME:
                name = data.decode("utf-8", "replace")
                if not self.server.matches(name):
                    # this option cannot carry an error: the spec says drop the connection
                    raise p.ProtocolError(f"NBD_OPT_EXPORT_NAME: no export named {name!r}")
                reply = p.EXPORT_NAME_REPLY.pack(self.server.size, self.session().transmission_flags())
                self.send(reply if no_zeroes else reply + bytes(124))
                return self.session()
            if opt == p.NBD_OPT_ABORT:
                self.option_reply(opt, p.NBD_REP_ACK)
                return None
            if opt == p.NBD_OPT_LIST:
                if data:
                    self.option_error(opt, p.NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                    continue
                name_b = self.server.name.encode()
                self.option_reply(opt, p.NBD_REP_SERVER, len(name_b).to_bytes(4, "big") + name_b)
                self.option_reply(opt, p.NBD_REP_ACK)
            elif opt in (p.NBD_OPT_INFO, p.NBD_OPT_GO):
                if self.info(opt, data) and opt == p.NBD_OPT_GO:
                    return self.session()
            elif opt == p.NBD_OPT_STRUCTURED_REPLY:
                if data:
                    self.option_error(opt, p.NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                    continue
                self.structured = True
                self.option_reply(opt, p.NBD_REP_ACK)
            elif opt in (p.NBD_OPT_LIST_META_CONTEXT, p.NBD_OPT_SET_META_CONTEXT):
                self.meta_context_option(opt, data)
            else:
                self.option_error(opt, p.NBD_REP_ERR_UNSUP, f"option {opt} is not supported")

    def option_reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self.send(p.OPTION_REPLY.pack(p.REPLY_MAGIC, opt, rep, len(data)) + data)

    def option_error(self, opt: int, rep: int, message: str) -> None:
        log.debug("nbd: option %d: %s", opt, message)
        self.option_reply(opt, rep, message.encode()[: p.MAX_STRING])

    def info(self, opt: int, data: bytes) -> bool:
        """NBD_OPT_INFO / NBD_OPT_GO; True when the export was described (and, for GO, selected)."""
        parsed = parse_info_request(data)
        if parsed is None:
            self.option_error(opt, p.NBD_REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data")
            return False
        name, requests = parsed
        server = self.server
        if not server.matches(name):
            self.option_error(opt, p.NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
            return False
        export = p.INFO_EXPORT.pack(p.NBD_INFO_EXPORT, server.size, self.session().transmission_flags())
        self.option_reply(opt, p.NBD_REP_INFO, export)
        if p.NBD_INFO_NAME in requests:
            self.option_reply(opt, p.NBD_REP_INFO, p.NBD_INFO_NAME.to_bytes(2, "big") + server.name.encode())
        if p.NBD_INFO_DESCRIPTION in requests and server.description:
            desc = server.description.encode()[: p.MAX_STRING]
            self.option_reply(opt, p.NBD_REP_INFO, p.NBD_INFO_DESCRIPTION.to_bytes(2, "big") + desc)
        # sent unasked too: a minimum of 1 constrains nothing, and clients learn the 32 MiB maximum
        block = p.INFO_BLOCK_SIZE.pack(p.NBD_INFO_BLOCK_SIZE, p.MIN_BLOCK, p.PREFERRED_BLOCK, p.MAX_PAYLOAD)
        self.option_reply(opt, p.NBD_REP_INFO, block)
        self.option_reply(opt, p.NBD_REP_ACK)
        return True

    def meta_context_option(self, opt: int, data: bytes) -> None:
        parsed = parse_meta_context_request(data)
        if parsed is None:
            self.option_error(opt, p.NBD_REP_ERR_INVALID, "malformed meta context request")
            return
        name, queries = parsed
        if opt == p.NBD_OPT_SET_META_CONTEXT and not self.structured:
            self.option_error(opt, p.NBD_REP_ERR_INVALID, "NBD_OPT_SET_META_CONTEXT needs structured replies")
            return
        if not self.server.matches(name):
            self.option_error(opt, p.NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        if opt == p.NBD_OPT_LIST_META_CONTEXT:
            chosen = not queries or any(q in ("base:", p.BASE_ALLOCATION) for q in queries)
        else:
            chosen = p.BASE_ALLOCATION in queries
            self.meta_context = CONTEXT_ID if chosen else None
        if chosen:
            self.option_reply(opt, p.NBD_REP_META_CONTEXT, CONTEXT_ID.to_bytes(4, "big") + p.BASE_ALLOCATION.encode())
        self.option_reply(opt, p.NBD_REP_ACK)


def parse_info_request(data: bytes) -> Optional[Tuple[str, List[int]]]:
    """NBD_OPT_INFO/GO data: u32 name length, name, u16 count, count x u16 info type."""
    if len(data) < 6:
        return None
    n = int.from_bytes(data[:4], "big")
    if n > p.MAX_STRING or 4 + n + 2 > len(data):
        return None
    name = data[4 : 4 + n].decode("utf-8", "replace")
    count = int.from_bytes(data[4 + n : 6 + n], "big")
    rest = data[6 + n :]
    if len(rest) != 2 * count:
        return None
    return name, [int.from_bytes(rest[i : i + 2], "big") for i in range(0, len(rest), 2)]


def parse_meta_context_request(data: bytes) -> Optional[Tuple[str, List[str]]]:
    """NBD_OPT_{LIST,SET}_META_CONTEXT data: u32 name length, name, u32 count, count x (u32 length, query)."""
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:4], "big")
    if n > p.MAX_STRING or 4 + n + 4 > len(data):
        return None
    name = data[4 : 4 + n].decode("utf-8", "replace")
    count = int.from_bytes(data[4 + n : 8 + n], "big")
    pos = 8 + n
    queries = []
    for _ in range(count):
        if pos + 4 > len(data):
            return None
        k = int.from_bytes(data[pos : pos + 4], "big")
        if k > p.MAX_STRING or pos + 4 + k > len(data):
            return None
        queries.append(data[pos + 4 : pos + 4 + k].decode("utf-8", "replace"))
        pos += 4 + k
    if pos != len(data):
        return None
    return name, queries
