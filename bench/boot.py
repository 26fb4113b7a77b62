"""Boot-time benchmark: bootkit's netboot against dracut's own network roots and three local-disk floors.

Same guest (QEMU TCG, 1 vCPU, same RAM), same kernel, same root content, one run::

    python bench/boot.py [--root busybox|debian] [--runs N] [--only KEY,...]

The rows (qemu-tests/bkharness/bootrows.py): floor A (a bare busybox initramfs mounts the root from a local
virtio disk),
floor B (dracut ``base`` + ``rootfs-block``, only the disk drivers, the same disk), floor C (floor B with
dracut's network handler bringing the boot NIC up from the handed-over static configuration before it mounts
the same disk: what dracut's network costs before any network root starts), dracut's NBD root
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
from typing import Any

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
    boot_floor_c,
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
    if row.kind is Kind.floor_c:
        return boot_floor_c(setup, row, d), False
    if row.is_peer:
        return boot_peer(setup, row, d), False
    return boot_bootkit(setup, row, d)


def _median(results: list[Result], key: str) -> float:
    return statistics.median(float(getattr(r, key)) for r in results)


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}" if base else "-"


#: the three clocks of the table: (Result attribute, column title)
CLOCKS = (
    ("guest_target_s", "guest s"),
    ("host_kernel_s", "host s from kernel"),
    ("host_target_s", "host s from QEMU start"),
)


def table(rows: list[Row], results: dict[Row, list[Result]]) -> list[str]:
    """The markdown table: each clock's median and its ratios to floor A, floor B and the best peer."""
    have = [r for r in rows if results[r]]

    def best(pick: list[Row], key: str) -> float | None:
        vals = [_median(results[r], key) for r in pick if r in have]
        return min(vals) if vals else None

    groups = {
        "A": [r for r in rows if r.kind is Kind.floor_a],
        "B": [r for r in rows if r.kind is Kind.floor_b],
        "peer": [r for r in rows if r.is_peer and r.net is Net.dhcp],
    }
    head = "| boot |" + "".join(f" {title} | ÷ A | ÷ B | ÷ peer |" for _, title in CLOCKS)
    out = [head, "|---|" + "---:|" * (4 * len(CLOCKS))]
    for r in have:
        cells = []
        for key, _ in CLOCKS:
            v = _median(results[r], key)
            cells += [f"{v:.2f}", *(_ratio(v, best(g, key)) for g in groups.values())]
        out.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return out


def stage_table(rows: list[Row], results: dict[Row, list[Result]]) -> list[str]:
    """Guest-clock seconds at which each stage's console line appeared (median over runs), per row, and the
    guest CPU seconds the boot used until the target (one vCPU: the clock minus the idle time)."""
    out = ["| boot | " + " | ".join(STAGES) + " | CPU busy |", "|---|" + "---:|" * (len(STAGES) + 1)]
    for r in rows:
        if not results[r]:
            continue
        cells = []
        for stage in STAGES:
            vals = [s[stage]["guest_s"] for s in (x.stages for x in results[r]) if stage in s]
            nums = [v for v in vals if v is not None]
            cells.append(f"{statistics.median(nums):.2f}" if nums else "-")
        busy = [b for b in (x.guest_busy_s for x in results[r]) if b is not None]
        cells.append(f"{statistics.median(busy):.2f}" if busy else "-")
        out.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return out


def targets(rows: list[Row], results: dict[Row, list[Result]], systemd: bool) -> list[str]:
    """The issue's targets for bootkit with the lease handed over in the root's flavour, on the guest clock
    and on the host's measure of the same span."""
    out: list[str] = []
    for key, title in CLOCKS[:2]:
        def best(pick: list[Row], key: str = key) -> float | None:
            have = [_median(results[r], key) for r in pick if results[r]]
            return min(have) if have else None

        lease = best([r for r in rows if r.kind is Kind.bootkit and r.net is Net.lease and r.systemd == systemd])
        floor_a = best([r for r in rows if r.kind is Kind.floor_a])
        floor_b = best([r for r in rows if r.kind is Kind.floor_b])
        floor_c = best([r for r in rows if r.kind is Kind.floor_c])
        peer = best([r for r in rows if r.is_peer and r.net is Net.dhcp])
        if lease is None:
            return out
        if floor_b is not None:
            out.append(f"{title}: bootkit lease / floor B = {lease / floor_b:.2f} (target <= 1.40: "
                       f"{'met' if lease / floor_b <= 1.4 else 'NOT met'})")
        if floor_b is not None and floor_c is not None:
            out.append(f"{title}: floor C / floor B = {floor_c / floor_b:.2f} (dracut's network bring-up alone); "
                       f"bootkit lease / floor C = {lease / floor_c:.2f}")
        if peer is not None:
            out.append(f"{title}: faster dracut peer (ip=dhcp) / bootkit lease = {peer / lease:.2f} "
                       f"(target >= 1.50: {'met' if peer / lease >= 1.5 else 'NOT met'})")
        if floor_a is not None:
            out.append(f"{title}: bootkit lease / floor A = {lease / floor_a:.2f}")
    return out


def report(meta: dict[str, Any], rows: list[Row], results: dict[Row, list[Result]]) -> str:
    """The whole printed report: what ran, the table, the stage breakdown, the targets."""
    load = meta["load_average"]
    head = (f"boot to target, {meta['root']} root, {meta['image']} ({meta['image_mib']:.1f} MiB), TCG, "
            f"{meta['memory_mib']} MiB, median of {meta['runs']}; lease handover from {meta['lease_handover']}; "
            f"load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; whole run {meta['elapsed_s']:.0f} s")
    return "\n".join([head, "", *table(rows, results), "", "guest seconds at each stage:", "",
                      *stage_table(rows, results), "", *targets(rows, results, meta["root"] == "debian")])


def from_json(path: Path) -> tuple[dict[str, Any], list[Row], dict[Row, list[Result]]]:
    """A saved run (artifacts/bench-boot.json) read back, to print its report again."""
    data = json.loads(path.read_text())
    by_key = {r.key: r for r in rows_for(data["root"] == "debian")}
    rows = [by_key[x["key"]] for x in data["rows"]]
    results = {by_key[x["key"]]: [Result.from_json(r) for r in x["results"]] for x in data["rows"]}
    return data, rows, results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0], allow_abbrev=False)
    parser.add_argument("--root", choices=("busybox", "debian"), default="busybox")
    parser.add_argument("--compression", choices=("deflate", "zstd"), default="zstd")
    parser.add_argument("--runs", type=int, default=1, help="boots of each row (median reported)")
    parser.add_argument("--only", default="", help="comma-separated row keys to boot (default: all)")
    parser.add_argument("--table-from", type=Path, metavar="JSON",
                        help="print the report of a saved run (artifacts/bench-boot.json) and boot nothing")
    args = parser.parse_args(argv)
    if args.table_from is not None:
        print(report(*from_json(args.table_from)))
        return 0
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

    meta: dict[str, Any] = {
        "root": args.root,
        "image": qcow2.name,
        "image_mib": round(qcow2.stat().st_size / 2**20, 1),
        "memory_mib": MEMORY_MIB,
        "runs": args.runs,
        "lease_handover": handover,
        "load_average": os.getloadavg(),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    out = artifacts_dir() / "bench-boot.json"
    out.write_text(json.dumps({
        **meta,
        "rows": [{"key": r.key, "label": r.label, "results": [x.to_json() for x in results[r]]} for r in rows],
    }, indent=2) + "\n")
    print("\n" + report(meta, rows, results))
    print(f"\n(details: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
