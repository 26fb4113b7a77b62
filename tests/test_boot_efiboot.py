"""The boot NIC from the UEFI variables (bootkit.boot.efiboot): a directory laid out as efivarfs, with the
variables OVMF writes for a UEFI HTTP Boot, then hostile variants patched field by field."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from bootkit.boot import efiboot
from bootkit.boot.efiboot import EFI_GLOBAL_VARIABLE, BadVariable, boot_mac

MAC = bytes.fromhex("525400123456")
#: efivarfs's attribute bytes: NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS
ATTRIBUTES = struct.pack("<I", 7)


def node(node_type: int, subtype: int, data: bytes) -> bytes:
    return struct.pack("<BBH", node_type, subtype, 4 + len(data)) + data


def mac_node(mac: bytes = MAC, if_type: int = 1) -> bytes:
    return node(3, 11, mac.ljust(32, b"\0") + bytes([if_type]))


def http_boot_path(mac_part: bytes | None = None) -> bytes:
    """PciRoot(0x0)/Pci(0x3,0x0)/MAC(525400123456,0x1)/IPv4(0.0.0.0)/Uri(), as OVMF writes it."""
    return b"".join((
        node(2, 1, struct.pack("<II", 0x0A0341D0, 0)),  # ACPI PciRoot
        node(1, 1, bytes([0, 3])),  # Hardware PCI: function 0, device 3
        mac_node() if mac_part is None else mac_part,
        node(3, 12, bytes(23)),  # Messaging IPv4
        node(3, 24, b""),  # Messaging URI, empty
        node(0x7F, 0xFF, b""),  # end of the entire path
    ))  # fmt: skip


def load_option(path: bytes, description: str = "UEFI HTTPv4 (MAC:525400123456)") -> bytes:
    return struct.pack("<IH", 1, len(path)) + (description + "\0").encode("utf-16-le") + path


def efivars(tmp_path: Path, option: bytes, current: bytes = struct.pack("<H", 2)) -> Path:
    d = tmp_path / "efivars"
    d.mkdir(exist_ok=True)
    (d / f"BootCurrent-{EFI_GLOBAL_VARIABLE}").write_bytes(ATTRIBUTES + current)
    (d / f"Boot0002-{EFI_GLOBAL_VARIABLE}").write_bytes(ATTRIBUTES + option)
    return d


def test_ovmf_http_boot_variables_give_the_mac(tmp_path: Path) -> None:
    assert boot_mac(efivars(tmp_path, load_option(http_boot_path()))) == "52:54:00:12:34:56"
    assert efiboot.bootif("52:54:00:12:34:56") == "01-52-54-00-12-34-56"


def test_a_disk_boot_option_has_no_mac(tmp_path: Path) -> None:
    disk = node(2, 1, struct.pack("<II", 0x0A0341D0, 0)) + node(4, 4, b"\\\0E\0F\0I\0\0\0") + node(0x7F, 0xFF, b"")
    assert boot_mac(efivars(tmp_path, load_option(disk, "UEFI Misc Device"))) is None


def test_the_command_prints_bootif_or_nothing(tmp_path: Path) -> None:
    d = efivars(tmp_path, load_option(http_boot_path()))
    cmd = [sys.executable, "-m", "bootkit.boot.efiboot", "--efivars", str(d)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "01-52-54-00-12-34-56\n", "")
    (d / f"BootCurrent-{EFI_GLOBAL_VARIABLE}").unlink()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("bootkit: no boot interface from the UEFI variables: BootCurrent: cannot read ")
    assert len(proc.stderr.splitlines()) == 1


_PATH = http_boot_path()
_OPTION = load_option(_PATH)
_PATH_AT = len(_OPTION) - len(_PATH)
_MAC_AT = _PATH_AT + 12 + 6  # after PciRoot (12 bytes) and Pci (6 bytes)


def _patched(at: int, value: bytes, option: bytes = _OPTION) -> bytes:
    return option[:at] + value + option[at + len(value) :]


@pytest.mark.parametrize(
    ("option", "current", "message"),
    [
        (_OPTION, b"\x02", "BootCurrent: 1 bytes, not a UINT16"),
        (_OPTION, b"\x02\x00\x00", "BootCurrent: 3 bytes, not a UINT16"),
        (_OPTION, struct.pack("<H", 0x1234), "Boot1234: cannot read"),
        (b"\x01\x00\x00", None, "Boot0002: 3 bytes, shorter than a load option's header"),
        # the description never ends
        (struct.pack("<IH", 1, 4) + "UEFI".encode("utf-16-le"), None, "the description has no terminating NUL"),
        # FilePathListLength larger than the option, and smaller than one node header
        (_patched(4, struct.pack("<H", 0xFFFF)), None, "FilePathListLength 65535"),
        (_patched(4, struct.pack("<H", 2)), None, "FilePathListLength 2"),
        # a node length of 0 (would loop forever), 3 (shorter than its header) and past the end of the path
        (_patched(_PATH_AT + 2, struct.pack("<H", 0)), None, "node at offset 0 has length 0"),
        (_patched(_PATH_AT + 2, struct.pack("<H", 3)), None, "node at offset 0 has length 3"),
        (_patched(_MAC_AT + 2, struct.pack("<H", 0xFFF0)), None, "node at offset 18 has length 65520"),
        # no end node: the path stops after the MAC node
        (load_option(_PATH[: 12 + 6 + 37]), None, "device path ends without an end node (offset 55)"),
        # the MAC node: wrong length, not Ethernet, multicast, all zero
        (load_option(http_boot_path(node(3, 11, MAC + bytes(26)))), None, "MAC address node of 36 bytes, not 37"),
        (load_option(http_boot_path(node(3, 11, MAC + bytes(30)))), None, "MAC address node of 40 bytes, not 37"),
        (load_option(http_boot_path(mac_node(if_type=6))), None, "interface type 6, not Ethernet"),
        (load_option(http_boot_path(mac_node(bytes.fromhex("01005e000001")))), None, "01:00:5e:00:00:01 is not"),
        (load_option(http_boot_path(mac_node(bytes(6)))), None, "00:00:00:00:00:00 is not a unicast address"),
        # more nodes than any real path: the walk is bounded
        (load_option(node(1, 1, bytes(2)) * 100 + node(0x7F, 0xFF, b"")), None, "more than 64 nodes"),
    ],
)
def test_malformed_variables_are_refused_naming_the_field(
    tmp_path: Path, option: bytes, current: bytes | None, message: str
) -> None:
    d = efivars(tmp_path, option, current if current is not None else struct.pack("<H", 2))
    with pytest.raises(BadVariable, match=None) as info:
        boot_mac(d)
    assert message in str(info.value), str(info.value)


def test_an_oversized_variable_is_not_read_whole(tmp_path: Path) -> None:
    d = efivars(tmp_path, _OPTION + bytes(efiboot.MAX_VARIABLE))
    with pytest.raises(BadVariable, match=r"^Boot0002: larger than 65536 bytes$"):
        boot_mac(d)


def test_a_truncated_attribute_header_is_refused(tmp_path: Path) -> None:
    d = efivars(tmp_path, _OPTION)
    (d / f"BootCurrent-{EFI_GLOBAL_VARIABLE}").write_bytes(b"\x07\x00")
    with pytest.raises(BadVariable, match=r"^BootCurrent: 2 bytes, shorter than its 4 attribute bytes$"):
        boot_mac(d)


# -- the systemd flavour's generator: BOOTIF= from the UEFI variables ---------------------------------------

MODULE = Path(__file__).resolve().parent.parent / "dracut-module" / "90bootkit"


def _generator(tmp_path: Path, cmdline: str, efivars_dir: Path) -> dict[str, str]:
    proc_cmdline = tmp_path / "cmdline"
    proc_cmdline.write_text(cmdline + "\n")
    helper = tmp_path / "bootkit-efi-bootif"
    # the initramfs's entry point, with this interpreter and tree
    helper.write_text(f'#!/bin/sh\nexec {sys.executable} -m bootkit.boot.efiboot "$@"\n')
    helper.chmod(0o755)
    out = tmp_path / "network"
    env = {"PATH": "/usr/bin:/bin", "BOOTKIT_PROC_CMDLINE": str(proc_cmdline), "BOOTKIT_NETWORK_DIR": str(out),
           "BOOTKIT_EFIVARS": str(efivars_dir), "BOOTKIT_EFI_BOOTIF": str(helper),
           "PYTHONPATH": str(Path(efiboot.__file__).resolve().parents[2])}  # fmt: skip
    proc = subprocess.run(["sh", str(MODULE / "bootkit-bootif-generator.sh")], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return {p.name: p.read_text() for p in sorted(out.iterdir())} if out.exists() else {}


def test_uki_line_with_http_boot_variables_configures_the_boot_nic_only(tmp_path: Path) -> None:
    """The line build-uki writes (ip=dhcp rd.neednet=1, no BOOTIF=) on a machine OVMF booted over HTTP."""
    from bootkit.host.uki import UKI_NETWORK

    line = "root=qcow2:http://h/d.qcow2 " + " ".join(a.render(None) for a in UKI_NETWORK)
    assert "ip=dhcp" in line.split() and "BOOTIF=" not in line
    files = _generator(tmp_path, line, efivars(tmp_path, load_option(http_boot_path())))
    assert list(files) == ["10-bootkit-bootif.network", "11-bootkit-other.network"]
    assert "MACAddress=52:54:00:12:34:56\n" in files["10-bootkit-bootif.network"]


@pytest.mark.parametrize(
    "option",
    [
        load_option(http_boot_path(mac_node(if_type=6))),  # malformed: refused by the reader
        load_option(node(2, 1, bytes(8)) + node(0x7F, 0xFF, b"")),  # not a network boot
    ],
)
def test_without_a_usable_mac_every_nic_keeps_dhcp(tmp_path: Path, option: bytes) -> None:
    assert _generator(tmp_path, "ip=dhcp rd.neednet=1", efivars(tmp_path, option)) == {}


def test_bootif_on_the_line_wins_over_the_variables(tmp_path: Path) -> None:
    files = _generator(tmp_path, "ip=dhcp BOOTIF=01-52-54-00-aa-bb-cc",
                       efivars(tmp_path, load_option(http_boot_path())))  # fmt: skip
    assert "MACAddress=52:54:00:aa:bb:cc\n" in files["10-bootkit-bootif.network"]
