"""Stream mode (bootkit.fetch.stream): lazy reads with the whole image filled into RAM behind them.

The proof: a fill from a real HTTP server ends with a copy equal to the image, after which the server can go
and every read still answers (no request reaches the fault server after the fill); a chunk that fails its
manifest hash is fetched again and never stored; an image that does not fit stays lazy with one warning;
the rate cap and the boot's precedence are decisions the fill records; ``bootkit status`` fields.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultserver import Fault, FaultState, fault_server
from fetch_fixtures import fast_options, make_data

from bootkit import qcow2
from bootkit.boot.status import StatusFile, read_status
from bootkit.fetch import HTTPSource, Manifest
from bootkit.fetch.room import filesystem_type, mem_available
from bootkit.fetch.stream import Fill, FillState, Pacer, RamStore, StreamSource, start_fill
from bootkit.host.httpserve import http_server
from bootkit.run import run

CHUNK = 64 * 1024
DATA = make_data(40 * CHUNK + 777, seed=16)


def manifest_of(data: bytes, chunk: int = CHUNK) -> Manifest:
    digests = tuple(hashlib.sha256(data[i : i + chunk]).digest() for i in range(0, len(data), chunk))
    return Manifest(len(data), chunk, hashlib.sha256(data).hexdigest(), digests)


@pytest.fixture
def faulty() -> Iterator[tuple[str, FaultState]]:
    with fault_server() as (base, state):
        state.files["/img"] = DATA
        yield base + "/img", state


def stream_source(url: str, data: bytes = DATA) -> StreamSource:
    return StreamSource(HTTPSource(url, fast_options(), manifest=manifest_of(data), readahead=0))


def fill_requests(state: FaultState) -> int:
    return len(state.requests_for("/img"))


# -- a whole QCOW2 image from bootkit serve-http, then the server is gone --


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (Debian package qemu-utils)")
    d = tmp_path_factory.mktemp("stream")
    raw = d / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(make_data(3 << 20, seed=3))
        f.write(b"bootkit stream " * 50_000)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", raw, d / "disk.qcow2"])
    Manifest.build(str(d / "disk.qcow2"), CHUNK).write(str(d / "disk.qcow2.manifest"))
    return d


def test_fill_from_serve_http_then_the_server_goes(
    image_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reports: list[dict[str, Any]] = []
    status = StatusFile(str(tmp_path / "run"))
    manifest = Manifest.load(str(image_dir / "disk.qcow2.manifest"))
    store_dir = tmp_path / "images"
    store_dir.mkdir()
    raw = (image_dir / "disk.raw").read_bytes()
    caplog.set_level(logging.INFO, logger="bootkit")

    def report(fields: dict[str, Any]) -> None:
        reports.append(fields)
        status.update(fill=fields)

    with http_server(str(image_dir)) as base:
        source = StreamSource(HTTPSource(base + "disk.qcow2", fast_options(), manifest=manifest))
        image = qcow2.open(source)
        assert image.pread(1 << 20, 4096) == raw[1 << 20 : (1 << 20) + 4096]  # the boot's first read
        fill = start_fill([source], str(store_dir), rate=0, reserve=0, report=report)
        assert fill.done.wait(60)
        assert fill.state is FillState.complete and source.complete
    # the server is gone: every byte of the disk still reads, from the copy in "RAM"
    try:
        assert image.pread(0, len(raw)) == raw
    finally:
        image.close()
        source.close()
    (copy,) = store_dir.iterdir()
    assert copy.read_bytes() == (image_dir / "disk.qcow2").read_bytes()
    # status: filling, then progress steps, then complete with every byte
    assert reports[0]["state"] == "filling" and reports[-1] == {
        "state": "complete", "bytes": source.size, "total": source.size, "rate": 0}  # fmt: skip
    assert read_status(tmp_path / "run" / "status.json")["fill"]["state"] == "complete"
    # console: at most one line per 10 %, then one "fill complete" line
    lines = [r.getMessage() for r in caplog.records if "fill" in r.getMessage()]
    assert sum("fill complete:" in line for line in lines) == 1
    assert 1 <= sum(line.split("] ", 1)[-1].startswith("fill: ") and "%" in line for line in lines) <= 9


def test_after_the_fill_no_request_reaches_the_server(faulty: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = faulty
    source = stream_source(url)
    fill = start_fill([source], str(tmp_path / "run" / "images"), rate=0, reserve=0)  # made on the way
    assert (tmp_path / "run" / "images").stat().st_mode & 0o777 == 0o700
    assert fill.done.wait(30) and fill.state is FillState.complete
    before = fill_requests(state)
    state.add_faults("/img", *[Fault(status=503)] * 50)  # a server that would fail every request now
    assert source.pread(0, len(DATA)) == DATA
    assert source.pread(len(DATA) - 10, 100) == DATA[-10:]
    assert fill_requests(state) == before
    source.close()


def test_chunks_the_boot_read_are_not_fetched_again(faulty: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = faulty
    source = stream_source(url)
    source.attach(RamStore(str(tmp_path / "copy"), source.size, CHUNK))
    assert source.pread(3 * CHUNK + 5, 2 * CHUNK) == DATA[3 * CHUNK + 5 : 5 * CHUNK + 5]  # chunks 3, 4, 5
    fill = Fill([source], rate=0)
    fill.start()
    assert fill.done.wait(30) and fill.state is FillState.complete
    ranges = [r.headers.get("Range") for r in state.requests_for("/img")]
    assert ranges.count(f"bytes={3 * CHUNK}-{4 * CHUNK - 1}") == 1
    assert (tmp_path / "copy").read_bytes() == DATA
    source.close()


# -- verification --


def test_a_bad_chunk_is_fetched_again_and_never_stored(faulty: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = faulty
    source = stream_source(url)
    # the fill's first request (chunk 0) and the lazy source's own second try both come back corrupt
    state.add_faults("/img", Fault(corrupt_at=100), Fault(corrupt_at=200))
    fill = start_fill([source], str(tmp_path), rate=0, reserve=0)
    assert fill.done.wait(30) and fill.state is FillState.complete
    assert fill.refetched == 1 and source.stats["bad_chunks"] == 2
    (copy,) = tmp_path.iterdir()
    assert copy.read_bytes() == DATA
    source.close()


def test_a_chunk_that_never_verifies_fails_the_fill_not_the_reads(
    faulty: tuple[str, FaultState], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, state = faulty
    source = stream_source(url)
    state.add_faults("/img", *[Fault(corrupt_at=7)] * 6)  # 3 fill attempts x 2 fetches each
    fill = start_fill([source], str(tmp_path), rate=0, reserve=0)
    assert fill.done.wait(30)
    assert fill.state is FillState.failed
    assert fill.error is not None and "chunk 0 (bytes 0-65535) does not match the manifest" in fill.error
    assert source.store is not None and not source.store.has(0)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "fill: FAILED: " in errors[0] and "reads carry on over the network" in errors[0]
    assert source.pread(0, 100) == DATA[:100]  # the server is honest again: the read is served, verified
    source.close()


# -- room --


def test_an_image_that_does_not_fit_stays_lazy_with_one_warning(
    faulty: tuple[str, FaultState], caplog: pytest.LogCaptureFixture
) -> None:
    if filesystem_type("/dev/shm") != "tmpfs" or mem_available() is None:
        pytest.skip("no tmpfs at /dev/shm or no MemAvailable: the RAM room rule cannot be shown here")
    url, _ = faulty
    source = stream_source(url)
    reserve = mem_available() or 0  # everything: nothing is left for the copy
    fill = start_fill([source], "/dev/shm", rate=0, reserve=reserve)
    assert fill.state is FillState.lazy and fill.done.is_set()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "of RAM available after keeping" in warnings[0] and "stream mode stays lazy" in warnings[0]
    assert source.store is None
    assert source.pread(CHUNK, 10) == DATA[CHUNK : CHUNK + 10]
    assert fill.status()["state"] == "lazy"
    source.close()
    assert not [p for p in os.listdir("/dev/shm") if p.startswith("stream-0-img")]


# -- pacing --


def test_pacer_schedule() -> None:
    """1 MiB/s with a burst of one 64 KiB chunk: after the burst, each chunk waits its 1/16 s."""
    pacer = Pacer(1 << 20, burst=CHUNK)
    decisions = [pacer.delay(CHUNK, now=100.0) for _ in range(5)]
    assert decisions == [0.0, 0.0, 1 / 16, 2 / 16, 3 / 16]
    # after a pause, no rush to make up for lost time: one burst, then the rate again
    assert pacer.delay(CHUNK, now=200.0) == 0.0
    assert pacer.delay(CHUNK, now=200.0) == 0.0
    assert pacer.delay(CHUNK, now=200.0) == 1 / 16
    assert Pacer(0, burst=CHUNK).delay(1 << 30, now=0.0) == 0.0  # 0: no cap


def test_the_fill_keeps_to_the_rate_cap(faulty: tuple[str, FaultState], tmp_path: Path) -> None:
    url, _ = faulty
    capped = stream_source(url)
    (tmp_path / "a").mkdir()
    fill = start_fill([capped], str(tmp_path / "a"), rate=16 * CHUNK, reserve=0)
    assert fill.done.wait(30) and fill.state is FillState.complete
    # 41 chunks at 16 chunks/s, two of them free (the burst and the first request): the cap decided
    # at least (41 - 2) / 16 s of waiting, less what the requests themselves took
    assert fill.paced_seconds > 0.5
    uncapped = stream_source(url)
    (tmp_path / "b").mkdir()
    free = start_fill([uncapped], str(tmp_path / "b"), rate=0, reserve=0)
    assert free.done.wait(30) and free.paced_seconds == 0.0
    capped.close()
    uncapped.close()


def test_the_boots_reads_go_first(faulty: tuple[str, FaultState], tmp_path: Path) -> None:
    url, state = faulty
    source = stream_source(url)
    fill = Fill([source], rate=0, quiet=0.2)
    assert fill.may_go(time.monotonic())
    state.add_faults("/img", Fault(trickle=4096, trickle_delay=0.03))  # the boot's read takes ~0.5 s
    reader = threading.Thread(target=source.pread, args=(5 * CHUNK, 10))
    reader.start()
    while source.busy == 0:
        time.sleep(0.005)
    assert not fill.may_go(time.monotonic())  # a read waits for the network
    reader.join()
    assert not fill.may_go(time.monotonic())  # it just finished: the boot is likely to read again
    assert fill.may_go(time.monotonic() + 0.2)
    source.close()


def test_the_fill_waits_for_the_root_to_be_mounted(faulty: tuple[str, FaultState], tmp_path: Path) -> None:
    from bootkit.boot.mount import mark_root_mounted, root_mounted

    url, state = faulty
    source = stream_source(url)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fill = start_fill([source], str(run_dir / "images"), rate=0, reserve=0,
                      gate=lambda: root_mounted(str(run_dir)))  # fmt: skip
    # the boot reads what it needs before its root is mounted; the fill asks for nothing yet
    assert source.pread(2 * CHUNK, 10) == DATA[2 * CHUNK : 2 * CHUNK + 10]
    boot_reads = fill_requests(state)
    assert not fill.done.wait(0.5)
    assert fill.state is FillState.waiting and fill.filled == 0 and fill_requests(state) == boot_reads
    mark_root_mounted(str(run_dir))  # what bootkit-boot does once the root is mounted
    assert fill.done.wait(30) and fill.status()["state"] == FillState.complete.value
    assert fill_requests(state) > boot_reads
    assert source.pread(0, len(DATA)) == DATA
    source.close()
