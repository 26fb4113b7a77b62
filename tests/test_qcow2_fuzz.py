"""Fuzzing the QCOW2 reader: mutated headers, L1/L2 tables and compressed payloads of small real images.

Whatever the bytes, ``open()``, ``pread()`` and ``extents()`` may only raise bootkit's own errors
(``BootkitError`` subclasses), must finish in bounded time (a per-example alarm turns a hang into a failure
with a traceback; hypothesis' deadline catches the merely slow) and in bounded memory (tracemalloc peak per
example). The seed images are made by qemu-img/qemu-io; hypothesis picks a seed, a region of it (header,
L1, an L2 table, a compressed payload, the snapshot table) and a few writes of interesting values there.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import struct
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import NamedTuple, Optional

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from qcow2_refimages import KiB, bootkit_map, convert, create, pattern, qemu_io, qemu_map, tool

import bootkit.qcow2
from bootkit.errors import BootkitError, CorruptImage
from bootkit.qcow2 import compress
from bootkit.source import ByteSource, BytesSource, FileSource

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="qemu-img/qemu-io (Debian package qemu-utils) not installed")

#: wall-clock limit for one example (open + reads + extents of a <= 1 MiB disk); a hang fails here
EXAMPLE_ALARM_SECONDS = 20
#: memory one example may allocate at its peak: the reader's own limits allow a 32 MiB L1 table (QEMU's
#: QCOW_MAX_L1_SIZE) plus its padding and array copy, caches are bounded at 8 + 16 MiB
EXAMPLE_PEAK_BYTES = 160 << 20
#: bytes of guest disk read per example (the mutated size may be anything up to 2^61)
READ_WINDOW = 512 * KiB

INTERESTING_64 = (
    0,
    1,
    0x200,
    0x10000,
    0x7FFFFFFF,
    0xFFFFFFFF,
    1 << 62,  # compressed flag
    1 << 63,  # copied flag
    (1 << 63) | (1 << 62),
    (1 << 63) | 0x10000,
    (1 << 63) | 0x10001,  # zero flag with an allocation
    0x00FFFFFFFFFFFE00,  # the largest host offset
    (1 << 62) | 0x3FFFFFFFFFFFFFFF,  # compressed, every size and offset bit set
    (1 << 63) - 1,
    (1 << 64) - 1,
)
INTERESTING_32 = (0, 1, 8, 9, 16, 21, 22, 104, 112, 0x7FFFFFFF, 0xFFFFFFFF, 0x10000000)


class Seed(NamedTuple):
    name: str
    path: Path  # the mutated copy is written next to it (for "via file" examples: its backing files resolve)
    data: bytes
    regions: dict[str, list[tuple[int, int]]]  # region kind -> (offset, length) pieces
    snapshot: Optional[str]

    def __repr__(self) -> str:  # hypothesis prints fixtures in failure reports: not the image bytes
        return f"Seed({self.name!r}, {str(self.path)!r})"


def _regions(data: bytes) -> dict[str, list[tuple[int, int]]]:
    """Where the metadata of a (valid) seed image lives, read with plain struct (not with the reader)."""
    (cluster_bits,) = struct.unpack_from(">I", data, 20)
    (l1_size, l1_offset) = struct.unpack_from(">IQ", data, 36)
    (nb_snapshots, snapshots_offset) = struct.unpack_from(">IQ", data, 60)
    version = struct.unpack_from(">I", data, 4)[0]
    incompat = struct.unpack_from(">Q", data, 72)[0] if version == 3 else 0
    cs = 1 << cluster_bits
    extended = bool(incompat & (1 << 4))
    step = 16 if extended else 8
    regions: dict[str, list[tuple[int, int]]] = {
        "header": [(0, 512)],
        "l1": [(l1_offset, l1_size * 8)],
        "l2": [],
        "compressed": [],
    }
    if nb_snapshots:
        regions["snapshots"] = [(snapshots_offset, 256)]
    csize_shift = 62 - (cluster_bits - 8)
    for (l1e,) in struct.iter_unpack(">Q", data[l1_offset : l1_offset + l1_size * 8]):
        l2 = l1e & 0x00FFFFFFFFFFFE00
        if not l2:
            continue
        regions["l2"].append((l2, cs))
        for i in range(0, cs, step):
            (entry,) = struct.unpack_from(">Q", data, l2 + i)
            if entry & (1 << 62):
                desc = entry & ((1 << 62) - 1)
                coffset = desc & ((1 << csize_shift) - 1)
                nb = ((desc >> csize_shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
                regions["compressed"].append((coffset, min(nb * 512 - (coffset & 511), len(data) - coffset)))
    return {k: v for k, v in regions.items() if v}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Seed]:
    d = tmp_path_factory.mktemp("fuzzseeds")
    text = b"".join(f"{i:05d} lorem ipsum dolor sit amet\n".encode() for i in range(8000))
    src = d / "src.raw"
    with open(src, "wb") as f:
        f.write(text[: 96 * KiB] + pattern(7, 16 * KiB) + text[: 16 * KiB])
        f.truncate(256 * KiB)
    paths = {}
    std = create(d / "std.qcow2", 256 * KiB, cluster_size=4 * KiB)
    qemu_io(std, "write -P 0x11 0 20k", "write -z 8k 4k", "write -P 0x12 70k 9k", "write -z -u 200k 8k")
    paths["std"] = std
    paths["deflate"] = convert(src, options=["cluster_size=4096"], compress=True, dst=d / "deflate.qcow2")
    paths["zstd"] = convert(src, options=["cluster_size=4096", "compression_type=zstd"], compress=True,
                            dst=d / "zstd.qcow2")
    ext = create(d / "extl2.qcow2", 512 * KiB, cluster_size=16 * KiB, options=["extended_l2=on"])
    qemu_io(ext, "write -P 0x21 512 1k", "write -z 4k 2k", "write -P 0x22 30k 8k", "write -c -P 0x23 64k 16k")
    paths["extl2"] = ext
    snap = create(d / "snap.qcow2", 128 * KiB, cluster_size=4 * KiB)
    qemu_io(snap, "write -P 0x31 0 16k")
    tool("qemu-img", "snapshot", "-c", "s1", snap)
    qemu_io(snap, "write -P 0x32 8k 16k")
    paths["snap"] = snap
    v2 = create(d / "v2.qcow2", 128 * KiB, cluster_size=4 * KiB, options=["compat=0.10"])
    qemu_io(v2, "write -P 0x41 0 12k", "write -c -P 0x42 16k 4k")
    paths["v2"] = v2
    base = d / "chain-base.raw"
    base.write_bytes(pattern(8, 100 * KiB))
    mid = create(d / "chain-mid.qcow2", 200 * KiB, cluster_size=4 * KiB, backing=base.name, backing_fmt="raw")
    qemu_io(mid, "write -P 0x51 8k 8k", "write -z 40k 4k")
    top = create(d / "chain-top.qcow2", 256 * KiB, cluster_size=4 * KiB, backing=mid.name)
    qemu_io(top, "write -P 0x52 12k 8k", "write -z -u 80k 4k")
    paths["chain"] = top
    df = create(d / "datafile.qcow2", 256 * KiB, cluster_size=4 * KiB, options=["data_file=datafile.data"])
    qemu_io(df, "write -P 0x61 0 20k", "write -z 8k 4k", "write -P 0x62 70k 9k", "write -z -u 200k 8k")
    paths["datafile"] = df
    out = {}
    for name, p in paths.items():
        data = p.read_bytes()
        out[name] = Seed(name, p, data, _regions(data), "s1" if name == "snap" else None)
    assert "compressed" in out["deflate"].regions and "compressed" in out["zstd"].regions
    assert "snapshots" in out["snap"].regions
    return out


class Mutation(NamedTuple):
    region: str
    piece: int  # which piece of the region (e.g. which L2 table)
    position: int  # reduced modulo the piece's length
    width: int  # 1, 4 or 8 bytes (big-endian), or 0: flip one bit
    value: int


def mutations(
    regions: tuple[str, ...] = ("header", "l1", "l2", "l2", "compressed", "compressed", "snapshots"),
) -> st.SearchStrategy[list[Mutation]]:
    value = st.one_of(st.sampled_from(INTERESTING_64), st.sampled_from(INTERESTING_32),
                      st.integers(0, (1 << 64) - 1))
    one = st.builds(
        Mutation,
        region=st.sampled_from(regions),
        piece=st.integers(0, 64),
        position=st.integers(0, 1 << 21),
        width=st.sampled_from([0, 1, 4, 8, 8]),
        value=value,
    )
    return st.lists(one, min_size=1, max_size=6)


def mutate(seed: Seed, muts: list[Mutation], fallback: str = "header") -> bytes:
    """Apply ``muts``; a region the seed does not have (no compressed clusters...) means ``fallback``."""
    data = bytearray(seed.data)
    for m in muts:
        pieces = seed.regions.get(m.region) or seed.regions[fallback]
        start, length = pieces[m.piece % len(pieces)]
        pos = start + m.position % max(1, length)
        if m.region in ("l1", "l2") and m.width == 8:
            pos -= (pos - start) % 8  # table entries are aligned u64s
        if m.width == 0:
            data[pos] ^= 1 << (m.value % 8)
        else:
            raw = (m.value & ((1 << (8 * m.width)) - 1)).to_bytes(m.width, "big")
            data[pos : pos + m.width] = raw[: len(data) - pos]
    return bytes(data)


class _Hang(Exception):
    pass


@contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """Interrupt a hang (a loop that never ends) with an exception that carries its traceback.

    pytest-timeout may have its own SIGALRM timer running: it is put back, minus the time spent here."""

    def fire(signum: int, frame: Optional[FrameType]) -> None:
        raise _Hang(f"example still running after {seconds} s")

    old_handler = signal.signal(signal.SIGALRM, fire)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay:
            left = max(0.001, old_delay - (time.monotonic() - started))
            signal.setitimer(signal.ITIMER_REAL, left, old_interval)


def exercise(image: bootkit.qcow2.Image) -> None:
    """What the NBD server and convert do with an image: reads, a map, and their invariants."""
    size = image.virtual_size
    window = min(size, READ_WINDOW)
    offsets = [*range(0, window, 64 * KiB), size - 1, size // 2, max(0, size - 70000)]
    for off in offsets:
        if off < 0:
            continue
        try:
            assert len(image.pread(off, 70000)) == max(0, min(70000, size - off))
        except BootkitError as e:
            event(f"read: {type(e).__name__}")  # a corrupt cluster fails its request only; go on
    total = 0
    count = 0
    try:
        for ext in itertools.islice(image.extents(0, window), 20000):
            assert ext.offset == total and ext.length > 0
            total += ext.length
            count += 1
    except BootkitError:
        return
    assert total == window or count == 20000


def check_one(data: bytes, snapshot: Optional[str], via_file: Optional[Path]) -> None:
    tracemalloc.start()
    try:
        with alarm(EXAMPLE_ALARM_SECONDS):
            source: ByteSource
            if via_file is not None:
                via_file.write_bytes(data)
                source = FileSource(via_file)
            else:
                source = BytesSource(data, name="fuzzed")
            try:
                # through a file the chain is followed (under the path rules); a buffer has no directory
                backing = None if via_file is not None else False
                with bootkit.qcow2.open(source, snapshot=snapshot, backing=backing) as image:
                    event("opened")
                    exercise(image)
            except BootkitError as e:
                event(f"open: {type(e).__name__}")
            finally:
                if isinstance(source, FileSource):
                    source.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < EXAMPLE_PEAK_BYTES, f"peak {peak >> 20} MiB"


FUZZ_SETTINGS = settings(
    # ~20 s in the test suite; BOOTKIT_FUZZ_EXAMPLES=5000 for a deeper run by hand
    max_examples=int(os.environ.get("BOOTKIT_FUZZ_EXAMPLES", "150")),
    deadline=timedelta(seconds=10),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("name", ["std", "deflate", "zstd", "extl2", "snap", "v2", "chain", "datafile"])
@FUZZ_SETTINGS
@given(muts=mutations(), use_file=st.booleans(), use_snapshot=st.booleans())
def test_mutated_images_raise_only_bootkit_errors(
    seeds: dict[str, Seed], name: str, muts: list[Mutation], use_file: bool, use_snapshot: bool
) -> None:
    seed = seeds[name]
    via_file = seed.path.with_name(f"fuzz-{name}.qcow2") if use_file else None
    check_one(mutate(seed, muts), seed.snapshot if use_snapshot else None, via_file)


@FUZZ_SETTINGS
@given(
    name=st.sampled_from(["deflate", "zstd"]),
    piece=st.integers(0, 64),
    payload=st.binary(min_size=0, max_size=6000),
    keep=st.integers(0, 4096),
)
def test_replaced_compressed_payloads(
    seeds: dict[str, Seed], name: str, piece: int, payload: bytes, keep: int
) -> None:
    """A compressed cluster's bytes replaced by a prefix of the real ones followed by anything."""
    seed = seeds[name]
    pieces = seed.regions["compressed"]
    start, length = pieces[piece % len(pieces)]
    data = bytearray(seed.data)
    keep = min(keep, length)
    new = (payload + bytes(length))[: length - keep]
    data[start + keep : start + length] = new
    check_one(bytes(data), None, None)


