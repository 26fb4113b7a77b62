"""Who works on which request of a connection: leader and follower threads, the queue of one-cluster reads
and its helper thread, polling the socket before sleeping.

Each connection is served by a small team of threads. One thread at a time holds the receive lock (the
leader) and reads requests, a whole recv of them at a time:
- a request that decodes nothing (an uncompressed or zero run, any command but a large read) it answers at
  once;
- a read that decodes one compressed cluster (the small random read) goes into a queue, which the leader
  works on whenever no new request has arrived, beside one helper thread woken for the surplus. The
  decoders release the GIL, so at depth 16 two clusters decode at once on two cores, and at depth 1 no
  other thread ever wakes. While more small jobs wait, a thread holds its reply back and sends up to four
  in one call: fewer sends, and the client wakes once for several;
- for a costlier read the leader hands the lead on and decodes while the next thread reads (leader and
  follower).
Every hand-off between threads is a context switch, and in a VM those cost 10-20 us each; the design keeps
them below one per request. Before sleeping on the socket an idle leader polls it briefly (``poll_us``):
waking costs more than a small read.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, List, Optional, Tuple

from bootkit.log import log
from bootkit.nbd import protocol as p
from bootkit.nbd.handshake import Session
from bootkit.nbd.receiver import Receiver
from bootkit.nbd.replies import SENDFILE_MIN, Replies

if TYPE_CHECKING:
    from bootkit.nbd.server import NBDServer
    from bootkit.qcow2.image import Extent, Run

#: reads up to this size that decode nothing are answered by the thread that received them
_INLINE_MAX = 256 * 1024
#: what a request costs (classify): answered by the leader at once, or queued as decoding one cluster or more
_CHEAP, _SMALL, _BIG = 0, 1, 2
#: the leader stops reading requests while this many wait in the queue
_MAX_QUEUED = 256
#: read_request: the client sent NBD_CMD_DISC
_DISC = p.Request(0, p.NBD_CMD_DISC, 0, 0, 0)
#: a request, and what classify looked up for it: the read plan of a short read, the extents of a longer one
_Job = Tuple[p.Request, Optional[List["Run"]], Optional[List["Extent"]]]


class Connection:
    """The transmission phase of one connection: ``run()`` serves requests until DISC, EOF or a fault."""

    def __init__(self, server: NBDServer, sock: socket.socket, rx: Receiver, session: Session) -> None:
        self.server = server
        self.image = server.image
        self.sock = sock
        self.rx = rx
        self.recv_lock = threading.Lock()  # held by the leader
        # queued reads that decode one cluster, and whether the helper waits for one; guarded by lock
        self.small_jobs: deque[_Job] = deque()
        self.lock = threading.Lock()
        self.small_ready = threading.Condition(self.lock)
        self.idle = server.threads < 2  # the helper waits for work (or there is none)
        self.busy = 0  # followers working on a request they read
        self.closing = False
        self.failure: Optional[BaseException] = None
        self.replies = Replies(sock, server.image, server.size, session, server.budget, self.small_jobs)

    def run(self) -> None:
        """Serve requests with ``server.threads`` threads; raises what ended the connection, if not DISC.

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
        lock, small, rx, replies = self.recv_lock, self.small_jobs, self.rx, self.replies
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
                            req = self.read_request(None if rx.looked else False)
                        else:
                            replies.flush()  # held-back replies go out before the socket is waited on
                            req = self.poll_request()
                        if req is None:
                            job = self.take()
                            if job is not None:
                                self.handle_small(job)
                                rx.looked = False
                            continue
                        if req is _DISC:
                            self.drain()
                            return
                        cost, plan, extents = self.classify(req)
                        if cost == _CHEAP:
                            replies.answer(req, plan, extents)
                        elif cost == _SMALL and not small and not rx.buffered():
                            replies.answer(req, plan, extents)  # the only request there is (depth 1): no queue
                        elif cost == _SMALL:
                            with self.lock:
                                small.append((req, plan, extents))
                                # the leader works on one itself: the helper wakes for a second
                                if len(small) > 1 and self.idle:
                                    self.small_ready.notify()
                        else:
                            replies.flush()
                            break
                finally:
                    lock.release()
                with self.lock:
                    self.busy += 1
                try:
                    replies.answer(req, plan, extents)
                finally:
                    with self.lock:
                        self.busy -= 1
        except BaseException as e:
            self.fail(e)

    def poll_request(self) -> Optional[p.Request]:
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
        sent with the next (up to four at once): fewer sends, and fewer wake-ups for the client."""
        local = self.replies.local
        local.defer = True
        try:
            self.replies.answer(*job)
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
                    self.replies.flush()
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
            self.replies.answer(*job)
        self.replies.flush()
        self.closing = True

    def fail(self, e: BaseException) -> None:
        """End the connection after ``e``: the others stop taking work and the leader's recv returns."""
        if not isinstance(e, (p.PeerClosed, p.ProtocolError, OSError)):
            # a bug, not the peer: this connection ends, the server and its other clients go on
            log.exception("nbd: internal error, dropping the connection")
            e = p.ProtocolError(f"internal error: {type(e).__name__}: {e}")
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

    def read_request(self, wait: Optional[bool] = True) -> Optional[p.Request]:
        """The next request to work on; _DISC after NBD_CMD_DISC. Write payloads are consumed here.

        ``wait``: True waits for one; False looks at the socket without waiting and None only at what is
        buffered, both returning None when no whole request header is there."""
        while True:
            header = self.rx.recv_exact(p.REQUEST.size, wait)
            if header is None:
                return None
            magic, flags, type_, cookie, offset, length = p.REQUEST.unpack(header)
            if magic != p.REQUEST_MAGIC:
                raise p.ProtocolError(f"bad request magic {magic:#x}")
            if type_ == p.NBD_CMD_DISC:
                return _DISC
            if type_ == p.NBD_CMD_WRITE:
                # read-only export: consume the payload to stay in sync, then refuse
                self.rx.discard(length)
                self.replies.simple_reply(cookie, p.NBD_EPERM)
                continue
            return p.Request(flags, type_, cookie, offset, length)

    def classify(self, req: p.Request) -> Tuple[int, Optional[List[Run]], Optional[List[Extent]]]:
        """(_CHEAP, _SMALL or _BIG, the read plan of a read below SENDFILE_MIN bytes, the extents of a longer one).

        _CHEAP requests decode nothing (uncompressed and zero runs up to _INLINE_MAX bytes, every command but
        READ and large BLOCK_STATUS) and cost less than waking another thread: the leader answers them at
        once. _SMALL reads decode one cluster and are queued; _BIG ones decode more (or are long), and the
        leader hands the lead on to work on them. What was looked up here is used again: a request is mapped
        once.
        """
        if req.type == p.NBD_CMD_READ:
            replies = self.replies
            if req.length > _INLINE_MAX or replies.check(req, p.NBD_CMD_FLAG_FUA | p.NBD_CMD_FLAG_DF, p.MAX_PAYLOAD):
                return (_CHEAP if req.length <= _INLINE_MAX else _BIG), None, None
            if req.length < SENDFILE_MIN:
                try:
                    plan = self.image.plan(req.offset, req.length)
                except Exception:
                    return _CHEAP, None, None  # read() meets the same error and answers EIO
                return min(self.image.clusters_to_decode(plan), _BIG), plan, None
            try:
                extents = list(self.image.extents(req.offset, req.length))
            except Exception:
                return _CHEAP, None, None  # read() meets the same error and answers EIO
            return (_BIG if any(e.kind == "compressed" for e in extents) else _CHEAP), None, extents
        if req.type == p.NBD_CMD_BLOCK_STATUS:
            return (_CHEAP if req.length <= _INLINE_MAX * 32 else _BIG), None, None
        return _CHEAP, None, None
