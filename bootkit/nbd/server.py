"""A read-only NBD server for one image: fixed newstyle handshake and the transmission phase.

References: NetworkBlockDevice/nbd doc/proto.md (NBDP); the kernel client (drivers/block/nbd.c) speaks only
the transmission phase with simple replies, so ``serve_connection(sock, handshake=False)`` serves a socket
handed to the kernel.

Threads, not asyncio: each connection is served by a small team of threads. One thread at a time holds the
receive lock (the leader) and reads requests, a whole recv of them at a time:
- a request that decodes nothing (an uncompressed or zero run, any command but a large read) it answers at
  once;
- a read that decodes one compressed cluster (the small random read) goes into a queue, which the leader
  works on whenever no new request has arrived, beside one helper thread woken for the surplus. The
  decoders release the GIL, so at depth 16 two clusters decode at once on two cores, and at depth 1 no
  other thread ever wakes. While more small jobs wait, a thread holds its reply back and sends up to four
  in one call: fewer sends, and the client wakes once for several;
- for a costlier read the leader hands the lead on and decodes while the next thread reads (leader and
  follower).
Replies go out under the send lock in completion order, which NBDP allows (the cookie identifies them).
Every hand-off between threads is a context switch, and in a VM those cost 10-20 us each; the design keeps
them below one per request. Before sleeping on the socket an idle leader polls it briefly (``poll_us``):
waking costs more than a small read. Measured (bench/nbd.py), random 4 KiB reads, zstd: 1.2-1.3x qemu-nbd's
rate at depth 16 (63-69 us of server CPU per read, qemu-nbd 65-70), 1.35-1.6x at depth 1.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import deque
from typing import Any, Iterator, List, NamedTuple, Optional, Protocol, Sequence, Tuple

from bootkit.errors import NBDError
from bootkit.log import log
from bootkit.nbd import protocol as p


class Extent(NamedTuple):
    """What ``Image.extents`` yields (see ``bootkit.qcow2``); repeated here so the server does not import it."""

    kind: str
    offset: int
    length: int
    host_offset: Optional[int]
    depth: int
    source: Any


class Image(Protocol):
    """What the server needs from an open image (``bootkit.qcow2.Image`` has it)."""

    @property
    def virtual_size(self) -> int: ...

    def readinto(self, offset: int, buf: memoryview, plan: Optional[List[Any]] = None) -> int: ...

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Any]: ...

    def plan(self, offset: int, length: int) -> List[Any]: ...

    def clusters_to_decode(self, plan: List[Any]) -> int: ...


class ProtocolError(NBDError):
    """The peer broke the protocol; the connection is dropped (the server keeps running)."""


class _Closed(Exception):
    """The peer closed the connection (EOF, reset)."""


#: runs reported as data by BLOCK_STATUS; "zero" and "unallocated" read as zeros: hole + zero, like qemu-nbd
_DATA_KINDS = frozenset(("data", "compressed"))
#: below this, one pread into the reply buffer beats looking up extents for os.sendfile
_SENDFILE_MIN = 64 * 1024
#: most descriptors in one BLOCK_STATUS reply (the client asks again for the rest)
_MAX_DESCRIPTORS = 64 * 1024
_ZEROES = bytes(1024 * 1024)
#: zero runs shorter than this are sent as data in a sparse read (a chunk header is 20 bytes + the hole's 12)
_MIN_HOLE = 4096
_RECV_CHUNK = 64 * 1024
#: reads up to this size that decode nothing are answered by the thread that received them
_INLINE_MAX = 256 * 1024
#: reply buffers up to this size are kept by each thread for its next requests (about 1 MiB per thread)
_KEEP_BUFFER = 1024 * 1024 + 64
#: how long an idle connection looks for its next request before sleeping (NBDServer poll_us)
DEFAULT_POLL_US = 50
MAX_POLL_US = 10000

SERVER_FLAGS = (
    p.NBD_FLAG_HAS_FLAGS
    | p.NBD_FLAG_READ_ONLY
    | p.NBD_FLAG_SEND_FLUSH
    | p.NBD_FLAG_SEND_DF
    | p.NBD_FLAG_CAN_MULTI_CONN
    | p.NBD_FLAG_SEND_CACHE
)
#: flags for the kernel: no DF (it never negotiates structured replies)
KERNEL_FLAGS = SERVER_FLAGS & ~p.NBD_FLAG_SEND_DF


class _Budget:
    """Bounds the bytes of read buffers in flight over all connections (the daemon locks its memory)."""

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            while self._free < n:
                self._cond.wait()
            self._free -= n

    def release(self, n: int) -> None:
        with self._cond:
            self._free += n
            self._cond.notify_all()


class NBDServer:
    """Serves one open image, read-only, to any number of connections.

    ``threads`` is the number of threads serving one connection; ``poll_us`` how long an otherwise idle
    connection keeps looking for the next request before its thread sleeps (0: never); a client that has
    not finished negotiating after ``handshake_timeout`` seconds is dropped (it would hold a thread).
    """

    def __init__(
        self,
        image: Image,
        *,
        name: str = "",
        description: str = "",
        threads: int = 4,
        poll_us: int = DEFAULT_POLL_US,
        buffer_limit: int = 4 * p.MAX_PAYLOAD,
        handshake_timeout: Optional[float] = 60.0,
    ) -> None:
        if threads < 1:
            raise NBDError(f"threads: must be at least 1, not {threads}")
        if not 0 <= poll_us <= MAX_POLL_US:
            raise NBDError(f"poll_us: must be 0 to {MAX_POLL_US}, not {poll_us}")
        self.image = image
        self.name = name
        self.description = description
        self.size: int = image.virtual_size
        self.threads = threads
        self.poll = poll_us / 1e6
        self.handshake_timeout = handshake_timeout
        self._budget = _Budget(max(buffer_limit, p.MAX_PAYLOAD + 64))
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()

    def serve_connection(self, sock: socket.socket, *, handshake: bool = True) -> None:
        """Serve one connected socket until the client disconnects; never raises for a peer's fault."""
        with self._lock:
            self._connections.add(sock)
        conn = _Connection(self, sock)
        try:
            if handshake:
                sock.settimeout(self.handshake_timeout)
                if not conn.handshake():
                    return
                sock.settimeout(None)
            conn.transmission()
        except _Closed:
            log.debug("nbd: client closed the connection")
        except ProtocolError as e:
            log.warning("nbd: dropping connection: %s", e)
        except OSError as e:
            log.debug("nbd: connection error: %s", e)
        finally:
            with self._lock:
                self._connections.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    def shutdown_connections(self) -> None:
        """Make every connection's threads return (used when the server stops)."""
        with self._lock:
            socks = list(self._connections)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def matches(self, name: str) -> bool:
        """The default export ("") and the configured name both select the image."""
        return name in ("", self.name)


