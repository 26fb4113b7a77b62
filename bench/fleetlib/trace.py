"""A boot's reads: every range request a real lazy-mode boot made, with its time, and when the root was mounted.

Recorded once per image (:func:`record`: one QEMU netboot in lazy mode from a stock nginx whose log line has
the request's start time, duration and ``Range``) and stored next to the image as
``<image>.fleet-trace-<first 16 hex digits of its SHA-256>.json`` (``--record`` makes a new one).

Definitions the benchmark uses:

* ``t`` of a read: its start, seconds after the boot's first request for the image;
* ``root_t``: when the guest printed bootkit's ``mount:`` line (the root is mounted), on the same clock;
* the reads *to root*: those that started before ``root_t``; a client's **time to root** is when the last of
  them completes (the recorded boot's own time to root, :meth:`Trace.own_time`, is the same on its clock);
* a read's **pause**: the time between the end of the reads before it and its start -- what the guest spent
  computing (decompressing, udev, systemd) before it asked again. A replay waits that long after the
  previous read completes, so a slower network makes the boot slower by exactly its own delays.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRACE_VERSION = 1
_RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")


@dataclass(frozen=True)
class Read:
    """One range request of the boot: start ``t`` (s), ``offset`` and ``length`` in the image file."""

    t: float
    offset: int
    length: int
    duration: float = 0.0


@dataclass(frozen=True)
class Trace:
    """The reads of one boot of one image (``image_sha256``), and when its root was mounted (``root_t``)."""

    image_sha256: str
    image_size: int
    root_t: float
    reads: tuple[Read, ...]
    origin: str = "qemu"

    def to_root(self) -> tuple[Read, ...]:
        return tuple(r for r in self.reads if r.t < self.root_t)

    def own_time(self) -> float:
        """The recorded boot's own time to root: when its last read before the mount completed (what a
        replay over an infinitely fast network measures)."""
        return max((r.t + r.duration for r in self.to_root()), default=0.0)

    def pauses(self, reads: tuple[Read, ...] | None = None) -> list[float]:
        """Each read's pause: its start minus the latest end of the reads before it (0 when they overlap;
        the first read's pause is its start)."""
        out, done = [], 0.0
        for r in self.to_root() if reads is None else reads:
            out.append(max(0.0, r.t - done))
            done = max(done, r.t + r.duration)
        return out

    def bytes_needed(self, chunk_size: int) -> int:
        """The bytes of the distinct chunks the reads to root touch (what a lazy client must fetch)."""
        chunks: set[int] = set()
        for r in self.to_root():
            if r.length > 0:
                chunks.update(range(r.offset // chunk_size, (r.offset + r.length - 1) // chunk_size + 1))
        last = (self.image_size - 1) // chunk_size
        tail = self.image_size - last * chunk_size
        return sum(tail if c == last else chunk_size for c in chunks)

    def variant(self, *, pace: float = 1.0, through_end: bool = False) -> Trace:
        """This trace with its clock scaled by ``pace`` (0.25: a machine four times faster than the recording
        guest, e.g. real hardware against QEMU's TCG) and, with ``through_end``, the "root" moved after its
        last read (the whole recorded boot counts, not only the part before the root was mounted)."""
        root_t = max(r.t for r in self.reads) + 1e-3 if through_end and self.reads else self.root_t
        reads = tuple(Read(r.t * pace, r.offset, r.length, r.duration * pace) for r in self.reads)
        return Trace(self.image_sha256, self.image_size, root_t * pace, reads, self.origin)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": TRACE_VERSION,
            "image_sha256": self.image_sha256,
            "image_size": self.image_size,
            "root_t": self.root_t,
            "origin": self.origin,
            "reads": [[round(r.t, 6), r.offset, r.length, round(r.duration, 6)] for r in self.reads],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Trace:
        if data.get("version") != TRACE_VERSION:
            raise ValueError(f"trace version {data.get('version')!r}, expected {TRACE_VERSION}")
        reads = tuple(Read(float(t), int(o), int(n), float(d)) for t, o, n, d in data["reads"])
        return cls(str(data["image_sha256"]), int(data["image_size"]), float(data["root_t"]), reads,
                   str(data.get("origin", "qemu")))  # fmt: skip

    def save(self, path: Path) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".trace.")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f)
        os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def trace_path(image: Path, sha256: str) -> Path:
    """Where the trace of ``image`` is kept: next to it, keyed by its SHA-256."""
    return image.parent / f"{image.name}.fleet-trace-{sha256[:16]}.json"


