"""One boot storm: N clients of one mode against a fresh origin (and rack cache) on the emulated network,
and the figures of one table row.

Modes are a fetch mode (``ram``, ``lazy``, ``stream``) and a tier (``origin``: the clients ask the origin;
``rack``: they ask a rack cache, nginx ``proxy_cache`` + ``slice``, which asks the origin). Each run starts
its servers afresh (a cold rack cache, an empty origin log) in the testbed's namespaces.

Hook for warm-cache boots (a local copy of the image from an earlier boot, another helper's work, not on this
branch): add a fetch mode here and a branch in :func:`bench.fleetlib.clients._boot` that opens the copy.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.fleetlib import clients, netem, servers
from bench.fleetlib.trace import Trace

CHUNK = 1 << 20
COLLECT_PORT = 8070


class Mode(enum.StrEnum):
    """What the clients do and whom they ask."""

    ram = "ram"
    lazy = "lazy"
    stream = "stream"
    lazy_rack = "lazy+rack"
    stream_rack = "stream+rack"
    ram_rack = "ram+rack"

    @property
    def fetch(self) -> str:
        return self.value.split("+")[0]

    @property
    def rack(self) -> bool:
        return self.value.endswith("+rack")

    def bytes_needed(self, trace: Trace) -> int:
        """What one client must receive before its root: the whole image (ram) or the chunks the boot reads."""
        return trace.image_size if self.fetch == "ram" else trace.bytes_needed(CHUNK)


@dataclass(frozen=True)
class Image:
    """The image as the origin serves it: ``docroot/images/disk.qcow2`` with its manifest and sidecar."""

    docroot: Path
    sha256: str
    manifest_sha256: str
    size: int


def publish(qcow2: Path, sha256: str, docroot: Path) -> Image:
    """Link ``qcow2`` into ``docroot/images/`` with its manifest and ``.sha256`` (as ``bootkit publish`` would)."""
    from bootkit.fetch import Manifest

    d = docroot / "images"
    d.mkdir(parents=True, exist_ok=True)
    target = d / "disk.qcow2"
    if not target.exists():
        try:
            os.link(qcow2, target)
        except OSError:
            import shutil

            shutil.copyfile(qcow2, target)
    manifest = d / "disk.qcow2.manifest"
    Manifest.build(str(target)).write(str(manifest))
    (d / "disk.qcow2.sha256").write_text(f"{sha256}  disk.qcow2\n")
    from bench.fleetlib.trace import file_sha256

    return Image(docroot, sha256, file_sha256(manifest), target.stat().st_size)


@dataclass(frozen=True)
class Row:
    """The figures of one mode at one N (seconds, bytes)."""

    mode: str
    n: int
    p50: float | None
    p95: float | None
    max: float | None
    origin_bytes: int
    client_bytes: int
    limit: float
    failed: int
    reports: int
    fill_p95: float | None
    errors: tuple[str, ...] = ()
    #: the median over the clients of each replayed read's wait (ms), in trace order: where the time went
    read_ms: tuple[int, ...] = ()

    @property
    def origin_per_client(self) -> int:
        return self.origin_bytes // max(1, self.n)

    @property
    def per_client(self) -> int:
        return self.client_bytes // max(1, self.n)


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank percentile (p in 0..100) of ``values``."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def physical_limit(trace: Trace, mode: Mode, n: int, shaping: netem.Shaping) -> float:
    """max(the trace's own time to root, N x bytes needed / uplink rate); ram mode has no trace pauses to
    wait for, so its limit is the transfer alone."""
    transfer = n * mode.bytes_needed(trace) / shaping.bytes_per_s
    return transfer if mode.fetch == "ram" else max(trace.own_time(), transfer)


def _ram_dir() -> str | None:
    """A tmpfs for the clients' copies (/dev/shm), or None (the default temporary directory)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def storm(tb: netem.Testbed, image: Image, trace: Trace, mode: Mode, n: int, work: Path,
          timeout: float = 600.0, fill_rate: int | None = None) -> Row:  # fmt: skip
    """Run one storm of ``n`` clients of ``mode`` (stream: fill capped at ``fill_rate`` bytes/s); its row."""
    from bootkit.host.fleet import read_reports

    run_dir = work / f"{mode.value.replace('+', '-')}-{n}"
    run_dir.mkdir(parents=True)
    origin_cmd = tb.exec(tb.origin, [])
    reads = trace.to_root()
    pauses = tuple(trace.pauses(reads))
    with contextlib.ExitStack() as stack:
        # the clients keep their copies (ram's download, stream's fill) in RAM, as a booting machine does
        # under /run: on a disk, 64 copies at once meet the kernel's dirty-page throttling instead of the network
        shm = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-fleet.", dir=_ram_dir()))
        origin_log = stack.enter_context(servers.nginx(
            run_dir / "origin", servers.origin_conf(f"{netem.ORIGIN_ADDR}:80", image.docroot),
            netns_cmd=origin_cmd))  # fmt: skip
        reports_dir = stack.enter_context(servers.collector(
            run_dir / "reports", f"{netem.ORIGIN_ADDR}:{COLLECT_PORT}", netns_cmd=origin_cmd))  # fmt: skip
        host = netem.ORIGIN_ADDR
        if mode.rack:
            stack.enter_context(servers.nginx(
                run_dir / "cache", servers.cache_conf(f"{netem.CACHE_ADDR}:80", f"{netem.ORIGIN_ADDR}:80",
                                                      run_dir / "cache" / "store", run_dir / "cache"),
                netns_cmd=tb.exec(tb.cache, [])))  # fmt: skip
            host = netem.CACHE_ADDR
        jobs = [clients.Job(c, mode.fetch, f"http://{host}/images/disk.qcow2", image.sha256,
                            image.manifest_sha256, reads, pauses, os.path.join(shm, f"c{c.index}"),
                            f"http://{netem.ORIGIN_ADDR}:{COLLECT_PORT}/report", timeout, fill_rate)
                for c in tb.clients[:n]]  # fmt: skip
        outcomes = clients.run_clients(jobs, timeout + 30)
        time.sleep(0.3)  # the last reports and log lines
        origin_bytes = sum(r.sent for r in servers.read_log(origin_log) if r.uri.startswith("/images/"))
        reports = [r for r in read_reports(reports_dir) if r.get("result") == "ok"]
    times = [o.time_to_root for o in outcomes if o.time_to_root is not None]
    fills = [o.fill_s for o in outcomes if o.fill_s is not None]
    errors = tuple(sorted({o.error for o in outcomes if o.error}))[:3]
    return Row(
        mode=mode.value,
        n=n,
        p50=statistics.median(times) if times else None,
        p95=percentile(times, 95) if times else None,
        max=max(times) if times else None,
        origin_bytes=origin_bytes,
        client_bytes=sum(o.received for o in outcomes),
        limit=physical_limit(trace, mode, n, tb.shaping),
        failed=sum(1 for o in outcomes if o.time_to_root is None),
        reports=len(reports),
        fill_p95=percentile(fills, 95) if fills else None,
        errors=errors,
        read_ms=tuple(
            round(statistics.median(o.extra.get(f"read{i}_ms", 0) for o in outcomes if o.time_to_root is not None))
            for i in range(len(reads))
        ) if times and mode.fetch != "ram" else (),
    )
