"""pxe-config output executed for real: QEMU network-boots through iPXE or GRUB, BIOS and UEFI.

Each test generates the configuration with ``bootkit pxe-config``, serves kernels and initrds from a logged
HTTP server on 127.0.0.1 (the guest reaches it as 10.0.2.2) and QEMU's built-in TFTP serves ``OUT/tftp``.
The boot goes as far as the kernel: the server's log must show the right kernel and initrd fetched, and
the guest kernel must print the command line bootkit built (``Command line: ...``) and start unpacking the
initrd it was handed. Then QEMU is killed. The kernel is the Debian one from ``bootkit.kernelpkg``'s cache;
the initrd is a dummy (the kernel only has to find it).

Machines: BIOS uses QEMU's default SeaBIOS with the iPXE option ROM of virtio-net (package ipxe-qemu);
UEFI uses OVMF with iPXE's EFI ROM, or OVMF's own PXE client loading GRUB's core.efi. Some cases boot a
MAC with per-machine overrides, the others the default menu, so both the per-MAC dispatch and the timed
menu run in iPXE and in GRUB.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bootcfg_fixtures import logged_http_server, run_cli
from conftest import require_tools

from bootkit.bootcfg.cmdline import kernel_cmdline
from bootkit.bootcfg.load import load_file

pytestmark = pytest.mark.qemu

#: generous: the machine is slow and shared; a boot to the kernel takes 15-25 s under TCG here
TIMEOUT = 120.0

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
#: iPXE for virtio-net (package ipxe-qemu); QEMU's default ROM for the NIC, with a BIOS and an EFI image in one
IPXE_ROM = Path("/usr/lib/ipxe/qemu/efi-virtio.rom")

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


@pytest.fixture(scope="module")
def vmlinuz() -> Path:
    require_tools("qemu-system-x86_64", "apt-get", "dpkg-deb", "depmod")
    from bootkit.errors import BootkitError
    from bootkit.kernelpkg import ensure_kernel

    try:
        return ensure_kernel().vmlinuz
    except BootkitError as e:
        pytest.skip(f"no Debian kernel to boot: {e}")


@dataclass
class Vm:
    proc: subprocess.Popen[bytes]
    serial: Path

    def text(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def wait_for(self, marker: str, timeout: float) -> bool:
        """Wait until ``marker`` is on the serial console; False on timeout or if QEMU exits first."""
        deadline = time.monotonic() + timeout
        while marker not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return marker in self.text()
            time.sleep(0.5)  # the serial log is a file: nothing to block on
        return True

    def line(self, prefix: str) -> str:
        for line in self.text().splitlines():
            if prefix in line:
                return line.split(prefix, 1)[1].strip()
        raise AssertionError(f"no {prefix!r} line on the serial console:\n{self.text()[-3000:]}")


@contextlib.contextmanager
def qemu_netboot(netdev: str, *, uefi: bool, mac: str, work: Path, firmware_pxe: bool = False) -> Iterator[Vm]:
    """Boot QEMU from the network ``netdev`` (its id must be n0); killed on exit.

    ``firmware_pxe`` (UEFI only): no iPXE ROM on the NIC, OVMF's own PXE client boots.
    """
    require_tools("qemu-system-x86_64")
    serial = work / "client.log"
    nic = f"virtio-net-pci,netdev=n0,mac={mac}"
    firmware: list[str] = []
    if not IPXE_ROM.exists():
        pytest.skip(f"{IPXE_ROM} missing (package ipxe-qemu)")
    if uefi:
        for path in (OVMF_CODE, OVMF_VARS):
            if not path.exists():
                pytest.skip(f"{path} missing (packages ovmf, ipxe-qemu)")
        variables = work / "OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, variables)
        firmware = [
            "-machine", "q35",
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={variables}",
        ]  # fmt: skip
        nic += ",romfile=" if firmware_pxe else f",romfile={IPXE_ROM}"
    cmd = [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-nodefaults",
        "-display", "none",
        "-m", "512",
        *firmware,
        "-serial", f"file:{serial}",
        "-boot", "n",
        "-netdev", netdev,
        "-device", nic,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield Vm(proc, serial)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        if proc.returncode not in (0, -9):
            print(f"qemu exited {proc.returncode}: {err.decode(errors='replace')}")


@dataclass(frozen=True)
class Case:
    bootloader: str  # "ipxe" or "grub"
    uefi: bool
    mac: str
    #: UEFI firmware's own PXE client instead of iPXE's ROM (what dnsmasq's loader "grub" serves UEFI with)
    firmware_pxe: bool = False

    @property
    def bootfile(self) -> str:
        if self.bootloader == "ipxe":
            return "boot.ipxe"
        return "boot/grub/x86_64-efi/core.efi" if self.uefi else "boot/grub/i386-pc/core.0"


CASES = [
    pytest.param(Case("ipxe", uefi=False, mac=OTHER_MAC), id="bios-ipxe-menu"),
    pytest.param(Case("grub", uefi=False, mac=KNOWN_MAC), id="bios-grub-per-mac"),
    pytest.param(Case("ipxe", uefi=True, mac=KNOWN_MAC), id="uefi-ipxe-per-mac"),
    pytest.param(Case("grub", uefi=True, mac=OTHER_MAC), id="uefi-grub-menu"),
    pytest.param(Case("grub", uefi=True, mac=KNOWN_MAC, firmware_pxe=True), id="uefi-firmware-pxe-grub-per-mac"),
]


@pytest.mark.parametrize("case", CASES)
def test_netboot_fetches_kernel_and_initrd_with_the_generated_command_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, vmlinuz: Path, case: Case
) -> None:
    if case.bootloader == "grub":
        require_tools("grub-mknetdir")
    www = tmp_path / "www"
    for name in ("menu", "node"):
        (www / name).mkdir(parents=True)
        shutil.copyfile(vmlinuz, www / name / "vmlinuz")
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

        netdev = f"user,id=n0,tftp={out / 'tftp'},bootfile={case.bootfile}"
        with qemu_netboot(netdev, uefi=case.uefi, mac=case.mac, work=tmp_path, firmware_pxe=case.firmware_pxe) as vm:
            fetched = server.wait_for(lambda: len(server.paths()) >= 2, TIMEOUT)
            assert fetched, f"HTTP requests: {server.requests}; console:\n{vm.text()[-3000:]}"
            # the kernel prints its command line first thing, and "Trying to unpack rootfs image as
            # initramfs" only when the bootloader handed it an initrd (iPXE on UEFI: through initrd=NAME)
            assert vm.wait_for("Trying to unpack rootfs image as initramfs", TIMEOUT), vm.text()[-3000:]
            booted_cmdline = vm.line("Command line: ")

    assert server.paths() == wanted
    if case.bootloader == "ipxe":
        expected = kernel_cmdline(entry, machine, initrd_name="initrd.img")
        # iPXE on UEFI passes the image name first (the EFI stub's argv[0]); BIOS does not
        assert booted_cmdline.removeprefix("vmlinuz ") == expected
    else:
        port = server.port
        expected = f"BOOT_IMAGE=(http,10.0.2.2:{port})/{entry.name}/vmlinuz " + kernel_cmdline(entry, machine)
        assert booted_cmdline == expected
    assert ("bootkit.test=per-mac" in booted_cmdline) == (machine is not None)
