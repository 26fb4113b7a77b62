"""Logging set-up: diagnostics and progress go to stderr, results to stdout.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("bootkit")


def setup(verbose: int = 0, *, stream: object = None) -> None:
    """Configure the ``bootkit`` logger once: level from -v count, plain lines readable on a serial console."""
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose == 0 else logging.DEBUG
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(message)s" if verbose <= 0 else "%(name)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def human_size(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
