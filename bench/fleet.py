"""Boot storm: N machines booting at once from one stock nginx, on an emulated network, with bootkit's real
fetch code replaying a real boot's reads (issue 17)::

    python bench/fleet.py [--clients 1,8,32,64] [--modes ram,lazy,stream,lazy+rack] [--uplink-mbit 400]
                          [--rtt-ms 1] [--until root|end] [--pace 1] [--fill-mib M] [--record]
                          [--plot fleet.png] [--bulk-mib 0] [--work DIR]

1. The trace: every range request of one lazy-mode QEMU boot of the Debian/systemd test image, with when
   the root was mounted (bench/fleetlib/trace.py); recorded once and kept next to the cached image, keyed by
   its SHA-256 (``--record`` records it again).
2. The network: namespaces ``bkf<PID>-*``, a bridge, the origin's uplink shaped with htb (``--uplink-mbit``)
   and a bounded queue, netem (``--rtt-ms``) where the kernel has it, a rack cache with the same link, one
   namespace per client (bench/fleetlib/netem.py); all removed at the end, also on an error or Ctrl-C.
3. The servers: nginx with docs/deploy-nginx.md's tested origin and rack-cache blocks; ``bootkit fleet
   collect`` receives each client's boot report.
4. The clients: forked processes, one per machine, each in its namespace, replaying the trace with its pauses
   through ``HTTPSource`` / ``StreamSource`` + fill / ``download`` (bench/fleetlib/clients.py).

Prints the Markdown table (per mode and N: time to root p50/p95/max, bytes from the origin, bytes per client,
the physical limit max(trace's time to root, N x bytes needed / uplink), the ratios), issue 17's targets met
or missed, and writes ``--plot`` (matplotlib: the ``bench`` extra) and artifacts/bench-fleet.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "qemu-tests"))

from bench.fleetlib import netem, storm, table, trace  # noqa: E402

DEFAULT_MODES = "ram,lazy,stream,lazy+rack"
DEFAULT_CLIENTS = "1,8,32,64"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def image_and_trace(record: bool, bulk_mib: int, work: Path) -> tuple[Path, str, trace.Trace]:
    """The cached Debian/systemd test image (QCOW2, zstd) and its boot trace (recorded if missing)."""
    from bkharness import images

    root = images.debian_bulk_image(bulk_mib) if bulk_mib else images.debian_image()
    qcow2 = images.qcow2_image(root.raw, compression="zstd")
    sha = trace.file_sha256(qcow2)
    found = None if record else trace.load(qcow2, sha)
    if found is not None:
        return qcow2, sha, found
    print(f"fleet: recording the boot trace of {qcow2.name} (one lazy-mode QEMU boot) ...", file=sys.stderr,
          flush=True)  # fmt: skip
    return qcow2, sha, trace.record(qcow2, sha, work / "trace")


def run(tr: trace.Trace, qcow2: Path, sha: str, modes: Sequence[storm.Mode], counts: Sequence[int],
        shaping: netem.Shaping, work: Path, fill_rate: int | None = None,
        ) -> tuple[list[storm.Row], str | None]:  # fmt: skip
    """Every storm, smallest N first in each mode, in one testbed sized for the largest N; the rows, and why
    the RTT could not be emulated (or None)."""
    image = storm.publish(qcow2, sha, work / "www")
    rows = []
    with netem.Testbed(shaping, max(counts)) as tb:
        if tb.delay_missing:
            print(f"fleet: WARNING: no added RTT (netem: {tb.delay_missing})", file=sys.stderr, flush=True)
        for mode in modes:
            for n in counts:
                t = time.monotonic()
                row = storm.storm(tb, image, tr, mode, n, work, fill_rate=fill_rate)
                print(f"fleet: {mode} N={n}: p95 {row.p95 if row.p95 is None else round(row.p95, 2)} s, "
                      f"{row.failed} failed ({time.monotonic() - t:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
                rows.append(row)
        return rows, tb.delay_missing


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: everything was cleaned up on the way out
        print(f"fleet: interrupted ({e or 'Ctrl-C'}); namespaces, servers and clients are gone", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0], allow_abbrev=False)
    parser.add_argument("--clients", default=DEFAULT_CLIENTS, help=f"comma-separated N (default {DEFAULT_CLIENTS})")
    parser.add_argument("--modes", default=DEFAULT_MODES,
                        help=f"comma-separated, of {','.join(storm.Mode)} (default {DEFAULT_MODES})")  # fmt: skip
    parser.add_argument("--uplink-mbit", type=float, default=400.0, help="the origin's uplink (Mbit/s)")
    parser.add_argument("--rtt-ms", type=float, default=1.0, help="round-trip time added on the uplink (ms)")
    parser.add_argument("--until", choices=("root", "end"), default="root",
                        help="time to root (default) or to the trace's last read (the whole recorded boot)")
    parser.add_argument("--pace", type=float, default=1.0,
                        help="scale the trace's clock (0.25: a machine 4x faster than the TCG guest recorded)")
    parser.add_argument("--fill-mib", type=float,
                        help="stream mode: each client's fill cap in MiB/s (rd.qcow2.fill-rate; default the boot's)")
    parser.add_argument("--record", action="store_true", help="record the boot trace again (one QEMU boot)")
    parser.add_argument("--bulk-mib", type=int, default=0,
                        help="use bench/bootmodes.py's image with this much bulk data (default: the plain image)")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="write p95 time to root against N per mode")
    parser.add_argument("--work", type=Path, help="keep the run's files (logs, reports) in this directory")
    args = parser.parse_args(argv)
    try:
        modes = [storm.Mode(m) for m in args.modes.split(",") if m]
        counts = sorted({int(n) for n in args.clients.split(",") if n})
    except ValueError as e:
        parser.error(f"--modes/--clients: {e}")
    if not modes or not counts or min(counts) < 1 or max(counts) > 1000:
        parser.error("--modes and --clients (1..1000) must not be empty")
    if args.uplink_mbit <= 0 or args.rtt_ms < 0 or not 0 < args.pace <= 100 or (args.fill_mib or 1) <= 0:
        parser.error("--uplink-mbit and --fill-mib must be > 0, --rtt-ms >= 0, --pace in (0, 100]")
    if os.geteuid() != 0:
        print("error: the benchmark creates network namespaces: run it as root", file=sys.stderr)
        return 2
    if args.plot and (why := table.check_plot()):
        print(f"error: {why}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    shaping = netem.Shaping(args.uplink_mbit, args.rtt_ms)
    load = os.getloadavg()[0]  # other work on the machine slows the clients: the table says how much there was
    with tempfile.TemporaryDirectory(prefix="bench-fleet.") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        qcow2, sha, recorded = image_and_trace(args.record, args.bulk_mib, work)
        tr = recorded.variant(pace=args.pace, through_end=args.until == "end")
        fill_rate = None if args.fill_mib is None else int(args.fill_mib * 2**20)
        rows, no_delay = run(tr, qcow2, sha, modes, counts, shaping, work, fill_rate)
    needed = tr.bytes_needed(storm.CHUNK)
    until = "the trace's last read" if args.until == "end" else "root"
    head = (f"boot storm: {qcow2.name} ({tr.image_size / 2**20:.1f} MiB), trace: {len(tr.to_root())} reads to "
            f"{until}, {needed / 2**20:.1f} MiB of chunks, {until} after {tr.own_time():.2f} s (pace {args.pace:g}); "
            f"uplink {shaping.rate_mbit:g} "
            f"Mbit/s, RTT {'not emulated (no netem)' if no_delay else f'{shaping.delay_ms:g} ms'}; "
            f"{os.cpu_count()} CPUs, load {load:.1f} at start"
            + (f"; stream fill capped at {args.fill_mib:g} MiB/s per client" if args.fill_mib else ""))  # fmt: skip
    print(head + "\n")
    print(table.markdown(rows) + "\n")
    for line in table.verdict(rows, tr.image_size):
        print(line)
    out = ROOT / "artifacts" / "bench-fleet.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"head": head, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    if args.plot:
        table.plot(rows, args.plot, head)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
