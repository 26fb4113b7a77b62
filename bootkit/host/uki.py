"""A unified kernel image (UKI): kernel, bootkit's initramfs and the kernel command line in one signed PE file.

The firmware verifies the whole file under Secure Boot, so the command line inside (with the pinned image or
manifest hash) is as trusted as the kernel: the chain reaches every byte of the root (docs/secure-boot.md).

Built as systemd's ``ukify`` does, with what Debian 12 has (no ukify there): systemd's EFI stub
(``systemd-boot-efi``: ``linuxx64.efi.stub``) plus new sections added by ``objcopy`` after the stub's own,
each at a page-aligned virtual address (systemd's "Unified Kernel Image" specification, uapi-group.org):

* ``.osrel``   os-release text naming the UKI (boot menus show it)
* ``.cmdline`` the kernel command line, used instead of anything the loader passes when Secure Boot is on
* ``.initrd``  the initramfs
* ``.linux``   the kernel (last, as ukify places it: the kernel may use memory past its file size)

then signed with ``sbsign`` (``sbsigntool``) and checked with ``sbverify`` against the same certificate.

The command line cannot hold boot-loader variables (nothing fills them in: the firmware starts the UKI
directly), so its network part is plain DHCP: :data:`UKI_NETWORK`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bootkit.boot.cmdline import BootConfig
from bootkit.boot.loaderargs import DHCP_NETWORK
from bootkit.errors import BootkitError, ConfigError, UsageError
from bootkit.host import pe
from bootkit.host.pxecfg.cmdline import MAX_CMDLINE, boot_config
from bootkit.host.pxecfg.model import Entry, Machine
from bootkit.log import human_size, log
from bootkit.record import replace
from bootkit.run import run

#: systemd's EFI stub in Debian's systemd-boot-efi
STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
#: added sections start on page boundaries whatever the stub's SectionAlignment (ukify does the same)
PAGE = 4096
#: the UKI is started by the firmware itself, not by iPXE or GRUB: no lease to hand over and no BOOTIF, so
#: dracut asks DHCP (``ip=dhcp rd.neednet=1``; docs/secure-boot.md, "The network")
UKI_NETWORK = DHCP_NETWORK
#: the sections build-uki adds, in file order
SECTIONS = (".osrel", ".cmdline", ".initrd", ".linux")


class UkiError(BootkitError):
    """A UKI cannot be built from what was given."""

    exit_status = 2


@dataclass(frozen=True)
class Signing:
    """The site's Secure Boot signing key and its certificate (PEM files, as sbsign takes them)."""

    key: Path
    cert: Path


@dataclass(frozen=True)
class UkiOptions:
    """Everything one UKI is made of."""

    output: Path
    kernel: Path
    initrd: Path
    cmdline: str
    #: the ``.osrel`` text (os-release format)
    os_release: str
    stub: Path = STUB
    signing: Signing | None = None


@dataclass(frozen=True)
class UkiResult:
    output: Path
    size: int
    #: the section table of the written file (ImageBase-relative addresses)
    layout: pe.PeImage
    signed: bool


# -- the command line ----------------------------------------------------------------------------------------


def uki_args(entry: Entry, machine: Machine | None = None) -> tuple[str, ...]:
    """The kernel arguments of ``entry`` (as ``machine`` boots it) inside a UKI: what pxe-config writes for
    the entry (:func:`bootkit.host.pxecfg.cmdline.kernel_args`: the same :class:`BootConfig`, console and
    extra arguments, in the same order), with the network part that needs no boot loader."""
    config = replace(boot_config(entry), network=UKI_NETWORK)
    args = [*config.to_args(None), *(f"console={c}" for c in entry.console), *entry.args]
    if machine is not None:
        args += machine.args
    return tuple(args)


def check_cmdline(line: str, what: str) -> BootConfig:
    """Refuse a command line the kernel would cut, no boot loader can fill in, or the initramfs would refuse."""
    if not line.isascii() or not line.isprintable():
        raise UsageError(f"{what}: the kernel command line must be printable ASCII on one line")
    if len(line) >= MAX_CMDLINE:
        raise UsageError(f"{what}: the kernel command line is {len(line)} bytes; the kernel keeps {MAX_CMDLINE - 1}")
    if "${" in line:
        raise UsageError(f"{what}: ${{...}} is a boot-loader variable, and nothing fills it in inside a UKI")
    try:
        parsed = BootConfig.parse(line)
    except ConfigError as e:
        raise UsageError(f"{what}: the initramfs would refuse this command line: {e}") from None
    if parsed is None:
        raise UsageError(f"{what}: no root=qcow2:URL: bootkit's initramfs would not boot anything from it")
    return parsed


def os_release(pretty_name: str, version: str) -> str:
    """The ``.osrel`` text: boot menus (systemd-boot, firmware setup) show PRETTY_NAME."""
    # values are quoted, and every character is printable ASCII without quotes or backslashes: the caller's
    # names come from validated settings (entry and machine names)
    for value in (pretty_name, version):
        if not value.isascii() or not value.isprintable() or any(c in value for c in "\"\\`$"):
            raise UsageError(f"{value!r}: not usable in os-release")
    return f'ID=bootkit\nNAME="bootkit"\nPRETTY_NAME="{pretty_name}"\nVERSION_ID="{version}"\n'


