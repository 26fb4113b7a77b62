"""QEMU guests under TCG, and their serial console read as the boot story.

A :class:`Guest` is a running ``qemu-system-x86_64`` whose first serial port is a pipe. A reader thread
splits it into lines, stamps each with the seconds since QEMU was started (host clock), appends it to a log
file and wakes whoever waits in :meth:`Guest.expect`. Every boot has an overall timeout after which QEMU is
killed; QEMU is always killed by PID when the context manager exits.

Rules for every guest on this machine (docs/testing.md, "QEMU guests on the build machine"): ``-accel tcg``
always (the /dev/kvm here does not run ordinary guests), ``-no-reboot`` so a panic or a reboot ends the run,
``-nodefaults -display none``. PXE goes through QEMU's user networking: its built-in DHCP hands out
``bootfile``, its TFTP server serves ``tftp_dir``, and the guest reaches the host's loopback as 10.0.2.2.
"""

from __future__ import annotations

import enum
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bootkit.log import log
from bootkit.run import spawn

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
#: QEMU's iPXE option ROMs (ipxe-qemu): efi-<nic>.rom for UEFI; the BIOS ones are QEMU's defaults for each NIC
IPXE_ROM_DIR = Path("/usr/lib/ipxe/qemu")
#: the EFI iPXE ROM of the default NIC (virtio-net)
IPXE_EFI_ROM = IPXE_ROM_DIR / "efi-virtio.rom"

#: the host as seen from the guest on QEMU's user network
HOST_FROM_GUEST = "10.0.2.2"

#: kernel arguments every test guest gets: serial console, and a panic ends the run (-no-reboot) at once
GUEST_KERNEL_ARGS = ("console=ttyS0,115200", "panic=-1")


class Nic(enum.StrEnum):
    """The guest's network card, as QEMU's ``-device`` names it: what the client's initramfs must drive."""

    virtio = "virtio-net-pci"
    e1000 = "e1000"
    e1000e = "e1000e"
    vmxnet3 = "vmxnet3"

    def rom_name(self) -> str:
        """The NIC's name in QEMU's iPXE ROM files (efi-virtio.rom, efi-e1000e.rom, ...)."""
        return "virtio" if self is Nic.virtio else self.value


class Firmware(enum.StrEnum):
    """The firmware a guest boots with, and what QEMU needs for it."""

    bios = "bios"
    uefi = "uefi"

    def machine(self) -> str:
        # OVMF 4M with pflash runs on q35 (docs/pxe.md, "Firmware under QEMU"); SeaBIOS on the default pc
        return "q35" if self is Firmware.uefi else "pc"

    def nic_options(self, nic: Nic = Nic.virtio, *, firmware_pxe: bool = False) -> str:
        # BIOS: QEMU loads the NIC's iPXE ROM (pxe-virtio.rom, ...) by itself. UEFI: OVMF's own PXE would be
        # used unless the EFI iPXE ROM is named; the issue wants QEMU's iPXE on both. ``firmware_pxe`` (UEFI):
        # an empty romfile, so OVMF's own PXE client boots (what dnsmasq's GRUB loader serves UEFI machines with)
        if self is Firmware.uefi:
            return ",romfile=" if firmware_pxe else f",romfile={IPXE_ROM_DIR}/efi-{nic.rom_name()}.rom"
        if firmware_pxe:
            raise ValueError("only OVMF has a PXE client of its own: SeaBIOS netboots virtio-net through iPXE")
        return ""


class GuestError(AssertionError):
    """A guest did not do what the test expected; the message carries the end of its console."""


@dataclass(frozen=True)
class ConsoleLine:
    """One line of the serial console and when the host saw it (seconds since QEMU started)."""

    t: float
    text: str


LineHandler = Callable[[ConsoleLine], None]


