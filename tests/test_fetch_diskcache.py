"""The persistent local chunk cache (bootkit.fetch.diskcache) on a real directory, with a real HTTP server.

The proofs: chunks are stored by content (two images sharing chunks store them once); a chunk file with
other bytes is never served (removed, counted, one warning, fetched again); a directory that is not a bootkit
cache is refused, stray files in one are removed; eviction keeps what recent manifests need; a cache that
holds every chunk serves a whole image with the server gone and never contacts it; stream mode's fill goes
into the cache; metadata blobs round-trip and a damaged one is not returned.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultserver import FaultState, fault_server
from fetch_fixtures import fast_options, make_data

from bootkit.fetch import Manifest
from bootkit.fetch.deferred import DeferredRemote
from bootkit.fetch.diskcache import RECENT_MANIFESTS, CacheError, CacheStore, DiskCache
from bootkit.fetch.stream import FillState, StreamSource, start_fill

CHUNK = 64 * 1024
DATA = make_data(24 * CHUNK + 999, seed=61)


def manifest_of(data: bytes, chunk: int = CHUNK) -> Manifest:
    digests = tuple(hashlib.sha256(data[i : i + chunk]).digest() for i in range(0, len(data), chunk))
    return Manifest(len(data), chunk, hashlib.sha256(data).hexdigest(), digests)


def chunk(data: bytes, i: int) -> bytes:
    return data[i * CHUNK : (i + 1) * CHUNK]


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    d = tmp_path / "cache"
    d.mkdir()
    return d


@pytest.fixture
def server() -> Iterator[tuple[str, FaultState]]:
    with fault_server() as (base, state):
        state.files["/img"] = DATA
        yield base + "/img", state


def through_cache(url: str, cache: DiskCache, data: bytes = DATA) -> tuple[StreamSource, DeferredRemote]:
    manifest = manifest_of(data)
    cache.put_manifest(manifest.dumps())
    remote = DeferredRemote(url, fast_options(), manifest)
    source = StreamSource(remote)
    source.attach(CacheStore(cache, manifest.chunks))
    return source, remote


# -- the store --


def test_chunks_are_stored_by_content_once(cache_dir: Path) -> None:
    cache = DiskCache.open(str(cache_dir))
    a, b = chunk(DATA, 0), chunk(DATA, 1)
    assert cache.put(hashlib.sha256(a).digest(), a)
    assert cache.put(hashlib.sha256(a).digest(), a)  # a second image with the same chunk: nothing new
    assert cache.put(hashlib.sha256(b).digest(), b)
    assert cache.get(hashlib.sha256(a).digest()) == a
    files = sorted(p.name for p in (cache_dir / "chunks").rglob("*") if p.is_file())
    assert files == sorted(hashlib.sha256(x).hexdigest() for x in (a, b))
    assert cache.used == len(a) + len(b)
    assert (cache_dir / "bootkit-cache").read_bytes() == b"bootkit-cache 1\n"
    cache.close()
    assert DiskCache.open(str(cache_dir)).used == len(a) + len(b)  # counted again on the next boot


def test_an_unverified_chunk_is_never_stored(cache_dir: Path) -> None:
    cache = DiskCache.open(str(cache_dir))
    with pytest.raises(CacheError, match="refusing to store a chunk"):
        cache.put(hashlib.sha256(b"right").digest(), b"wrong")
    assert not list((cache_dir / "chunks").rglob("*"))


def test_a_chunk_with_other_bytes_is_removed_and_fetched_again(
    cache_dir: Path, server: tuple[str, FaultState], caplog: pytest.LogCaptureFixture
) -> None:
    url, state = server
    cache = DiskCache.open(str(cache_dir))
    source, _ = through_cache(url, cache)
    assert source.pread(0, len(DATA)) == DATA  # fills the cache
    digest = hashlib.sha256(chunk(DATA, 3)).hexdigest()
    bad = cache_dir / "chunks" / digest[:2] / digest
    flipped = bytearray(bad.read_bytes())
    flipped[100] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    (cache_dir / "chunks" / digest[:2] / digest.replace(digest[-1], "0" if digest[-1] != "0" else "1")).write_bytes(
        b""
    )  # a file whose name no manifest asks for: harmless, never read
    before = len(state.requests_for("/img"))
    cache2 = DiskCache.open(str(cache_dir))
    source2, remote2 = through_cache(url, cache2)
    with caplog.at_level(logging.WARNING, logger="bootkit"):
        assert source2.pread(0, len(DATA)) == DATA
    assert remote2.opened  # the bad chunk came from the server again
    assert len(state.requests_for("/img")) - before <= 2  # its probe and the one chunk
    assert cache2.stats["cache_repaired"] == 1
    assert f"chunk {digest} in {cache_dir} does not match its hash" in caplog.text
    assert hashlib.sha256(bad.read_bytes()).hexdigest() == digest  # repaired on disk


def test_a_truncated_chunk_counts_as_a_miss(cache_dir: Path, server: tuple[str, FaultState]) -> None:
    url, _ = server
    cache = DiskCache.open(str(cache_dir))
    source, _ = through_cache(url, cache)
    source.pread(0, len(DATA))
    digest = hashlib.sha256(chunk(DATA, 0)).hexdigest()
    path = cache_dir / "chunks" / digest[:2] / digest
    os.truncate(path, 10)
    assert DiskCache.open(str(cache_dir)).get(bytes.fromhex(digest)) is None
    assert not path.exists()


def test_a_foreign_directory_is_never_used(cache_dir: Path) -> None:
    (cache_dir / "home").mkdir()
    (cache_dir / "etc").write_text("someone's data")
    with pytest.raises(CacheError, match=r"not a bootkit cache \(holds etc, home\)"):
        DiskCache.open(str(cache_dir))
    assert sorted(p.name for p in cache_dir.iterdir()) == ["etc", "home"]  # nothing written


def test_a_fresh_ext4_root_becomes_a_cache(cache_dir: Path) -> None:
    (cache_dir / "lost+found").mkdir()
    DiskCache.open(str(cache_dir)).close()
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(
        ["bootkit-cache", "chunks", "lost+found", "manifests", "meta", "tmp"]
    )


def test_a_wrong_marker_is_refused(cache_dir: Path) -> None:
    (cache_dir / "bootkit-cache").write_bytes(b"bootkit-cache 9\n")
    with pytest.raises(CacheError, match="not a bootkit cache marker of version 1"):
        DiskCache.open(str(cache_dir))


def test_stray_files_are_removed_at_open(cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    DiskCache.open(str(cache_dir)).close()
    (cache_dir / "chunks" / "zz").mkdir()
    (cache_dir / "chunks" / "ab").mkdir()
    (cache_dir / "chunks" / "ab" / "not-a-hash").write_bytes(b"x")
    (cache_dir / "chunks" / "ab" / ("cd" + "0" * 62)).write_bytes(b"in the wrong directory")
    (cache_dir / "tmp" / "123.4").write_bytes(b"half a chunk")
    (cache_dir / "manifests" / "junk").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="bootkit"):
        cache = DiskCache.open(str(cache_dir))
    assert cache.stats["cache_repaired"] == 5
    assert "removed 5 file(s) that are not part of a bootkit cache" in caplog.text
    assert [p.name for p in (cache_dir / "chunks").iterdir()] == ["ab"]
    assert not list((cache_dir / "chunks" / "ab").iterdir())
    assert cache.used == 0


def test_eviction_keeps_what_recent_manifests_need(cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = make_data(8 * CHUNK, seed=1)
    new = make_data(8 * CHUNK, seed=2)
    cache = DiskCache.open(str(cache_dir), max_bytes=12 * CHUNK)
    for i in range(8):
        cache.put(hashlib.sha256(chunk(old, i)).digest(), chunk(old, i))
    # the old image's manifest is forgotten: RECENT_MANIFESTS newer ones push it out
    cache.put_manifest(manifest_of(old).dumps())
    for seed in range(RECENT_MANIFESTS - 1):
        cache.put_manifest(manifest_of(make_data(CHUNK, seed=100 + seed)).dumps())
    os.utime(cache_dir / "manifests" / manifest_of(old).digest, (1, 1))
    cache.put_manifest(manifest_of(new).dumps())
    assert not (cache_dir / "manifests" / manifest_of(old).digest).exists()
    with caplog.at_level(logging.INFO, logger="bootkit"):
        for i in range(8):
            assert cache.put(hashlib.sha256(chunk(new, i)).digest(), chunk(new, i))
    assert cache.used <= 12 * CHUNK
    assert all(cache.has(h) for h in manifest_of(new).chunks)
    assert cache.stats["cache_evicted"] >= 4
    assert "of chunks no recent manifest needs" in caplog.text


def test_a_cache_full_of_needed_chunks_keeps_no_more(cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = make_data(6 * CHUNK, seed=3)
    cache = DiskCache.open(str(cache_dir), max_bytes=4 * CHUNK)
    cache.put_manifest(manifest_of(data).dumps())
    with caplog.at_level(logging.WARNING, logger="bootkit"):
        stored = [cache.put(hashlib.sha256(chunk(data, i)).digest(), chunk(data, i)) for i in range(6)]
    assert stored == [True] * 4 + [False] * 2
    assert caplog.text.count("is full") == 1


def test_manifests_by_their_hash(cache_dir: Path) -> None:
    cache = DiskCache.open(str(cache_dir))
    m = manifest_of(DATA)
    assert cache.put_manifest(m.dumps()) == m.digest
    assert cache.get_manifest(m.digest) == m.dumps()
    (cache_dir / "manifests" / m.digest).write_bytes(m.dumps() + b"extra")
    assert cache.get_manifest(m.digest) is None
    assert not (cache_dir / "manifests" / m.digest).exists()
    assert cache.get_manifest("../" + "0" * 61) is None


def test_meta_blobs(cache_dir: Path) -> None:
    cache = DiskCache.open(str(cache_dir))
    cache.put_meta("channel.stable", b"version 42")
    assert cache.get_meta("channel.stable") == b"version 42"
    assert cache.get_meta("absent") is None
    raw = (cache_dir / "meta" / "channel.stable").read_bytes()
    (cache_dir / "meta" / "channel.stable").write_bytes(raw.replace(b"42", b"43"))
    assert cache.get_meta("channel.stable") is None
    with pytest.raises(CacheError, match="metadata name"):
        cache.put_meta("../escape", b"")
    with pytest.raises(CacheError, match="at most 65536"):
        cache.put_meta("big", bytes(65537))


# -- through the cache, with a server and without --


def test_a_complete_cache_boots_without_the_server(cache_dir: Path) -> None:
    with fault_server() as (base, state):
        state.files["/img"] = DATA
        url = base + "/img"
        cache = DiskCache.open(str(cache_dir))
        first, remote = through_cache(url, cache)
        assert first.pread(0, len(DATA)) == DATA
        assert remote.opened
        first.close()
    # the server is gone (its port closed): every read comes from the cache, the server is never tried
    cache = DiskCache.open(str(cache_dir))
    second, remote = through_cache(url, cache)
    assert second.store is not None and second.store.complete()
    assert second.pread(0, len(DATA)) == DATA
    assert second.pread(5 * CHUNK - 3, 7) == DATA[5 * CHUNK - 3 : 5 * CHUNK + 4]
    assert not remote.opened
    assert cache.stats["cache_hits"] >= 25


def test_a_second_image_fetches_only_the_chunks_it_does_not_share(cache_dir: Path) -> None:
    # base chunks 0..19 shared, four new ones: what a backing chain's new overlay looks like by content
    v2 = DATA[: 20 * CHUNK] + make_data(4 * CHUNK, seed=99)
    with fault_server() as (base, state):
        state.files["/img"] = DATA
        state.files["/v2"] = v2
        cache = DiskCache.open(str(cache_dir))
        through_cache(base + "/img", cache)[0].pread(0, len(DATA))
        source, _ = through_cache(base + "/v2", cache, v2)
        assert source.pread(0, len(v2)) == v2
        ranges = [r.headers["Range"] for r in state.requests_for("/v2") if "Range" in r.headers]
    spans = [r.split("=")[1].split("-") for r in ranges]
    fetched = sum(int(end) - int(start) + 1 for start, end in spans)
    assert fetched <= 4 * CHUNK + 4096  # the four new chunks (and a probe of at most a page)


def test_stream_fill_goes_into_the_cache(cache_dir: Path, server: tuple[str, FaultState], tmp_path: Path) -> None:
    url, _ = server
    cache = DiskCache.open(str(cache_dir))
    source, _ = through_cache(url, cache)
    fill = start_fill([source], str(tmp_path / "ram"), rate=0, reserve=0)
    assert fill.done.wait(30)
    assert fill.state is FillState.complete and fill.where == "the local cache"
    assert not (tmp_path / "ram").exists()  # nothing went to RAM
    assert all(cache.has(h) for h in manifest_of(DATA).chunks)
    assert source.pread(0, len(DATA)) == DATA


def test_a_huge_file_under_a_chunk_name_is_not_read(cache_dir: Path) -> None:
    cache = DiskCache.open(str(cache_dir))
    digest = hashlib.sha256(b"x").hexdigest()
    (cache_dir / "chunks" / digest[:2]).mkdir()
    with open(cache_dir / "chunks" / digest[:2] / digest, "wb") as f:
        f.truncate((64 << 20) + 1)  # sparse: larger than any chunk can be
    assert cache.get(bytes.fromhex(digest)) is None
    assert not (cache_dir / "chunks" / digest[:2] / digest).exists()
    assert cache.stats["cache_repaired"] == 1
