"""Stream mode end to end (issue 16): the root is up before the image is in, the image is filled into RAM
behind the boot, and then the image server can go.

One boot of the busybox root with a 32 MiB bulk file (incompressible), over iPXE, the fill capped at 2 MiB/s
so that it outlasts the boot under TCG. The guest (qemu-tests/rootfs/stream) waits for the fill to complete,
then for the server to be gone -- the host stops it on the guest's first line -- then reads every file of its
root with the page cache dropped and checksums the bulk file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bkharness.fixtures import BootDir
from bkharness.images import qcow2_image, stream_image
from bkharness.netboot import netboot
from bkharness.pieces import bootkit

BOOT_TIMEOUT = 300.0


def test_stream_root_first_fill_behind_then_server_gone(kernel: Any, shell_initrd: Path, boot_dir: BootDir) -> None:
    root, bulk_sha256 = stream_image(32)
    image = qcow2_image(root.raw, compression="zstd")
    manifest = boot_dir.path / "disk.qcow2.manifest"
    bootkit("manifest", "-o", manifest, image)
    with netboot(kernel, shell_initrd, image, work=boot_dir.path, name="stream",
                 also_serve={"disk.qcow2.manifest": manifest},
                 pxe_args=["--mode", "stream", "--manifest", "disk.qcow2.manifest"],
                 kernel_args=["rd.qcow2.fill-rate=2M"],
                 boot_timeout=BOOT_TIMEOUT) as boot:  # fmt: skip
        vm = boot.vm
        vm.expect(r"read lazily, filled into RAM behind the boot", BOOT_TIMEOUT)
        vm.expect(r"^BOOTKIT-PROOF-INFO fill=complete", BOOT_TIMEOUT)
        boot.web.stop()
        vm.expect(r"^BOOTKIT-PROOF-INFO server=gone", 120)
        after = vm.expect(r"^BOOTKIT-PROOF-INFO after-fill files=(\d+) read-errors=(\d+) bulk-sha256=(\S+)", 180)
        boot_dir.prove(vm, root, BOOT_TIMEOUT, firmware="bios", loader="ipxe", mode="stream",
                       compression="zstd", root="stream", initrd="shell")  # fmt: skip
    # every file of the root read back from RAM, the bulk file intact
    files, errors, digest = int(after[1]), int(after[2]), after[3]
    assert (errors, digest) == (0, bulk_sha256), after[0]
    assert files >= 10, after[0]  # busybox, its scripts, /etc, the known and bulk files (applets are links)
    # timeline: the root was mounted before the fill completed
    mounted = vm.first_time(r"bootkit: \[\s*[\d.]+\] mount: ")
    filled = vm.first_time(r"bootkit: \[\s*[\d.]+\] fill complete: ")
    assert mounted is not None and filled is not None and mounted < filled, (mounted, filled)
    # bounded progress: at most one line per 10 %
    progress = [line.text for line in vm.lines if re.search(r"bootkit: \[\s*[\d.]+\] fill: \d+% ", line.text)]
    assert 1 <= len(progress) <= 9, progress
    # the image came in ranges; after the fill and the server's end, nothing failed
    assert re.search(r'"GET /disk\.qcow2 HTTP/1\.[01]" 206', boot.web.requests_log())
    assert not vm.seen(r"fill: FAILED")
