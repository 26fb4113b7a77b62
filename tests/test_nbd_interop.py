"""`bootkit serve-nbd` against real NBD clients, on real QCOW2 images made by qemu-img/qemu-io.

Every client's bytes are compared with `qemu-img convert -O raw` of the same image; BLOCK_STATUS is compared
with `qemu-img map --output=json`.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

nbd = pytest.importorskip("nbd", reason="libnbd's Python binding (python3-libnbd) is not installed")

MiB = 1024 * 1024
SIZE = 40 * MiB
BOOTKIT = [sys.executable, "-m", "bootkit"]
KINDS = ["plain", "deflate", "zstd", "extended_l2", "backing"]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)


def _content() -> bytes:
    """Random runs (incompressible), text-like runs (compressible), zero runs, in 64 KiB-unaligned pieces."""
    rng = random.Random(11)
    out = bytearray()
    words = [b"bootkit", b"qcow2", b"cluster", b"\n", b"nbd ", b"kernel ", b"zstd"]
    while len(out) < SIZE:
        kind = rng.randrange(3)
        n = rng.randrange(1, 600) * 1024 + rng.randrange(0, 2) * 512
        if kind == 0:
            out += rng.randbytes(n)
        elif kind == 1:
            out += b"".join(rng.choice(words) for _ in range(n // 4))[:n].ljust(n, b".")
        else:
            out += bytes(n)
    return bytes(out[:SIZE])


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """kind -> (image, raw reference made by qemu-img)."""
    pytest.importorskip("bootkit.qcow2", reason="the QCOW2 reader (bootkit.qcow2) is not there yet")
    d = tmp_path_factory.mktemp("nbdimages")
    raw = d / "content.raw"
    raw.write_bytes(_content())
    made = {
        "plain": ["-O", "qcow2"],
        "deflate": ["-O", "qcow2", "-c"],
        "zstd": ["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
        "extended_l2": ["-O", "qcow2", "-o", "extended_l2=on"],
    }
    for kind, opts in made.items():
        _run("qemu-img", "convert", "-f", "raw", *opts, str(raw), str(d / f"{kind}.qcow2"))
    # zero clusters, sub-cluster writes and discards on top of the converted images
    _run("qemu-io", "-f", "qcow2", "-c", "write -z 2M 1M", "-c", "write -P 0x11 5M 4k", str(d / "plain.qcow2"))
    _run(
        "qemu-io", "-f", "qcow2",
        "-c", "write -P 0x5a 12k 4k",
        "-c", "write -z 3M 8k",
        "-c", "discard 7M 64k",
        str(d / "extended_l2.qcow2"),
    )  # fmt: skip
    # a backing chain: deflate base, overlay with data, zero and unallocated areas
    _run("qemu-img", "create", "-f", "qcow2", "-b", str(d / "deflate.qcow2"), "-F", "qcow2", str(d / "backing.qcow2"))
    _run(
        "qemu-io", "-f", "qcow2",
        "-c", "write -P 0x33 1M 192k",
        "-c", "write -z 9M 1M",
        "-c", "write -P 0x44 39M 64k",
        str(d / "backing.qcow2"),
    )  # fmt: skip
    out = {}
    for kind in KINDS:
        image = d / f"{kind}.qcow2"
        ref = d / f"{kind}.raw"
        _run("qemu-img", "convert", "-O", "raw", str(image), str(ref))
        out[kind] = (image, ref)
    return out


@contextmanager
def serve(image: Path, sock: Path, *extra: str) -> Iterator[str]:
    """`bootkit serve-nbd IMAGE --unix SOCK`; yields the URI it prints once listening."""
    proc = subprocess.Popen(
        [*BOOTKIT, "serve-nbd", str(image), "--unix", str(sock), *extra], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("nbd+unix:///"), line
        yield line
    finally:
        proc.terminate()
        assert proc.wait(60) == 0


@pytest.fixture(params=KINDS)
def served(
    request: pytest.FixtureRequest, images: dict[str, tuple[Path, Path]], tmp_path: Path
) -> Iterator[tuple[str, Path, Path]]:
    image, ref = images[request.param]
    with serve(image, tmp_path / "nbd.sock") as uri:
        yield uri, image, ref


def test_qemu_img_convert(served: tuple[str, Path, Path], tmp_path: Path) -> None:
    uri, _, ref = served
    out = tmp_path / "out.raw"
    _run("qemu-img", "convert", "-f", "raw", uri, "-O", "raw", str(out))
    assert out.read_bytes() == ref.read_bytes()


def test_nbdcopy_multi_conn(served: tuple[str, Path, Path], tmp_path: Path) -> None:
    uri, _, ref = served
    out = tmp_path / "out.raw"
    _run("nbdcopy", "--connections=4", "--requests=16", uri, str(out))
    assert out.read_bytes() == ref.read_bytes()


def test_libnbd_reads_and_block_status(served: tuple[str, Path, Path]) -> None:
    uri, image, ref = served
    data = ref.read_bytes()
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    assert h.get_size() == len(data)
    assert h.is_read_only() and h.can_multi_conn() and h.can_meta_context("base:allocation")
    rng = random.Random(1)
    for _ in range(200):
        offset = rng.randrange(0, len(data) - 1)
        n = min(rng.choice((1, 511, 4096, 65536, 300000)), len(data) - offset)
        assert h.pread(n, offset) == data[offset : offset + n]
    assert h.pread(32 * MiB, 0) == data[: 32 * MiB]
    assert _block_status(h) == _qemu_map(image)
    h.shutdown()


def test_libnbd_small_reads_in_flight(served: tuple[str, Path, Path]) -> None:
    """Hundreds of 4 KiB reads in flight at once (each decoding a cluster on compressed images: queued and
    shared by two threads, replies sent several at a time) all come back right."""
    uri, _, ref = served
    data = ref.read_bytes()
    h = nbd.NBD()
    h.connect_uri(uri)
    rng = random.Random(4)
    offsets = [rng.randrange(0, len(data) // 4096) * 4096 + rng.choice((0, 512, 1000)) for _ in range(2000)]
    offsets = [min(o, len(data) - 4096) for o in offsets]
    deadline = time.monotonic() + 120

    def wait_below(n: int) -> None:
        while h.aio_in_flight() > n:
            assert time.monotonic() < deadline, f"{h.aio_in_flight()} replies never came"
            h.poll(1000)

    bufs = []
    for o in offsets:
        buf = nbd.Buffer(4096)
        h.aio_pread(buf, o)
        bufs.append(buf)
        wait_below(255)
    wait_below(0)
    for o, buf in zip(offsets, bufs, strict=True):
        assert buf.to_bytearray() == data[o : o + 4096]
    h.shutdown()


def _block_status(h: Any) -> list[tuple[int, int, int]]:
    """(offset, length, flags) runs over the whole disk from NBD_CMD_BLOCK_STATUS, merged."""
    size = h.get_size()
    runs: list[tuple[int, int, int]] = []
    offset = 0
    while offset < size:
        got: list[int] = []

        def cb(meta: str, off: int, entries: list[int], err: int, got: list[int] = got) -> int:
            assert meta == "base:allocation"
            got.extend(entries)
            return 0

        h.block_status(min(size - offset, 1 << 30), offset, cb)
        assert got
        for i in range(0, len(got), 2):
            n = min(got[i], size - offset)
            _merge(runs, offset, n, got[i + 1])
            offset += n
    return runs


def _qemu_map(image: Path) -> list[tuple[int, int, int]]:
    runs: list[tuple[int, int, int]] = []
    for e in json.loads(_run("qemu-img", "map", "--output=json", str(image)).stdout):
        flags = (0 if e["data"] else 1) | (2 if e["zero"] else 0)
        _merge(runs, e["start"], e["length"], flags)
    return runs


def _merge(runs: list[tuple[int, int, int]], offset: int, length: int, flags: int) -> None:
    if runs and runs[-1][2] == flags and runs[-1][0] + runs[-1][1] == offset:
        runs[-1] = (runs[-1][0], runs[-1][1] + length, flags)
    else:
        runs.append((offset, length, flags))


@pytest.mark.parametrize("rw,bs,depth", [("randread", "4k", 16), ("read", "1M", 4)])
def test_fio_nbd_engine(served: tuple[str, Path, Path], rw: str, bs: str, depth: int) -> None:
    uri, _, ref = served
    proc = _run(
        "fio",
        "--name=nbd",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={depth}",
        f"--size={ref.stat().st_size}",
        "--io_size=16M",
        "--output-format=json",
    )
    job = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["read"]["io_bytes"] == 16 * MiB


def test_socket_activation_with_nbdcopy(images: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    image, ref = images["zstd"]
    out = tmp_path / "out.raw"
    _run("nbdcopy", "--", "[", *BOOTKIT, "serve-nbd", str(image), "]", str(out))
    assert out.read_bytes() == ref.read_bytes()
    # stdout stays the client's: nothing of ours mixed into a copy to stdout
    proc = subprocess.run(
        ["nbdcopy", "--", "[", *BOOTKIT, "serve-nbd", str(image), "]", "-"], capture_output=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout == ref.read_bytes()


def test_tcp_and_export_name(images: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    image, ref = images["deflate"]
    proc = subprocess.Popen(
        [*BOOTKIT, "serve-nbd", str(image), "--tcp", "127.0.0.1:0", "--export", "disk"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert uri.startswith("nbd://127.0.0.1:") and uri.endswith("/")
        out = tmp_path / "out.raw"
        _run("qemu-img", "convert", "-f", "raw", uri + "disk", "-O", "raw", str(out))
        assert out.read_bytes() == ref.read_bytes()
        h = nbd.NBD()
        h.set_export_name("other")
        with pytest.raises(nbd.Error):
            h.connect_uri(uri + "other")
    finally:
        proc.terminate()
        assert proc.wait(60) == 0


@pytest.mark.parametrize("extra", [["--threads", "1", "--poll-us", "0"], ["--threads", "2", "--poll-us", "500"]])
def test_serve_threads_and_poll_options(images: dict[str, tuple[Path, Path]], tmp_path: Path, extra: list[str]) -> None:
    """No helper at all (one thread, never polling) and a leader with only the helper both serve every byte,
    to a whole-disk copy and to many small reads in flight."""
    image, ref = images["zstd"]
    data = ref.read_bytes()
    with serve(image, tmp_path / "nbd.sock", *extra) as uri:
        out = tmp_path / "out.raw"
        _run("qemu-img", "convert", "-f", "raw", uri, "-O", "raw", str(out))
        assert out.read_bytes() == data
        _run("fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", "--rw=randread", "--bs=4k", "--iodepth=16",
             f"--size={len(data)}", "--io_size=4M", "--output-format=json")


@pytest.mark.parametrize(
    "option,value", [("--threads", "0"), ("--poll-us", "-1"), ("--poll-us", "10001"), ("--poll-us", "x")]
)
def test_serve_bad_option_exits_2_with_one_line(tmp_path: Path, option: str, value: str) -> None:
    image = tmp_path / "disk.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M")
    proc = subprocess.run(
        [*BOOTKIT, "serve-nbd", str(image), "--unix", str(tmp_path / "s"), option, value],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0], proc.stderr


def test_serve_bad_image_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(200))
    proc = subprocess.run(
        [*BOOTKIT, "serve-nbd", str(bad), "--unix", str(tmp_path / "s")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.qcow2" in lines[0], proc.stderr
    assert not (tmp_path / "s").exists()


def test_serve_internal_snapshot(images: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    image = tmp_path / "snap.qcow2"
    shutil.copy(images["plain"][0], image)
    _run("qemu-img", "snapshot", "-c", "before", str(image))
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 3M", str(image))
    ref = tmp_path / "before.raw"
    _run("qemu-img", "convert", "-l", "snapshot.name=before", "-O", "raw", str(image), str(ref))
    out = tmp_path / "out.raw"
    with serve(image, tmp_path / "nbd.sock", "--snapshot", "before") as uri:
        _run("nbdcopy", uri, str(out))
    assert out.read_bytes() == ref.read_bytes() == images["plain"][1].read_bytes()


def test_tcp_listener_parsing() -> None:
    from bootkit.errors import UsageError
    from bootkit.nbd.transport import activation_listeners, parse_hostport

    assert parse_hostport("0") == ("127.0.0.1", 0)
    assert parse_hostport(":10809") == ("127.0.0.1", 10809)
    assert parse_hostport("[::1]:99") == ("::1", 99)
    assert parse_hostport("localhost:1") == ("localhost", 1)
    for bad in ("host:port", "1:99999"):
        with pytest.raises(UsageError, match="--tcp"):
            parse_hostport(bad)
    # sockets passed to another process (LISTEN_PID) are not ours to take
    assert activation_listeners({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) == []


def test_corrupt_compressed_cluster_fails_only_its_requests(
    images: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    from bootkit import qcow2

    image = tmp_path / "corrupt.qcow2"
    shutil.copy(images["deflate"][0], image)
    ref = images["deflate"][1].read_bytes()
    with qcow2.open(str(image)) as img:
        victim = next(e for e in img.extents() if e.kind == "compressed" and e.offset >= MiB)
    assert victim.host_offset is not None
    with image.open("r+b") as f:  # garbage over the deflate stream: it cannot decode to a full cluster
        f.seek(victim.host_offset)
        f.write(b"\xff" * 64)
    with serve(image, tmp_path / "nbd.sock") as uri:
        h = nbd.NBD()
        h.connect_uri(uri)
        with pytest.raises(nbd.Error) as e:
            h.pread(4096, victim.offset + 4096)
        assert e.value.errno == "EIO"
        with pytest.raises(nbd.Error):
            h.pread(2 * MiB, victim.offset - MiB)  # a request that only touches it fails too
        # everything else still reads, on this connection and a new one
        assert h.pread(65536, victim.offset + victim.length) == ref[victim.offset + victim.length :][:65536]
        assert h.pread(65536, 0) == ref[:65536]
        h.shutdown()
        out = tmp_path / "out.raw"
        proc = subprocess.run(["qemu-img", "convert", "-f", "raw", uri, "-O", "raw", str(out)], capture_output=True)
        assert proc.returncode != 0 and b"Input/output error" in proc.stderr
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.pread(4096, SIZE - 4096) == ref[-4096:]
        h.shutdown()