@settings(
    max_examples=int(os.environ.get("BOOTKIT_DIFF_EXAMPLES", "40")),
    deadline=timedelta(seconds=120),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(name=st.sampled_from(["std", "deflate", "zstd", "extl2", "v2", "chain", "datafile"]),
       muts=mutations(("l1", "l2", "l2", "l2", "compressed")))
def test_mutated_tables_read_like_qemu(seeds: dict[str, Seed], name: str, muts: list[Mutation]) -> None:
    """Differential: with broken tables or payloads, bootkit fails where QEMU fails (CorruptImage where
    qemu-img convert reports an I/O error) and otherwise returns QEMU's bytes and QEMU's map."""
    seed = seeds[name]
    path = seed.path.with_name(f"diff-{name}.qcow2")
    path.write_bytes(mutate(seed, muts, fallback="l2"))
    out = path.with_name("diff.raw")
    qemu = tool("qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, out, check=False)
    ours: Optional[bytes] = None
    try:
        with alarm(EXAMPLE_ALARM_SECONDS), bootkit.qcow2.open(path) as image:
            ours = image.pread(0, image.virtual_size)
            our_map = bootkit_map(image.extents())
    except CorruptImage as e:
        event("both fail" if qemu.returncode else "only bootkit fails")
        assert qemu.returncode != 0, f"QEMU reads it, bootkit: {e}"
        return
    assert qemu.returncode == 0, f"bootkit reads it, QEMU: {qemu.stderr.strip()}"
    event("both read")
    assert ours == out.read_bytes()
    assert our_map == qemu_map(path)


def test_the_fuzzer_reaches_the_decoders(seeds: dict[str, Seed]) -> None:
    """Not a vacuous fuzz: unmutated seeds open and read, and a broken payload gives a CorruptImage."""
    for seed in seeds.values():
        with bootkit.qcow2.open(seed.path) as image:
            exercise(image)
    with bootkit.qcow2.open(seeds["chain"].path) as image:
        assert len(image.chain()) == 3
        exercise(image)
    seed = seeds["zstd"]
    start, length = seed.regions["compressed"][0]
    data = bytearray(seed.data)
    data[start : start + length] = bytes(length)
    with bootkit.qcow2.open(BytesSource(bytes(data))) as image, pytest.raises(CorruptImage):
        image.pread(0, image.virtual_size)


def test_the_hang_guard_fires() -> None:
    """The per-example alarm does interrupt a loop that never ends (so a reader hang fails the fuzz)."""
    with pytest.raises(_Hang), alarm(1):
        while True:
            pass


# --- the two inflaters agree -------------------------------------------------------------------------------

_TEXT = b"".join(f"{i:05d} the quick brown fox jumps over the lazy dog\n".encode() for i in range(2000))


def _streams() -> list[bytes]:
    out = []
    for level, wbits, strategy in ((1, -12, zlib.Z_DEFAULT_STRATEGY), (9, -12, zlib.Z_DEFAULT_STRATEGY),
                                   (6, -15, zlib.Z_DEFAULT_STRATEGY), (1, -12, zlib.Z_FIXED), (0, -12, 0)):
        c = zlib.compressobj(level, zlib.DEFLATED, wbits, 8, strategy)
        out.append(c.compress(_TEXT[: 64 * KiB]) + c.flush())
    return out


def _inflate(data: bytes, fast: bool, monkeypatch: pytest.MonkeyPatch) -> bytes | str:
    monkeypatch.setattr(compress.LIBDEFLATE, "api", None if fast else False)
    assert compress.inflater() == ("libdeflate" if fast else "zlib")
    out = bytearray(64 * KiB)
    try:
        compress.inflate_cluster(data, memoryview(out))
    except CorruptImage:
        return "refused"
    return bytes(out)


@given(st.data())
@settings(max_examples=400, deadline=timedelta(seconds=5), derandomize=True)
def test_libdeflate_and_zlib_decide_every_mutated_stream_alike(data: st.DataObject) -> None:
    """libdeflate (the fast path) may only ever take a stream zlib, QEMU's decoder, takes too, with the same
    bytes; every other stream is zlib's to decide. Mutated streams hit bad code tables, distances and ends."""
    stream = bytearray(data.draw(st.sampled_from(_STREAMS)))
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, min(len(stream) - 1, data.draw(st.sampled_from((16, 400, 1 << 20))))))
        stream[pos] = data.draw(st.integers(0, 255))
    payload = bytes(stream) + bytes(data.draw(st.sampled_from((0, 512))))
    with pytest.MonkeyPatch.context() as mp:
        fast = _inflate(payload, True, mp)
        slow = _inflate(payload, False, mp)
    event("refused" if slow == "refused" else "read")
    assert fast == slow


_STREAMS = _streams()