def _is_hole(e: Any) -> bool:
    return e.kind not in _DATA_KINDS


class _Request(NamedTuple):
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


#: what a request costs (classify): answered by the leader at once, or queued as decoding one cluster or more
_CHEAP, _SMALL, _BIG = 0, 1, 2
#: the leader stops reading requests while this many wait in the queue
_MAX_QUEUED = 256
#: most replies to small jobs one thread sends at once
_COALESCE = 4
#: read_request: the client sent NBD_CMD_DISC
_DISC = _Request(0, p.NBD_CMD_DISC, 0, 0, 0)
_Job = Tuple[_Request, Optional[List[Any]]]


class _ThreadState(threading.local):
    """What each thread of a connection keeps: reply buffers, and the replies it holds back."""

    def __init__(self) -> None:
        self.bufs: List[bytearray] = []
        self.pending: List[memoryview] = []
        self.defer = False  # working on a queued small job: its reply may wait for the next one


def _sendmsg_all(sock: socket.socket, views: List[memoryview]) -> None:
    """Send all of ``views`` (sendmsg, resumed after a partial send)."""
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views = views[1:]
        if sent:
            views = [views[0][sent:], *views[1:]]


class _Connection:
    def __init__(self, server: NBDServer, sock: socket.socket) -> None:
        self.server = server
        self.image = server.image
        self.size = server.size
        self.sock = sock
        self.structured = False
        self.meta_context: Optional[int] = None  # id of base:allocation once selected
        self.send_lock = threading.Lock()
        self.recv_lock = threading.Lock()  # held by the leader
        self.looked = False  # the socket was read since the leader last worked on a queued job
        # queued reads that decode one cluster, and whether the helper waits for one; guarded by lock
        self.small_jobs: deque[_Job] = deque()
        self.lock = threading.Lock()
        self.small_ready = threading.Condition(self.lock)
        self.idle = server.threads < 2  # the helper waits for work (or there is none)
        self.busy = 0  # followers working on a request they read
        self.closing = False
        self._rbuf = bytearray()
        self._rpos = 0
        self.local = _ThreadState()
        self.failure: Optional[BaseException] = None

    # -- socket helpers -------------------------------------------------------------------------------------

    def recv_exact(self, n: int, wait: Optional[bool] = True) -> Optional[bytes]:
        """Exactly ``n`` bytes from the peer (raises _Closed at EOF); only the leader reads.

        Buffered: with many requests queued (fio at depth 16, the kernel) one recv brings in several
        request headers, not one syscall per 28 bytes. Unless ``wait``, None when fewer than ``n`` bytes
        have arrived (what did arrive stays buffered); with ``wait`` None, the socket is not even looked at.
        """
        buf = self._rbuf
        while len(buf) - self._rpos < n:
            if wait is None:
                return None
            if self._rpos:
                del buf[: self._rpos]
                self._rpos = 0
            self.looked = True
            try:
                chunk = self.sock.recv(max(n - len(buf), _RECV_CHUNK), 0 if wait else socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            if not chunk:
                raise _Closed()
            buf += chunk
            if not wait and len(buf) < n:
                return None
        out = bytes(buf[self._rpos : self._rpos + n])
        self._rpos += n
        if self._rpos == len(buf):
            buf.clear()
            self._rpos = 0
        return out

    def recv_all(self, n: int) -> bytes:
        data = self.recv_exact(n)
        assert data is not None
        return data

    def discard(self, n: int) -> None:
        while n > 0:
            n -= len(self.recv_all(min(n, 1024 * 1024)))

    # -- handshake ----------------------------------------------------------------------------------------

    def handshake(self) -> bool:
        """Fixed newstyle negotiation; True when the client entered the transmission phase."""
        sock = self.sock
        sock.sendall(p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES))
        (cflags,) = p.CLIENT_FLAGS.unpack(self.recv_all(p.CLIENT_FLAGS.size))
        if cflags & ~p.KNOWN_CLIENT_FLAGS:
            raise ProtocolError(f"unknown client flags {cflags:#x}")
        no_zeroes = bool(cflags & p.NBD_FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = p.OPTION_HEADER.unpack(self.recv_all(p.OPTION_HEADER.size))
            if magic != p.IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > p.MAX_OPTION_DATA:
                raise ProtocolError(f"option {opt}: {length} bytes of data is too long")
            data = self.recv_all(length) if length else b""
            if opt == p.NBD_OPT_EXPORT_NAME:
                name = data.decode("utf-8", "replace")
                if not self.server.matches(name):
                    # this option cannot carry an error: the spec says drop the connection
                    raise ProtocolError(f"NBD_OPT_EXPORT_NAME: no export named {name!r}")
                reply = p.EXPORT_NAME_REPLY.pack(self.size, self.transmission_flags())
                sock.sendall(reply if no_zeroes else reply + bytes(124))
                return True
            if opt == p.NBD_OPT_ABORT:
                self.option_reply(opt, p.NBD_REP_ACK)
                return False
            if opt == p.NBD_OPT_LIST:
                if data:
                    self.option_error(opt, p.NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                    continue
                name_b = self.server.name.encode()
                self.option_reply(opt, p.NBD_REP_SERVER, len(name_b).to_bytes(4, "big") + name_b)
                self.option_reply(opt, p.NBD_REP_ACK)
            elif opt in (p.NBD_OPT_INFO, p.NBD_OPT_GO):
                if self.info(opt, data) and opt == p.NBD_OPT_GO:
                    return True
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

    def transmission_flags(self) -> int:
        # DF only means something with structured replies (NBDP: MUST NOT be set otherwise)
        return SERVER_FLAGS if self.structured else KERNEL_FLAGS

    def option_reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self.sock.sendall(p.OPTION_REPLY.pack(p.REPLY_MAGIC, opt, rep, len(data)) + data)

    def option_error(self, opt: int, rep: int, message: str) -> None:
        log.debug("nbd: option %d: %s", opt, message)
        self.option_reply(opt, rep, message.encode()[: p.MAX_STRING])

    def info(self, opt: int, data: bytes) -> bool:
        """NBD_OPT_INFO / NBD_OPT_GO; True when the export was described (and, for GO, selected)."""
        parsed = _parse_info_request(data)
        if parsed is None:
            self.option_error(opt, p.NBD_REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data")
            return False
        name, requests = parsed
        if not self.server.matches(name):
            self.option_error(opt, p.NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
            return False
        export = p.INFO_EXPORT.pack(p.NBD_INFO_EXPORT, self.size, self.transmission_flags())
        self.option_reply(opt, p.NBD_REP_INFO, export)
        if p.NBD_INFO_NAME in requests:
            self.option_reply(opt, p.NBD_REP_INFO, p.NBD_INFO_NAME.to_bytes(2, "big") + self.server.name.encode())
        if p.NBD_INFO_DESCRIPTION in requests and self.server.description:
            desc = self.server.description.encode()[: p.MAX_STRING]
            self.option_reply(opt, p.NBD_REP_INFO, p.NBD_INFO_DESCRIPTION.to_bytes(2, "big") + desc)
        # sent unasked too: a minimum of 1 constrains nothing, and clients learn the 32 MiB maximum
        block = p.INFO_BLOCK_SIZE.pack(p.NBD_INFO_BLOCK_SIZE, p.MIN_BLOCK, p.PREFERRED_BLOCK, p.MAX_PAYLOAD)
        self.option_reply(opt, p.NBD_REP_INFO, block)
        self.option_reply(opt, p.NBD_REP_ACK)
        return True

    def meta_context_option(self, opt: int, data: bytes) -> None:
        parsed = _parse_meta_context_request(data)
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
            self.meta_context = _CONTEXT_ID if chosen else None
        if chosen:
            self.option_reply(opt, p.NBD_REP_META_CONTEXT, _CONTEXT_ID.to_bytes(4, "big") + p.BASE_ALLOCATION.encode())
        self.option_reply(opt, p.NBD_REP_ACK)

    # -- transmission ---------------------------------------------------------------------------------------

    def transmission(self) -> None:
        """Serve requests with ``server.threads`` threads until DISC, EOF or a protocol error.

        One thread less than ``threads`` lead and follow (``worker``); the last one only helps with reads
        that decode one cluster (``helper``).
        """
        n = self.server.threads
        team = [threading.Thread(target=self.worker, name=f"nbd-worker-{i}", daemon=True) for i in range(1, n - 1)]
        if n > 1:
            team.append(threading.Thread(target=self.helper, name="nbd-helper", daemon=True))
        for t in team:
            t.start()
        self.worker()
        with self.lock:
            self.closing = True
            self.small_ready.notify_all()
        for t in team:
            t.join()
        if self.failure is not None:
            raise self.failure

    def worker(self) -> None:
        """Leader and follower in turn: the thread holding ``recv_lock`` reads requests.

        It answers cheap ones at once and queues reads that decode one cluster (``small_jobs``), working on
        those itself whenever no new request has arrived, with the helper taking the surplus: at depth 1
        no other thread ever wakes, at depth 16 two decode at once. For a costlier request it hands the lead
        on and works on it while the next thread reads.
        """
        lock, small = self.recv_lock, self.small_jobs
        try:
            while True:
                lock.acquire()
                try:
                    while True:
                        if self.closing:
                            return
                        # wait for the socket only when nothing is queued; look again only after working
                        if len(small) >= _MAX_QUEUED:  # a client that does not read its replies
                            req = None
                        elif small:
                            req = self.read_request(None if self.looked else False)
                        else:
                            self.flush()  # held-back replies go out before the socket is waited on
                            req = self.poll_request()
                        if req is None:
                            job = self.take()
                            if job is not None:
                                self.handle_small(job)
                                self.looked = False
                            continue
                        if req is _DISC:
                            self.drain()
                            return
                        cost, looked_up = self.classify(req)
                        if cost == _CHEAP:
                            self.handle(req, looked_up)
                        elif cost == _SMALL and not small and self._rpos == len(self._rbuf):
                            self.handle(req, looked_up)  # the only request there is (depth 1): no queue
                        elif cost == _SMALL:
                            with self.lock:
                                small.append((req, looked_up))
                                # the leader works on one itself: the helper wakes for a second
                                if len(small) > 1 and self.idle:
                                    self.small_ready.notify()
                        else:
                            self.flush()
                            break
                finally:
                    lock.release()
                with self.lock:
                    self.busy += 1
                try:
                    self.handle(req, looked_up)
                finally:
                    with self.lock:
                        self.busy -= 1
        except BaseException as e:
            self.fail(e)

    def poll_request(self) -> Optional[_Request]:
        """Wait for the next request; while no other thread of the connection works, keep looking at the
        socket for ``server.poll`` seconds before sleeping on it.

        Waking a thread that sleeps costs more than the work of a small read here (30-40 us in a VM, where
        an idle CPU halts): a client at depth 1 sends its next request a few microseconds after our reply,
        and catching it awake cuts the round trip by a quarter to a half. QEMU's iothreads poll the same way
        (poll-max-ns). When another thread is working, looking would only take CPU and the GIL from it.
        """
        poll = self.server.poll
        if poll and self.idle and not self.busy:
            deadline = time.perf_counter() + poll
            while True:
                req = self.read_request(False)
                if req is not None:
                    return req
                if time.perf_counter() > deadline:
                    break
        return self.read_request(True)

    def handle_small(self, job: _Job) -> None:
        """Work on a queued read that decodes one cluster; while more wait, its reply may be held back and
        sent with the next (up to _COALESCE at once): fewer sends, and fewer wake-ups for the client."""
        local = self.local
        local.defer = True
        try:
            self.handle(*job)
        finally:
            local.defer = False

    def take(self) -> Optional[_Job]:
        """The next queued small job, or None."""
        with self.lock:
            return self.small_jobs.popleft() if self.small_jobs else None

    def helper(self) -> None:
        """Works on queued reads that decode one cluster, beside the leader.

        Only one such thread: on two cores a third decoder is no faster, and every thread waiting for the
        GIL costs context switches, which are dear in a VM.
        """
        try:
            while True:
                job = self.take()
                if job is None:
                    self.flush()
                    with self.lock:
                        while not self.small_jobs:
                            if self.closing:
                                return
                            self.idle = True
                            self.small_ready.wait()
                            self.idle = False
                        job = self.small_jobs.popleft()
                self.handle_small(job)
        except BaseException as e:
            self.fail(e)

    def drain(self) -> None:
        """After NBD_CMD_DISC: answer what is queued, then end (other threads finish theirs)."""
        while True:
            job = self.take()
            if job is None:
                break
            self.handle(*job)
        self.flush()
        self.closing = True

    def fail(self, e: BaseException) -> None:
        """End the connection after ``e``: the others stop taking work and the leader's recv returns."""
        if not isinstance(e, (_Closed, ProtocolError, OSError)):
            # a bug, not the peer: this connection ends, the server and its other clients go on
            log.exception("nbd: internal error, dropping the connection")
            e = ProtocolError(f"internal error: {type(e).__name__}: {e}")
        with self.lock:
            if self.failure is None:
                self.failure = e
            self.closing = True
            self.small_jobs.clear()
            self.small_ready.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def read_request(self, wait: Optional[bool] = True) -> Optional[_Request]:
        """The next request to work on; _DISC after NBD_CMD_DISC. Write payloads are consumed here.

        ``wait``: True waits for one; False looks at the socket without waiting and None only at what is
        buffered, both returning None when no whole request header is there."""
        while True:
            header = self.recv_exact(p.REQUEST.size, wait)
            if header is None:
                return None
            magic, flags, type_, cookie, offset, length = p.REQUEST.unpack(header)
            if magic != p.REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            if type_ == p.NBD_CMD_DISC:
                return _DISC
            if type_ == p.NBD_CMD_WRITE:
                # read-only export: consume the payload to stay in sync, then refuse
                self.discard(length)
                self.simple_reply(cookie, p.NBD_EPERM)
                continue
            return _Request(flags, type_, cookie, offset, length)

    def classify(self, req: _Request) -> Tuple[int, Optional[List[Any]]]:
        """(_CHEAP, _SMALL or _BIG, what was looked up: a read plan below _SENDFILE_MIN bytes, else extents).

        _CHEAP requests decode nothing (uncompressed and zero runs up to _INLINE_MAX bytes, every command but
        READ and large BLOCK_STATUS) and cost less than waking another thread: the leader answers them at
        once. _SMALL reads decode one cluster and are queued; _BIG ones decode more (or are long), and the
        leader hands the lead on to work on them. What was looked up here is used again: a request is mapped
        once.
        """
        if req.type == p.NBD_CMD_READ:
            if req.length > _INLINE_MAX or self.check(req, p.NBD_CMD_FLAG_FUA | p.NBD_CMD_FLAG_DF, p.MAX_PAYLOAD):
                return (_CHEAP if req.length <= _INLINE_MAX else _BIG), None
            if req.length < _SENDFILE_MIN:
                try:
                    plan = self.image.plan(req.offset, req.length)
                except Exception:
                    return _CHEAP, None  # read() meets the same error and answers EIO
                return min(self.image.clusters_to_decode(plan), _BIG), plan
            try:
                extents = list(self.image.extents(req.offset, req.length))
            except Exception:
                return _CHEAP, None  # read() meets the same error and answers EIO
            return (_BIG if any(e.kind == "compressed" for e in extents) else _CHEAP), extents
        if req.type == p.NBD_CMD_BLOCK_STATUS:
            return (_CHEAP if req.length <= _INLINE_MAX * 32 else _BIG), None
        return _CHEAP, None

    def handle(self, req: _Request, looked_up: Optional[List[Any]] = None) -> None:
        t = req.type
        if t == p.NBD_CMD_READ:
            error = self.check(req, p.NBD_CMD_FLAG_FUA | p.NBD_CMD_FLAG_DF, p.MAX_PAYLOAD)
            if error:
                self.error_reply(req, error)
            else:
                self.read(req, looked_up)
        elif t == p.NBD_CMD_BLOCK_STATUS:
            error = self.check(req, p.NBD_CMD_FLAG_REQ_ONE, 0xFFFFFFFF)
            if not error and (self.meta_context is None or req.length == 0):
                error = p.NBD_EINVAL
            if error:
                self.error_reply(req, error)
            else:
                self.block_status(req)
        elif t in (p.NBD_CMD_FLUSH, p.NBD_CMD_CACHE):
            # nothing is ever dirty; CACHE has nothing useful to prefetch into (the page cache already is)
            error = self.check(req, p.NBD_CMD_FLAG_FUA, 0xFFFFFFFF) if t == p.NBD_CMD_CACHE else 0
            self.simple_reply(req.cookie, error)
        elif t in (p.NBD_CMD_TRIM, p.NBD_CMD_WRITE_ZEROES, p.NBD_CMD_RESIZE):
            self.simple_reply(req.cookie, p.NBD_EPERM)
        else:
            log.debug("nbd: unknown command %d", t)
            self.simple_reply(req.cookie, p.NBD_EINVAL)

    def check(self, req: _Request, allowed_flags: int, max_length: int) -> int:
        """NBD error for a request out of bounds, too long or with unknown flags; 0 when it is fine."""
        if req.flags & ~allowed_flags:
            return p.NBD_EINVAL
        if req.length > max_length or req.offset + req.length > self.size:
            return p.NBD_EINVAL
        return 0

    # -- replies --------------------------------------------------------------------------------------------

    def simple_reply(self, cookie: int, error: int = 0) -> None:
        with self.send_lock:
            self.sock.sendall(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, cookie))

    def error_reply(self, req: _Request, error: int, message: str = "") -> None:
        if self.structured and req.type in (p.NBD_CMD_READ, p.NBD_CMD_BLOCK_STATUS):
            msg = message.encode()[: p.MAX_STRING]
            payload = p.REPLY_ERROR.pack(error, len(msg)) + msg
            head = p.STRUCTURED_REPLY.pack(
                p.STRUCTURED_REPLY_MAGIC, p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_ERROR, req.cookie, len(payload)
            )
            with self.send_lock:
                self.sock.sendall(head + payload)
        else:
            self.simple_reply(req.cookie, error)

    def read_header(self, req: _Request) -> bytes:
        if self.structured:
            # one OFFSET_DATA chunk for the whole range: DF is always honoured
            return p.STRUCTURED_REPLY.pack(
                p.STRUCTURED_REPLY_MAGIC,
                p.NBD_REPLY_FLAG_DONE,
                p.NBD_REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                p.OFFSET_DATA.size + req.length,
            ) + p.OFFSET_DATA.pack(req.offset)
        return p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, req.cookie)

    def read(self, req: _Request, looked_up: Optional[List[Any]] = None) -> None:
        """``looked_up``: from classify(): the read plan of a short read, the extents of a longer one."""
        if req.length < _SENDFILE_MIN:
            self.send_read(req, self.read_header(req), req.offset, req.length, looked_up)
            return
        extents = looked_up
        if extents is None:
            try:
                extents = list(self.image.extents(req.offset, req.length))
            except Exception as e:  # CorruptImage, OSError: this request fails, the server goes on
                self.read_failed(req, e)
                return
        if self.structured and not req.flags & p.NBD_CMD_FLAG_DF and any(_is_hole(e) for e in extents):
            self.sparse_read(req, extents)
            return
        plan = self.sendfile_plan(extents)
        if plan is not None:
            self.send_plan(self.read_header(req), plan)
            return
        self.send_read(req, self.read_header(req), req.offset, req.length)

    def send_read(self, req: _Request, head: bytes, offset: int, length: int,
                  plan: Optional[List[Any]] = None) -> bool:
        """Read ``length`` bytes at ``offset`` into a buffer after ``head`` and send both; False on EIO."""
        n = len(head) + length
        # buffers kept by the threads are bounded by the thread count; only bigger ones count against the budget
        budget = n if n > _KEEP_BUFFER else 0
        if budget:
            self.server._budget.acquire(budget)
        try:
            local = self.local
            pending = local.pending
            view = self.buffer(n, local)
            view[: len(head)] = head
            try:
                self.image.readinto(offset, view[len(head) :], plan)
            except Exception as e:
                self.read_failed(req, e)
                return False
            if pending or local.defer:
                pending.append(view)
                # held back while more small jobs wait, to go out with this thread's next reply
                if not (local.defer and len(pending) < _COALESCE and self.small_jobs):
                    self.flush()
            else:
                with self.send_lock:
                    self.sock.sendall(view)
            return True
        finally:
            if budget:
                self.server._budget.release(budget)

    def flush(self) -> None:
        """Send the replies this thread has held back, in one call."""
        pending = self.local.pending
        if not pending:
            return
        with self.send_lock:
            _sendmsg_all(self.sock, pending)
        pending.clear()

    def buffer(self, n: int, local: _ThreadState) -> memoryview:
        """A reply buffer of ``n`` bytes; up to _KEEP_BUFFER it is this thread's own, reused (one for each
        reply held back, and one more).

        A fresh 1 MiB bytearray is a new mmap whose pages fault in one by one (and, with the daemon's
        mlockall, get locked); reusing it saves that on every request.
        """
        if n > _KEEP_BUFFER:
            return memoryview(bytearray(n))
        bufs, i = local.bufs, len(local.pending)
        if i == len(bufs):
            bufs.append(bytearray(max(n, 64 * 1024)))
        elif len(bufs[i]) < n:
            bufs[i] = bytearray(n)
        return memoryview(bufs[i])[:n]

    def sparse_read(self, req: _Request, extents: List[Any]) -> None:
        """A structured read in chunks: OFFSET_HOLE for runs that read as zeros, OFFSET_DATA for the rest.

        Like qemu-nbd (nbd_co_send_sparse_read): zeros cost 20 bytes on the wire instead of their length.
        Chunks of different replies may interleave (NBDP "Structured reply chunk message types"); an error
        after some chunks went out is one final ERROR chunk, no broken connection.
        """
        segments: List[Tuple[bool, int, int, List[Any]]] = []  # (hole, offset, length, extents)
        for e in extents:
            hole = _is_hole(e) and e.length >= _MIN_HOLE
            if segments and segments[-1][0] == hole:
                last = segments[-1]
                segments[-1] = (hole, last[1], last[2] + e.length, [*last[3], e])
            else:
                segments.append((hole, e.offset, e.length, [e]))
        for i, (hole, offset, length, runs) in enumerate(segments):
            flags = p.NBD_REPLY_FLAG_DONE if i == len(segments) - 1 else 0
            if hole:
                chunk = p.STRUCTURED_REPLY.pack(
                    p.STRUCTURED_REPLY_MAGIC, flags, p.NBD_REPLY_TYPE_OFFSET_HOLE, req.cookie, p.OFFSET_HOLE.size
                ) + p.OFFSET_HOLE.pack(offset, length)
                with self.send_lock:
                    self.sock.sendall(chunk)
                continue
            head = p.STRUCTURED_REPLY.pack(
                p.STRUCTURED_REPLY_MAGIC, flags, p.NBD_REPLY_TYPE_OFFSET_DATA, req.cookie, p.OFFSET_DATA.size + length
            ) + p.OFFSET_DATA.pack(offset)
            plan = self.sendfile_plan(runs)
            if plan is not None:
                self.send_plan(head, plan)
                continue
            if not self.send_read(req, head, offset, length):
                return

    def read_failed(self, req: _Request, e: BaseException) -> None:
        log.error("nbd: read of %d bytes at offset %d failed: %s", req.length, req.offset, e)
        self.error_reply(req, p.NBD_EIO, str(e))

    def sendfile_plan(self, extents: Sequence[Any]) -> Optional[List[Tuple[int, int, int]]]:
        """(fd, host offset, length) runs (fd -1: zeros) when the extents need no decoding; else None."""
        plan: List[Tuple[int, int, int]] = []
        for e in extents:
            if e.kind in ("zero", "unallocated"):
                plan.append((-1, 0, e.length))
                continue
            fd = getattr(e.source, "fd", -1)
            if e.kind != "data" or fd < 0 or e.host_offset is None:
                return None
            if e.host_offset + e.length > e.source.size:
                return None  # a truncated file: let the reader decide what that reads as
            if plan and plan[-1][0] == fd and plan[-1][1] + plan[-1][2] == e.host_offset:
                plan[-1] = (fd, plan[-1][1], plan[-1][2] + e.length)
            else:
                plan.append((fd, e.host_offset, e.length))
        return plan

    def send_plan(self, head: bytes, plan: List[Tuple[int, int, int]]) -> None:
        sock = self.sock
        out = sock.fileno()
        with self.send_lock:
            sock.sendall(head, socket.MSG_MORE)
            for fd, host_offset, length in plan:
                if fd < 0:
                    while length > 0:
                        k = min(length, len(_ZEROES))
                        sock.sendall(memoryview(_ZEROES)[:k], socket.MSG_MORE)
                        length -= k
                    continue
                while length > 0:
                    sent = os.sendfile(out, fd, host_offset, length)
                    if sent == 0:
                        # the header is out: a short reply cannot be repaired, only the connection ended
                        raise ProtocolError(f"sendfile: unexpected end of image file at {host_offset}")
                    host_offset += sent
                    length -= sent

    def block_status(self, req: _Request) -> None:
        assert self.meta_context is not None
        end = req.offset + req.length
        descriptors: List[List[int]] = []
        try:
            for e in self.image.extents(req.offset, req.length):
                start = max(e.offset, req.offset)
                stop = min(e.offset + e.length, end)
                if stop <= start:
                    continue
                flags = 0 if e.kind in _DATA_KINDS else p.NBD_STATE_HOLE | p.NBD_STATE_ZERO
                if descriptors and descriptors[-1][1] == flags:
                    descriptors[-1][0] += stop - start
                    continue
                if len(descriptors) >= _MAX_DESCRIPTORS or (descriptors and req.flags & p.NBD_CMD_FLAG_REQ_ONE):
                    break
                descriptors.append([stop - start, flags])
        except Exception as e:
            self.read_failed(req, e)
            return
        payload = p.BLOCK_STATUS_HEADER.pack(self.meta_context) + b"".join(
            p.BLOCK_DESCRIPTOR.pack(length, flags) for length, flags in descriptors
        )
        head = p.STRUCTURED_REPLY.pack(
            p.STRUCTURED_REPLY_MAGIC, p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_BLOCK_STATUS, req.cookie, len(payload)
        )
        with self.send_lock:
            self.sock.sendall(head + payload)


_CONTEXT_ID = 1


def _parse_info_request(data: bytes) -> Optional[Tuple[str, List[int]]]:
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


def _parse_meta_context_request(data: bytes) -> Optional[Tuple[str, List[str]]]:
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
