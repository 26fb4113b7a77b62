"""bench/fleet.py's building blocks at tiny scale: the namespaces and shaped links, the documented nginx origin
and rack cache, bootkit's fetch code in forked clients replaying a synthetic trace, the reports they send to
``bootkit fleet collect``, the table -- and that no namespace is left behind. No QEMU; no timings asserted.
Needs root (network namespaces, tc) and nginx."""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fleetlib import netem, storm, table, trace

SIZE = 3 * (1 << 20) + 4321


def _need_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and tc")
    for tool in ("ip", "tc", "nginx"):
        if not (shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}")):
            pytest.skip(f"needs {tool}")


def test_trace_pauses_and_needed_bytes() -> None:
    reads = (trace.Read(0.0, 0, 100, 0.5), trace.Read(0.2, 1 << 20, 10, 0.1), trace.Read(1.0, 5, 10, 0.1),
             trace.Read(3.0, 0, 1, 0.0))  # fmt: skip
    tr = trace.Trace("0" * 64, (2 << 20) + 7, 2.0, reads)
    assert tr.to_root() == reads[:3]
    # the second read overlaps the first (no pause); the third starts 0.5 s after the first ended
    assert tr.pauses() == pytest.approx([0.0, 0.0, 0.5])
    assert tr.bytes_needed(1 << 20) == 2 << 20
    assert tr.own_time() == pytest.approx(1.1)
    # the whole boot, on a clock twice as fast: every read counts, the pauses halve
    whole = tr.variant(pace=0.5, through_end=True)
    assert whole.to_root() == tuple(trace.Read(r.t / 2, r.offset, r.length, r.duration / 2) for r in reads)
    assert whole.pauses() == pytest.approx([0.0, 0.0, 0.25, 0.95])
    assert whole.own_time() == pytest.approx(1.5)
    again = trace.Trace.from_json(tr.to_json())
    assert again == tr


def test_storm_at_tiny_scale(tmp_path: Path) -> None:
    _need_netns()
    qcow2 = tmp_path / "image.bin"  # the fetch code never parses it: any bytes do
    qcow2.write_bytes(random.Random(3).randbytes(SIZE))
    sha = trace.file_sha256(qcow2)
    tr = trace.synthetic(SIZE, sha, reads=12, gap=0.01)
    tr.save(trace.trace_path(qcow2, sha))
    assert trace.load(qcow2, sha) == tr
    image = storm.publish(qcow2, sha, tmp_path / "www")
    prefix = f"bkft{os.getpid()}"
    rows = []
    with netem.Testbed(netem.Shaping(200.0, 1.0), 2, prefix=prefix) as tb:
        assert len(netem.namespaces(prefix)) == 5  # switch, origin, cache, 2 clients
        for mode in (storm.Mode.ram, storm.Mode.lazy, storm.Mode.stream, storm.Mode.lazy_rack):
            for n in (1, 2):
                rows.append(storm.storm(tb, image, tr, mode, n, tmp_path / "runs", timeout=60))
    assert netem.namespaces(prefix) == [], "namespaces left behind"
    for row in rows:
        assert row.failed == 0, (row.mode, row.n, row.errors)
        assert row.reports == row.n, row  # every client's report reached bootkit fleet collect
        assert row.p50 is not None and row.p95 is not None and row.max is not None
        assert 0 < row.p50 <= row.p95 <= row.max
        assert row.limit > 0
    by = {(r.mode, r.n): r for r in rows}
    # ram: each client the whole image (plus its sidecar); the origin sent each of them the image
    assert by["ram", 2].per_client == SIZE
    assert by["ram", 2].origin_bytes >= 2 * SIZE
    # lazy: at least the chunks the trace touches, at most the image
    assert tr.bytes_needed(storm.CHUNK) <= by["lazy", 1].per_client <= SIZE
    # stream: the fill brings the whole image to each client
    assert by["stream", 2].per_client == SIZE and by["stream", 2].fill_p95 is not None
    # rack cache: the second client's chunks come from the cache, the origin sends about one copy
    rack = by["lazy+rack", 2]
    assert rack.client_bytes >= 2 * tr.bytes_needed(storm.CHUNK)
    assert rack.origin_bytes < rack.client_bytes
    text = table.markdown(rows)
    header = text.splitlines()[0]
    for column in table.COLUMNS:
        assert f" {column} |" in header
    assert len(text.splitlines()) == 2 + len(rows)
    assert any(line.startswith("lazy+rack N=2: origin bytes per client") for line in table.verdict(rows, SIZE))
