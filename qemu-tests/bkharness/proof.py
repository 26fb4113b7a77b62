"""What a test guest proves, checked on the host from its serial console.

The guest's root (qemu-tests/rootfs/common/usr/libexec/bootkit-proof) prints one line::

    BOOTKIT-PROOF root=/dev/nbd0p2 rootfs=overlay sha256=<hex> overlay=rw nbd-server=alive uptime=12.34

then ``BOOTKIT-PROOF-DONE`` when it has asked for the power-off. The host then waits for the kernel's
``reboot: Power down`` and for QEMU to exit by itself, and looks through the whole console for I/O errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bkharness.guest import Guest
from bkharness.images import RootImage

PROOF = (
    r"^BOOTKIT-PROOF root=(?P<root>\S+) rootfs=(?P<rootfs>\S+) sha256=(?P<sha256>\S+) "
    r"overlay=(?P<overlay>\S+) nbd-server=(?P<server>\S+) uptime=(?P<uptime>[\d.]+)"
)
DONE = r"^BOOTKIT-PROOF-DONE"
POWER_DOWN = r"reboot: Power down"

#: console lines that mean the root's block device failed under the system (any of them fails a boot)
IO_ERRORS = (
    r"I/O error",
    r"Buffer I/O error",
    r"blk_update_request: .*error",
    r"nbd\d+: (Dead connection|Connection timed out|Receive control failed|Send control failed)",
    r"EXT4-fs error",
    r"EXT4-fs warning .*I/O",
    r"Kernel panic",
)

#: a root mount from the NBD device, as the kernel reports it
NBD_MOUNTED = r"EXT4-fs \(nbd\d+p\d+\): mounted"


@dataclass(frozen=True)
class Proof:
    """The guest's report, parsed."""

    root: str
    rootfs: str
    sha256: str
    overlay: str
    server: str
    uptime: float

    def problems(self, image: RootImage | None, *, sha256: str | None = None,
                 overlay: str = "rw") -> list[str]:
        """What does not match the expectation; empty when the boot proved everything."""
        want = sha256 or (image.known_sha256 if image is not None else None)
        out = []
        if not re.fullmatch(r"/dev/nbd\d+p\d+", self.root):
            out.append(f"root {self.root}: not mounted from a partition of an NBD device")
        if want is not None and self.sha256 != want:
            out.append(f"known file sha256 {self.sha256} != {want} (what the image holds)")
        if self.overlay != overlay:
            out.append(f"root writable: {self.overlay}, expected {overlay}")
        if overlay == "rw" and self.rootfs != "overlay":
            out.append(f"root file system {self.rootfs}: not bootkit's overlay")
        if self.server != "alive":
            out.append(f"NBD server after switch root: {self.server}")
        return out


def expect_proof(vm: Guest, timeout: float = 400.0) -> Proof:
    """Wait for the guest's proof line and parse it."""
    m = vm.expect(PROOF, timeout)
    return Proof(m["root"], m["rootfs"], m["sha256"], m["overlay"], m["server"], float(m["uptime"]))


def io_errors(vm: Guest) -> list[str]:
    rx = re.compile("|".join(IO_ERRORS))
    return [line.text for line in vm.lines if rx.search(line.text)]


def expect_clean_poweroff(vm: Guest, timeout: float = 180.0) -> None:
    """The guest finished its proof, powered off by itself, and nothing reported an I/O error."""
    vm.expect(DONE, timeout)
    vm.expect(POWER_DOWN, timeout)
    status = vm.wait_exit(60)
    assert status == 0, f"QEMU exited with status {status}"
    errors = io_errors(vm)
    assert not errors, "I/O errors on the console:\n" + "\n".join(errors)


def expect_boot_failure(vm: Guest, cause: str, timeout: float = 400.0) -> str:
    """The boot stopped with one console line matching ``cause`` and mounted nothing; returns that line.

    The guest must end by itself (``rd.emergency=poweroff`` or a panic with ``-no-reboot``).
    """
    m = vm.expect(cause, timeout)
    line_start = vm.output.rfind("\n", 0, m.start()) + 1
    line_end = vm.output.find("\n", m.end())
    line = vm.output[line_start : line_end if line_end >= 0 else None]
    vm.wait_exit(timeout)
    assert not vm.seen(r"^BOOTKIT-PROOF "), "the system booted although the boot should have failed"
    assert not vm.seen(NBD_MOUNTED), "a file system from the NBD device was mounted"
    return line
