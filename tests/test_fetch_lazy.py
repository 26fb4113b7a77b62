"""Lazy mode: HTTPSource against bootkit serve-http and nginx (the same tests), and the fault server.

The proof: bootkit's QCOW2 reader on an HTTP source returns exactly what it returns on the local file, for
images qemu-img made (plain, deflate, zstd, small clusters, extended L2); a chunk that does not match the
manifest is fetched again, then reported -- never served; a boot-like read pattern fetches no chunk twice
while the cache holds what it reads, and read-ahead fetches only a bounded share more.
"""

from __future__ import annotations

import collections
import hashlib
import random
import shutil
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bkharness import readpattern
from faultserver import Fault, FaultState, fault_server
from fetch_fixtures import fast_options, make_data, nginx

from bootkit import qcow2
from bootkit.errors import FetchError, UsageError
from bootkit.fetch import (
    ChunkError,
    GaveUp,
    HTTPSource,
    HTTPStatusError,
    Manifest,
    RemoteChanged,
    SizeMismatch,
    client,
)
from bootkit.host.httpserve import http_server
from bootkit.run import run

CHUNK = 64 * 1024
VIRTUAL_SIZE = 24 * 1024 * 1024

#: name -> extra qemu-img convert options
IMAGES = {
    "plain": [],
    "deflate": ["-c"],
    "zstd": ["-c", "-o", "compression_type=zstd"],
    "small-clusters": ["-o", "cluster_size=4096"],
    "extended-l2": ["-c", "-o", "extended_l2=on,cluster_size=128k"],
}


def make_raw(path: Path) -> None:
    """A disk with random data, a repeated pattern, zeros and holes, at offsets that straddle clusters."""
    rng = random.Random(7)
    with open(path, "wb") as f:
        f.truncate(VIRTUAL_SIZE)
        for offset, length in [(0, 70_000), (1_000_000, 3_000_000), (9_437_000, 512), (20_000_000, 4_000_000)]:
            f.seek(offset)
            f.write(rng.randbytes(length))
        f.seek(5_000_000)
        f.write(b"bootkit lazy " * 100_000)  # compressible


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the reference images, their manifests and a raw file of random bytes."""
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (Debian package qemu-utils)")
    root = tmp_path_factory.mktemp("lazy")
    make_raw(root / "disk.raw")
    for name, extra in IMAGES.items():
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *extra, root / "disk.raw", root / f"{name}.qcow2"])
        Manifest.build(str(root / f"{name}.qcow2"), CHUNK).write(str(root / f"{name}.qcow2.manifest"))
    (root / "random.bin").write_bytes(make_data(5 * CHUNK + 1234, seed=9))
    Manifest.build(str(root / "random.bin"), CHUNK).write(str(root / "random.bin.manifest"))
    return root


@pytest.fixture(scope="module", params=["serve-http", "nginx"])
def base_url(request: pytest.FixtureRequest, served: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The served directory's URL, from bootkit's own server and from nginx."""
    if request.param == "nginx":
        with nginx(served, tmp_path_factory.mktemp("nginx")) as url:
            yield url + "/"
    else:
        with http_server(str(served)) as url:
            yield url


def open_http(base_url: str, served: Path, name: str, **kwargs: object) -> HTTPSource:
    manifest = Manifest.load(str(served / f"{name}.manifest"))
    return HTTPSource(base_url + name, fast_options(), manifest=manifest, **kwargs)  # type: ignore[arg-type]


