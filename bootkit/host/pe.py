"""The section table of a PE32+ image (an EFI application): what ``build-uki`` needs to place new sections.

References: Microsoft "PE Format" (learn.microsoft.com/windows/win32/debug/pe-format): the MS-DOS stub's
``e_lfanew`` at 0x3c points to the ``PE\\0\\0`` signature, then the COFF file header, the optional header
(magic 0x20b for PE32+) and the section table (40 bytes per section). Names keep the spec's field names.

Read-only and strict: a file that is not a PE32+ image is :class:`PeError` naming the field and offset.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootkit.errors import BootkitError

E_LFANEW_OFFSET = 0x3C
PE_SIGNATURE = b"PE\0\0"
#: Machine, NumberOfSections, TimeDateStamp, PointerToSymbolTable, NumberOfSymbols, SizeOfOptionalHeader,
#: Characteristics
COFF_HEADER = struct.Struct("<HHIIIHH")
#: the start of the PE32+ optional header up to SizeOfImage: Magic, linker versions, SizeOfCode,
#: SizeOfInitializedData, SizeOfUninitializedData, AddressOfEntryPoint, BaseOfCode, ImageBase,
#: SectionAlignment, FileAlignment, OS/image/subsystem versions, Win32VersionValue, SizeOfImage
OPTIONAL_HEADER = struct.Struct("<HBBIIIIIQIIHHHHHHII")
#: Name, VirtualSize, VirtualAddress, SizeOfRawData, PointerToRawData, PointerToRelocations,
#: PointerToLinenumbers, NumberOfRelocations, NumberOfLinenumbers, Characteristics
SECTION_HEADER = struct.Struct("<8sIIIIIIHHI")
PE32_PLUS_MAGIC = 0x20B
IMAGE_FILE_MACHINE_AMD64 = 0x8664
#: more is not an EFI program but a hostile or broken file
MAX_SECTIONS = 96


class PeError(BootkitError):
    """The file is not the PE32+ image it should be."""

    exit_status = 2


@dataclass(frozen=True)
class Section:
    """One section table entry (addresses are relative to ImageBase, as in the file)."""

    name: str
    virtual_size: int
    virtual_address: int
    size_of_raw_data: int
    pointer_to_raw_data: int

    @property
    def end(self) -> int:
        """The first relative virtual address after the section."""
        return self.virtual_address + max(self.virtual_size, self.size_of_raw_data)


@dataclass(frozen=True)
class PeImage:
    """What a PE32+ header says about the layout of the image."""

    machine: int
    image_base: int
    section_alignment: int
    file_alignment: int
    size_of_image: int
    sections: tuple[Section, ...]

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name), None)

    @property
    def end(self) -> int:
        """The first relative virtual address after every section."""
        return max((s.end for s in self.sections), default=0)


def parse(data: bytes, what: str) -> PeImage:
    """The layout of the PE32+ image ``data``; ``what`` names it in messages."""

    def field(fmt: struct.Struct, offset: int, name: str) -> tuple[Any, ...]:
        if offset < 0 or offset + fmt.size > len(data):
            raise PeError(f"{what}: truncated at {name} (offset {offset:#x}, file {len(data)} bytes)")
        return fmt.unpack_from(data, offset)

    if data[:2] != b"MZ":
        raise PeError(f"{what}: not a PE image (no MZ signature at offset 0)")
    (e_lfanew,) = field(struct.Struct("<I"), E_LFANEW_OFFSET, "e_lfanew")
    if data[e_lfanew : e_lfanew + 4] != PE_SIGNATURE:
        raise PeError(f"{what}: no PE signature at e_lfanew {e_lfanew:#x}")
    coff = e_lfanew + 4
    machine, nsections, _, _, _, optional_size, _ = field(COFF_HEADER, coff, "COFF header")
    optional = coff + COFF_HEADER.size
    fields = field(OPTIONAL_HEADER, optional, "optional header")
    magic, image_base, section_alignment, file_alignment, size_of_image = (
        fields[0], fields[8], fields[9], fields[10], fields[18]
    )  # fmt: skip
    if magic != PE32_PLUS_MAGIC:
        raise PeError(f"{what}: optional header magic {magic:#x} at {optional:#x} is not PE32+ ({PE32_PLUS_MAGIC:#x})")
    if not 0 < nsections <= MAX_SECTIONS:
        raise PeError(f"{what}: NumberOfSections {nsections} at {coff + 2:#x} is not 1..{MAX_SECTIONS}")
    if section_alignment == 0 or section_alignment & (section_alignment - 1):
        raise PeError(f"{what}: SectionAlignment {section_alignment:#x} is not a power of two")
    sections = []
    table = optional + optional_size
    for i in range(nsections):
        raw = field(SECTION_HEADER, table + i * SECTION_HEADER.size, f"section header {i}")
        name = raw[0].rstrip(b"\0").decode("ascii", errors="replace")
        sections.append(Section(name, raw[1], raw[2], raw[3], raw[4]))
    return PeImage(machine, image_base, section_alignment, file_alignment, size_of_image, tuple(sections))


def read(path: Path) -> PeImage:
    """The layout of the PE32+ file at ``path`` (its headers are in the first pages)."""
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)
    except FileNotFoundError:
        raise PeError(f"{path}: no such file") from None
    return parse(head, str(path))


def section_data(path: Path, section: Section) -> bytes:
    """The bytes of ``section`` as the file holds them (VirtualSize of them: the rest is file padding)."""
    with path.open("rb") as f:
        f.seek(section.pointer_to_raw_data)
        return f.read(min(section.virtual_size, section.size_of_raw_data))
