"""The boot's console lines: one per stage, one for a failure, and the cause file the dracut scripts read.

Every line carries the guest's monotonic time (seconds since boot), so a serial console log reads as a
timeline; a finished stage adds its duration. A failure is one ``FAILED at <stage>: <cause>`` line, made safe
here because its cause may quote the network (see :func:`bootkit.log.safe_text`), and the same line goes to
``/run/bootkit/failed`` for ``qcow2-failed.sh`` and ``bootkit status``.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import os
import time
from typing import Dict

from bootkit.boot.status import RUN_DIR
from bootkit.errors import BootkitError
from bootkit.log import ConsoleFormatter, log, safe_text

FAILED_FILE = RUN_DIR + "/failed"


class BootFailed(BootkitError):
    """A boot stage failed; the message is the one console line."""


class Stages:
    """One console line per stage: guest monotonic time (seconds since boot) and the stage's duration."""

    def __init__(self) -> None:
        self.stage = "start"
        self.started = time.monotonic()
        self.timeline: Dict[str, float] = {}

    def begin(self, stage: str, what: str = "") -> None:
        self.stage, self.started = stage, time.monotonic()
        if what:
            log.info("[%8.2f] %s: %s", self.started, stage, what)

    def done(self, what: str) -> None:
        now = time.monotonic()
        self.timeline[self.stage] = round(now, 3)
        log.info("[%8.2f] %s: %s (%.2f s)", now, self.stage, what, now - self.started)

    def warn(self, what: str) -> None:
        """A warning line within the current stage (the boot goes on)."""
        log.warning("[%8.2f] %s: WARNING: %s", time.monotonic(), self.stage, what)

    def failed(self, cause: str) -> str:
        """Print and return the one failure line; the cause may quote the network, so it is made safe here."""
        line = safe_text(f"FAILED at {self.stage}: {cause}")
        log.error("[%8.2f] %s", time.monotonic(), line)
        return line


def leave_failure(line: str, path: str = FAILED_FILE) -> int:
    """Leave the failure line for the dracut scripts and ``bootkit status``: safe text only (see safe_text).

    Returns 1, the boot code's exit status for a failed boot.
    """
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="ascii") as f:
            f.write(safe_text(line) + "\n")
    except OSError:
        pass
    return 1


def setup_console(debug: bool) -> None:
    """``bootkit: <message>`` lines on stderr (the console), debug lines with ``rd.qcow2.debug``."""
    from bootkit.log import setup

    setup(1 if debug else 0)
    for handler in log.handlers:
        handler.setFormatter(ConsoleFormatter("bootkit: %(message)s"))
