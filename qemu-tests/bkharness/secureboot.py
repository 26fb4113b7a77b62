"""OVMF with Secure Boot enforcing: the firmware files and the guest, shared by the Secure Boot tests.

OVMF's Secure Boot build (``OVMF_CODE_4M.secboot.fd``) keeps its variable store behind SMM: it runs only on
q35 with ``smm=on`` and a secure pflash. Which keys it trusts is in the variable store each guest gets a copy
of: Debian's ``OVMF_VARS_4M.ms.fd`` has Microsoft's KEK and db (the UEFI CA that signs shim) enrolled and Secure
Boot on, as a stock PC; test_secureboot.py enrols a site's own keys into the empty store instead.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from bkharness.guest import Guest

OVMF_SECBOOT_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
#: the variable store without any key (a test enrols its own)
OVMF_EMPTY_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
#: Microsoft's keys enrolled, Secure Boot enabled: what a stock PC trusts
OVMF_MS_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")


def require_tools(*names: str) -> None:
    """Skip, naming the command, when a tool the test runs is not installed."""
    for name in names:
        if shutil.which(name) is None:
            pytest.skip(f"{name} not installed (scripts/setup.sh installs it)")


def require_files(*files: tuple[Path, str]) -> None:
    """Skip, naming the file and its Debian package, when one of ``(path, package)`` is missing."""
    for path, package in files:
        if not path.exists():
            pytest.skip(f"{path} missing (package {package})")


@contextmanager
def secure_boot_guest(vars_template: Path, devices: Sequence[str], *, log_dir: Path, name: str,
                      memory_mib: int = 1024, boot_timeout: float = 600.0) -> Iterator[Guest]:
    """OVMF with Secure Boot enforcing and the keys of ``vars_template`` (copied: the guest may write to it);
    ``devices`` are the rest of QEMU's arguments."""
    vars_file = log_dir / f"{name}.OVMF_VARS.fd"
    log_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(vars_template, vars_file)
    cmd = [
        "qemu-system-x86_64",
        "-accel", "tcg",
        # the secboot build keeps its variables behind SMM: without smm=on and a secure flash it does not start
        "-machine", "q35,smm=on",
        "-global", "driver=cfi.pflash01,property=secure,value=on",
        "-m", str(memory_mib),
        "-smp", "1",
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-chardev", "stdio,id=ser0,signal=off",
        "-serial", "chardev:ser0",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_SECBOOT_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}",
        *devices,
    ]  # fmt: skip
    guest = Guest(cmd, name=name, log_path=log_dir / f"{name}.serial.log", boot_timeout=boot_timeout)
    try:
        yield guest
    finally:
        guest.close()
