"""The default ``bootkit build-initrd`` (every NIC driver, nothing trimmed), booted in both flavours on the NICs
that users' machines have, and against a hostile web server (issue 12).

Every other QEMU test trims its initramfs to virtio_net for build time: that is how a default build without
virtio_net's PCI transport went unnoticed. A TCG boot costs 30-60 s, so each boot here proves several things:
the flavour, the NIC, and (for the hostile ones) that the failure path runs nothing and powers off.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bkharness.fixtures import BootDir
from bkharness.guest import GUEST_KERNEL_ARGS, Nic, qemu_direct
from bkharness.hostile import EXECUTED, LOCATION, hostile_server
from bkharness.images import RootImage, qcow2_image
from bkharness.netboot import netboot
from bkharness.proof import expect_boot_failure

#: a netboot under TCG takes 25-40 s on an idle machine and about 60 s on a busy one (2 cores shared)
BOOT_TIMEOUT = 300.0
#: bootkit's own failure line, "bootkit: [  12.34] FAILED at <stage>: <cause>" (bootkit/boot/main.py); dracut's
#: messages that mention it afterwards have no time stamp
BOOTKIT_FAILED = r"bootkit: \[\s*[\d.]+\] FAILED at \w+: "
#: what a guest whose init died (no poweroff, a failed emergency path) prints before QEMU exits
PANIC = r"Kernel panic|Attempted to kill init"


def test_default_shell_initrd_virtio_net(kernel: Any, shell_default_initrd: Path, busybox_root: RootImage,
                                         boot_dir: BootDir) -> None:
    """The default shell build on QEMU's usual NIC: virtio_net finds its device through virtio_pci."""
    image = qcow2_image(busybox_root.raw, compression="zstd")
    with netboot(kernel, shell_default_initrd, image, work=boot_dir.path, name="default-shell-virtio",
                 nic=Nic.virtio, boot_timeout=BOOT_TIMEOUT) as boot:
        boot_dir.prove(boot.vm, busybox_root, BOOT_TIMEOUT, firmware="bios", loader="ipxe", mode="ram",
                       compression="zstd", root="busybox", initrd="shell-default", nic="virtio")


def test_default_systemd_initrd_e1000e_debian(kernel: Any, systemd_default_initrd: Path, debian_root: RootImage,
                                              boot_dir: BootDir) -> None:
    """The default systemd build on an Intel e1000e (QEMU's q35 default NIC, and many real machines'), booting
    the Debian root with systemd as the other systemd tests do."""
    image = qcow2_image(debian_root.raw, compression="zstd")
    with netboot(kernel, systemd_default_initrd, image, work=boot_dir.path, name="default-systemd-e1000e",
                 nic=Nic.e1000e, boot_timeout=BOOT_TIMEOUT) as boot:
        boot_dir.prove(boot.vm, debian_root, BOOT_TIMEOUT, firmware="bios", loader="ipxe", mode="ram",
                       compression="zstd", root="debian", initrd="systemd-default", nic="e1000e")


# -- a hostile web server (issue 12 §1) ----------------------------------------------------------------------


def _boot_against_hostile_server(kernel: Any, initrd: Path, boot_dir: BootDir, *, nic: Nic, name: str) -> None:
    """Boot ``initrd`` straight from QEMU (-kernel/-initrd: the PXE part is not under test) with its image URL on
    the hostile server, the image hash pinned, and the failure path told to power off; check how it ends."""
    with hostile_server(log_dir=boot_dir.path) as server:
        append = " ".join((
            f"root=qcow2:{server.image_url}",
            f"rd.qcow2.sha256={'0' * 64}",  # pinned: the hash never gets a say, the failure comes first
            "rd.qcow2.overlay=tmpfs", "rw", "ip=dhcp", "rd.neednet=1",
            *GUEST_KERNEL_ARGS,
            # no shell to drop into; the emergency path powers off (in the shell flavour, with bootkit's poweroff)
            "rd.shell=0", "rd.emergency=poweroff",
        ))  # fmt: skip
        with qemu_direct(kernel.vmlinuz, initrd, append, log_dir=boot_dir.path, name=name, nic=nic,
                         boot_timeout=BOOT_TIMEOUT) as vm:
            expect_boot_failure(vm, BOOTKIT_FAILED, BOOT_TIMEOUT)
            status = vm.wait_exit(60)
        requests = server.requests()
    # the guest took the redirect: both the Location and the reason phrase were in its hands
    assert any(r.endswith(f" {server.image_path}") for r in requests), requests
    assert any(r.endswith(f" {LOCATION}") for r in requests), requests
    failed = [line.text for line in vm.lines if re.search(BOOTKIT_FAILED, line.text)]
    assert len(failed) == 1, f"{name}: expected one FAILED line from bootkit, got {failed}"
    executed = [line.text for line in vm.lines if EXECUTED in line.text]
    assert executed == [], f"{name}: the server's shell code ran in the guest: {executed}"
    # powered off by itself: the kernel's power-down, not a panic of an init that had nothing left to run
    assert vm.seen(r"reboot: Power down"), f"{name}: no power-down\n{vm.tail()}"
    assert not vm.seen(PANIC), f"{name}: the guest panicked\n{vm.tail()}"
    assert status == 0, f"{name}: QEMU exited with status {status}"
    boot_dir.record(vm, failure="hostile server", nic=str(nic))


def test_hostile_server_shell_default_vmxnet3(kernel: Any, shell_default_initrd: Path, boot_dir: BootDir) -> None:
    """Shell flavour, default build, VMware's vmxnet3: the failure runs none of the server's text, and
    rd.emergency=poweroff powers off (dracut's emergency path calls poweroff, which bootkit provides)."""
    _boot_against_hostile_server(kernel, shell_default_initrd, boot_dir, nic=Nic.vmxnet3,
                                 name="hostile-shell-vmxnet3")


def test_hostile_server_systemd_default_virtio(kernel: Any, systemd_default_initrd: Path, boot_dir: BootDir) -> None:
    """systemd flavour, default build, virtio-net: the same hostile answers, the same clean end."""
    _boot_against_hostile_server(kernel, systemd_default_initrd, boot_dir, nic=Nic.virtio,
                                 name="hostile-systemd-virtio")
