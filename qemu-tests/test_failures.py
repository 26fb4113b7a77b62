"""Netboots that must fail: each ends with one clear console line naming the cause, nothing from the image
is mounted, and the guest ends by itself (``rd.shell=0 rd.emergency=poweroff`` on the kernel line)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bkharness.fixtures import BootDir
from bkharness.images import RootImage, qcow2_image, set_incompatible_feature, sparse_qcow2
from bkharness.netboot import netboot
from bkharness.proof import expect_boot_failure

BOOT_TIMEOUT = 300.0
#: bootkit's boot code reports a failure as "FAILED at <stage>: <cause>" (bootkit/boot/main.py)
FAILED = r"bootkit: .*FAILED at \w+: "


def test_wrong_pinned_hash(kernel: Any, shell_initrd: Path, busybox_root: RootImage, boot_dir: BootDir) -> None:
    image = qcow2_image(busybox_root.raw, compression="deflate")
    with netboot(kernel, shell_initrd, image, work=boot_dir.path, sha256="0" * 64, name="wrong-hash",
                 boot_timeout=BOOT_TIMEOUT) as boot:
        line = expect_boot_failure(boot.vm, FAILED + r".*SHA-256 mismatch", BOOT_TIMEOUT)
    assert "0" * 64 in line
    boot_dir.record(boot.vm, failure="wrong pinned hash")


def test_image_not_found(kernel: Any, shell_initrd: Path, busybox_root: RootImage, boot_dir: BootDir) -> None:
    image = qcow2_image(busybox_root.raw, compression="deflate")
    with netboot(kernel, shell_initrd, image, work=boot_dir.path, name="not-found",
                 boot_timeout=BOOT_TIMEOUT) as boot:
        # the configuration pinned the real image; then the file went away from the server: HTTP 404
        (boot.web.root / "disk.qcow2").unlink()
        line = expect_boot_failure(boot.vm, FAILED + r".*(404|[Nn]ot [Ff]ound)", BOOT_TIMEOUT)
    assert "disk.qcow2" in line
    boot_dir.record(boot.vm, failure="404")


def test_image_larger_than_ram(kernel: Any, shell_initrd: Path, boot_dir: BootDir) -> None:
    """A 2 GiB QCOW2 (metadata preallocated: 2 GiB on the wire, nothing on the host's disk) for a guest
    with 1 GiB of RAM: refused before downloading, with the sizes in the message."""
    image = sparse_qcow2(boot_dir.path / "huge.qcow2", "2G")
    with netboot(kernel, shell_initrd, image, work=boot_dir.path, sha256="f" * 64, name="too-large",
                 memory_mib=1024, boot_timeout=BOOT_TIMEOUT) as boot:
        line = expect_boot_failure(boot.vm, FAILED + r".*(RAM|memory)", BOOT_TIMEOUT)
    assert "GiB" in line
    boot_dir.record(boot.vm, failure="image larger than RAM")


def test_unsupported_feature(kernel: Any, shell_initrd: Path, busybox_root: RootImage, boot_dir: BootDir) -> None:
    """An image with an incompatible feature bit no reader knows (bit 20): refused at open, never attached."""
    image = qcow2_image(busybox_root.raw, compression="deflate", out=boot_dir.path / "future.qcow2")
    set_incompatible_feature(image, 20)
    with netboot(kernel, shell_initrd, image, work=boot_dir.path, name="unsupported",
                 boot_timeout=BOOT_TIMEOUT) as boot:
        expect_boot_failure(boot.vm, FAILED + r".*unsupported", BOOT_TIMEOUT)
    assert not boot.vm.seen(r"nbd0: p\d")
    boot_dir.record(boot.vm, failure="unsupported feature")
