"""Boot-time benchmark: bootkit's netboot against dracut's own network roots and two local-disk floors.

Same guest (QEMU TCG, 1 vCPU, same RAM), same kernel, same root content, one run::

    python bench/boot.py [--root busybox|debian] [--runs N] [--only KEY,...]

The rows (qemu-tests/bkharness/bootrows.py): floor A (a bare busybox initramfs mounts the root from a local
virtio disk),
floor B (dracut ``base`` + ``rootfs-block``, only the disk drivers, the same disk), dracut's NBD root
(``nbd`` module, ``nbd-client`` against ``qemu-nbd --read-only`` serving the same QCOW2), dracut's livenet
(``root=live:`` of the same tree as squashfs), both peers once with ``ip=dhcp`` and once with the static
configuration the lease handover gives; bootkit with iPXE's lease handed to the kernel (shell and systemd
initramfs) and bootkit with DHCP in the initramfs. Floor B and the peers use the root's flavour (busybox:
shell, debian: systemd). Every initramfs is built once per run.

The figure compared is "target reached": the guest's monotonic clock when the root's proof ran (kernel start
to a running system), and the host's wall clock from QEMU's start. It prints each row's ratio to floor A,
floor B and the faster peer as usually configured (ip=dhcp), bootkit's stage breakdown, and writes
artifacts/bench-boot.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "qemu-tests"))

from bkharness import images, pieces
from bkharness.bootrows import (
    MEMORY_MIB,
    Kind,
    Net,
    Result,
    Row,
    Setup,
    boot_bootkit,
    boot_floor_a,
    boot_floor_b,
    boot_peer,
    rows_for,
)
from bkharness.paths import artifacts_dir

#: bootkit's stages in boot order, as bkharness.timeline names them
STAGES = ("kernel", "network", "download", "attach", "mount", "switch_root", "target")


def boot_row(setup: Setup, row: Row, d: Path) -> tuple[Result, bool]:
    """Boot ``row`` once; the flag says whether pxe-config's own lease handover was used."""
    if row.kind is Kind.floor_a:
        return boot_floor_a(setup, row, d), False
    if row.kind is Kind.floor_b:
        return boot_floor_b(setup, row, d), False
    if row.is_peer:
        return boot_peer(setup, row, d), False
    return boot_bootkit(setup, row, d)


def _median(results: list[Result], key: str) -> float:
    return statistics.median(float(getattr(r, key)) for r in results)


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}" if base else "-"


