"""pxe-config output executed for real: QEMU network-boots through iPXE or GRUB, BIOS and UEFI.

Each test generates the configuration with ``bootkit pxe-config``, serves kernels and initrds from a logged
HTTP server on 127.0.0.1 (the guest reaches it as 10.0.2.2) and QEMU's built-in TFTP serves ``OUT/tftp``.
The boot goes as far as the kernel: the server's log must show the right kernel and initrd fetched, and
the guest kernel must print the command line bootkit built (``Command line: ...``) and start unpacking the
initrd it was handed. Then QEMU is killed. The kernel is the Debian one from ``bootkit.host.kernelpkg``'s cache;
the initrd is a dummy (the kernel only has to find it).

Machines: BIOS uses QEMU's default SeaBIOS with the iPXE option ROM of virtio-net (package ipxe-qemu);
UEFI uses OVMF with iPXE's EFI ROM, or OVMF's own PXE client loading GRUB's core.efi. Some cases boot a
MAC with per-machine overrides, the others the default menu, so both the per-MAC dispatch and the timed
menu run in iPXE and in GRUB.

The last tests run the generated dnsmasq.conf for real in a second guest (see below): firmware PXE asks
it, gets iPXE or GRUB by client architecture, iPXE comes back with its user class and gets the script.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from bkharness.guest import (
    GUEST_KERNEL_ARGS,
    IPXE_EFI_ROM,
    OVMF_CODE,
    OVMF_VARS,
    Firmware,
    Guest,
    GuestError,
    qemu_direct,
    qemu_pxe,
    qemu_pxe_netdev,
)
from bkharness.netboot import bootfile
from pxecfg_fixtures import logged_http_server, run_cli
from testtools import require_tools

from bootkit.boot.cmdline import join_args
from bootkit.boot.loaderargs import Loader, LoaderVar
from bootkit.host.kernelpkg import Kernel
from bootkit.host.pxecfg.cmdline import kernel_words, network_choices
from bootkit.host.pxecfg.load import load_file
from bootkit.host.pxecfg.model import Entry, Machine

pytestmark = pytest.mark.qemu

#: generous: the machine is slow and shared; a boot to the kernel takes 15-25 s under TCG here
TIMEOUT = 120.0

#: less than the harness's default, as these tests always had: enough to reach the kernel, and two guests
#: run at once in the dnsmasq tests
MEMORY_MIB = 512

#: the machine with overrides in the description, and one without
KNOWN_MAC = "52:54:00:12:34:56"
OTHER_MAC = "52:54:00:65:43:21"

DESCRIPTION = """\
base_url = "{base_url}"
docroot = "{docroot}"
default = "menu"
timeout = 1
console = ["ttyS0,115200"]

[[entry]]
name = "menu"
title = "Default entry"
kernel = "menu/vmlinuz"
initrd = "menu/initrd.img"
image = "{base_url}images/menu.qcow2"
sha256 = "sidecar"
args = ["panic=-1"]

[[entry]]
name = "node"
title = "Per-machine entry"
kernel = "node/vmlinuz"
initrd = "node/initrd.img"
image = "{base_url}images/node.qcow2"
mode = "lazy"
sha256 = "sidecar"
root = "LABEL=root"
args = ["panic=-1"]

