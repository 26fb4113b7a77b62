"""The required boot proof of the dracut module: an initramfs from ``bootkit build-initrd`` for the Debian
kernel boots a busybox root from a GPT-partitioned, compressed QCOW2 image served over HTTP.

The guest's /sbin/init (tests/boot_fixtures.py) prints what it sees; the host checks from the serial log:
the root is mounted from /dev/nbd0p2 under the tmpfs overlay, a known file's checksum, the overlay is
writable, the '@bootkit' NBD server survived the root switch and serves reads afterwards, the root can be
remounted read-only and the guest powers off without I/O errors. One boot per initramfs flavour, plus the
failure path (a wrong pinned hash: one clear line, dracut's failure path, nothing mounted).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from boot_fixtures import (  # noqa: F401 - fixtures
    Boot,
    RootImage,
    busybox_root,
    debian_kernel,
    initrd_shell,
    initrd_systemd,
    keep_artifact,
    qemu_boot,
    serve,
)

from bootkit.host.initrd import InitrdResult
from bootkit.host.kernelpkg import Kernel

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(1500)]


def _boot(kernel: Kernel, initrd: InitrdResult, root: RootImage, tmp_path: Path, name: str, extra: str = "") -> Boot:
    log = tmp_path / f"{name}.serial.log"
    with serve(root.qcow2.parent) as port:
        append = f"root=qcow2:http://10.0.2.2:{port}/{root.qcow2.name} ip=dhcp rw {extra}"
        return qemu_boot(kernel, initrd.output, append, log, timeout=600)


def _check_booted(boot: Boot, root: RootImage, name: str) -> None:
    try:
        assert boot.returncode == 0, f"QEMU did not power off cleanly (status {boot.returncode})"
        mounts = boot.lines("BOOTKIT-TEST mount:")
        assert f"/dev/nbd0p{root.root_partition} /run/bootkit/lower ext4 ro,relatime" in mounts
        assert any(re.match(r"overlay / overlay rw,.*lowerdir=/run/bootkit/lower,", m) for m in mounts), mounts
        assert boot.lines("BOOTKIT-TEST sha256:") == [root.data_sha256]
        assert boot.lines("BOOTKIT-TEST write:") == ["ok"]
        servers = boot.lines("BOOTKIT-TEST server:")
        assert any("@bootkit" in s for s in servers), servers
        # a root storage daemon: never chosen by the OOM killer; its own root is the emptied initramfs
        assert set(boot.lines("BOOTKIT-TEST server-oom:")) == {"-1000"}
        assert set(boot.lines("BOOTKIT-TEST server-root:")) == {"0 entries"}
        assert boot.lines("BOOTKIT-TEST readall:") == ["ok"]
        # the downloaded image under /run is root's alone: the booted system's users cannot read it whole
        assert boot.lines("BOOTKIT-TEST images-mode:") == ["700 600"]
        assert boot.lines("BOOTKIT-TEST remount-ro:") == ["ok"]
        assert boot.lines("BOOTKIT-TEST kernel:") == []
        assert boot.lines("BOOTKIT-TEST done") == [""]
        status = boot.lines("BOOTKIT-TEST status:")
        assert status and f'"root": "/dev/nbd0p{root.root_partition}"' in status[0]
        assert f'"{root.sha256}"' in status[0]
        # request counters of the device (the partition scan has read it) and the reader's cache counters
        reads = re.search(r'"nbd_reads": (\d+)', status[0])
        assert reads and int(reads.group(1)) > 0, status[0]
        assert '"cluster_misses":' in status[0]
        # one console line per stage, with the guest's clock
        for stage in ("fetch", "open", "root", "attach", "mount"):
            assert any(re.search(rf"bootkit: \[ *[0-9.]+\] {stage}: .*\([0-9.]+ s\)", line)
                       for line in boot.text.splitlines()), f"no '{stage}' stage line"  # fmt: skip
        assert "FAILED" not in "\n".join(boot.lines("bootkit:"))
    except AssertionError:
        kept = keep_artifact(boot.log, f"{name}.serial.log")
        raise AssertionError(f"serial log kept in {kept}") from None


def test_shell_initramfs_boots_busybox_root(
    debian_kernel: Kernel, initrd_shell: InitrdResult, busybox_root: RootImage, tmp_path: Path  # noqa: F811
) -> None:
    boot = _boot(debian_kernel, initrd_shell, busybox_root, tmp_path, "boot-shell",
                 f"rd.qcow2.sha256={busybox_root.sha256}")  # fmt: skip
    _check_booted(boot, busybox_root, "boot-shell")


def test_systemd_initramfs_boots_busybox_root(
    debian_kernel: Kernel, initrd_systemd: InitrdResult, busybox_root: RootImage, tmp_path: Path  # noqa: F811
) -> None:
    boot = _boot(debian_kernel, initrd_systemd, busybox_root, tmp_path, "boot-systemd",
                 f"rd.qcow2.sha256={busybox_root.sha256}")  # fmt: skip
    _check_booted(boot, busybox_root, "boot-systemd")
    try:
        # the unit was copied where the real root's systemd finds it (docs/initramfs.md, "Root storage daemon")
        assert "bootkit-root.service" in " ".join(boot.lines("BOOTKIT-TEST units:"))
    except AssertionError:
        raise AssertionError(f"serial log kept in {keep_artifact(boot.log, 'boot-systemd.serial.log')}") from None


def test_wrong_pinned_hash_fails_with_one_line_and_mounts_nothing(
    debian_kernel: Kernel, initrd_shell: InitrdResult, busybox_root: RootImage, tmp_path: Path  # noqa: F811
) -> None:
    wrong = "0" * 64
    boot = _boot(debian_kernel, initrd_shell, busybox_root, tmp_path, "boot-badhash", f"rd.qcow2.sha256={wrong}")
    try:
        # the boot code's own line (dracut repeats it as "dracut: FATAL: bootkit: ...")
        failed = [line for line in boot.text.splitlines() if line.startswith("bootkit: [") and "FAILED at" in line]
        assert len(failed) == 1, failed
        assert re.search(r"FAILED at fetch: .*disk\.qcow2.*" + wrong, failed[0]), failed[0]
        assert "dracut: FATAL: bootkit: " in boot.text
        assert "nbd0" not in boot.text and "EXT4-fs" not in boot.text
        assert "BOOTKIT-TEST" not in boot.text
    except AssertionError:
        raise AssertionError(f"serial log kept in {keep_artifact(boot.log, 'boot-badhash.serial.log')}") from None


def test_systemd_failure_goes_to_emergency(
    debian_kernel: Kernel, initrd_systemd: InitrdResult, busybox_root: RootImage, tmp_path: Path  # noqa: F811
) -> None:
    log = tmp_path / "boot-404.serial.log"
    with serve(busybox_root.qcow2.parent) as port:
        append = f"root=qcow2:http://10.0.2.2:{port}/nosuch.qcow2 ip=dhcp rd.qcow2.verify=none"
        boot = qemu_boot(debian_kernel, initrd_systemd.output, append, log, timeout=600)
    try:
        failed = [line for line in boot.text.splitlines() if "bootkit: [" in line and "FAILED at" in line]
        assert len(failed) == 1, failed
        assert re.search(r"FAILED at fetch: http://10\.0\.2\.2:\d+/nosuch\.qcow2: HTTP 404", failed[0]), failed[0]
        # dracut's failure path: emergency.target, then the rd.emergency=poweroff action
        assert "emergency.target" in boot.text
        assert "nbd0" not in boot.text and "EXT4-fs" not in boot.text
        assert boot.returncode == 0
    except AssertionError:
        raise AssertionError(f"serial log kept in {keep_artifact(boot.log, 'boot-404.serial.log')}") from None
