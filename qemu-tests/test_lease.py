"""The boot loader's lease handed over to the initramfs, and only the boot NIC brought up (docs/pxe.md,
"The lease"; docs/initramfs.md, "Network bring-up time").

Three boots, each a full netboot to the root's proof:

* BIOS iPXE, systemd initramfs, Debian root, three NICs: the boot NIC on QEMU's user network, whose DHCP
  server also hands out a hostile host name and domain; a second NIC on a restricted user network of its own
  (a DHCP server answers there too, so DHCP on it would show as an address); a third on an empty hub. The kernel
  line carries the lease iPXE got (and nothing of the hostile strings), the initramfs configures the boot
  NIC from it, statically, and no other NIC.
* BIOS GRUB, shell initramfs, busybox root: GRUB has no netmask or gateway variable, so the line asks for
  DHCP on the boot interface (pinned by GRUB's ``net_default_mac``), and only that interface gets an address.
* UEFI iPXE, shell initramfs, busybox root: the lease handed over on the other firmware, configured
  statically by network-legacy without its duplicate-address wait.

Evidence on the console: the kernel's ``Command line:``, and bootkit's ``bootkit: address: <if> <addr>
static|dynamic`` lines (dracut-module/90bootkit/bootkit-netinfo.sh), printed before the boot code starts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bkharness.fixtures import BootDir
from bkharness.guest import Firmware, Guest, qemu_command
from bkharness.images import RootImage, qcow2_image
from bkharness.netboot import netboot, publish
from bkharness.pieces import pxe_tree, require_boot_code
from bkharness.servers import http_server

#: a netboot under TCG takes 25-40 s on an idle machine and well over a minute on a busy one
BOOT_TIMEOUT = 400.0

BOOT_MAC = "52:54:00:12:34:56"
#: QEMU's user-network DHCP options 12 and 15 (hostname= is limited to 32 characters): spaces, a root=,
#: command substitution and a semicolon. None of it may reach the kernel line.
HOSTILE_HOSTNAME = "a root=qcow2:http://evil/ $(x);"
HOSTILE_DOMAIN = "evil.example root=/dev/sda $(reboot);"

ADDRESS = re.compile(r"bootkit: address: (\S+) (\S+) (static|dynamic)")


def addresses(vm: Guest) -> list[tuple[str, str, str]]:
    """The IPv4 ``bootkit: address:`` lines of the boot, as (interface, address, kind).

    QEMU's user network also sends IPv6 router advertisements, so the boot NIC gets a SLAAC address (fec0::/64,
    reported since bootkit-netinfo lists site-local addresses): that is no DHCP request, but it must be on the
    boot NIC only, which this checks here for every caller."""
    found = []
    for line in vm.output.splitlines():
        m = ADDRESS.search(line)
        if m:
            found.append((m[1], m[2], m[3]))
    ipv6 = [f for f in found if ":" in f[1]]
    assert all(interface == "bootnet" for interface, _, _ in ipv6), f"IPv6 on another NIC than the boot NIC: {ipv6}"
    return [f for f in found if ":" not in f[1]]


def command_line(vm: Guest) -> str:
    m = re.search(r"\] Command line: (.*)$", vm.output, re.M)
    assert m, vm.output[-3000:]
    return m.group(1).strip()


@contextmanager
def three_nic_guest(tftp: Path, *, log_dir: Path, name: str) -> Iterator[Guest]:
    """BIOS PXE from the first NIC (user network with hostile DHCP strings); two more NICs with no ROM."""
    cmd = qemu_command(firmware=Firmware.bios, memory_mib=1024, tftp_dir=tftp, bootfile="boot.ipxe", mac=BOOT_MAC)
    i = cmd.index("-netdev") + 1
    # QEMU's option syntax: a comma inside a value is doubled (there is none in the strings above)
    cmd[i] += f",hostname={HOSTILE_HOSTNAME},domainname={HOSTILE_DOMAIN}"
    cmd += [
        "-netdev", "user,id=n1,restrict=on",
        "-device", "virtio-net-pci,netdev=n1,mac=52:54:00:00:00:11,romfile=",
        "-netdev", "hubport,id=n2,hubid=7",
        "-device", "virtio-net-pci,netdev=n2,mac=52:54:00:00:00:12,romfile=",
    ]  # fmt: skip
    log_dir.mkdir(parents=True, exist_ok=True)
    guest = Guest(cmd, name=name, log_path=log_dir / f"{name}.serial.log", boot_timeout=BOOT_TIMEOUT)
    try:
        yield guest
    finally:
        guest.close()


def test_ipxe_lease_reaches_the_boot_nic_only(kernel: Any, systemd_initrd: Path, debian_root: RootImage,
                                              boot_dir: BootDir) -> None:
    """iPXE's lease on the kernel line, hostile DHCP strings left out, one NIC of three configured, no DHCP.

    The Debian root: systemd's switch-root wants an OS tree (os-release), which the busybox root is not."""
    require_boot_code()
    image = qcow2_image(debian_root.raw, compression="zstd")
    www = publish(boot_dir.path / "www", {"vmlinuz": Path(kernel.vmlinuz), "initrd.img": systemd_initrd,
                                          "disk.qcow2": image})  # fmt: skip
    with http_server(www, log_dir=boot_dir.path) as web:
        tftp = pxe_tree(boot_dir.path / "pxe", base_url=web.guest_url + "/", docroot=www)
        with three_nic_guest(tftp, log_dir=boot_dir.path, name="ipxe-lease-3nics") as vm:
            boot_dir.prove(vm, debian_root, BOOT_TIMEOUT, firmware="bios", loader="ipxe", mode="ram",
                           compression="zstd", root="debian", initrd="systemd", network="lease")

    line = command_line(vm)
    words = line.split()
    assert f"ifname=bootnet:{BOOT_MAC}" in words, line
    assert "ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none:10.0.2.3" in words, line
    # the only root= is the image's; nothing of the hostile host name or domain made it in
    assert [w for w in words if w.startswith("root=")] == [f"root=qcow2:{web.guest_url}/disk.qcow2"], line
    assert not any(s in line for s in ("evil", "$(", ";")), line
    # the boot NIC, statically from the handed-over lease; the NIC with a DHCP server of its own got nothing
    assert addresses(vm) == [("bootnet", "10.0.2.15/24", "static")], vm.output[-4000:]
    # bootkit-lease-generator: networkd neither waited for nor took QEMU's router advertisement (its SLAAC
    # address would be reported as a dynamic fec0:: address)
    assert not vm.seen(r"bootkit: address: \S+ fec0:"), vm.output[-4000:]