[[machine]]
mac = "{known_mac}"
default = "node"
timeout = 0
args = ["bootkit.test=per-mac"]
"""


#: the lease QEMU's user-mode network (slirp) hands out
SLIRP_LEASE = {LoaderVar.ip: "10.0.2.15", LoaderVar.gateway: "10.0.2.2", LoaderVar.netmask: "255.255.255.0",
               LoaderVar.dns: "10.0.2.3"}  # fmt: skip


def booted_line(
    entry: Entry, machine: Machine | None, loader: Loader, lease: dict[LoaderVar, str], initrd_name: str | None = None
) -> str:
    """The command line the kernel gets when ``loader`` fills in ``lease`` (its first line, docs/pxe.md)."""
    network = network_choices(entry, machine, loader)[0]
    words = kernel_words(entry, machine, network=network, initrd_name=initrd_name)
    return join_args(tuple(w.substitute(lease).render(None) for w in words))


def handed_over(cmdline: str, mac: str) -> dict[LoaderVar, str]:
    """The lease values iPXE filled into ``cmdline`` (for a server whose addresses the test does not fix)."""
    m = re.search(r" ip=([0-9.]+)::([0-9.]*):([0-9.]+)::bootnet:none:([0-9.]*) ", cmdline)
    assert m, cmdline
    return {LoaderVar.ip: m[1], LoaderVar.gateway: m[2], LoaderVar.netmask: m[3], LoaderVar.dns: m[4],
            LoaderVar.mac: mac}  # fmt: skip


def require_firmware(firmware: Firmware) -> None:
    """Skip, naming the package, when the firmware files a guest boots with are not installed."""
    require_tools("qemu-system-x86_64")
    if not IPXE_EFI_ROM.exists():
        pytest.skip(f"{IPXE_EFI_ROM} missing (package ipxe-qemu)")
    if firmware is Firmware.uefi:
        for path in (OVMF_CODE, OVMF_VARS):
            if not path.exists():
                pytest.skip(f"{path} missing (packages ovmf, ipxe-qemu)")


def wait_for(vm: Guest, marker: str, timeout: float) -> bool:
    """Wait until ``marker`` is on the serial console; False on timeout or if QEMU exits first."""
    try:
        vm.expect(re.escape(marker), timeout)
    except GuestError:
        return False
    return True


def console_line(vm: Guest, prefix: str) -> str:
    """The rest of the first console line containing ``prefix``."""
    for line in vm.output.splitlines():
        if prefix in line:
            return line.split(prefix, 1)[1].strip()
    raise AssertionError(f"no {prefix!r} line on the serial console:\n{vm.output[-3000:]}")


@dataclass(frozen=True)
class Case:
    bootloader: str  # "ipxe" or "grub"
    firmware: Firmware
    mac: str
    #: UEFI firmware's own PXE client instead of iPXE's ROM (what dnsmasq's loader "grub" serves UEFI with)
    firmware_pxe: bool = False

    @property
    def bootfile(self) -> str:
        return bootfile(self.firmware, self.bootloader)


CASES = [
    pytest.param(Case("ipxe", Firmware.bios, mac=OTHER_MAC), id="bios-ipxe-menu"),
    pytest.param(Case("grub", Firmware.bios, mac=KNOWN_MAC), id="bios-grub-per-mac"),
    pytest.param(Case("ipxe", Firmware.uefi, mac=KNOWN_MAC), id="uefi-ipxe-per-mac"),
    pytest.param(Case("grub", Firmware.uefi, mac=OTHER_MAC), id="uefi-grub-menu"),
    pytest.param(Case("grub", Firmware.uefi, mac=KNOWN_MAC, firmware_pxe=True), id="uefi-firmware-pxe-grub-per-mac"),
]


@pytest.mark.parametrize("case", CASES)
def test_netboot_fetches_kernel_and_initrd_with_the_generated_command_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, kernel: Kernel, case: Case
) -> None:
    require_firmware(case.firmware)
    if case.bootloader == "grub":
        require_tools("grub-mknetdir")
    www = tmp_path / "www"
    for name in ("menu", "node"):
        (www / name).mkdir(parents=True)
        shutil.copyfile(kernel.vmlinuz, www / name / "vmlinuz")
        (www / name / "initrd.img").write_bytes(b"not a real initramfs\n" * 64)
    out = tmp_path / "out"
    with logged_http_server(www) as server:
        toml = tmp_path / "pxe.toml"
        toml.write_text(DESCRIPTION.format(base_url=server.guest_url, docroot=www, known_mac=KNOWN_MAC))
        status, _, err = run_cli(capsys, "pxe-config", str(toml), "--out", str(out))
        assert status == 0, err
        config = load_file(toml)
        machine = config.machines[0] if case.mac == KNOWN_MAC else None
        entry = config.entry("node" if machine else "menu")
        wanted = [f"/{entry.name}/vmlinuz", f"/{entry.name}/initrd.img"]

        with qemu_pxe(out / "tftp", case.bootfile, log_dir=tmp_path, firmware=case.firmware, mac=case.mac,
                      firmware_pxe=case.firmware_pxe, memory_mib=MEMORY_MIB, name="client") as vm:  # fmt: skip
            fetched = server.wait_for(lambda: len(server.paths()) >= 2, TIMEOUT)
            assert fetched, f"HTTP requests: {server.requests}; console:\n{vm.output[-3000:]}"
            # the kernel prints its command line first thing, and "Trying to unpack rootfs image as
            # initramfs" only when the bootloader handed it an initrd (iPXE on UEFI: through initrd=NAME)
            assert wait_for(vm, "Trying to unpack rootfs image as initramfs", TIMEOUT), vm.output[-3000:]
            booted_cmdline = console_line(vm, "Command line: ")

    assert server.paths() == wanted
    lease = {**SLIRP_LEASE, LoaderVar.mac: case.mac}
    if case.bootloader == "ipxe":
        expected = booted_line(entry, machine, Loader.ipxe, lease, initrd_name="initrd.img")
        # iPXE on UEFI passes the image name first (the EFI stub's argv[0]); BIOS does not
        assert booted_cmdline.removeprefix("vmlinuz ") == expected
    else:
        port = server.port
        expected = f"BOOT_IMAGE=(http,10.0.2.2:{port})/{entry.name}/vmlinuz " + booted_line(
            entry, machine, Loader.grub, lease
        )
        assert booted_cmdline == expected
    assert ("bootkit.test=per-mac" in booted_cmdline) == (machine is not None)


# -- dnsmasq for real: a second guest is the PXE server ---------------------------------------------------------
#
# The generated dnsmasq.conf runs in a server guest (busybox init, dnsmasq with its libraries, busybox httpd
# serving the kernel and initrd) connected to the client guest by a point-to-point QEMU network over a unix
# socket; no host address is involved. The client's firmware asks the server's dnsmasq, which must hand it
# the right file for its architecture (option 93) and, once iPXE runs (user class "iPXE"), the script.

SERVER_IP = "192.168.50.1"

SERVER_INIT = """\
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
modprobe virtio_pci
modprobe virtio_net
ip link set lo up
ip link set eth0 up
ip addr add {server_ip}/24 dev eth0
httpd -p 80 -h /srv/http
{existing_dhcp}dnsmasq --conf-file=/etc/dnsmasq.conf --user=root --group=root --dhcp-leasefile=/tmp/leases \\
    --pid-file= --log-facility=- --keep-in-foreground &
