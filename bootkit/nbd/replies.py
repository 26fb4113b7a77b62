"""Answers to requests, and how they go out: the send lock, reply buffers, held-back replies, sparse reads,
sendfile.

References: NetworkBlockDevice/nbd doc/proto.md (NBDP) "Simple reply message", "Structured reply message",
"Request types"; qemu-nbd's nbd_co_send_sparse_read for sparse reads.

Replies go out under the send lock in completion order, which NBDP allows (the cookie identifies them).
A read that needs no decoding goes out with ``os.sendfile`` from the image file; the others are read into
a buffer behind their header and sent in one call. Buffers up to about 1 MiB belong to the thread and are
reused; larger ones are mapped for one reply and count against the server's buffer budget (``budget``).

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import mmap
import os
import socket
import threading
from typing import TYPE_CHECKING, List, Optional, Sequence, Sized, Tuple

from bootkit.log import log
from bootkit.nbd import protocol as p
from bootkit.nbd.handshake import Session
from bootkit.source import FileSource

if TYPE_CHECKING:
    from bootkit.nbd.budget import Budget
    from bootkit.nbd.server import Image
    from bootkit.qcow2.image import Extent, Run

#: runs reported as data by BLOCK_STATUS; "zero" and "unallocated" read as zeros: hole + zero, like qemu-nbd
_DATA_KINDS = frozenset(("data", "compressed"))
#: below this, one pread into the reply buffer beats looking up extents for os.sendfile
SENDFILE_MIN = 64 * 1024
#: most descriptors in one BLOCK_STATUS reply (the client asks again for the rest)
_MAX_DESCRIPTORS = 64 * 1024
_ZEROES = bytes(1024 * 1024)
#: zero runs shorter than this are sent as data in a sparse read (a chunk header is 20 bytes + the hole's 12)
_MIN_HOLE = 4096
#: reply buffers up to this size are kept by each thread for its next requests (about 1 MiB per thread)
KEEP_BUFFER = 1024 * 1024 + 64
#: most replies to small jobs one thread sends at once
_COALESCE = 4

#: (fd, host offset, length) runs for os.sendfile; fd -1: zeros
SendfilePlan = List[Tuple[int, int, int]]


def _is_hole(e: Extent) -> bool:
    return e.kind not in _DATA_KINDS


class ThreadState(threading.local):
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


class Replies:
    """Answers the requests of one connection; any of its threads may call in.

    ``queued`` is the connection's queue of small jobs: while it is not empty, a thread working on one
    holds its reply back to send it with its next (see ``send_read``).
    """

    def __init__(
        self,
        sock: socket.socket,
        image: Image,
        size: int,
        session: Session,
        budget: Budget,
        queued: Sized,
    ) -> None:
        self.sock = sock
        self.image = image
        self.size = size
        self.structured = session.structured
        self.meta_context = session.meta_context
        self.budget = budget
        self.queued = queued
        self.send_lock = threading.Lock()
        self.local = ThreadState()
        self.evicted = False

    def answer(self, req: p.Request, plan: Optional[List[Run]] = None, extents: Optional[List[Extent]] = None) -> None:
        """Answer ``req``; ``plan`` or ``extents``: what the scheduler already looked up for a read."""
        t = req.type
        if t == p.NBD_CMD_READ:
            error = self.check(req, p.NBD_CMD_FLAG_FUA | p.NBD_CMD_FLAG_DF, p.MAX_PAYLOAD)
            if error:
                self.error_reply(req, error)
            else:
                self.read(req, plan, extents)
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

    def check(self, req: p.Request, allowed_flags: int, max_length: int) -> int:
        """NBD error for a request out of bounds, too long or with unknown flags; 0 when it is fine."""
        if req.flags & ~allowed_flags:
            return p.NBD_EINVAL
        if req.length > max_length or req.offset + req.length > self.size:
            return p.NBD_EINVAL
        return 0

    # -- simple and error replies ---------------------------------------------------------------------------

    def simple_reply(self, cookie: int, error: int = 0) -> None:
        with self.send_lock:
            self.sock.sendall(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, cookie))

    def error_reply(self, req: p.Request, error: int, message: str = "") -> None:
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

    def read_failed(self, req: p.Request, e: BaseException) -> None:
        log.error("nbd: read of %d bytes at offset %d failed: %s", req.length, req.offset, e)
        self.error_reply(req, p.NBD_EIO, str(e))

    # -- reads ----------------------------------------------------------------------------------------------

    def read_header(self, req: p.Request) -> bytes:
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

    def read(self, req: p.Request, plan: Optional[List[Run]] = None, extents: Optional[List[Extent]] = None) -> None:
        """``plan``: the read plan of a short read; ``extents``: those of a longer one (both optional)."""
        if req.length < SENDFILE_MIN:
            self.send_read(req, self.read_header(req), req.offset, req.length, plan)
            return
        if extents is None:
            try:
                extents = list(self.image.extents(req.offset, req.length))
            except Exception as e:  # CorruptImage, OSError: this request fails, the server goes on
                self.read_failed(req, e)
                return
        if self.structured and not req.flags & p.NBD_CMD_FLAG_DF and any(_is_hole(e) for e in extents):
            self.sparse_read(req, extents)
            return
        sendfile = self.sendfile_plan(extents)
        if sendfile is not None:
            self.send_plan(self.read_header(req), sendfile)
            return
        self.send_read(req, self.read_header(req), req.offset, req.length)

    def send_read(
        self, req: p.Request, head: bytes, offset: int, length: int, plan: Optional[List[Run]] = None
    ) -> bool:
        """Read ``length`` bytes at ``offset`` into a buffer after ``head`` and send both; False on EIO."""
        n = len(head) + length
        if n > KEEP_BUFFER:
            return self.send_large_read(req, head, offset, length)
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
            if not (local.defer and len(pending) < _COALESCE and self.queued):
                self.flush()
        else:
            with self.send_lock:
                self.sock.sendall(view)
        return True

    def send_large_read(self, req: p.Request, head: bytes, offset: int, length: int) -> bool:
        """send_read for more than KEEP_BUFFER bytes: in a buffer counted against the budget, mapped for this
        reply alone and unmapped right after it.

        A large bytearray freed goes back to malloc, and glibc keeps it in the thread's arena once its
        mmap threshold has risen (it does, up to 32 MiB, with every large block freed): the process then
        grew well past the budget, to 755 MB with a 128 MiB bound (issue 12 §3). An unmapped buffer is
        gone.
        """
        n = len(head) + length
        self.flush()  # replies held back go first (they never are: small jobs are not this large)
        token = self.budget.acquire(n, self)
        try:
            view = memoryview(mmap.mmap(-1, n))
            view[: len(head)] = head
            try:
                self.image.readinto(offset, view[len(head) :])
            except Exception as e:
                self.read_failed(req, e)
                return False
            with self.send_lock:
                self.sock.sendall(view)
            return True
        finally:
            # the last reference: the mapping goes (slices the reader made died with its frames)
            view = None  # type: ignore[assignment]
            self.budget.release(n, self, token)

    def evict(self, reason: str) -> None:
        """Drop this connection: its threads' blocked sends fail, and they release their buffers."""
        if self.evicted:  # other waiters may find it still holding until its threads have noticed
            return
        self.evicted = True
        log.warning("nbd: dropping a connection: %s", reason)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def flush(self) -> None:
        """Send the replies this thread has held back, in one call."""
        pending = self.local.pending
        if not pending:
            return
        with self.send_lock:
            _sendmsg_all(self.sock, pending)
        pending.clear()

    def buffer(self, n: int, local: ThreadState) -> memoryview:
        """A reply buffer of ``n`` bytes; up to KEEP_BUFFER it is this thread's own, reused (one for each
        reply held back, and one more).

        A fresh 1 MiB bytearray is a new mmap whose pages fault in one by one (and, with the daemon's
        mlockall, get locked); reusing it saves that on every request.
        """
        if n > KEEP_BUFFER:
            return memoryview(bytearray(n))
        bufs, i = local.bufs, len(local.pending)
        if i == len(bufs):
            bufs.append(bytearray(max(n, 64 * 1024)))
        elif len(bufs[i]) < n:
            bufs[i] = bytearray(n)
        return memoryview(bufs[i])[:n]

    def sparse_read(self, req: p.Request, extents: List[Extent]) -> None:
        """A structured read in chunks: OFFSET_HOLE for runs that read as zeros, OFFSET_DATA for the rest.

        Like qemu-nbd (nbd_co_send_sparse_read): zeros cost 20 bytes on the wire instead of their length.
        Chunks of different replies may interleave (NBDP "Structured reply chunk message types"); an error
        after some chunks went out is one final ERROR chunk, no broken connection.
        """
        segments: List[Tuple[bool, int, int, List[Extent]]] = []  # (hole, offset, length, extents)
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
            sendfile = self.sendfile_plan(runs)
            if sendfile is not None:
                self.send_plan(head, sendfile)
                continue
            if not self.send_read(req, head, offset, length):
                return

    def sendfile_plan(self, extents: Sequence[Extent]) -> Optional[SendfilePlan]:
        """(fd, host offset, length) runs (fd -1: zeros) when the extents need no decoding; else None."""
        plan: SendfilePlan = []
        for e in extents:
            if e.kind in ("zero", "unallocated"):
                plan.append((-1, 0, e.length))
                continue
            source = e.source
            if e.kind != "data" or not isinstance(source, FileSource) or source.fd < 0 or e.host_offset is None:
                return None
            if e.host_offset + e.length > source.size:
                return None  # a truncated file: let the reader decide what that reads as
            fd = source.fd
            if plan and plan[-1][0] == fd and plan[-1][1] + plan[-1][2] == e.host_offset:
                plan[-1] = (fd, plan[-1][1], plan[-1][2] + e.length)
            else:
                plan.append((fd, e.host_offset, e.length))
        return plan

    def send_plan(self, head: bytes, plan: SendfilePlan) -> None:
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
                        raise p.ProtocolError(f"sendfile: unexpected end of image file at {host_offset}")
                    host_offset += sent
                    length -= sent

    # -- block status ---------------------------------------------------------------------------------------

    def block_status(self, req: p.Request) -> None:
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
