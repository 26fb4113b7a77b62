"""Mirrors: one image from several real HTTP servers (tests/faultserver.py), in lazy and in ram mode.

What a user relies on: a mirror that serves wrong bytes costs a request to another mirror, never a wrong
byte, and is demoted; a mirror that dies mid-read or mid-download is left and the others finish the job (ram
mode keeps the bytes it has only when a manifest checks them); a slow mirror is dropped; when every mirror
fails, one line names each mirror's last error. Decisions are asserted (``MirrorSet.decisions``), not timings.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from faultserver import Fault, FaultState, fault_server
from fetch_fixtures import fast_options, free_port, make_data

from bootkit.errors import UsageError
from bootkit.fetch import ChecksumMismatch, ChunkError, GaveUp, HTTPSource, Manifest, NotFound, download
from bootkit.fetch.mirrors import MirrorSet, MirrorState

CHUNK = 64 * 1024
DATA = make_data(24 * CHUNK + 999, seed=31)
SHA = hashlib.sha256(DATA).hexdigest()
MANIFEST = Manifest(
    len(DATA),
    CHUNK,
    SHA,
    tuple(hashlib.sha256(DATA[i : i + CHUNK]).digest() for i in range(0, len(DATA), CHUNK)),
)


@contextmanager
def servers(count: int) -> Iterator[list[tuple[str, FaultState]]]:
    """``count`` fault servers, each serving DATA at /img; yields [(URL of /img, state), ...]."""
    with ExitStack() as stack:
        out = []
        for _ in range(count):
            url, state = stack.enter_context(fault_server())
            state.files["/img"] = DATA
            out.append((f"{url}/img", state))
        yield out


def read_all(source: HTTPSource) -> bytes:
    return b"".join(source.pread(offset, CHUNK) for offset in range(0, source.size, CHUNK))


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/img"


# -- the decisions, on a clock the test holds --


def test_slow_mirror_is_dropped_then_asked_again_after_its_back_off() -> None:
    now = [100.0]
    mirrors = MirrorSet(["http://a/img", "http://b/img"], clock=lambda: now[0])
    a, b = mirrors.mirrors
    for _ in range(3):
        mirrors.succeeded(a, CHUNK, 0.010)
    for _ in range(2):
        mirrors.succeeded(b, CHUNK, 0.500)
    assert b.state is MirrorState.healthy  # not judged before MIN_SAMPLES answers
    mirrors.succeeded(b, CHUNK, 0.500)
    assert list(mirrors.decisions) == [
        "dropped http://b/img: slow: 500 ms per request, the best mirror takes 10 ms (asked again in 5 s)"
    ]
    # while it backs off, every request goes to a, however busy a is
    assert [mirrors.pick() for _ in range(3)] == [a, a, a]
    now[0] += 5
    assert mirrors.pick() is b  # probation: one request decides
    mirrors.succeeded(b, CHUNK, 0.012)
    assert b.state is MirrorState.healthy and b.samples == 1
    assert list(mirrors.decisions)[-1] == "healthy http://b/img: answered again"


def test_requests_spread_over_healthy_mirrors_and_back_off_doubles() -> None:
    now = [0.0]
    mirrors = MirrorSet(["http://a/img", "http://b/img", "http://c/img"], clock=lambda: now[0])
    a, b, c = mirrors.mirrors
    assert [mirrors.pick(), mirrors.pick(), mirrors.pick(), mirrors.pick()] == [a, b, c, a]
    mirrors.failed(c, "connection refused")
    mirrors.released(a)
    mirrors.released(a)
    mirrors.released(b)
    now[0] += 6
    assert mirrors.pick(avoid=[a, b]) is c
    mirrors.failed(c, "connection refused")
    assert c.retry_at == now[0] + 10  # the second drop in a row backs off twice as long
    assert mirrors.pick(avoid=[a, b]) is a  # avoided, but the only usable ones
    mirrors.corrupt(a, "chunk 1 does not match")
    assert a.state is MirrorState.demoted and a.retry_at == now[0] + 60
    assert mirrors.describe()["http://a/img"] == {
        "state": "demoted",
        "bytes": 0,
        "requests": 0,
        "errors": 0,
        "bad_chunks": 1,
        "last_error": "chunk 1 does not match",
    }


# -- lazy mode --


def test_lazy_mirror_that_corrupts_chunks_is_demoted_and_never_served() -> None:
    with servers(2) as [(bad_url, bad), (good_url, _)]:
        bad.add_faults("/img", *[Fault(corrupt_at=7) for _ in range(200)])
        with HTTPSource(bad_url, fast_options(), manifest=MANIFEST, mirrors=[good_url]) as source:
            assert read_all(source) == DATA
            first, second = source.mirrors.mirrors
            assert first.state is MirrorState.demoted
            assert first.bad_chunks >= 1 and first.bytes == 0
            assert second.state is MirrorState.healthy and second.bytes == len(DATA)
            assert source.stats["bad_chunks"] == first.bad_chunks
            assert re.fullmatch(
                rf"demoted {bad_url}: served bad data: {bad_url}: chunk \d+ \(bytes \d+-\d+\) does not match the"
                r" manifest \(asked again in 60 s\)",
                source.mirrors.decisions[0],
            )


def test_lazy_chunk_bad_on_every_mirror_is_an_error() -> None:
    tampered = bytearray(DATA)
    tampered[3 * CHUNK + 5] ^= 1
    with servers(2) as [(url_a, a), (url_b, b)]:
        a.files["/img"] = b.files["/img"] = bytes(tampered)
        with HTTPSource(url_a, fast_options(), manifest=MANIFEST, mirrors=[url_b], readahead=0) as source:
            with pytest.raises(ChunkError, match=r"from all 2 mirrors; not served$"):
                source.pread(3 * CHUNK, 10)
            assert [m.bad_chunks for m in source.mirrors.mirrors] == [1, 1]
            assert source.pread(4 * CHUNK, CHUNK) == DATA[4 * CHUNK : 5 * CHUNK]


def test_lazy_mirror_that_dies_midway_is_left_then_all_dead_is_one_line() -> None:
    with (
        servers(2) as [(url_a, a), (url_b, b)],
        HTTPSource(url_a, fast_options(), manifest=MANIFEST, mirrors=[url_b], cache_bytes=CHUNK) as source,
    ):
        half = 12 * CHUNK
        assert source.pread(0, half) == DATA[:half]
        a.down = True
        first, second = source.mirrors.mirrors
        # requests go to the faster mirror: forget both measurements, so that the next one goes to the first
        # (by its index) and finds it dead, whichever answered faster before
        first.latency = second.latency = None
        assert source.pread(half, len(DATA)) == DATA[half:]
        assert first.state is MirrorState.dropped
        assert any(d.startswith(f"dropped {url_a}: failed: ") for d in source.mirrors.decisions)
        assert second.bytes > 0
        b.down = True
        with pytest.raises(GaveUp) as info:
            source.pread(0, 10)  # evicted from the one-chunk cache: asked again
    message = str(info.value)
    assert message.startswith(f"all 2 servers of {url_a} failed: {url_a}: ")
    assert f"; {url_b}: " in message and message.endswith("attempts in a row)")
    assert "\n" not in message


def test_lazy_slow_mirror_is_dropped() -> None:
    with servers(2) as [(slow_url, slow), (fast_url, _)]:
        slow.add_faults("/img", *[Fault(trickle=CHUNK // 4, trickle_delay=0.05) for _ in range(100)])
        opts = fast_options()
        # a cache of 8 chunks: read-ahead (at most half the cache) keeps requests to both mirrors in flight, so
        # each answers the 3 requests the slow rule needs (with a 1-chunk cache there is no read-ahead and the
        # reads, one at a time, all go to whichever mirror answered fastest)
        with HTTPSource(slow_url, opts, manifest=MANIFEST, mirrors=[fast_url], cache_bytes=8 * CHUNK) as source:
            for _ in range(3):
                assert read_all(source) == DATA
                if source.mirrors.mirrors[0].state is MirrorState.dropped:
                    break
            first, second = source.mirrors.mirrors
            assert any(d.startswith(f"dropped {slow_url}: slow: ") for d in source.mirrors.decisions)
            assert first.errors == 0 and second.bytes > first.bytes


def test_lazy_all_mirrors_dead_at_open_is_one_line() -> None:
    first, second = dead_url(), dead_url()
    with pytest.raises(GaveUp) as info:
        HTTPSource(first, fast_options(retries=1), manifest=MANIFEST, mirrors=[second])
    assert re.fullmatch(
        rf"all 2 servers of {first} failed: {first}: [^;]+; {second}: [^;]+ \(gave up after 2 attempts in a row\)",
        str(info.value),
    )


def test_lazy_mirrors_need_a_manifest() -> None:
    with pytest.raises(UsageError, match="mirrors need a manifest"):
        HTTPSource(dead_url(), fast_options(), mirrors=[dead_url()])


# -- ram mode --


def pinned() -> dict[str, str]:
    return {"verify": "pinned", "sha256": SHA}


def test_ram_mirror_dies_midway_resume_on_the_next_with_a_manifest(tmp_path: Path) -> None:
    with servers(2) as [(url_a, a), (url_b, b)]:
        a.add_faults("/img", Fault(drop_after=10 * CHUNK + 500))
        result = download(url_a, str(tmp_path / "img"), fast_options(**pinned()), mirrors=[url_b], manifest=MANIFEST)
        asked = [r.headers for r in b.requests_for("/img")]
    assert (tmp_path / "img").read_bytes() == DATA and result.sha256 == SHA
    assert result.url == url_b
    # the checked chunks are kept; If-Range carries no ETag of another server
    assert [h.get("Range") for h in asked] == [f"bytes={10 * CHUNK}-"]
    assert "If-Range" not in asked[0]
    assert result.mirrors[url_a]["state"] == "dropped" and result.mirrors[url_a]["errors"] == 1
    assert result.mirrors[url_a]["bytes"] == 10 * CHUNK + 500
    assert result.mirrors[url_b]["bytes"] == len(DATA) - 10 * CHUNK


def test_ram_mirror_dies_midway_restart_without_a_manifest(tmp_path: Path) -> None:
    with servers(2) as [(url_a, a), (url_b, b)]:
        a.add_faults("/img", Fault(drop_after=10 * CHUNK + 500))
        result = download(url_a, str(tmp_path / "img"), fast_options(**pinned()), mirrors=[url_b])
        asked = [r.headers.get("Range") for r in b.requests_for("/img")]
    assert (tmp_path / "img").read_bytes() == DATA
    assert asked == [None]  # from zero: another server's bytes cannot be spliced without a check
    assert result.mirrors[url_b]["bytes"] == len(DATA)


def test_ram_mirror_with_a_corrupt_prefix_keeps_only_the_good_chunks(tmp_path: Path) -> None:
    with servers(2) as [(url_a, a), (url_b, b)]:
        a.add_faults("/img", Fault(drop_after=10 * CHUNK + 500, corrupt_at=4 * CHUNK + 3))
        download(url_a, str(tmp_path / "img"), fast_options(**pinned()), mirrors=[url_b], manifest=MANIFEST)
        asked = [r.headers.get("Range") for r in b.requests_for("/img")]
    assert (tmp_path / "img").read_bytes() == DATA
    assert asked == [f"bytes={4 * CHUNK}-"]


def test_ram_mirror_that_serves_another_file_is_demoted(tmp_path: Path) -> None:
    with servers(2) as [(url_a, a), (url_b, b)]:
        a.files["/img"] = make_data(len(DATA), seed=99)  # same size, other bytes: only the hash can tell
        result = download(url_a, str(tmp_path / "img"), fast_options(**pinned()), mirrors=[url_b])
        asked = [r.headers.get("Range") for r in b.requests_for("/img")]
    assert (tmp_path / "img").read_bytes() == DATA and result.url == url_b
    assert asked == [None]
    assert result.mirrors[url_a]["state"] == "demoted" and result.mirrors[url_a]["bad_chunks"] == 1
    # every mirror wrong: the download fails as without mirrors, and leaves nothing behind
    with servers(2) as [(url_a, a), (url_b, b)]:
        a.files["/img"] = b.files["/img"] = make_data(len(DATA), seed=99)
        with pytest.raises(ChecksumMismatch, match=rf"^{url_b}: SHA-256 mismatch: got "):
            download(url_a, str(tmp_path / "img2"), fast_options(**pinned()), mirrors=[url_b])
    assert not (tmp_path / "img2").exists() and not (tmp_path / "img2.part").exists()


def test_ram_primary_404_moves_to_the_mirror(tmp_path: Path) -> None:
    with servers(2) as [(url_a, a), (url_b, _)]:
        del a.files["/img"]
        result = download(url_a, str(tmp_path / "img"), fast_options(**pinned()), mirrors=[url_b])
    assert result.url == url_b and (tmp_path / "img").read_bytes() == DATA


def test_ram_all_mirrors_fail_is_one_line(tmp_path: Path) -> None:
    first, second = dead_url(), dead_url()
    with pytest.raises(GaveUp) as info:
        download(first, str(tmp_path / "img"), fast_options(retries=2, **pinned()), mirrors=[second])
    assert re.fullmatch(
        rf"2 servers of {first}: {first}: [^;]+; {second}: [^;]+ \(gave up after 3 attempts in a row\)",
        str(info.value),
    )
    assert not list(tmp_path.iterdir())
    with servers(2) as [(url_a, a), (url_b, b)]:
        del a.files["/img"], b.files["/img"]
        with pytest.raises(NotFound) as missing:
            download(url_a, str(tmp_path / "img"), fast_options(**pinned()), mirrors=[url_b])
    assert str(missing.value) == (
        f"all 2 servers of {url_a} failed: {url_a}: HTTP 404 Not Found; {url_b}: HTTP 404 Not Found"
    )


def test_ram_mirrors_need_a_pinned_hash(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"mirrors need a pinned hash \(verify=pinned\): a mirror could serve any"):
        download(dead_url(), str(tmp_path / "img"), fast_options(verify="sidecar"), mirrors=[dead_url()])
