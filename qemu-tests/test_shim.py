"""Secure Boot with the distribution's signatures: shim -> signed GRUB -> signed kernel (issue 18, part 1).

OVMF's Secure Boot build with Debian's ``OVMF_VARS_4M.ms.fd`` (Microsoft's keys enrolled, Secure Boot on, as a
stock PC), no option ROM on the NIC (``romfile=``: an unsigned iPXE ROM would make "enforcing" prove nothing),
the NIC first in the boot order and OVMF's IPv6 PXE off, so the firmware goes straight to PXE over IPv4. QEMU's
user network hands out ``shimx64.efi`` from the TFTP tree ``bootkit pxe-config`` wrote with
``[dhcp] loader = "shim"``; shim fetches ``grubx64.efi`` (Debian's signed network GRUB) next to it, which reads
``grub/grub.cfg`` and picks the menu of the MAC it booted from; kernel and initramfs come over TFTP from the same
tree, the image over HTTP from ``bootkit serve-http`` on the host.

Two boots, from the same TFTP tree:

* the machine described in the TOML (its MAC's branch of grub.cfg, default entry ``node``): Debian's signed
  kernel passes shim's check in GRUB, bootkit's initramfs boots the pinned busybox image to the root proof;
* a machine not described (the default branch, entry ``unsigned``), whose kernel the test replaced in the TFTP
  tree by the same kernel from the unsigned package: GRUB refuses it ("bad shim signature") and the test stops
  the guest there.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from bkharness.fixtures import BootDir
from bkharness.guest import HOST_FROM_GUEST, Guest
from bkharness.images import RootImage, qcow2_image
from bkharness.netboot import publish
from bkharness.pieces import GUEST_BOOT_ARGS, bootkit, signed_kernel
from bkharness.secureboot import OVMF_MS_VARS, OVMF_SECBOOT_CODE, require_files, require_tools, secure_boot_guest
from bkharness.servers import http_server

from bootkit.host.pxecfg import shim

pytestmark = pytest.mark.qemu

#: the signed boot to the root proof: OVMF (~10 s), then shim, GRUB, kernel and initramfs over TFTP
BOOT_TIMEOUT = 600.0
#: the refusal comes once GRUB has fetched the ~8 MB kernel over TFTP
REFUSAL_TIMEOUT = 240.0

DESCRIBED_MAC = "52:54:00:12:34:56"
STRANGER_MAC = "52:54:00:12:34:57"

DESCRIPTION = """\
base_url = "{base_url}"
docroot = "{docroot}"
timeout = 0
default = "unsigned"
console = ["ttyS0,115200"]

[[entry]]
name = "node"
kernel = "vmlinuz"
initrd = "initrd.img"
image = "disk.qcow2"
args = {args}

[[entry]]
name = "unsigned"
# pxe-config refuses an unsigned kernel: the test swaps it into the TFTP tree afterwards, as whoever controls the
# TFTP server could
kernel = "vmlinuz"
initrd = "initrd.img"
image = "disk.qcow2"
args = {args}

[[machine]]
mac = "{mac}"
default = "node"

[dhcp]
subnet = "10.0.2.0"
loader = "shim"
"""


def tftp_kernel(tftp: Path, entry: str) -> Path:
    """Where pxe-config put the kernel of ``entry`` for the signed GRUB, which reads it over TFTP."""
    return tftp / shim.ENTRIES / entry / "vmlinuz"


def shim_guest(tftp: Path, mac: str, *, log_dir: Path, name: str, memory_mib: int) -> Any:
    devices = [
        "-netdev", f"user,id=n0,tftp={tftp},bootfile={shim.SHIM_NAME}",
        # romfile= (empty): OVMF's own PXE client, no unsigned iPXE option ROM; the NIC is the only boot option
        "-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile=,bootindex=1",
        # the NIC's IPv6 PXE option would wait for a DHCPv6 answer QEMU's user network never gives
        "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n",
    ]  # fmt: skip
    return secure_boot_guest(OVMF_MS_VARS, devices, log_dir=log_dir, name=name, memory_mib=memory_mib,
                             boot_timeout=BOOT_TIMEOUT)  # fmt: skip


def test_shim_grub_and_signed_kernel_boot_the_root_and_an_unsigned_kernel_is_refused(
    kernel: Any, shell_initrd: Path, busybox_root: RootImage, boot_dir: BootDir
) -> None:
    require_tools("qemu-system-x86_64", "sbverify")
    require_files((OVMF_SECBOOT_CODE, "ovmf"), (OVMF_MS_VARS, "ovmf"),
                  *((path, package) for path, _, package in shim.DEBIAN.packages()))  # fmt: skip
    signed = signed_kernel()
    assert signed.kver == kernel.kver  # the same build: the initramfs's modules fit both
    work = boot_dir.path
    www = publish(work / "www", {
        "vmlinuz": signed.vmlinuz,
        "initrd.img": shell_initrd,
        "disk.qcow2": qcow2_image(busybox_root.raw, compression="zstd"),
    })  # fmt: skip
    args = "[" + ", ".join(f'"{a}"' for a in GUEST_BOOT_ARGS if a != "rw") + "]"
    with http_server(www, log_dir=work) as web:
        base_url = f"http://{HOST_FROM_GUEST}:{web.port}/"
        toml = work / "pxe.toml"
        toml.write_text(DESCRIPTION.format(base_url=base_url, docroot=www, args=args, mac=DESCRIBED_MAC))
        out = work / "pxe"
        bootkit("pxe-config", toml, "--out", out, "--no-grub-images")
        swapped = tftp_kernel(out / "tftp", "unsigned")
        swapped.unlink()  # a hard link to the signed kernel: replace the link, not the file
        shutil.copyfile(kernel.vmlinuz, swapped)
        tftp = out / "tftp"
        assert {p.name for p in tftp.iterdir()} >= {shim.SHIM_NAME, shim.GRUB_NAME, "grub"}

        vm: Guest
        with shim_guest(tftp, DESCRIBED_MAC, log_dir=work, name="signed", memory_mib=1024) as vm:
            vm.expect(r"Fetching Netboot Image grubx64\.efi", BOOT_TIMEOUT)  # shim runs
            vm.expect(r"bootkit: loading node", 120)  # the signed GRUB read grub/grub.cfg: this MAC's branch
            vm.expect(r"EFI stub: UEFI Secure Boot is enabled", BOOT_TIMEOUT)  # shim verified the kernel
            vm.expect(r"Kernel is locked down from EFI Secure Boot", 60)
            vm.expect(r"secureboot: Secure boot enabled", 60)
            boot_dir.prove(vm, busybox_root, BOOT_TIMEOUT, firmware="uefi-secureboot-ms", loader="shim-grub",
                           mode="ram", root="busybox", initrd="shell")  # fmt: skip

        with shim_guest(tftp, STRANGER_MAC, log_dir=work, name="unsigned", memory_mib=512) as vm:
            vm.expect(r"bootkit: loading unsigned", REFUSAL_TIMEOUT)
            refusal = vm.expect(r"error: (bad shim signature)", REFUSAL_TIMEOUT)[1]
            boot_dir.record(vm, firmware="uefi-secureboot-ms", loader="shim-grub", refusals=1)
        console = vm.output
    assert refusal == "bad shim signature"
    # the kernel never started
    assert not re.search(r"Linux version", console), console[-2000:]
    shutil.rmtree(www, ignore_errors=True)
