"""Boot-storm clients: each a forked process in its own network namespace that "boots" by replaying a trace
with bootkit's real fetch code, and reports like a booted machine does (``rd.qcow2.report``).

* ``ram``: :func:`bootkit.fetch.download` of the whole image, verified against its sidecar ``.sha256``
  (time to root: download and verification complete -- the boot's part after that is local);
* ``lazy``: the trace's reads through :class:`bootkit.fetch.HTTPSource` (1 MiB chunks, read-ahead, each
  chunk verified against the manifest, whose hash is pinned), with the trace's pauses;
* ``stream``: the same through :class:`bootkit.fetch.stream.StreamSource`, with the boot's fill copying the
  whole image into a local directory behind the reads at the boot's default rate cap (or ``--fill-mib``, as
  ``rd.qcow2.fill-rate`` would set it); the client ends when
  the fill is complete; the fill starts when the client reaches its root, as the boot's fill starts once the root
  is mounted (a real machine goes on filling after that, competing with the others).

Processes, not threads: the clients (hashing, HTTP parsing) use both cores. They are forked after the
parent has prepared everything, wait for one start event, and put one :class:`Outcome` on a queue.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.fleetlib import netem
from bench.fleetlib.trace import Read


@dataclass(frozen=True)
class Job:
    """What one client does: ``fetch`` (ram, lazy, stream) of ``url`` by the trace's ``reads`` and
    ``pauses``; the manifest's and the image's SHA-256 are pinned as ``pxe-config`` pins them."""

    client: netem.Client
    fetch: str
    url: str
    image_sha256: str
    manifest_sha256: str
    reads: tuple[Read, ...]
    pauses: tuple[float, ...]
    workdir: str
    report_url: str | None = None
    timeout: float = 600.0
    #: stream mode's fill cap (bytes/s, ``rd.qcow2.fill-rate``); None: the boot's default
    fill_rate: int | None = None


@dataclass(frozen=True)
class Outcome:
    """One client's result: time to root (s since the common start) or the error; bytes it received."""

    index: int
    time_to_root: float | None
    received: int
    requests: int
    error: str | None = None
    fill_s: float | None = None
    extra: dict[str, int] = field(default_factory=dict)


def _options(job: Job) -> Any:
    from bootkit.fetch import FetchOptions

    # the boot's settings, except RAM reserve (the benchmark's clients share one machine) and quiet progress
    verify = {"ram": "sidecar"}.get(job.fetch, "pinned")
    return FetchOptions(sha256=None if verify == "sidecar" else job.image_sha256, verify=verify,
                        reserve_bytes=0, progress_interval=3600.0, timeout=60.0, total_timeout=job.timeout)  # fmt: skip


def _replay(source: Any, job: Job) -> dict[str, int]:
    """The trace's reads with their pauses; each read's wait in ms (``read<i>_ms``), for where time goes."""
    waits = {}
    for i, (read, pause) in enumerate(zip(job.reads, job.pauses, strict=True)):
        if pause > 0:
            time.sleep(pause)
        t = time.monotonic()
        source.pread(read.offset, read.length)
        waits[f"read{i}_ms"] = round((time.monotonic() - t) * 1000)
    return waits


