"""Mirrors end to end: the image's first server dies in the middle of a lazy boot; the boot finishes from the
second (``rd.qcow2.mirror=``, written by ``pxe-config --mirrors``). The same boot sends its fleet report
(``rd.qcow2.report=``, ``pxe-config --report``) to ``bootkit fleet collect``'s receiver, which stores it.

Kernel, initramfs and manifest come from the netboot's own server; the image from two more ``bootkit
serve-http`` servers on the same files: the primary, stopped (by its PID, through the harness) as soon as its
log shows the first chunk request after the probe, and the mirror.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from bkharness.fixtures import BootDir
from bkharness.images import RootImage, file_sha256, qcow2_image
from bkharness.netboot import netboot, publish
from bkharness.pieces import bootkit
from bkharness.servers import http_server

from bootkit.host.fleet import read_reports, serve_reports

#: one lazy busybox boot under TCG: 25-40 s idle, about 60 s on a busy machine
BOOT_TIMEOUT = 300.0
_IMAGE_REQUEST = re.compile(r'"GET /disk\.qcow2 HTTP/1\.[01]" 206')


def test_first_mirror_dies_mid_boot(
    kernel: Any, shell_initrd: Path, busybox_root: RootImage, boot_dir: BootDir
) -> None:
    """Lazy mode from two servers; the first is stopped after its first chunk; the root is proved as always."""
    image = qcow2_image(busybox_root.raw, compression="zstd")
    manifest = boot_dir.path / "disk.qcow2.manifest"
    # 64 KiB chunks: the 2.4 MiB image is ~40 chunks, so the boot's requests keep going to both servers and some
    # reach the primary after it stopped (with 1 MiB chunks the three chunks can all be fetched before that)
    bootkit("manifest", "--chunk-size", "64K", "-o", manifest, image)
    images = publish(boot_dir.path / "images", {"disk.qcow2": image})
    primary_server = http_server(images, log_dir=boot_dir.path / "primary")
    primary = primary_server.__enter__()
    stopped = threading.Event()
    served_before_stop: list[int] = []

    def stop_after_first_chunk() -> None:
        # the probe (bytes=0-0) is the first range request; the next one is a chunk the boot needs
        while not stopped.wait(0.05):
            count = len(_IMAGE_REQUEST.findall(primary.requests_log()))
            if count >= 2:
                served_before_stop.append(count)
                primary_server.__exit__(None, None, None)
                stopped.set()

    watcher = threading.Thread(target=stop_after_first_chunk, daemon=True)
    reports = boot_dir.path / "reports"
    reports.mkdir()
    try:
        with http_server(images, log_dir=boot_dir.path / "mirror") as mirror, serve_reports(reports) as report_url:
            watcher.start()
            with netboot(kernel, shell_initrd, image, work=boot_dir.path, name="lazy-mirror-failover",
                         also_serve={"disk.qcow2.manifest": manifest},
                         pxe_args=["--mode", "lazy", "--manifest", "disk.qcow2.manifest",
                                   "--image", f"{primary.guest_url}/disk.qcow2", "--sha256", file_sha256(image),
                                   "--mirrors", f"{mirror.guest_url}/disk.qcow2",
                                   # QEMU's user network: the guest reaches the host's 127.0.0.1 as 10.0.2.2
                                   "--report", report_url.replace("127.0.0.1", "10.0.2.2")],
                         boot_timeout=BOOT_TIMEOUT) as boot:  # fmt: skip
                boot_dir.prove(boot.vm, busybox_root, BOOT_TIMEOUT, firmware="bios", loader="ipxe", mode="lazy",
                               compression="zstd", root="busybox", initrd="shell", mirrors=2)  # fmt: skip
                assert stopped.is_set(), "the primary was never asked for a chunk"
                assert boot.vm.seen(rf"mirror dropped {re.escape(primary.guest_url)}/disk\.qcow2: failed: "), (
                    "the boot code did not report leaving the dead primary"
                )
                # sent before the root switch, so it is here once the root is proved
                (report,) = read_reports(reports)
                assert report["result"] == "ok" and report["mode"] == "lazy" and report["mac"]
                assert report["image"] == f"{primary.guest_url}/disk.qcow2"
                assert set(report["stages"]) >= {"fetch", "open", "root", "attach", "mount"}
                assert 0 < report["time_to_root"] == report["stages"]["mount"]
            # the mirror served the rest: range requests for the image, after the primary had stopped
            assert len(_IMAGE_REQUEST.findall(mirror.requests_log())) > 0
            # and nothing was ever fetched whole: the kernel/initrd server never saw the image
            assert "/disk.qcow2 " not in boot.web.requests_log()
    finally:
        stopped.set()
        if watcher.is_alive():
            watcher.join()
        if not served_before_stop:
            primary_server.__exit__(None, None, None)