def test_raw_bytes_match_from_many_threads(base_url: str, served: Path) -> None:
    data = (served / "random.bin").read_bytes()
    rng = random.Random(1)
    ranges = [(rng.randrange(len(data) + 100), rng.randrange(3 * CHUNK)) for _ in range(300)]
    errors: list[str] = []
    with open_http(base_url, served, "random.bin", cache_bytes=2 * CHUNK) as source:
        assert source.size == len(data)

        def reader(part: list[tuple[int, int]]) -> None:
            for offset, length in part:
                if source.pread(offset, length) != data[offset : offset + length]:
                    errors.append(f"{offset}+{length}")

        threads = [threading.Thread(target=reader, args=(ranges[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert source.pread(len(data) - 10, 100) == data[-10:]
        assert source.pread(len(data), 10) == b""


@pytest.mark.parametrize("name", list(IMAGES))
def test_qcow2_reader_reads_the_same_over_http(base_url: str, served: Path, name: str) -> None:
    path = served / f"{name}.qcow2"
    with open_http(base_url, served, path.name) as source, qcow2.open(source) as remote, qcow2.open(str(path)) as local:
        assert remote.virtual_size == local.virtual_size == VIRTUAL_SIZE
        step = 1536 * 1024  # not a multiple of the cluster or chunk size
        for offset in range(0, VIRTUAL_SIZE, step):
            assert remote.pread(offset, step) == local.pread(offset, step), f"{name} at {offset}"
        rng = random.Random(2)
        for _ in range(100):
            offset, length = rng.randrange(VIRTUAL_SIZE), rng.randrange(1, 300_000)
            assert remote.pread(offset, length) == local.pread(offset, length), f"{name} at {offset}+{length}"


def test_sequential_reads_trigger_read_ahead_within_the_cache_bound(base_url: str, served: Path) -> None:
    data = (served / "plain.qcow2").read_bytes()
    with open_http(base_url, served, "plain.qcow2", cache_bytes=6 * CHUNK, readahead=3) as source:
        for offset in range(0, len(data), 4096):
            assert source.pread(offset, 4096) == data[offset : offset + 4096]
        assert source.stats["readahead"] > 0
        assert source.cached_bytes <= 6 * CHUNK


def boot_like_reads(image: Path) -> list[tuple[int, int]]:
    """:func:`bkharness.readpattern.boot_like_reads` with 512 KiB "files"."""
    return readpattern.boot_like_reads(image, 512 << 10, seed=5)


def chunks_needed(image: Path, reads: list[tuple[int, int]]) -> set[int]:
    """The image's chunks the QCOW2 reader reads for ``reads`` (from the local file)."""
    needed: set[int] = set()

    class Recording:
        name = str(image)
        size = image.stat().st_size

        def __init__(self) -> None:
            self.data = image.read_bytes()

        def pread(self, offset: int, length: int) -> bytes:
            end = min(offset + length, self.size)
            needed.update(range(offset // CHUNK, (end - 1) // CHUNK + 1) if end > offset else ())
            return self.data[offset:end]

        def close(self) -> None:
            pass

    with qcow2.open(Recording()) as img:
        for offset, length in reads:
            img.pread(offset, length)
    return needed


@pytest.mark.parametrize("name", ["plain", "zstd"])
def test_a_boot_fetches_no_chunk_twice_within_the_cache_budget(served: Path, name: str) -> None:
    """The pipeline test's lazy boot read 243 MB from a 162 MB image: read-ahead evicted chunks the boot
    read. Replayed here with a cache that holds every chunk the reads need (but not the whole image): each
    chunk is asked of the server once, read-ahead fetches at most half as much again, memory stays bounded."""
    image = served / f"{name}.qcow2"
    reads = boot_like_reads(image)
    needed = chunks_needed(image, reads)
    cache = (len(needed) + 8) * CHUNK
    assert cache < image.stat().st_size  # the budget matters
    with fault_server() as (url, state):
        state.files["/img"] = image.read_bytes()
        manifest = Manifest.load(str(served / f"{name}.qcow2.manifest"))
        source = HTTPSource(url + "/img", fast_options(), manifest=manifest, cache_bytes=cache)
        with source, qcow2.open(source) as img, qcow2.open(str(image)) as local:
            for offset, length in reads:
                assert img.pread(offset, length) == local.pread(offset, length)
            assert source.cached_bytes <= cache
        asked = collections.Counter(ranges_asked(state)[1:])  # after the probe
    assert [r for r, n in asked.items() if n > 1] == []
    assert len(needed) <= len(asked) <= len(needed) * 3 // 2, (len(needed), len(asked))


def test_stream_fill_takes_read_ahead_chunks_from_the_cache(faulty: tuple[str, FaultState]) -> None:
    """Stream mode's fill asks for every chunk the boot did not keep: one that read-ahead already fetched
    comes from the cache (and leaves it), not from the server again."""
    url, state = faulty
    with HTTPSource(url, fast_options(), manifest=MANIFEST, readahead=4) as source:
        for index in range(3):  # a reader moving on from chunk to chunk: read-ahead of chunks 2, 3 and 4
            assert source.pread(index * CHUNK, 10) == DATA[index * CHUNK : index * CHUNK + 10]
        deadline = time.monotonic() + 30
        while source.stats["readahead"] < 3:  # wait for the read-ahead to arrive
            assert time.monotonic() < deadline, source.stats
            time.sleep(0.01)
        before = len(state.requests_for("/img"))
        cached = source.cached_bytes
        assert source.fetch_chunk(3) == DATA[3 * CHUNK : 4 * CHUNK]  # unread read-ahead: the fill keeps it now
        assert source.fetch_chunk(0) == DATA[:CHUNK]  # read by the boot: stays cached
        assert len(state.requests_for("/img")) == before
        assert cached == 5 * CHUNK
        assert source.cached_bytes == cached - CHUNK
        assert source.fetch_chunk(6) == DATA[6 * CHUNK :]  # not cached: from the server, and not kept
        assert len(state.requests_for("/img")) == before + 1
        assert source.cached_bytes == cached - CHUNK


# -- against the fault server --


DATA = make_data(6 * CHUNK + 999, seed=11)
MANIFEST = Manifest(
    len(DATA),
    CHUNK,
    hashlib.sha256(DATA).hexdigest(),
    tuple(hashlib.sha256(DATA[i : i + CHUNK]).digest() for i in range(0, len(DATA), CHUNK)),
)


@pytest.fixture
def faulty() -> Iterator[tuple[str, FaultState]]:
    with fault_server() as (url, state):
        state.files["/img"] = DATA
        yield f"{url}/img", state


def ranges_asked(state: FaultState) -> list[str | None]:
    return [r.headers.get("Range") for r in state.requests_for("/img")]


def test_tampered_chunk_is_never_served(faulty: tuple[str, FaultState]) -> None:
    url, state = faulty
    tampered = bytearray(DATA)
    tampered[3 * CHUNK + 5] ^= 1
    state.files["/img"] = bytes(tampered)
    with HTTPSource(url, fast_options(), manifest=MANIFEST, readahead=0) as source:
        assert source.pread(0, CHUNK) == DATA[:CHUNK]
        with pytest.raises(ChunkError) as info:
            source.pread(3 * CHUNK + 100, 10)
        assert str(info.value) == (
            f"{url}: chunk 3 (bytes {3 * CHUNK}-{4 * CHUNK - 1}) does not match the manifest,"
            " also when fetched again; not served"
        )
        # fetched exactly twice, and the source keeps serving the good chunks
        assert ranges_asked(state).count(f"bytes={3 * CHUNK}-{4 * CHUNK - 1}") == 2
        assert source.pread(4 * CHUNK, CHUNK) == DATA[4 * CHUNK : 5 * CHUNK]


def test_tampered_chunk_through_the_qcow2_reader(served: Path) -> None:
    raw = bytearray((served / "plain.qcow2").read_bytes())
    manifest = Manifest.load(str(served / "plain.qcow2.manifest"))
    with qcow2.open(str(served / "plain.qcow2")) as local:
        extent = next(e for e in local.extents() if e.kind == qcow2.DATA and e.length >= 65536)
        guest_offset, host_offset = extent.offset, extent.host_offset
    assert host_offset is not None
    raw[host_offset + 10] ^= 0x40
    with fault_server() as (url, state):
        state.files["/plain.qcow2"] = bytes(raw)
        source = HTTPSource(url + "/plain.qcow2", fast_options(), manifest=manifest)
        with source, qcow2.open(source) as image, pytest.raises(FetchError, match="does not match the manifest"):
            image.pread(guest_offset, 512)


def test_bad_chunk_once_is_fetched_again(faulty: tuple[str, FaultState]) -> None:
    url, state = faulty
    with HTTPSource(url, fast_options(), manifest=MANIFEST, readahead=0) as source:
        state.add_faults("/img", Fault(corrupt_at=7))
        assert source.pread(2 * CHUNK, 3 * CHUNK) == DATA[2 * CHUNK : 5 * CHUNK]
        assert source.stats["bad_chunks"] == 1


def test_reconnects_need_no_name_lookup(faulty: tuple[str, FaultState], monkeypatch: pytest.MonkeyPatch) -> None:
    """Lazy mode reads on after switch_root, where name lookup may not work (the new root's resolv.conf and
    NSS modules): the source looks its server up when opened, then reconnects to the same addresses."""
    url, state = faulty
    url = url.replace("127.0.0.1", "localhost")
    with HTTPSource(url, fast_options(), manifest=MANIFEST, readahead=0) as source:

        def no_lookup(*args: object, **kwargs: object) -> None:
            raise socket.gaierror(socket.EAI_NONAME, "no name lookup after switch_root")

        monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
        before = len(state.requests_for("/img"))
        state.add_faults("/img", Fault(drop_after=100), Fault(drop_after=100))  # each drop: a new connection
        assert source.pread(0, len(DATA)) == DATA
        assert len(state.requests_for("/img")) - before >= 9  # 7 chunks, 2 of them again after a drop
        # the lookup really is gone: an unpinned connection to the same URL cannot be made
        conn = client.connect(client.parse_url(url), fast_options())[0]
        with pytest.raises(socket.gaierror):
            conn.connect()


def test_each_request_is_retried(faulty: tuple[str, FaultState]) -> None:
    url, state = faulty
    with HTTPSource(url, fast_options(timeout=1, retries=6), manifest=MANIFEST, readahead=0) as source:
        state.add_faults("/img", Fault(status=503), Fault(drop_after=100), Fault(stall_after=10, stall=3))
        assert source.pread(CHUNK, 10) == DATA[CHUNK : CHUNK + 10]


HUGE = 64 << 20


@pytest.mark.parametrize(
    ("fault", "says"),
    [
        (Fault(chunked=True, extra_body=HUGE), f"the server sent more than the {CHUNK} bytes asked for"),
        (
            Fault(extra_body=HUGE),
            f"asked for bytes {CHUNK}-{2 * CHUNK - 1} ({CHUNK} bytes), the server announced Content-Length"
            f" '{CHUNK + HUGE}'",
        ),
    ],
    ids=["chunked-without-length", "content-length-larger-than-asked"],
)
def test_oversized_range_answer_is_not_read(faulty: tuple[str, FaultState], fault: Fault, says: str) -> None:
    """A hostile server answers a range request with 64 MiB more than asked: the client reads at most the
    range (and one byte), keeps its memory bounded, retries, and names the URL and the numbers."""
    url, state = faulty
    with HTTPSource(url, fast_options(retries=1), manifest=MANIFEST, readahead=0) as source:
        state.add_faults("/img", fault, fault)
        tracemalloc.start()
        try:
            with pytest.raises(GaveUp) as info:
                source.pread(CHUNK, 10)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * CHUNK + (1 << 20), f"{peak} bytes allocated while reading a {CHUNK}-byte range"
        assert str(info.value) == f"{url}: {says} (gave up after 2 attempts in a row)"
        # the answers were cut short: the source goes on serving from an honest server
        assert source.pread(CHUNK, 10) == DATA[CHUNK : CHUNK + 10]


def test_oversized_answer_to_the_probe(faulty: tuple[str, FaultState]) -> None:
    """The first request (one byte, to learn the size) is bounded the same way."""
    url, state = faulty
    state.add_faults("/img", Fault(chunked=True, extra_body=HUGE), Fault(chunked=True, extra_body=HUGE))
    with pytest.raises(GaveUp) as info:
        HTTPSource(url, fast_options(retries=1), manifest=MANIFEST)
    assert str(info.value) == (
        f"{url}: the server sent more than the 1 bytes asked for (gave up after 2 attempts in a row)"
    )


def test_file_changed_on_server_is_an_error(faulty: tuple[str, FaultState]) -> None:
    url, state = faulty
    with HTTPSource(url, fast_options(), manifest=MANIFEST, readahead=0) as source:
        state.files["/img"] = make_data(len(DATA), seed=12)
        with pytest.raises(RemoteChanged, match=rf"^{url}: the file changed on the server since it was opened"):
            source.pread(0, 10)


def test_manifest_of_another_size(faulty: tuple[str, FaultState]) -> None:
    url, state = faulty
    state.files["/img"] = DATA + b"x"
    with pytest.raises(SizeMismatch, match=rf"^{url}: the server has {len(DATA) + 1} bytes, the manifest says"):
        HTTPSource(url, fast_options(), manifest=MANIFEST)


def test_manifest_required_unless_verify_none(faulty: tuple[str, FaultState]) -> None:
    url, _ = faulty
    with pytest.raises(UsageError, match="lazy mode verifies chunks with a manifest"):
        HTTPSource(url, fast_options(verify="sidecar"))


def test_server_without_range_support(faulty: tuple[str, FaultState]) -> None:
    url, state = faulty
    state.add_faults("/img", Fault(ignore_range=True))
    with pytest.raises(HTTPStatusError, match="the server ignores Range requests; lazy mode needs them"):
        HTTPSource(url, fast_options(), manifest=MANIFEST)


# -- every reference image of the reader tests (tests/test_qcow2_reference.py), over HTTP --


def _reference_builders() -> dict[str, Any]:
    from test_qcow2_reference import BUILDERS

    return dict(BUILDERS)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.skip("qemu-img/qemu-io are not installed (Debian package qemu-utils)")
    return tmp_path_factory.mktemp("refs-over-http")


@pytest.mark.parametrize("name", sorted(_reference_builders()))
def test_reference_images_read_the_same_over_http(reference_dir: Path, name: str) -> None:
    d = reference_dir / name
    d.mkdir()
    top = _reference_builders()[name](d).path
    opened: list[HTTPSource] = []
    with http_server(str(d)) as base:

        def source(file_name: str) -> HTTPSource:
            manifest = Manifest.build(str(d / file_name), CHUNK)
            opened.append(HTTPSource(base + file_name, fast_options(), manifest=manifest))
            return opened[-1]

        def resolver(file_name: str, what: str, referrer: object) -> HTTPSource:
            # backing and data files lie next to the image on the server (some images name absolute paths)
            return source(Path(file_name).name)

        try:
            with qcow2.open(source(top.name), resolver=resolver) as remote, qcow2.open(str(top)) as local:
                assert remote.virtual_size == local.virtual_size
                step = 333_333
                for offset in range(0, local.virtual_size, step):
                    assert remote.pread(offset, step) == local.pread(offset, step), f"{name} at {offset}"
        finally:
            for s in opened:
                s.close()
