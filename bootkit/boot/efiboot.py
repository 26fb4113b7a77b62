"""The network interface the firmware booted from, read from the UEFI variables (UEFI 2.10, 3.1.3 "Load
Options", 3.3 "Globally Defined Variables", 10.3 "Device Path Nodes").

A UKI started by UEFI HTTP Boot gets no ``BOOTIF=`` from a boot loader; the firmware's own record says which
NIC it used: ``BootCurrent`` (UINT16) names the boot option ``Boot####``, an ``EFI_LOAD_OPTION``::

    UINT32 Attributes; UINT16 FilePathListLength; CHAR16 Description[] (NUL-terminated);
    EFI_DEVICE_PATH_PROTOCOL FilePathList[]  (FilePathListLength bytes); UINT8 OptionalData[]

whose device path holds a MAC address node (Messaging, type 3, sub-type 11: 32 bytes of address, one byte of
interface type, 37 bytes in all) for a network boot. Each efivarfs file is the variable's UINT32 attributes
followed by its data.

The variables are firmware data, and whoever can write them before the boot controls them: every length is
checked against the bytes present, the walk is bounded, and only a well-formed Ethernet MAC address is
returned (as dracut's ``BOOTIF=`` value, ``01-xx-xx-xx-xx-xx-xx``); anything else is None and the boot falls
back to DHCP on every interface, as without this module.
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

#: EFI_GLOBAL_VARIABLE: the namespace of BootCurrent and Boot####
EFI_GLOBAL_VARIABLE = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
EFIVARS = Path("/sys/firmware/efi/efivars")
#: a load option larger than this is not a real one (OVMF's are a few hundred bytes)
MAX_VARIABLE = 64 * 1024
#: nodes in one device path before the walk gives up (a real network path has about six)
MAX_NODES = 64

END_TYPE = 0x7F
END_ENTIRE = 0xFF
MESSAGING_TYPE = 0x03
MSG_MAC_ADDR = 0x0B
#: EFI_DEVICE_PATH_PROTOCOL header: Type, SubType, Length (UINT16, the whole node)
_NODE_HEADER = struct.Struct("<BBH")
#: MAC_ADDR_DEVICE_PATH: header, EFI_MAC_ADDRESS (32 bytes), IfType
MAC_NODE_LENGTH = _NODE_HEADER.size + 32 + 1
#: RFC 1700 ARP hardware types firmware writes for Ethernet (OVMF: 1; some write 0)
ETHERNET_IF_TYPES = (0, 1)
_LOAD_OPTION_HEAD = struct.Struct("<IH")


class BadVariable(ValueError):
    """A UEFI variable that is missing, too large or malformed; the message names the variable and offset."""


def read_variable(efivars: Path, name: str, guid: str = EFI_GLOBAL_VARIABLE) -> bytes:
    """The data of variable ``name`` (without efivarfs's 4 attribute bytes), at most :data:`MAX_VARIABLE`."""
    path = efivars / f"{name}-{guid}"
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_VARIABLE + 5)
    except OSError as e:
        raise BadVariable(f"{name}: cannot read {path}: {e.strerror}") from None
    if len(raw) < 4:
        raise BadVariable(f"{name}: {len(raw)} bytes, shorter than its 4 attribute bytes")
    if len(raw) > MAX_VARIABLE + 4:
        raise BadVariable(f"{name}: larger than {MAX_VARIABLE} bytes")
    return raw[4:]


def boot_current(efivars: Path) -> int:
    """The number of the boot option the firmware started (``BootCurrent``)."""
    data = read_variable(efivars, "BootCurrent")
    if len(data) != 2:
        raise BadVariable(f"BootCurrent: {len(data)} bytes, not a UINT16")
    value: int = struct.unpack("<H", data)[0]
    return value