def table(rows: list[Row], results: dict[Row, list[Result]]) -> list[str]:
    """The markdown table: guest and host clocks and their ratios to floor A, floor B and the best peer."""
    med = {r: (_median(results[r], "guest_target_s"), _median(results[r], "host_target_s"))
           for r in rows if results[r]}

    def base(pick: list[Row]) -> tuple[float | None, float | None]:
        have = [med[r] for r in pick if r in med]
        return (min(g for g, _ in have), min(h for _, h in have)) if have else (None, None)

    floor_a = base([r for r in rows if r.kind is Kind.floor_a])
    floor_b = base([r for r in rows if r.kind is Kind.floor_b])
    peer = base([r for r in rows if r.is_peer and r.net is Net.dhcp])
    out = [
        "| boot | guest s | ÷ A | ÷ B | ÷ peer | host s | ÷ A | ÷ B | ÷ peer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r not in med:
            continue
        g, h = med[r]
        out.append(f"| {r.label} | {g:.2f} | {_ratio(g, floor_a[0])} | {_ratio(g, floor_b[0])} | "
                   f"{_ratio(g, peer[0])} | {h:.2f} | {_ratio(h, floor_a[1])} | {_ratio(h, floor_b[1])} | "
                   f"{_ratio(h, peer[1])} |")
    return out


def stage_table(rows: list[Row], results: dict[Row, list[Result]]) -> list[str]:
    """Guest-clock seconds at which each stage's console line appeared (median over runs), per row."""
    out = ["| boot | " + " | ".join(STAGES) + " |", "|---|" + "---:|" * len(STAGES)]
    for r in rows:
        if not results[r]:
            continue
        cells = []
        for stage in STAGES:
            vals = [s[stage]["guest_s"] for s in (x.stages for x in results[r]) if stage in s]
            nums = [v for v in vals if v is not None]
            cells.append(f"{statistics.median(nums):.2f}" if nums else "-")
        out.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return out


def targets(rows: list[Row], results: dict[Row, list[Result]], systemd: bool) -> list[str]:
    """The issue's targets for bootkit with the lease handed over, in the root's flavour."""
    def guest(pick: list[Row]) -> float | None:
        have = [_median(results[r], "guest_target_s") for r in pick if results[r]]
        return min(have) if have else None

    lease = guest([r for r in rows if r.kind is Kind.bootkit and r.net is Net.lease and r.systemd == systemd])
    floor_a = guest([r for r in rows if r.kind is Kind.floor_a])
    floor_b = guest([r for r in rows if r.kind is Kind.floor_b])
    peer = guest([r for r in rows if r.is_peer and r.net is Net.dhcp])
    if lease is None:
        return []
    out = []
    if floor_b is not None:
        out.append(f"bootkit lease / floor B = {lease / floor_b:.2f} (target <= 1.40: "
                   f"{'met' if lease / floor_b <= 1.4 else 'NOT met'})")
    if peer is not None:
        out.append(f"faster dracut peer (ip=dhcp) / bootkit lease = {peer / lease:.2f} (target >= 1.50: "
                   f"{'met' if peer / lease >= 1.5 else 'NOT met'})")
    if floor_a is not None:
        out.append(f"bootkit lease / floor A = {lease / floor_a:.2f}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0], allow_abbrev=False)
    parser.add_argument("--root", choices=("busybox", "debian"), default="busybox")
    parser.add_argument("--compression", choices=("deflate", "zstd"), default="zstd")
    parser.add_argument("--runs", type=int, default=1, help="boots of each row (median reported)")
    parser.add_argument("--only", default="", help="comma-separated row keys to boot (default: all)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs: at least 1")

    systemd = args.root == "debian"
    rows = rows_for(systemd)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {r.key for r in rows}
        if unknown:
            parser.error(f"--only: unknown rows {', '.join(sorted(unknown))} "
                         f"(rows: {', '.join(r.key for r in rows)})")
        rows = [r for r in rows if r.key in wanted]

    started = time.monotonic()
    kernel = pieces.kernel()
    image = images.root_image(args.root)
    qcow2 = images.qcow2_image(image.raw, compression=args.compression)
    results: dict[Row, list[Result]] = {r: [] for r in rows}
    handover = "stand-in"
    # the run's initramfs images and every boot's logs, kept until the next run (a failed boot's console)
    work = artifacts_dir() / "bench-boot"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    setup = Setup(kernel, image, qcow2, work)
    for run in range(args.runs):
        for row in rows:
            d = setup.work / f"{row.key}-{run}"
            d.mkdir()
            print(f"bench: run {run + 1}/{args.runs}: {row.label} ...", file=sys.stderr, flush=True)
            result, native = boot_row(setup, row, d)
            if native:
                handover = "pxe-config"
            results[row].append(result)
            print(f"bench:   guest {result.guest_target_s:.2f} s, host {result.host_target_s:.2f} s",
                  file=sys.stderr, flush=True)
    elapsed = time.monotonic() - started

    load = os.getloadavg()
    print(f"\nboot to target, {args.root} root, {qcow2.name} ({qcow2.stat().st_size / 2**20:.1f} MiB), "
          f"TCG, {MEMORY_MIB} MiB, median of {args.runs}; lease handover from {handover}; "
          f"load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; whole run {elapsed:.0f} s")
    print("\n".join(["", *table(rows, results), "", "guest seconds at each stage:", "",
                     *stage_table(rows, results), "", *targets(rows, results, systemd)]))
    out = artifacts_dir() / "bench-boot.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "root": args.root,
        "image": qcow2.name,
        "memory_mib": MEMORY_MIB,
        "runs": args.runs,
        "lease_handover": handover,
        "load_average": load,
        "elapsed_s": round(elapsed, 1),
        "rows": [{"key": r.key, "label": r.label, "results": [x.to_json() for x in results[r]]} for r in rows],
    }, indent=2) + "\n")
    print(f"\n(details: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