def test_grub_dhcp_on_the_boot_interface_only(kernel: Any, shell_initrd: Path, busybox_root: RootImage,
                                              boot_dir: BootDir) -> None:
    """GRUB lacks the netmask and gateway: DHCP in the initramfs, on the NIC GRUB booted from."""
    image = qcow2_image(busybox_root.raw, compression="zstd")
    with netboot(kernel, shell_initrd, image, work=boot_dir.path, loader="grub", name="grub-boot-nic-dhcp",
                 boot_timeout=BOOT_TIMEOUT) as boot:
        boot_dir.prove(boot.vm, busybox_root, BOOT_TIMEOUT, firmware="bios", loader="grub", mode="ram",
                       compression="zstd", root="busybox", initrd="shell", network="boot-nic-dhcp")
    words = command_line(boot.vm).split()
    assert "ifname=bootnet:52:54:00:12:34:56" in words and "ip=:::::bootnet:dhcp" in words, words
    assert addresses(boot.vm) == [("bootnet", "10.0.2.15/24", "dynamic")], boot.vm.output[-4000:]


def test_uefi_ipxe_lease_shell_initramfs(kernel: Any, shell_initrd: Path, busybox_root: RootImage,
                                         boot_dir: BootDir) -> None:
    """OVMF with QEMU's EFI iPXE ROM hands its lease over too; the shell initramfs configures it statically,
    with no duplicate-address wait for it (the arping wrapper) and no DHCP client."""
    image = qcow2_image(busybox_root.raw, compression="zstd")
    with netboot(kernel, shell_initrd, image, work=boot_dir.path, firmware=Firmware.uefi, name="uefi-ipxe-lease",
                 boot_timeout=BOOT_TIMEOUT) as boot:
        boot_dir.prove(boot.vm, busybox_root, BOOT_TIMEOUT, firmware="uefi", loader="ipxe", mode="ram",
                       compression="zstd", root="busybox", initrd="shell", network="lease")
    words = command_line(boot.vm).split()
    assert "ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none:10.0.2.3" in words, words
    assert addresses(boot.vm) == [("bootnet", "10.0.2.15/24", "static")], boot.vm.output[-4000:]
    assert not boot.vm.seen(r"Duplicate address detected|dhclient"), boot.vm.output[-4000:]