class Guest:
    """A running QEMU guest and its serial console.

    ``expect`` searches the console output after the previous match, so a test reads in boot order:
    ``vm.expect(r"Linux version")``, then ``vm.expect(r"BOOTKIT-PROOF-DONE")``, then ``vm.wait_exit()``.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        log_path: Path,
        boot_timeout: float,
        on_line: LineHandler | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.boot_timeout = boot_timeout
        self.lines: list[ConsoleLine] = []
        self._on_line = on_line
        self._text = ""  # everything read so far, \r removed
        self._cursor = 0  # expect() searches from here
        self._eof = False
        self._timed_out = False
        self._cond = threading.Condition()
        self._log = log_path.open("w", encoding="utf-8", errors="replace")
        self.started = time.monotonic()
        self._proc = spawn(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so killing QEMU never touches the test runner's process group
        )
        self.pid = self._proc.pid
        self._log.write(f"# {' '.join(self.argv)}\n")
        self._reader = threading.Thread(target=self._read, name=f"{name}-console", daemon=True)
        self._reader.start()
        self._watchdog = threading.Timer(boot_timeout, self._overall_timeout)
        self._watchdog.daemon = True
        self._watchdog.start()

    # -- console ---------------------------------------------------------------------------------------
    def _read(self) -> None:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        pending = b""
        while True:
            chunk = os.read(fd, 65536)
            now = time.monotonic() - self.started
            if not chunk:
                break
            pending += chunk
            *complete, pending = pending.split(b"\n")
            text = chunk.decode("utf-8", errors="replace").replace("\r", "")
            new_lines = [ConsoleLine(now, c.decode("utf-8", errors="replace").rstrip("\r")) for c in complete]
            with self._cond:
                self._text += text
                self.lines.extend(new_lines)
                self._cond.notify_all()
            for line in new_lines:
                self._log.write(f"[{line.t:8.3f}] {line.text}\n")
                if self._on_line is not None:
                    self._on_line(line)
            self._log.flush()
        if pending:
            line = ConsoleLine(time.monotonic() - self.started, pending.decode("utf-8", errors="replace"))
            self.lines.append(line)
            self._log.write(f"[{line.t:8.3f}] {line.text}\n")
            if self._on_line is not None:
                self._on_line(line)
        self._log.flush()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def output(self) -> str:
        """The whole console so far."""
        with self._cond:
            return self._text

    def tail(self, n: int = 25) -> str:
        return "\n".join(line.text for line in self.lines[-n:])

    def _fail(self, what: str) -> GuestError:
        return GuestError(f"{self.name}: {what}\n--- last console lines ({self.log_path}) ---\n{self.tail()}")

    def expect(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        """Wait until the console shows ``pattern`` (a regex, MULTILINE) after the previous match."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                # complete lines only: a chunk boundary must not let ``.*`` match half a line
                end = len(self._text) if self._eof else self._text.rfind("\n") + 1
                m = rx.search(self._text, self._cursor, end) if end > self._cursor else None
                if m is not None:
                    self._cursor = m.end()
                    return m
                if self._eof:
                    raise self._fail(f"QEMU exited ({self._exit_reason()}) before {pattern!r} appeared")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._fail(f"{pattern!r} did not appear within {timeout:.0f} s")
                self._cond.wait(min(left, 1.0))

    def seen(self, pattern: str) -> bool:
        """Whether ``pattern`` appears anywhere in the console so far (does not move the cursor)."""
        return re.search(pattern, self.output, re.MULTILINE) is not None

    def first_time(self, pattern: str) -> float | None:
        """Host time of the first console line matching ``pattern``, if any."""
        rx = re.compile(pattern)
        return next((line.t for line in self.lines if rx.search(line.text)), None)

    # -- process ---------------------------------------------------------------------------------------
    def _overall_timeout(self) -> None:
        self._timed_out = True
        log.warning("%s: overall boot timeout (%.0f s) reached: killing QEMU %d", self.name,
                    self.boot_timeout, self.pid)
        self.kill()

    def _exit_reason(self) -> str:
        if self._timed_out:
            return f"killed after the overall boot timeout of {self.boot_timeout:.0f} s"
        try:
            # the console closes a moment before the process is gone
            return f"status {self._proc.wait(10)}"
        except subprocess.TimeoutExpired:
            return "console closed, process still running"

    def wait_exit(self, timeout: float = 120.0) -> int:
        """Wait for QEMU to exit by itself (the guest powered off) and return its exit status."""
        try:
            status = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._fail(f"QEMU still running {timeout:.0f} s after the wait began") from None
        self._reader.join(10)
        if self._timed_out:
            raise self._fail(f"QEMU {self._exit_reason()}")
        return status

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def kill(self) -> None:
        if self._proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self._watchdog.cancel()
        self.kill()
        self._proc.wait()
        self._reader.join(10)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._log.close()


def qemu_command(
    *,
    firmware: Firmware = Firmware.bios,
    memory_mib: int = 1024,
    tftp_dir: Path | None = None,
    bootfile: str | None = None,
    kernel: Path | None = None,
    initrd: Path | None = None,
    append: str | None = None,
    disks: Sequence[Path] = (),
    writable_disks: Sequence[Path] = (),
    vars_file: Path | None = None,
    netdev: str | None = None,
    mac: str | None = None,
    firmware_pxe: bool = False,
    nic: Nic = Nic.virtio,
) -> list[str]:
    """The QEMU command line for one test guest (written as data: one option and its value per line).

    ``netdev`` replaces QEMU's user network (``tftp_dir``/``bootfile``) with another ``-netdev`` value whose
    id is ``n0``, e.g. a socket to a second guest; ``mac`` sets the NIC's address; ``firmware_pxe`` see
    :meth:`Firmware.nic_options`. ``disks`` are attached with ``snapshot=on`` (the guest's writes are dropped),
    ``writable_disks`` (raw files) after them without it (a local cache disk that must outlive the boot).
    """
    cmd = [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-machine", firmware.machine(),
        "-m", str(memory_mib),
        "-smp", "1",
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-chardev", "stdio,id=ser0,signal=off",
        "-serial", "chardev:ser0",
    ]  # fmt: skip
    if firmware is Firmware.uefi:
        if vars_file is None:
            raise ValueError("UEFI guests need a writable copy of the OVMF variable store")
        cmd += [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}",
        ]  # fmt: skip
    network = netdev or "user,id=n0"
    if netdev is None and tftp_dir is not None:
        network += f",tftp={tftp_dir}"
        if bootfile is not None:
            network += f",bootfile={bootfile}"
    device = f"{nic},netdev=n0,bootindex=1{firmware.nic_options(nic, firmware_pxe=firmware_pxe)}"
    if mac is not None:
        device += f",mac={mac}"
    cmd += [
        "-netdev", network,
        "-device", device,
    ]  # fmt: skip
    for i, disk in enumerate(disks):
        fmt = "qcow2" if disk.suffix == ".qcow2" else "raw"
        cmd += [
            "-drive", f"if=none,id=d{i},format={fmt},file={disk},snapshot=on",
            "-device", f"virtio-blk-pci,drive=d{i}",
        ]  # fmt: skip
    for i, disk in enumerate(writable_disks, start=len(disks)):
        cmd += [
            "-drive", f"if=none,id=d{i},format=raw,file={disk}",
            "-device", f"virtio-blk-pci,drive=d{i},serial=bootkit-disk{i}",
        ]  # fmt: skip
    if kernel is not None:
        cmd += ["-kernel", str(kernel)]
        if initrd is not None:
            cmd += ["-initrd", str(initrd)]
        if append is not None:
            cmd += ["-append", append]
    elif tftp_dir is not None or netdev is not None:
        cmd += ["-boot", "n"]
    return cmd