def _boot(job: Job, t0: float) -> Outcome:
    from bootkit.fetch import HTTPSource, Manifest, download

    options = _options(job)
    index = job.client.index
    if job.fetch == "ram":
        dest = os.path.join(job.workdir, "disk.qcow2")
        result = download(job.url, dest, options)
        ttr = time.monotonic() - t0
        os.unlink(dest)
        return Outcome(index, ttr, result.size, 1)
    manifest = Manifest.load(job.url + ".manifest", options, sha256=job.manifest_sha256)
    with HTTPSource(job.url, options, manifest=manifest) as remote:
        if job.fetch == "lazy":
            waits = _replay(remote, job)
            ttr = time.monotonic() - t0
            stats = {**remote.stats, **waits}
            return Outcome(index, ttr, stats.get("bytes", 0), stats.get("requests", 0), extra=stats)
        if job.fetch != "stream":
            raise ValueError(f"unknown fetch mode {job.fetch!r}")
        from bootkit.boot.cmdline import DEFAULT_FILL_RATE
        from bootkit.fetch.stream import StreamSource, start_fill

        source = StreamSource(remote)
        rate = DEFAULT_FILL_RATE if job.fill_rate is None else job.fill_rate
        # as at boot, the fill starts once the root is mounted: here, once the client's reads up to its root are
        # done (with --until end that is after the trace's last read)
        mounted = threading.Event()
        fill = start_fill([source], os.path.join(job.workdir, "fill"), rate=rate, reserve=0, gate=mounted.is_set)
        try:
            waits = _replay(source, job)
            ttr = time.monotonic() - t0
            mounted.set()
            fill.done.wait(job.timeout)
            fill_s = time.monotonic() - t0
            if fill.error:
                raise RuntimeError(f"fill: {fill.error}")
        finally:
            fill.stop()
            source.close()
        stats = {**remote.stats, **waits}
        return Outcome(index, ttr, stats.get("bytes", 0), stats.get("requests", 0), fill_s=fill_s, extra=stats)


def _report(job: Job, outcome: Outcome) -> None:
    """Send the boot report a machine sends (``rd.qcow2.report``), with the client's own clock as uptime."""
    from bootkit.boot import report

    if job.report_url is None:
        return
    mode = job.fetch
    if outcome.error is None and outcome.time_to_root is not None:
        body = report.build_report(job.url, mode, {"mount": outcome.time_to_root}, None, job.client.mac, None,
                                   uptime=outcome.time_to_root)  # fmt: skip
    else:
        body = report.build_report(job.url, mode, {}, f"FAILED at fetch: {outcome.error}", job.client.mac, None)
    report.post(job.report_url, body, timeout=5.0)


def _child(job: Job, start: Any, results: Any) -> None:
    """The forked client: into its namespace, wait for the start, boot, report, put the outcome."""
    outcome: Outcome
    try:
        netem.enter(job.client.netns)
        os.makedirs(job.workdir, exist_ok=True)
        start.wait()
        t0 = time.monotonic()
        try:
            outcome = _boot(job, t0)
        except Exception as e:
            outcome = Outcome(job.client.index, None, 0, 0, error=f"{type(e).__name__}: {e}")
        _report(job, outcome)
    except BaseException as e:  # the parent must hear from every child
        outcome = Outcome(job.client.index, None, 0, 0, error=f"{type(e).__name__}: {e}: "
                          + traceback.format_exc(limit=3)[-300:])  # fmt: skip
    finally:
        shutil.rmtree(job.workdir, ignore_errors=True)
    results.put(outcome)


def run_clients(jobs: Sequence[Job], timeout: float) -> list[Outcome]:
    """Fork one process per job, start them together, collect their outcomes (missing ones as errors)."""
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    results: Any = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(job, start, results), name=f"fleet-client-{job.client.index}")
             for job in jobs]  # fmt: skip
    outcomes: dict[int, Outcome] = {}
    grace = 0.0  # an interrupt or error stops the clients at once; a finished storm lets them exit
    try:
        for p in procs:
            p.start()
        time.sleep(0.2)  # let the last forks settle into their namespaces before the clock starts
        start.set()
        deadline = time.monotonic() + timeout
        while len(outcomes) < len(jobs):
            try:
                o = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            outcomes[o.index] = o
        grace = 10.0
    finally:
        for p in procs:
            p.join(timeout=grace)
            if p.is_alive():  # a client that did not finish in time: ours, stopped by its process handle
                p.kill()
                p.join()
    return [outcomes.get(job.client.index) or Outcome(job.client.index, None, 0, 0, error="no result (timeout)")
            for job in jobs]  # fmt: skip