def load_option_device_path(data: bytes, name: str) -> bytes:
    """The ``FilePathList`` of an ``EFI_LOAD_OPTION``."""
    if len(data) < _LOAD_OPTION_HEAD.size:
        raise BadVariable(f"{name}: {len(data)} bytes, shorter than a load option's header")
    _attributes, path_length = _LOAD_OPTION_HEAD.unpack_from(data)
    # the description: UCS-2 characters up to and including a NUL one
    offset = _LOAD_OPTION_HEAD.size
    while True:
        if offset + 2 > len(data):
            raise BadVariable(f"{name}: the description has no terminating NUL (offset {offset})")
        char = data[offset : offset + 2]
        offset += 2
        if char == b"\0\0":
            break
    if path_length < _NODE_HEADER.size or offset + path_length > len(data):
        raise BadVariable(
            f"{name}: FilePathListLength {path_length} at offset {offset} does not fit the {len(data)}-byte option"
        )
    return data[offset : offset + path_length]


def device_path_nodes(path: bytes, name: str) -> List[Tuple[int, int, bytes]]:
    """The nodes ``(type, subtype, data)`` of the first device path instance, up to its end node."""
    nodes: List[Tuple[int, int, bytes]] = []
    offset = 0
    while len(nodes) < MAX_NODES:
        if offset + _NODE_HEADER.size > len(path):
            raise BadVariable(f"{name}: device path ends without an end node (offset {offset})")
        node_type, subtype, length = _NODE_HEADER.unpack_from(path, offset)
        if length < _NODE_HEADER.size or offset + length > len(path):
            raise BadVariable(f"{name}: device path node at offset {offset} has length {length}")
        if node_type == END_TYPE:
            return nodes
        nodes.append((node_type, subtype, path[offset + _NODE_HEADER.size : offset + length]))
        offset += length
    raise BadVariable(f"{name}: device path has more than {MAX_NODES} nodes")


def mac_of(nodes: Sequence[Tuple[int, int, bytes]], name: str) -> Optional[str]:
    """The Ethernet MAC address of the path's MAC address node (``52:54:00:12:34:56``); None without one."""
    for node_type, subtype, data in nodes:
        if node_type != MESSAGING_TYPE or subtype != MSG_MAC_ADDR:
            continue
        if len(data) != MAC_NODE_LENGTH - _NODE_HEADER.size:
            size = len(data) + _NODE_HEADER.size
            raise BadVariable(f"{name}: MAC address node of {size} bytes, not {MAC_NODE_LENGTH}")
        if data[32] not in ETHERNET_IF_TYPES:
            raise BadVariable(f"{name}: MAC address node of interface type {data[32]}, not Ethernet")
        mac = data[:6]
        if mac == b"\0" * 6 or mac[0] & 1:
            raise BadVariable(f"{name}: MAC address {mac.hex(':')} is not a unicast address")
        return mac.hex(":")
    return None


def boot_mac(efivars: Path = EFIVARS) -> Optional[str]:
    """The MAC address of the NIC the firmware booted from, or None when it did not boot from a network."""
    name = f"Boot{boot_current(efivars):04X}"
    path = load_option_device_path(read_variable(efivars, name), name)
    return mac_of(device_path_nodes(path, name), name)


def bootif(mac: str) -> str:
    """dracut's ``BOOTIF=`` value for ``mac``: ``01-52-54-00-12-34-56`` (hardware type 1, Ethernet)."""
    return "01-" + mac.replace(":", "-")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the boot NIC's ``BOOTIF=`` value (nothing when the firmware did not boot from a NIC); the reason
    on stderr and exit status 1 when the variables are missing or malformed."""
    parser = argparse.ArgumentParser(prog="bootkit-efi-bootif", description=main.__doc__, allow_abbrev=False)
    parser.add_argument("--efivars", type=Path, default=EFIVARS, help="efivarfs directory (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        mac = boot_mac(args.efivars)
    except BadVariable as e:
        print(f"bootkit: no boot interface from the UEFI variables: {e}", file=sys.stderr)
        return 1
    if mac is not None:
        print(bootif(mac))
    return 0


if __name__ == "__main__":
    sys.exit(main())