@contextmanager
def _guest(cmd: list[str], name: str, log_dir: Path, boot_timeout: float,
           on_line: LineHandler | None) -> Iterator[Guest]:
    log_dir.mkdir(parents=True, exist_ok=True)
    guest = Guest(cmd, name=name, log_path=log_dir / f"{name}.serial.log", boot_timeout=boot_timeout,
                  on_line=on_line)
    try:
        yield guest
    finally:
        guest.close()


def _vars_file(firmware: Firmware, log_dir: Path, name: str) -> Path | None:
    """A UEFI guest's own writable copy of the OVMF variable store (next to its log); None for BIOS."""
    if firmware is not Firmware.uefi:
        return None
    vars_file = log_dir / f"{name}.OVMF_VARS.fd"
    log_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(OVMF_VARS, vars_file)
    return vars_file


@contextmanager
def qemu_pxe(
    tftp_dir: Path,
    bootfile: str,
    *,
    log_dir: Path,
    firmware: Firmware = Firmware.bios,
    memory_mib: int = 1024,
    name: str = "guest",
    boot_timeout: float = 600.0,
    on_line: LineHandler | None = None,
    mac: str | None = None,
    firmware_pxe: bool = False,
    nic: Nic = Nic.virtio,
    writable_disks: Sequence[Path] = (),
) -> Iterator[Guest]:
    """Boot a guest from the network: firmware PXE -> QEMU's DHCP/TFTP hands out ``bootfile`` from ``tftp_dir``."""
    vars_file = _vars_file(firmware, log_dir, name)
    cmd = qemu_command(firmware=firmware, memory_mib=memory_mib, tftp_dir=tftp_dir, bootfile=bootfile,
                       vars_file=vars_file, mac=mac, firmware_pxe=firmware_pxe, nic=nic,
                       writable_disks=writable_disks)
    with _guest(cmd, name, log_dir, boot_timeout, on_line) as guest:
        yield guest


@contextmanager
def qemu_direct(
    kernel: Path,
    initrd: Path | None,
    append: str,
    *,
    log_dir: Path,
    disks: Sequence[Path] = (),
    writable_disks: Sequence[Path] = (),
    memory_mib: int = 1024,
    name: str = "guest",
    boot_timeout: float = 600.0,
    on_line: LineHandler | None = None,
    netdev: str | None = None,
    nic: Nic = Nic.virtio,
) -> Iterator[Guest]:
    """Boot a kernel directly (``-kernel``/``-initrd``), with the network and optional local virtio disks.

    ``netdev`` replaces QEMU's user network (see :func:`qemu_command`).
    """
    cmd = qemu_command(memory_mib=memory_mib, kernel=kernel, initrd=initrd, append=append, disks=disks,
                       writable_disks=writable_disks, netdev=netdev, nic=nic)
    with _guest(cmd, name, log_dir, boot_timeout, on_line) as guest:
        yield guest


@contextmanager
def qemu_pxe_netdev(
    netdev: str,
    *,
    log_dir: Path,
    firmware: Firmware = Firmware.bios,
    memory_mib: int = 1024,
    name: str = "guest",
    boot_timeout: float = 600.0,
    on_line: LineHandler | None = None,
    mac: str | None = None,
    firmware_pxe: bool = False,
) -> Iterator[Guest]:
    """Boot a guest from the network ``netdev`` (a ``-netdev`` value with id ``n0``, e.g. a socket to a second
    guest that runs the DHCP/TFTP server) instead of QEMU's user network."""
    vars_file = _vars_file(firmware, log_dir, name)
    cmd = qemu_command(firmware=firmware, memory_mib=memory_mib, netdev=netdev, vars_file=vars_file, mac=mac,
                       firmware_pxe=firmware_pxe)
    with _guest(cmd, name, log_dir, boot_timeout, on_line) as guest:
        yield guest