while true; do sleep 60; done
"""

CHAIN_DESCRIPTION = """\
base_url = "http://{server_ip}/"
timeout = 0
console = ["ttyS0,115200"]

[[entry]]
name = "node"
kernel = "vmlinuz"
initrd = "initrd.img"
image = "disk.qcow2"
sha256 = "sidecar"
args = ["panic=-1"]

[dhcp]
loader = "{loader}"
interface = "eth0"
tftp_root = "/srv/tftp"
{dhcp}"""

FULL_DHCP = """\
mode = "full"
range_start = "192.168.50.100"
range_end = "192.168.50.150"
netmask = "255.255.255.0"
"""

PROXY_DHCP = """\
mode = "proxy"
subnet = "192.168.50.0"
"""

#: proxy mode needs a DHCP server that hands out the addresses: busybox udhcpd plays the LAN's existing one
EXISTING_DHCP = """\
touch /tmp/udhcpd.leases
udhcpd -f /etc/udhcpd.conf &
"""
UDHCPD_CONF = """\
start 192.168.50.100
end 192.168.50.150
interface eth0
lease_file /tmp/udhcpd.leases
option subnet 255.255.255.0
option router 192.168.50.1
"""


def _copy_with_libraries(binary: str, root: Path) -> None:
    """Copy an ELF binary and every shared library ``ldd`` lists into the same paths under ``root``."""
    ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    for path in [binary, *(m.group(1) for m in re.finditer(r"(/\S+) \(0x", ldd))]:
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)


def _copy_modules(kernel: Kernel, root: Path, names: tuple[str, ...]) -> None:
    """Copy modules and their dependencies (from modules.dep) for busybox modprobe."""
    dep = (kernel.kmoddir / "modules.dep").read_text()
    wanted: set[str] = set()
    for line in dep.splitlines():
        module, _, deps = line.partition(":")
        if Path(module).name in {f"{n}.ko" for n in names}:
            wanted |= {module, *deps.split()}
    target = root / "lib" / "modules" / kernel.kver
    for module in wanted:
        (target / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(kernel.kmoddir / module, target / module)
    shutil.copy(kernel.kmoddir / "modules.dep", target / "modules.dep")


def server_initramfs(kernel: Kernel, out: Path, work: Path, *, existing_dhcp: bool) -> Path:
    """A cpio initramfs running the generated ``OUT/dnsmasq.conf`` and an HTTP server for the boot files."""
    require_tools("busybox", "cpio", "ldd", "dnsmasq")
    root = work / "server-root"
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "srv/http"):
        (root / d).mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "busybox", root / "bin" / "busybox")
    _copy_with_libraries(shutil.which("dnsmasq") or "dnsmasq", root)
    _copy_modules(kernel, root, ("virtio_pci", "virtio_net"))
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    shutil.copy(out / "dnsmasq.conf", root / "etc" / "dnsmasq.conf")
    (root / "etc" / "udhcpd.conf").write_text(UDHCPD_CONF)
    shutil.copytree(out / "tftp", root / "srv" / "tftp")
    shutil.copy(kernel.vmlinuz, root / "srv" / "http" / "vmlinuz")
    (root / "srv" / "http" / "initrd.img").write_bytes(b"not a real initramfs\n" * 64)
    init = root / "init"
    init.write_text(SERVER_INIT.format(server_ip=SERVER_IP, existing_dhcp=EXISTING_DHCP if existing_dhcp else ""))
    init.chmod(0o755)
    archive = work / "server.cpio"
    names = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    with archive.open("wb") as f:
        cpio = ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"]
        subprocess.run(cpio, cwd=root, input=names, stdout=f, check=True)
    return archive


@dataclass(frozen=True)
class Chain:
    dhcp_mode: str
    loader: str
    firmware: Firmware
    firmware_pxe: bool
    #: files the server's TFTP must have sent, in this order (GRUB's modules come in between)
    tftp_files: tuple[str, ...]


CHAINS = [
    # OVMF's PXE (client architecture 7) gets ipxe.efi; iPXE (user class iPXE) then gets boot.ipxe
    # (proxy DHCP next to udhcpd, the default configuration)
    pytest.param(Chain("proxy", "ipxe", Firmware.uefi, firmware_pxe=True, tftp_files=("ipxe.efi", "boot.ipxe")),
                 id="proxy-uefi-firmware-ipxe.efi-boot.ipxe"),
    # loader grub: OVMF's PXE gets GRUB's core.efi, which reads grub.cfg from the same TFTP server
    # (full DHCP)
    pytest.param(Chain("full", "grub", Firmware.uefi, firmware_pxe=True,
                       tftp_files=("boot/grub/x86_64-efi/core.efi", "boot/grub/grub.cfg")),
                 id="full-uefi-firmware-grub-core.efi"),
]  # fmt: skip


@pytest.mark.parametrize("chain", CHAINS)
def test_generated_dnsmasq_serves_the_boot_chain(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, kernel: Kernel, chain: Chain
) -> None:
    require_firmware(chain.firmware)
    toml = tmp_path / "pxe.toml"
    dhcp = PROXY_DHCP if chain.dhcp_mode == "proxy" else FULL_DHCP
    toml.write_text(CHAIN_DESCRIPTION.format(server_ip=SERVER_IP, loader=chain.loader, dhcp=dhcp))
    out = tmp_path / "out"
    grub_flag = [] if chain.loader == "grub" else ["--no-grub-images"]
    status, _, err = run_cli(capsys, "pxe-config", str(toml), "--out", str(out), *grub_flag)
    assert status == 0, err
    initramfs = server_initramfs(kernel, out, tmp_path, existing_dhcp=chain.dhcp_mode == "proxy")
    entry = load_file(toml).entry("node")

    # unix socket paths are limited to 108 bytes: keep it short
    with tempfile.TemporaryDirectory(prefix="bk-net-") as sockdir:
        socket = Path(sockdir) / "net"
        # the server guest listens on the socket for the client's network
        listen = f"stream,id=n0,server=on,addr.type=unix,addr.path={socket}"
        append = " ".join((*GUEST_KERNEL_ARGS, "quiet"))
        with qemu_direct(kernel.vmlinuz, initramfs, append, netdev=listen, memory_mib=MEMORY_MIB,
                         log_dir=tmp_path, name="server") as server:  # fmt: skip
            ready = wait_for(server, "TFTP root is /srv/tftp", TIMEOUT)
            assert ready, server.output[-3000:]
            netdev = f"stream,id=n0,server=off,addr.type=unix,addr.path={socket}"
            with qemu_pxe_netdev(netdev, firmware=chain.firmware, mac=KNOWN_MAC, firmware_pxe=chain.firmware_pxe,
                                 memory_mib=MEMORY_MIB, log_dir=tmp_path, name="client") as vm:  # fmt: skip
                unpacked = wait_for(vm, "Trying to unpack rootfs image as initramfs", TIMEOUT)
                assert unpacked, f"client:\n{vm.output[-2000:]}\nserver:\n{server.output[-3000:]}"
                booted_cmdline = console_line(vm, "Command line: ")
            server_log = server.output

    sent = re.findall(r"dnsmasq-tftp\[\d+\]: sent /srv/tftp/(\S+) to ", server_log)
    assert [f for f in dict.fromkeys(sent) if f in chain.tftp_files] == list(chain.tftp_files), sent
    if chain.loader == "ipxe":
        lease = handed_over(booted_cmdline, KNOWN_MAC)
        assert lease[LoaderVar.ip].startswith("192.168.50."), booted_cmdline
        expected = booted_line(entry, None, Loader.ipxe, lease, initrd_name="initrd.img")
        assert booted_cmdline.removeprefix("vmlinuz ") == expected
        assert "tags: ipxe, uefi, eth0" in server_log  # iPXE's user class was recognised
    else:
        expected = booted_line(entry, None, Loader.grub, {LoaderVar.mac: KNOWN_MAC})
        assert booted_cmdline == f"BOOT_IMAGE=(http,{SERVER_IP})/vmlinuz " + expected
