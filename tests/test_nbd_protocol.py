"""NBD protocol and fault tests over raw sockets, against a raw-file test double (tests/nbd_helpers.py).

Each test checks the bytes on the wire against NetworkBlockDevice/nbd doc/proto.md, and that a misbehaving
client never stops the server or disturbs another client.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbd_helpers import RawFileDouble, connect_raw, serve_unix

from bootkit.nbd import protocol as p

SIZE = 33 * 1024 * 1024 + 512  # not a power of two on purpose
ZERO_AT = (1024 * 1024, 256 * 1024)
ZERO_BEFORE_CORRUPT = (32 * 1024 * 1024, 65536)
CORRUPT_AT = (32 * 1024 * 1024 + 65536, 65536)
COMPRESSED_AT = (4 * 1024 * 1024, 2 * 1024 * 1024)  # reads fine, but small reads there are queued


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    rng = random.Random(3)
    data = bytearray(rng.randbytes(SIZE))
    for start, n in (ZERO_AT, ZERO_BEFORE_CORRUPT):
        data[start : start + n] = bytes(n)
    path = tmp_path_factory.mktemp("nbdproto") / "disk.raw"
    path.write_bytes(data)
    return str(path), bytes(data)


@pytest.fixture
def server_sock(data_file: tuple[str, bytes], tmp_path: Path) -> Iterator[str]:
    sock_path = str(tmp_path / "nbd.sock")
    with (
        RawFileDouble(
            data_file[0],
            zero_ranges=(ZERO_AT, ZERO_BEFORE_CORRUPT),
            corrupt_ranges=(CORRUPT_AT,),
            compressed_ranges=(COMPRESSED_AT,),
        ) as image,
        serve_unix(image, sock_path, name="disk", description="test disk"),
    ):
        yield sock_path


class Client:
    """Just enough of an NBD client to put exact bytes on the wire."""

    def __init__(self, path: str) -> None:
        self.s = connect_raw(path)
        self.cookie = 0

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            b = self.s.recv(n - len(buf))
            if not b:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += b
        return bytes(buf)

    def closed_by_server(self) -> bool:
        try:
            return self.s.recv(1) == b""
        except ConnectionResetError:
            return True

    def greeting(self, flags: int = p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES) -> None:
        magic, opt, hflags = p.SERVER_GREETING.unpack(self.recv(p.SERVER_GREETING.size))
        assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT)
        assert hflags == p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES
        self.s.sendall(struct.pack(">I", flags))

    def option(self, opt: int, data: bytes = b"") -> None:
        self.s.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, n = p.OPTION_REPLY.unpack(self.recv(p.OPTION_REPLY.size))
        assert magic == p.REPLY_MAGIC
        return opt, rep, self.recv(n)

    def go(self, name: str = "", structured: bool = False, meta: bool = False) -> int:
        self.greeting()
        if structured:
            self.option(p.NBD_OPT_STRUCTURED_REPLY)
            assert self.option_reply()[1] == p.NBD_REP_ACK
        if meta:
            q = p.BASE_ALLOCATION.encode()
            self.option(p.NBD_OPT_SET_META_CONTEXT, _str(name) + struct.pack(">I", 1) + _str(q.decode()))
            opt, rep, data = self.option_reply()
            assert rep == p.NBD_REP_META_CONTEXT and data[4:] == q
            assert self.option_reply()[1] == p.NBD_REP_ACK
        self.option(p.NBD_OPT_GO, _str(name) + struct.pack(">H", 0))
        flags = -1
        while True:
            opt, rep, data = self.option_reply()
            assert opt == p.NBD_OPT_GO
            if rep == p.NBD_REP_ACK:
                assert data == b""
                return flags
            assert rep == p.NBD_REP_INFO, hex(rep)
            if struct.unpack(">H", data[:2])[0] == p.NBD_INFO_EXPORT:
                _, size, flags = p.INFO_EXPORT.unpack(data)
                assert size == SIZE

    def request(self, type_: int, offset: int, length: int, flags: int = 0, payload: bytes = b"") -> int:
        self.cookie += 1
        self.s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, flags, type_, self.cookie, offset, length) + payload)
        return self.cookie

    def simple_reply(self, length: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = p.SIMPLE_REPLY.unpack(self.recv(p.SIMPLE_REPLY.size))
        assert magic == p.SIMPLE_REPLY_MAGIC
        return error, cookie, self.recv(length) if error == 0 else b""

    def chunk(self) -> tuple[int, int, int, bytes]:
        magic, flags, type_, cookie, n = p.STRUCTURED_REPLY.unpack(self.recv(p.STRUCTURED_REPLY.size))
        assert magic == p.STRUCTURED_REPLY_MAGIC
        return flags, type_, cookie, self.recv(n)

    def close(self) -> None:
        self.s.close()


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">I", len(b)) + b


def _alive(sock_path: str, data: bytes) -> None:
    """A fresh client still gets correct data: the server survived whatever came before."""
    c = Client(sock_path)
    c.go()
    c.request(p.NBD_CMD_READ, 4096, 8192)
    assert c.simple_reply(8192) == (0, 1, data[4096 : 4096 + 8192])
    c.close()


# -- handshake ---------------------------------------------------------------------------------------------


def test_go_describes_export(server_sock: str) -> None:
    c = Client(server_sock)
    c.greeting()
    c.option(p.NBD_OPT_GO, _str("disk") + struct.pack(">HHH", 2, p.NBD_INFO_NAME, p.NBD_INFO_DESCRIPTION))
    infos = {}
    while True:
        _, rep, data = c.option_reply()
        if rep == p.NBD_REP_ACK:
            break
        assert rep == p.NBD_REP_INFO
        infos[struct.unpack(">H", data[:2])[0]] = data[2:]
    size, flags = struct.unpack(">QH", infos[p.NBD_INFO_EXPORT])
    assert size == SIZE
    assert flags == (
        p.NBD_FLAG_HAS_FLAGS
        | p.NBD_FLAG_READ_ONLY
        | p.NBD_FLAG_SEND_FLUSH
        | p.NBD_FLAG_CAN_MULTI_CONN
        | p.NBD_FLAG_SEND_CACHE
    )
    assert infos[p.NBD_INFO_NAME] == b"disk"
    assert infos[p.NBD_INFO_DESCRIPTION] == b"test disk"
    assert struct.unpack(">III", infos[p.NBD_INFO_BLOCK_SIZE]) == (1, 4096, 32 * 1024 * 1024)
    c.request(p.NBD_CMD_DISC, 0, 0)
    assert c.closed_by_server()


def test_structured_reply_adds_df_flag(server_sock: str) -> None:
    c = Client(server_sock)
    assert c.go(structured=True) & p.NBD_FLAG_SEND_DF


def test_list_then_info_unknown_export_then_go(server_sock: str, data_file: tuple[str, bytes]) -> None:
    c = Client(server_sock)
    c.greeting()
    c.option(p.NBD_OPT_LIST)
    assert c.option_reply() == (p.NBD_OPT_LIST, p.NBD_REP_SERVER, _str("disk"))
    assert c.option_reply() == (p.NBD_OPT_LIST, p.NBD_REP_ACK, b"")
    c.option(p.NBD_OPT_INFO, _str("nope") + struct.pack(">H", 0))
    opt, rep, _ = c.option_reply()
    assert (opt, rep) == (p.NBD_OPT_INFO, p.NBD_REP_ERR_UNKNOWN)
    c.option(p.NBD_OPT_GO, _str("disk") + struct.pack(">H", 0))
    while c.option_reply()[1] != p.NBD_REP_ACK:
        pass
    c.request(p.NBD_CMD_READ, 0, 512)
    assert c.simple_reply(512) == (0, 1, data_file[1][:512])


@pytest.mark.parametrize("opt", [p.NBD_OPT_STARTTLS, 11, 99, 0xFFFF])
def test_unknown_option_is_unsupported_and_negotiation_goes_on(server_sock: str, opt: int) -> None:
    c = Client(server_sock)
    c.greeting()
    c.option(opt, b"some data")
    o, rep, _ = c.option_reply()
    assert (o, rep) == (opt, p.NBD_REP_ERR_UNSUP)
    c.option(p.NBD_OPT_LIST)
    assert c.option_reply()[1] == p.NBD_REP_SERVER


def test_malformed_go_is_invalid(server_sock: str) -> None:
    c = Client(server_sock)
    c.greeting()
    c.option(p.NBD_OPT_GO, struct.pack(">I", 1000) + b"short")
    assert c.option_reply()[1] == p.NBD_REP_ERR_INVALID
    c.option(p.NBD_OPT_SET_META_CONTEXT, _str("") + struct.pack(">I", 1) + _str(p.BASE_ALLOCATION))
    assert c.option_reply()[1] == p.NBD_REP_ERR_INVALID  # structured replies not negotiated


def test_export_name_with_and_without_zeroes(server_sock: str, data_file: tuple[str, bytes]) -> None:
    for cflags, tail in ((p.NBD_FLAG_C_FIXED_NEWSTYLE, 124), (p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES, 0)):
        c = Client(server_sock)
        c.greeting(cflags)
        c.option(p.NBD_OPT_EXPORT_NAME, b"disk")
        size, flags = p.EXPORT_NAME_REPLY.unpack(c.recv(p.EXPORT_NAME_REPLY.size))
        assert (size, flags & p.NBD_FLAG_READ_ONLY) == (SIZE, p.NBD_FLAG_READ_ONLY)
        assert c.recv(tail) == bytes(tail)
        c.request(p.NBD_CMD_READ, SIZE - 100, 100)
        assert c.simple_reply(100) == (0, 1, data_file[1][-100:])


def test_export_name_unknown_drops_connection(server_sock: str, data_file: tuple[str, bytes]) -> None:
    c = Client(server_sock)
    c.greeting()
    c.option(p.NBD_OPT_EXPORT_NAME, b"nope")
    assert c.closed_by_server()
    _alive(server_sock, data_file[1])


def test_silent_client_is_dropped_after_the_handshake_timeout(data_file: tuple[str, bytes], tmp_path: Path) -> None:
    sock_path = str(tmp_path / "nbd.sock")
    with RawFileDouble(data_file[0]) as image, serve_unix(image, sock_path, handshake_timeout=0.5):
        c = Client(sock_path)
        c.recv(p.SERVER_GREETING.size)
        c.s.sendall(struct.pack(">I", 3))  # flags, then nothing
        assert c.closed_by_server()
        _alive(sock_path, data_file[1])


def test_trickling_client_is_dropped_at_the_handshake_deadline(
    data_file: tuple[str, bytes], tmp_path: Path
) -> None:
    """The handshake timeout bounds the whole negotiation, not each receive: one byte every 0.2 s (well
    inside a 1 s timeout per receive) does not keep a client negotiating."""
    sock_path = str(tmp_path / "nbd.sock")
    with RawFileDouble(data_file[0]) as image, serve_unix(image, sock_path, handshake_timeout=1.0):
        c = Client(sock_path)
        c.recv(p.SERVER_GREETING.size)
        c.s.sendall(struct.pack(">I", 3))
        option = p.OPTION_HEADER.pack(p.IHAVEOPT, p.NBD_OPT_GO, 4000) + bytes(4000)
        start = time.monotonic()
        dropped = False
        for b in option:
            if time.monotonic() - start > 20:  # far beyond the deadline: the server let it go on
                break
            try:
                c.s.send(bytes([b]))
            except OSError:  # EPIPE / ECONNRESET: the server closed the connection
                dropped = True
                break
            time.sleep(0.2)
        assert dropped
        assert c.closed_by_server()
        _alive(sock_path, data_file[1])


def test_abort(server_sock: str) -> None:
    c = Client(server_sock)
    c.greeting()
    c.option(p.NBD_OPT_ABORT)
    assert c.option_reply() == (p.NBD_OPT_ABORT, p.NBD_REP_ACK, b"")
    assert c.closed_by_server()


@pytest.mark.parametrize(
    "garbage",
    [
        b"",  # connect and hang up
        b"\x00\x00",  # truncated client flags
        struct.pack(">I", 1 << 7),  # unknown client flag
        struct.pack(">I", 3) + b"NOTOPTS!" + bytes(8),  # bad option magic
        struct.pack(">I", 3) + p.OPTION_HEADER.pack(p.IHAVEOPT, p.NBD_OPT_GO, 100) + b"trunc",  # truncated option
        struct.pack(">I", 3) + p.OPTION_HEADER.pack(p.IHAVEOPT, p.NBD_OPT_GO, 1 << 30),  # absurd option length
    ],
)
def test_broken_handshakes_end_only_that_connection(
    server_sock: str, data_file: tuple[str, bytes], garbage: bytes
) -> None:
    c = Client(server_sock)
    c.recv(p.SERVER_GREETING.size)
    c.s.sendall(garbage)
    c.s.shutdown(socket.SHUT_WR)
    assert c.closed_by_server()
    _alive(server_sock, data_file[1])


# -- transmission -------------------------------------------------------------------------------------------


def test_reads_including_32_mib_limit(server_sock: str, data_file: tuple[str, bytes]) -> None:
    data = data_file[1]
    c = Client(server_sock)
    c.go()
    for offset, length in ((0, 1), (511, 3000), (0, 32 << 20), (SIZE - 1, 1), (ZERO_AT[0] - 10, 100)):
        cookie = c.request(p.NBD_CMD_READ, offset, length)
        assert c.simple_reply(length) == (0, cookie, data[offset : offset + length])


def test_bad_requests_get_errors_and_serving_goes_on(server_sock: str, data_file: tuple[str, bytes]) -> None:
    data = data_file[1]
    c = Client(server_sock)
    c.go()
    cases = [
        ((p.NBD_CMD_READ, SIZE - 4096, 4097), p.NBD_EINVAL),  # past the end
        ((p.NBD_CMD_READ, 1 << 62, 512), p.NBD_EINVAL),
        ((p.NBD_CMD_READ, 0, 32 * 1024 * 1024 + 1), p.NBD_EINVAL),  # oversized
        ((p.NBD_CMD_READ, 0, 512, 1 << 9), p.NBD_EINVAL),  # unknown flag
        ((p.NBD_CMD_CACHE, SIZE, 1), p.NBD_EINVAL),
        ((p.NBD_CMD_CACHE, 0, SIZE), 0),
        ((p.NBD_CMD_FLUSH, 0, 0), 0),
        ((p.NBD_CMD_TRIM, 0, 4096), p.NBD_EPERM),
        ((p.NBD_CMD_WRITE_ZEROES, 0, 4096), p.NBD_EPERM),
        ((42, 0, 512), p.NBD_EINVAL),  # unknown command
        ((p.NBD_CMD_BLOCK_STATUS, 0, 4096), p.NBD_EINVAL),  # needs structured replies + base:allocation
        ((p.NBD_CMD_READ, CORRUPT_AT[0], 4096), p.NBD_EIO),  # a corrupt cluster fails only this request
    ]
    for args, expected in cases:
        cookie = c.request(*args)  # type: ignore[arg-type]
        error, rcookie, _ = c.simple_reply()
        assert (error, rcookie) == (expected, cookie), args
    # a write's payload is consumed, so the stream stays in sync
    cookie = c.request(p.NBD_CMD_WRITE, 0, 70000, payload=b"w" * 70000)
    assert c.simple_reply() == (p.NBD_EPERM, cookie, b"")
    cookie = c.request(p.NBD_CMD_READ, 0, 4096)
    assert c.simple_reply(4096) == (0, cookie, data[:4096])


def test_bad_request_magic_drops_connection(server_sock: str, data_file: tuple[str, bytes]) -> None:
    c = Client(server_sock)
    c.go()
    c.s.sendall(b"\xde\xad\xbe\xef" + bytes(24))
    assert c.closed_by_server()
    _alive(server_sock, data_file[1])


def test_many_requests_in_flight_each_answered_once(server_sock: str, data_file: tuple[str, bytes]) -> None:
    data = data_file[1]
    c = Client(server_sock)
    c.go()
    rng = random.Random(5)
    wanted = {}
    for _ in range(64):
        offset = rng.randrange(0, SIZE - 200000)
        length = rng.choice((512, 4096, 65536, 200000))
        wanted[c.request(p.NBD_CMD_READ, offset, length)] = (offset, length)
    for _ in range(len(wanted)):
        error, cookie, _ = c.simple_reply()
        assert error == 0
        offset, length = wanted.pop(cookie)
        assert c.recv(length) == data[offset : offset + length]
    assert not wanted


def test_disc_answers_requests_in_flight_first(server_sock: str) -> None:
    c = Client(server_sock)
    c.go()
    cookies = {c.request(p.NBD_CMD_READ, i * 65536, 65536) for i in range(8)}
    c.request(p.NBD_CMD_DISC, 0, 0)
    for _ in range(8):
        error, cookie, _ = c.simple_reply(65536)
        assert error == 0
        cookies.remove(cookie)
    assert c.closed_by_server()


def test_queued_small_reads_and_errors_then_disc(server_sock: str, data_file: tuple[str, bytes]) -> None:
    """Reads that decode one cluster, sent in a burst, are queued and shared by two threads whose replies may
    go out several at once; a failing one among them, and DISC right after, change nothing for the rest."""
    data = data_file[1]
    c = Client(server_sock)
    c.go()
    rng = random.Random(7)
    wanted: dict[int, tuple[int, int]] = {}
    failing = set()
    burst = b""
    for i in range(300):
        if i % 37 == 0:
            offset, length = CORRUPT_AT[0] + rng.randrange(0, 60000), 512
        else:
            offset, length = COMPRESSED_AT[0] + rng.randrange(0, COMPRESSED_AT[1] // 4096) * 4096, 4096
        c.cookie += 1
        burst += p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.NBD_CMD_READ, c.cookie, offset, length)
        wanted[c.cookie] = (offset, length)
        if offset >= CORRUPT_AT[0]:
            failing.add(c.cookie)
    c.s.sendall(burst + p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.NBD_CMD_DISC, 0, 0, 0))
    while wanted:
        magic, error, cookie = p.SIMPLE_REPLY.unpack(c.recv(p.SIMPLE_REPLY.size))
        assert magic == p.SIMPLE_REPLY_MAGIC
        offset, length = wanted.pop(cookie)
        if cookie in failing:
            assert error == p.NBD_EIO
        else:
            assert error == 0
            assert c.recv(length) == data[offset : offset + length]
    assert c.closed_by_server()


def test_client_sending_faster_than_it_reads(server_sock: str, data_file: tuple[str, bytes]) -> None:
    """Thousands of queued reads, sent while replies pile up: the server stops taking requests in when its
    queue is full, and still answers each one exactly once."""
    data = data_file[1]
    c = Client(server_sock)
    c.go()
    n = 5000
    offsets = [COMPRESSED_AT[0] + (i * 7919 % (COMPRESSED_AT[1] // 512)) * 512 for i in range(n)]
    burst = b"".join(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.NBD_CMD_READ, i + 1, o, 512) for i, o in enumerate(offsets))
    sender = threading.Thread(target=c.s.sendall, args=(burst,))
    sender.start()
    seen = set()
    for _ in range(n):
        magic, error, cookie = p.SIMPLE_REPLY.unpack(c.recv(p.SIMPLE_REPLY.size))
        assert (magic, error) == (p.SIMPLE_REPLY_MAGIC, 0)
        assert cookie not in seen
        seen.add(cookie)
        offset = offsets[cookie - 1]
        assert c.recv(512) == data[offset : offset + 512]
    sender.join()
    _alive(server_sock, data)


def test_structured_read_and_error_chunks(server_sock: str, data_file: tuple[str, bytes]) -> None:
    data = data_file[1]
    c = Client(server_sock)
    c.go(structured=True)
    cookie = c.request(p.NBD_CMD_READ, 1000, 100000, flags=p.NBD_CMD_FLAG_DF)
    flags, type_, rcookie, payload = c.chunk()
    assert (flags, type_, rcookie) == (p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_OFFSET_DATA, cookie)
    assert payload == struct.pack(">Q", 1000) + data[1000:101000]
    cookie = c.request(p.NBD_CMD_READ, CORRUPT_AT[0], 512)
    flags, type_, rcookie, payload = c.chunk()
    assert (flags, type_, rcookie) == (p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_ERROR, cookie)
    error, n = p.REPLY_ERROR.unpack(payload[:6])
    assert error == p.NBD_EIO and b"corrupt" in payload[6 : 6 + n]
    cookie = c.request(p.NBD_CMD_FLUSH, 0, 0)
    assert c.simple_reply() == (0, cookie, b"")


def test_structured_sparse_read_sends_holes(server_sock: str, data_file: tuple[str, bytes]) -> None:
    data = data_file[1]
    zs, zn = ZERO_AT
    c = Client(server_sock)
    c.go(structured=True)
    cookie = c.request(p.NBD_CMD_READ, zs - 100000, zn + 200000)
    chunks = [c.chunk() for _ in range(3)]
    assert [(f, t, k) for f, t, k, _ in chunks] == [
        (0, p.NBD_REPLY_TYPE_OFFSET_DATA, cookie),
        (0, p.NBD_REPLY_TYPE_OFFSET_HOLE, cookie),
        (p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_OFFSET_DATA, cookie),
    ]
    assert chunks[0][3] == struct.pack(">Q", zs - 100000) + data[zs - 100000 : zs]
    assert chunks[1][3] == struct.pack(">QI", zs, zn)
    assert chunks[2][3] == struct.pack(">Q", zs + zn) + data[zs + zn : zs + zn + 100000]
    # a hole goes out, then the corrupt cluster behind it: the reply ends with an error chunk
    cookie = c.request(p.NBD_CMD_READ, ZERO_BEFORE_CORRUPT[0], 2 * 65536)
    hole, error = c.chunk(), c.chunk()
    assert hole == (0, p.NBD_REPLY_TYPE_OFFSET_HOLE, cookie, struct.pack(">QI", ZERO_BEFORE_CORRUPT[0], 65536))
    assert error[:3] == (p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_ERROR, cookie)
    assert struct.unpack(">I", error[3][:4]) == (p.NBD_EIO,)
    cookie = c.request(p.NBD_CMD_READ, 0, 70000)
    assert c.chunk() == (p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_OFFSET_DATA, cookie, bytes(8) + data[:70000])


def test_block_status(server_sock: str) -> None:
    c = Client(server_sock)
    c.go(structured=True, meta=True)
    zs, zn = ZERO_AT
    for flags, expected in (
        (0, [(zs - 4096, 0), (zn, 3), (4096, 0)]),
        (p.NBD_CMD_FLAG_REQ_ONE, [(zs - 4096, 0)]),
    ):
        cookie = c.request(p.NBD_CMD_BLOCK_STATUS, 4096, zs + zn, flags=flags)
        cflags, type_, rcookie, payload = c.chunk()
        assert (cflags, type_, rcookie) == (p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE_BLOCK_STATUS, cookie)
        assert struct.unpack(">I", payload[:4]) == (1,)
        assert [struct.unpack(">II", payload[i : i + 8]) for i in range(4, len(payload), 8)] == expected
    cookie = c.request(p.NBD_CMD_BLOCK_STATUS, 0, SIZE + 1)
    assert c.chunk()[1] == p.NBD_REPLY_TYPE_ERROR


# -- clients misbehaving or many -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["header-only", "half-header", "no-read"])
def test_client_vanishing_mid_request(server_sock: str, data_file: tuple[str, bytes], how: str) -> None:
    c = Client(server_sock)
    c.go()
    if how == "half-header":
        c.s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.NBD_CMD_READ, 1, 0, 4096)[:13])
    elif how == "header-only":  # a write whose payload never comes
        c.s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, 1, 0, 1 << 20) + b"x" * 1000)
    else:  # asks for 4 x 32 MiB and goes away without reading
        for i in range(4):
            c.request(p.NBD_CMD_READ, 0, min(SIZE, 32 << 20) - i)
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
    c.close()
    _alive(server_sock, data_file[1])


def test_64_concurrent_clients_reading_different_regions(server_sock: str, data_file: tuple[str, bytes]) -> None:
    data = data_file[1]
    errors: list[str] = []
    region = CORRUPT_AT[0] // 64

    def client(i: int) -> None:
        try:
            rng = random.Random(i)
            c = Client(server_sock)
            c.go()
            for _ in range(16):
                offset = i * region + rng.randrange(0, region - 8192)
                length = rng.randrange(1, 8192)
                cookie = c.request(p.NBD_CMD_READ, offset, length)
                got = c.simple_reply(length)
                if got != (0, cookie, data[offset : offset + length]):
                    errors.append(f"client {i}: wrong data at {offset}+{length}")
            c.request(p.NBD_CMD_DISC, 0, 0)
            c.close()
        except Exception as e:  # collected: an assertion in a thread would be lost
            errors.append(f"client {i}: {e!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    assert not any(t.is_alive() for t in threads)


def test_server_survives_fault_storm_with_good_client_running(server_sock: str, data_file: tuple[str, bytes]) -> None:
    """A well-behaved client reads the whole disk correctly while others break the protocol around it."""
    data = data_file[1]
    good = Client(server_sock)
    good.go()
    stop = threading.Event()

    def storm() -> None:
        while not stop.is_set():
            b = Client(server_sock)
            b.recv(p.SERVER_GREETING.size)
            b.s.sendall(os.urandom(64))
            b.close()

    t = threading.Thread(target=storm)
    t.start()
    try:
        for offset in range(0, SIZE, 1 << 20):
            n = min(1 << 20, SIZE - offset)
            cookie = good.request(p.NBD_CMD_READ, offset, n)
            corrupt = offset < CORRUPT_AT[0] + CORRUPT_AT[1] and CORRUPT_AT[0] < offset + n
            error, rcookie, chunk = good.simple_reply(n)
            assert (error, rcookie) == (p.NBD_EIO if corrupt else 0, cookie)
            assert corrupt or chunk == data[offset : offset + n]
    finally:
        stop.set()
        t.join(60)


@pytest.mark.parametrize("threads,poll_us,named", [(0, 50, "threads"), (4, -1, "poll_us"), (4, 10001, "poll_us")])
def test_server_settings_out_of_range(data_file: tuple[str, bytes], threads: int, poll_us: int, named: str) -> None:
    from bootkit.errors import NBDError
    from bootkit.nbd.server import NBDServer

    with RawFileDouble(data_file[0]) as image, pytest.raises(NBDError, match=named):
        NBDServer(image, threads=threads, poll_us=poll_us)
