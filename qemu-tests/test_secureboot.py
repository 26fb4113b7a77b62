"""Secure Boot with the site's own key: a signed UKI (``bootkit build-uki``) over UEFI HTTP Boot (issue 18, part 2).

Every boot runs OVMF's Secure Boot build (``OVMF_CODE_4M.secboot.fd``: SMM on, the flash's variable store
writable only from SMM) with a copy of the empty variable store into which the test enrols its own PK, KEK and
db certificates (``virt-fw-vars`` from virt-firmware, made with openssl here), so Secure Boot is enforcing and
only the site's db key is trusted. No NIC has QEMU's iPXE option ROM (``romfile=``): an unsigned ROM running
would make "enforcing" prove nothing.

Two boots:

* firmware refusals, no network: three virtual FAT disks hold, in boot order, a signed UKI with one digit of the
  pinned hash in its command line changed, a UKI signed by another key, and a correctly signed UKI (with a
  small initramfs that prints its command line and powers off). The firmware must refuse the first two (its
  boot manager prints "Access Denied" for each) and start the third.
* HTTP Boot to the root: the two-guest network of tests/test_pxecfg_qemu.py (a server guest runs the
  ``dnsmasq.conf`` pxe-config generated, with ``[dhcp] http_boot``, and busybox httpd); OVMF's HTTP Boot gets
  the UKI's URL from dnsmasq, fetches it, verifies it, and the UKI's bootkit initramfs boots the QCOW2 image
  (served by the same httpd, hash pinned in the UKI's command line) to the root proof.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bkharness.fixtures import BootDir
from bkharness.guest import GUEST_KERNEL_ARGS, Guest, qemu_direct
from bkharness.images import RootImage, qcow2_image
from bkharness.initramfs import SMOKE_INIT, tiny_initramfs
from bkharness.pieces import GUEST_BOOT_ARGS, bootkit
from bkharness.secureboot import OVMF_EMPTY_VARS, OVMF_SECBOOT_CODE, require_files, require_tools
from bkharness.secureboot import secure_boot_guest as ovmf_secure_boot_guest

from bootkit.host import pe
from bootkit.run import run

pytestmark = pytest.mark.qemu

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")

#: OVMF under TCG takes ~5 s to its boot manager; the HTTP Boot then fetches the ~28 MB UKI through the
#: firmware's network stack (~20 s), and the whole boot to the root proof took 245 s with the machine loaded
BOOT_TIMEOUT = 600.0

SERVER_IP = "192.168.50.1"
CLIENT_MAC = "52:54:00:12:34:56"

#: the kernel line of the refusal boot's UKIs: a pinned hash whose digits the altered copy changes
PINNED = "a" * 64
SMOKE_CMDLINE = f"root=qcow2:http://{SERVER_IP}/disk.qcow2 rd.qcow2.sha256={PINNED} ro ip=dhcp rd.neednet=1 " + (
    " ".join(GUEST_KERNEL_ARGS)
)


def require_secure_boot_tools() -> None:
    require_tools("qemu-system-x86_64", "openssl", "objcopy", "sbsign", "sbverify")
    require_files((OVMF_SECBOOT_CODE, "ovmf"), (OVMF_EMPTY_VARS, "ovmf"), (STUB, "systemd-boot-efi"))
    if _virt_fw_vars() is None:
        pytest.skip("virt-fw-vars missing (pip install virt-firmware: the dev extra of pyproject.toml)")


def _virt_fw_vars() -> str | None:
    beside = Path(sys.executable).parent / "virt-fw-vars"
    return str(beside) if beside.exists() else shutil.which("virt-fw-vars")


# -- the site's keys and the firmware's variable store --------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    key: Path
    cert: Path


def make_key(directory: Path, name: str) -> KeyPair:
    """A self-signed RSA 2048 certificate and its key (what firmware accepts for PK, KEK and db)."""
    pair = KeyPair(directory / f"{name}.key", directory / f"{name}.crt")
    run([
        "openssl", "req", "-new", "-x509",
        "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650",
        "-subj", f"/CN=bootkit test {name}/",
        "-keyout", pair.key,
        "-out", pair.cert,
    ], capture=True)  # fmt: skip
    return pair


@dataclass(frozen=True)
class Site:
    """The site's Secure Boot keys (db signs UKIs), a stranger's key, and the enrolled variable store."""

    db: KeyPair
    other: KeyPair
    vars_template: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    require_secure_boot_tools()
    d = tmp_path_factory.mktemp("site-keys")
    pk, kek, db, other = (make_key(d, n) for n in ("PK", "KEK", "db", "other"))
    owner = str(uuid.uuid4())
    vars_file = d / "OVMF_VARS.enrolled.fd"
    tool = _virt_fw_vars()
    assert tool is not None
    run([
        tool,
        "--input", OVMF_EMPTY_VARS,
        "--output", vars_file,
        "--set-pk", owner, pk.cert,
        "--add-kek", owner, kek.cert,
        "--add-db", owner, db.cert,
        "--secure-boot",
    ], capture=True)  # fmt: skip
    return Site(db, other, vars_file)


@contextmanager
def secure_boot_guest(site: Site, devices: Sequence[str], *, log_dir: Path, name: str,
                      memory_mib: int = 1024) -> Iterator[Guest]:
    """OVMF with Secure Boot enforcing and the site's keys; ``devices`` are the rest of QEMU's arguments."""
    with ovmf_secure_boot_guest(site.vars_template, devices, log_dir=log_dir, name=name, memory_mib=memory_mib,
                                boot_timeout=BOOT_TIMEOUT) as guest:
        yield guest


def build_uki(out: Path, *args: str | Path) -> Path:
    bootkit("build-uki", "-o", out, *args)
    return out


def alter_cmdline(uki: Path, out: Path) -> Path:
    """A copy of ``uki`` whose pinned hash has one digit changed, signature left as it was."""
    data = bytearray(uki.read_bytes())
    section = pe.read(uki).section(".cmdline")
    assert section is not None
    start = section.pointer_to_raw_data + bytes(data[section.pointer_to_raw_data:]).index(PINNED.encode())
    data[start] = ord("b")
    out.write_bytes(bytes(data))
    return out


def esp_disk(directory: Path, uki: Path, pci_slot: int, bootindex: int) -> list[str]:
    """A virtual FAT disk (QEMU's vvfat, read-only) holding ``uki`` as the removable-media boot path."""
    (directory / "EFI" / "BOOT").mkdir(parents=True)
    shutil.copyfile(uki, directory / "EFI" / "BOOT" / "BOOTX64.EFI")
    drive = f"d{bootindex}"
    return [
        "-drive", f"file=fat:{directory},format=raw,if=none,id={drive},readonly=on",
        "-device", f"virtio-blk-pci,drive={drive},addr={pci_slot:#x},bootindex={bootindex}",
    ]  # fmt: skip


def test_firmware_refuses_an_altered_uki_and_a_foreign_key_and_starts_the_signed_one(
    site: Site, kernel: Any, boot_dir: BootDir
) -> None:
    work = boot_dir.path
    smoke = tiny_initramfs(work / "smoke.cpio", SMOKE_INIT)
    common = ("--kernel", kernel.vmlinuz, "--initrd", smoke, "--cmdline", SMOKE_CMDLINE)
    signed = build_uki(work / "signed.efi", *common, "--sign-key", site.db.key, "--sign-cert", site.db.cert)
    foreign = build_uki(work / "foreign.efi", *common, "--sign-key", site.other.key, "--sign-cert", site.other.cert)
    altered = alter_cmdline(signed, work / "altered.efi")

    # PCI slots name each disk in the firmware's messages: 5 altered, 6 foreign, 7 signed (and the boot order)
    devices = [
        *esp_disk(work / "esp-altered", altered, 5, 1),
        *esp_disk(work / "esp-foreign", foreign, 6, 2),
        *esp_disk(work / "esp-signed", signed, 7, 3),
    ]
    with secure_boot_guest(site, devices, log_dir=work, name="refusals", memory_mib=512) as vm:
        vm.expect(r"failed to load Boot\w+ .* from PciRoot\(0x0\)/Pci\(0x5,0x0\): Access Denied", 300)
        vm.expect(r"failed to load Boot\w+ .* from PciRoot\(0x0\)/Pci\(0x6,0x0\): Access Denied", 120)
        vm.expect(r"secureboot: Secure boot enabled", 120)
        line = vm.expect(r"HARNESS-SMOKE cmdline=(.*) uptime=", 120)[1]
        assert vm.wait_exit(60) == 0
    assert line == SMOKE_CMDLINE
    boot_dir.record(vm, firmware="uefi-secureboot", loader="uki", refusals=2)


# -- UEFI HTTP Boot through the generated dnsmasq.conf --------------------------------------------------------

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
dnsmasq --conf-file=/etc/dnsmasq.conf --user=root --group=root --dhcp-leasefile=/tmp/leases \\
    --pid-file= --log-facility=- --keep-in-foreground &
while true; do sleep 60; done
"""

DESCRIPTION = """\
base_url = "http://{server_ip}/"
docroot = "{docroot}"
console = ["ttyS0,115200"]

[[entry]]
name = "node"
kernel = "vmlinuz"
initrd = "initrd.img"
image = "disk.qcow2"
args = {args}

[dhcp]
mode = "full"
range_start = "192.168.50.100"
range_end = "192.168.50.150"
netmask = "255.255.255.0"
interface = "eth0"
tftp_root = "/srv/tftp"
http_boot = "uki.efi"
"""


def _copy_with_libraries(binary: str, root: Path) -> None:
    """Copy an ELF binary and every shared library ``ldd`` lists into the same paths under ``root``."""
    ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    for path in [binary, *(m.group(1) for m in re.finditer(r"(/\S+) \(0x", ldd))]:
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)


def server_initramfs(kernel: Any, dnsmasq_conf: Path, served: dict[str, Path], work: Path) -> Path:
    """A cpio initramfs running ``dnsmasq_conf`` and busybox httpd serving ``served`` (name -> file)."""
    require_tools("busybox", "cpio", "ldd", "dnsmasq")
    root = work / "server-root"
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "srv/http", "srv/tftp"):
        (root / d).mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "busybox", root / "bin" / "busybox")
    _copy_with_libraries(shutil.which("dnsmasq") or "dnsmasq", root)
    dep = (kernel.kmoddir / "modules.dep").read_text()
    modules = root / "lib" / "modules" / kernel.kver
    for line in dep.splitlines():
        module, _, deps = line.partition(":")
        if Path(module).name in ("virtio_pci.ko", "virtio_net.ko"):
            for m in (module, *deps.split()):
                (modules / m).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(kernel.kmoddir / m, modules / m)
    shutil.copy(kernel.kmoddir / "modules.dep", modules / "modules.dep")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    shutil.copy(dnsmasq_conf, root / "etc" / "dnsmasq.conf")
    for name, path in served.items():
        shutil.copy(path, root / "srv" / "http" / name)
    init = root / "init"
    init.write_text(SERVER_INIT.format(server_ip=SERVER_IP))
    init.chmod(0o755)
    archive = work / "server.cpio"
    names = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    with archive.open("wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=root, input=names, stdout=f,
                       check=True)  # fmt: skip
    shutil.rmtree(root)
    return archive


def test_http_boot_of_the_signed_uki_to_the_root(
    site: Site, kernel: Any, shell_initrd: Path, busybox_root: RootImage, boot_dir: BootDir
) -> None:
    from bootkit.boot.cmdline import join_args
    from bootkit.host.pxecfg.load import load_file
    from bootkit.host.uki import uki_args

    work = boot_dir.path
    www = work / "www"
    www.mkdir()
    shutil.copyfile(kernel.vmlinuz, www / "vmlinuz")
    shutil.copyfile(shell_initrd, www / "initrd.img")
    shutil.copyfile(qcow2_image(busybox_root.raw, compression="zstd"), www / "disk.qcow2")
    args = "[" + ", ".join(f'"{a}"' for a in GUEST_BOOT_ARGS if a != "rw") + "]"
    toml = work / "site.toml"
    toml.write_text(DESCRIPTION.format(server_ip=SERVER_IP, docroot=www, args=args))
    # the UKI carries exactly the entry's line (hash pinned); then pxe-config hands its URL to HTTP clients
    uki = build_uki(www / "uki.efi", "--toml", toml, "--entry", "node", "--kernel", www / "vmlinuz",
                    "--initrd", www / "initrd.img", "--sign-key", site.db.key, "--sign-cert", site.db.cert)
    out = work / "out"
    bootkit("pxe-config", toml, "--out", out, "--no-grub-images")
    run(["dnsmasq", "--test", f"--conf-file={out / 'dnsmasq.conf'}"], capture=True)
    expected_line = join_args(uki_args(load_file(toml).entry("node")))
    # the server sends only what the firmware and the initramfs fetch: the UKI and the image
    initramfs = server_initramfs(kernel, out / "dnsmasq.conf", {"uki.efi": uki, "disk.qcow2": www / "disk.qcow2"},
                                 work)

    with tempfile.TemporaryDirectory(prefix="bk-sb-") as sockdir:  # unix socket paths: at most 108 bytes
        socket = Path(sockdir) / "net"
        listen = f"stream,id=n0,server=on,addr.type=unix,addr.path={socket}"
        append = " ".join((*GUEST_KERNEL_ARGS, "quiet"))
        with qemu_direct(kernel.vmlinuz, initramfs, append, netdev=listen, memory_mib=512, log_dir=work,
                         name="server") as server:  # fmt: skip
            server.expect(r"TFTP root is /srv/tftp", 120)
            devices = [
                "-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={socket}",
                # romfile= (empty): no iPXE option ROM, OVMF's own network stack does the HTTP Boot
                "-device", f"virtio-net-pci,netdev=n0,mac={CLIENT_MAC},romfile=,bootindex=1",
                # OVMF's PXE boot options would come first and wait for TFTP: this machine boots over HTTP only
                "-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n",
                "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n",
            ]  # fmt: skip
            with secure_boot_guest(site, devices, log_dir=work, name="http-boot") as vm:
                booted_line = vm.expect(r"Command line: (.*)$", BOOT_TIMEOUT)[1].strip()
                vm.expect(r"secureboot: Secure boot enabled", 60)
                boot_dir.prove(vm, busybox_root, BOOT_TIMEOUT, firmware="uefi-secureboot", loader="uki-http",
                               mode="ram", root="busybox", initrd="shell")  # fmt: skip
                # no boot loader, no BOOTIF=: the UEFI variables named the NIC OVMF booted from (docs/pxe.md,
                # "Secure paths"), and dracut ran DHCP on that one only
                bootif = "01-" + CLIENT_MAC.replace(":", "-")
                assert vm.seen(rf"bootkit: boot interface from the UEFI variables: BOOTIF={bootif}"), vm.tail(60)
            server_log = server.output

    assert booted_line == expected_line
    # dnsmasq recognised the firmware as an HTTP Boot client (vendor class, architecture 16) and handed it the
    # UKI's URL; nothing was sent over TFTP
    assert re.search(r"vendor class: HTTPClient:Arch:00016", server_log), server_log[-3000:]
    assert "tags: httpclient, efi64-http" in server_log, server_log[-3000:]
    assert re.search(rf"bootfile-name +http://{re.escape(SERVER_IP)}/uki\.efi", server_log), server_log[-3000:]
    assert not re.search(r"dnsmasq-tftp\[\d+\]: sent", server_log)