def load(image: Path, sha256: str) -> Trace | None:
    path = trace_path(image, sha256)
    try:
        trace = Trace.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return trace if trace.image_sha256 == sha256 else None


def from_requests(requests: list[Any], image_uri: str, sha256: str, size: int, root_wall: float) -> Trace:
    """A trace from the boot server's log (:class:`fleetlib.servers.Request`) and the wall-clock time the
    root was mounted: the image's range requests, on a clock starting at its first request."""
    mine = [r for r in requests if r.uri == image_uri and r.method == "GET"]
    if not mine:
        raise ValueError(f"the boot made no request for {image_uri}")
    t0 = min(r.start for r in mine)
    reads = []
    for r in sorted(mine, key=lambda r: r.start):
        m = _RANGE.match(r.range)
        if m:
            first, last = int(m.group(1)), int(m.group(2))
            reads.append(Read(r.start - t0, first, last - first + 1, r.duration))
    return Trace(sha256, size, root_wall - t0, tuple(reads))


def synthetic(image_size: int, sha256: str, *, reads: int = 40, length: int = 128 << 10, gap: float = 0.02,
              seed: int = 17) -> Trace:  # fmt: skip
    """A boot-like trace without QEMU (for the benchmark's own test): ``reads`` reads of ``length`` at
    random places, ``gap`` seconds apart, root mounted after the last."""
    rnd = random.Random(seed)
    out = [Read(i * gap, rnd.randrange(0, max(1, image_size - length)), length) for i in range(reads)]
    return Trace(sha256, image_size, reads * gap, tuple(out), origin="synthetic")


def record(qcow2: Path, sha256: str, work: Path) -> Trace:
    """Boot ``qcow2`` once in lazy mode in QEMU (TCG) from nginx on the loopback; its trace (also saved)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "qemu-tests"))
    from bkharness import pieces
    from bkharness.guest import ConsoleLine, qemu_pxe
    from bkharness.netboot import publish
    from bkharness.proof import expect_clean_poweroff, expect_proof
    from bkharness.servers import free_port

    from bench.fleetlib import servers
    from bootkit.fetch import Manifest

    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "disk.qcow2.manifest"
    Manifest.build(str(qcow2)).write(str(manifest))
    initrd = pieces.initrd(work / "initrd.img", systemd=True, drivers=("virtio_net",))
    kernel = pieces.kernel()
    www = publish(work / "www", {"vmlinuz": Path(kernel.vmlinuz), "initrd.img": initrd, "disk.qcow2": qcow2,
                                 "disk.qcow2.manifest": manifest})  # fmt: skip
    port = free_port()
    body = f"    sendfile on;\n    server {{\n        listen 127.0.0.1:{port};\n        root {www};\n    }}\n"
    mounted: list[float] = []

    def on_line(line: ConsoleLine) -> None:
        if not mounted and re.search(r"bootkit: \[\s*[\d.]+\] mount: ", line.text):
            mounted.append(time.time())

    with servers.nginx(work / "nginx", body) as access_log:
        tftp = pieces.pxe_tree(work / "pxe", base_url=f"http://10.0.2.2:{port}/", docroot=www,
                               extra=["--mode", "lazy", "--manifest", "disk.qcow2.manifest"])  # fmt: skip
        with qemu_pxe(tftp, "boot.ipxe", log_dir=work, memory_mib=1536, name="fleet-trace", boot_timeout=900,
                      on_line=on_line) as vm:  # fmt: skip
            expect_proof(vm, 900)
            expect_clean_poweroff(vm)
        requests = servers.read_log(access_log)
    if not mounted:
        raise RuntimeError("the trace boot never printed bootkit's mount: line")
    trace = from_requests(requests, "/disk.qcow2", sha256, qcow2.stat().st_size, mounted[0])
    trace.save(trace_path(qcow2, sha256))
    return trace