# -- building ------------------------------------------------------------------------------------------------


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise UkiError(f"{what} {path}: no such file")
    if not os.access(path, os.R_OK):
        raise UkiError(f"{what} {path}: not readable")


def check_inputs(options: UkiOptions) -> None:
    """One clear line for each missing piece, before anything runs."""
    if not options.stub.is_file():
        hint = " (install the Debian package systemd-boot-efi)" if options.stub == STUB else ""
        raise UkiError(f"EFI stub {options.stub}: no such file{hint}")
    _require_file(options.kernel, "kernel")
    _require_file(options.initrd, "initramfs")
    if options.signing is not None:
        _require_file(options.signing.key, "--sign-key")
        _require_file(options.signing.cert, "--sign-cert")
        for tool in ("sbsign", "sbverify"):
            if shutil.which(tool) is None:
                raise UkiError(f"{tool} not found: install the Debian package sbsigntool")
    if shutil.which("objcopy") is None:
        raise UkiError("objcopy not found: install the Debian package binutils")


def section_addresses(stub: pe.PeImage, sizes: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """The virtual address (ImageBase included, as objcopy takes it) of each new section, in order: after the
    stub's last section, each on a page boundary."""
    alignment = max(PAGE, stub.section_alignment)
    address = _align(stub.end, alignment)
    placed = []
    for name, size in sizes:
        placed.append((name, stub.image_base + address))
        address = _align(address + size, alignment)
    return placed


def verify_layout(layout: pe.PeImage, sizes: dict[str, int], what: str) -> None:
    """The written file has every section, whole, page-aligned and not overlapping another."""
    previous_end = 0
    for s in sorted(layout.sections, key=lambda s: s.virtual_address):
        if s.virtual_address < previous_end:
            raise UkiError(f"{what}: section {s.name} at {s.virtual_address:#x} overlaps the one before")
        # the loader maps VirtualSize bytes; SizeOfRawData may run past them into file-alignment padding
        previous_end = s.virtual_address + s.virtual_size
    for name, size in sizes.items():
        added = layout.section(name)
        if added is None:
            raise UkiError(f"{what}: objcopy left out section {name}")
        if added.virtual_address % PAGE or added.virtual_size != size or added.size_of_raw_data < size:
            raise UkiError(f"{what}: section {name} was not written as asked ({added})")


def build_uki(options: UkiOptions) -> UkiResult:
    """Write the UKI ``options.output`` (atomically: a failed build leaves no file there)."""
    check_inputs(options)
    stub = pe.read(options.stub)
    if stub.machine != pe.IMAGE_FILE_MACHINE_AMD64:
        raise UkiError(f"EFI stub {options.stub}: machine {stub.machine:#x} is not x86-64")
    clash = [name for name in SECTIONS if stub.section(name) is not None]
    if clash:
        raise UkiError(f"EFI stub {options.stub}: already has a {clash[0]} section (a UKI, not a stub?)")
    out = options.output
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".uki.", dir=out.parent) as tmp:
        work = Path(tmp)
        (work / "osrel").write_text(options.os_release, encoding="ascii")
        # no newline: the stub passes the section to the kernel as it is
        (work / "cmdline").write_bytes(options.cmdline.encode("ascii"))
        files = {
            ".osrel": work / "osrel",
            ".cmdline": work / "cmdline",
            ".initrd": options.initrd,
            ".linux": options.kernel,
        }
        sizes = {name: files[name].stat().st_size for name in SECTIONS}
        cmd: list[str | Path] = ["objcopy"]
        for name, vma in section_addresses(stub, [(n, sizes[n]) for n in SECTIONS]):
            cmd += [
                "--add-section", f"{name}={files[name]}",
                "--change-section-vma", f"{name}={vma:#x}",
            ]  # fmt: skip
        unsigned = work / "unsigned.efi"
        cmd += [options.stub, unsigned]
        log.info("build-uki: %s + %s + %d-byte command line", options.kernel, options.initrd, len(options.cmdline))
        run(cmd)
        layout = pe.read(unsigned)
        verify_layout(layout, sizes, str(out))
        final = unsigned
        if options.signing is not None:
            final = work / "signed.efi"
            sign = options.signing
            run([
                "sbsign",
                "--key", sign.key,
                "--cert", sign.cert,
                "--output", final,
                unsigned,
            ])  # fmt: skip
            verify_signature(final, sign.cert)
            log.info("build-uki: signed with %s, sbverify accepts it with %s", sign.key, sign.cert)
        final.chmod(0o644)
        os.replace(final, out)
    return UkiResult(out, out.stat().st_size, pe.read(out), options.signing is not None)


def verify_signature(path: Path, cert: Path) -> None:
    """``sbverify --cert CERT``: the image carries a valid signature by ``cert``'s key."""
    proc = run(["sbverify", "--cert", cert, path], check=False, capture=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).decode(errors="replace").strip().splitlines()[-1:]
        raise UkiError(f"{path}: sbverify does not accept the signature with {cert}: {' '.join(tail)}")


def describe(result: UkiResult) -> str:
    """The result line ``bootkit build-uki`` prints."""
    sections = ", ".join(
        f"{s.name} {human_size(s.virtual_size)}" for s in result.layout.sections if s.name in SECTIONS
    )
    signed = "signed" if result.signed else "NOT signed"
    return f"{result.output}: {human_size(result.size)} ({result.size} bytes), {signed}; {sections}"
