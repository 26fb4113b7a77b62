"""Boot-time benchmark: a bootkit netboot against the same root file system on a local virtio disk.

Same guest (QEMU TCG, 1 vCPU, same RAM), same kernel, same root image content, one run::

    python bench/boot.py [--root busybox|debian] [--runs N]

Three boots per run:

* ``local-disk``  the floor: ``-kernel`` + a tiny busybox initramfs that loads virtio_blk/ext4 and mounts the
  root partition of the raw disk on a virtio-blk device, then switches to it;
* ``bootkit-direct``  ``-kernel``/``-initrd`` with bootkit's initramfs and the kernel line ``pxe-config``
  wrote (DHCP, HTTP download, NBD, overlay), firmware and bootloader skipped;
* ``bootkit-pxe``  the whole netboot: BIOS PXE, iPXE, kernel and initramfs over HTTP, then as above.

The figure compared is "target reached": the guest's monotonic clock when the root's proof ran (kernel start
to a running system), and the host's wall clock from QEMU's start (firmware included). It prints a table
with the ratio to the floor and writes artifacts/bench-boot.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "qemu-tests"))

from bkharness import images, pieces
from bkharness.guest import GUEST_KERNEL_ARGS, Guest, qemu_direct
from bkharness.initramfs import LOCAL_DISK_INIT, tiny_initramfs
from bkharness.netboot import netboot, publish
from bkharness.paths import artifacts_dir
from bkharness.proof import Proof, expect_clean_poweroff, expect_proof
from bkharness.servers import http_server
from bkharness.timeline import stage_times

LOCAL_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
MEMORY_MIB = 1024


def _result(vm: Guest, proof: Proof, host_s: float) -> dict[str, object]:
    stages = stage_times(vm.lines)
    return {
        "guest_target_s": proof.uptime,
        "host_target_s": round(host_s, 2),
        "stages": {s.name: {"host_s": s.host_s, "guest_s": s.guest_s} for s in stages},
    }


def boot_local(kernel: Any, image: images.RootImage, work: Path) -> dict[str, object]:
    cpio = tiny_initramfs(work / "local.cpio", LOCAL_DISK_INIT, kmoddir=kernel.kmoddir,
                          modules=LOCAL_MODULES)
    with qemu_direct(kernel.vmlinuz, cpio, " ".join(GUEST_KERNEL_ARGS), disks=[image.raw],
                     memory_mib=MEMORY_MIB, log_dir=work, name="local-disk") as vm:
        proof = expect_proof(vm, 600)
        host = vm.first_time(r"^BOOTKIT-PROOF ") or vm.elapsed
        expect_clean_poweroff(vm)
    assert proof.sha256 == image.known_sha256, "local disk: wrong data"
    return _result(vm, proof, host)


def _kernel_args(tftp: Path) -> str:
    """The kernel line pxe-config wrote into boot.ipxe, without iPXE's initrd= (not needed with -initrd)."""
    for line in (tftp / "boot.ipxe").read_text().splitlines():
        if line.startswith("kernel "):
            words = shlex.split(line.split("||")[0])[2:]
            return " ".join(w for w in words if not w.startswith("initrd="))
    raise RuntimeError(f"{tftp}/boot.ipxe: no kernel line")


def boot_bootkit_direct(kernel: Any, initrd: Path, qcow2: Path, image: images.RootImage,
                        work: Path) -> dict[str, object]:
    www = publish(work / "www", {"disk.qcow2": qcow2})
    with http_server(www, log_dir=work) as web:
        tftp = pieces.pxe_tree(work / "pxe", base_url=web.guest_url + "/", docroot=publish(
            www, {"vmlinuz": kernel.vmlinuz, "initrd.img": initrd}))
        with qemu_direct(kernel.vmlinuz, initrd, _kernel_args(tftp), memory_mib=MEMORY_MIB,
                         log_dir=work, name="bootkit-direct") as vm:
            proof = expect_proof(vm, 600)
            host = vm.first_time(r"^BOOTKIT-PROOF ") or vm.elapsed
            expect_clean_poweroff(vm)
    assert not proof.problems(image), proof.problems(image)
    return _result(vm, proof, host)


def boot_bootkit_pxe(kernel: Any, initrd: Path, qcow2: Path, image: images.RootImage,
                     work: Path) -> dict[str, object]:
    with netboot(kernel, initrd, qcow2, work=work, memory_mib=MEMORY_MIB, name="bootkit-pxe") as boot:
        proof = expect_proof(boot.vm, 600)
        host = boot.vm.first_time(r"^BOOTKIT-PROOF ") or boot.vm.elapsed
        expect_clean_poweroff(boot.vm)
    assert not proof.problems(image), proof.problems(image)
    return _result(boot.vm, proof, host)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--root", choices=("busybox", "debian"), default="busybox")
    parser.add_argument("--compression", choices=("deflate", "zstd"), default="zstd")
    parser.add_argument("--runs", type=int, default=1, help="boots of each kind (median reported)")
    args = parser.parse_args(argv)

    kernel = pieces.kernel()
    image = images.root_image(args.root)
    qcow2 = images.qcow2_image(image.raw, compression=args.compression)
    results: dict[str, list[dict[str, object]]] = {"local-disk": [], "bootkit-direct": [], "bootkit-pxe": []}
    with tempfile.TemporaryDirectory(prefix="bench-boot.") as tmp:
        work = Path(tmp)
        initrd = pieces.initrd(work / "initrd.img", systemd=args.root == "debian", drivers=("virtio_net",))
        for run in range(args.runs):
            for kind in results:
                d = work / f"{kind}-{run}"
                d.mkdir()
                print(f"bench: run {run + 1}/{args.runs}: {kind} ...", file=sys.stderr, flush=True)
                if kind == "local-disk":
                    results[kind].append(boot_local(kernel, image, d))
                elif kind == "bootkit-direct":
                    results[kind].append(boot_bootkit_direct(kernel, initrd, qcow2, image, d))
                else:
                    results[kind].append(boot_bootkit_pxe(kernel, initrd, qcow2, image, d))

    def median(kind: str, key: str) -> float:
        return statistics.median(float(r[key]) for r in results[kind])  # type: ignore[arg-type]

    floor_guest, floor_host = median("local-disk", "guest_target_s"), median("local-disk", "host_target_s")
    print(f"\nboot to target, {args.root} root, {qcow2.name} ({qcow2.stat().st_size / 2**20:.1f} MiB), "
          f"TCG, {MEMORY_MIB} MiB, median of {args.runs}")
    print("| boot | guest s (kernel->target) | ratio | host s (QEMU start->target) | ratio |")
    print("|---|---|---|---|---|")
    for kind in results:
        g, h = median(kind, "guest_target_s"), median(kind, "host_target_s")
        print(f"| {kind} | {g:.2f} | {g / floor_guest:.2f} | {h:.2f} | {h / floor_host:.2f} |")
    out = artifacts_dir() / "bench-boot.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"root": args.root, "image": qcow2.name, "memory_mib": MEMORY_MIB,
                               "results": results}, indent=2) + "\n")
    print(f"\n(details: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
