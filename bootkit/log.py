"""Logging set-up: diagnostics and progress go to stderr, results to stdout.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import logging
import re
import sys

log = logging.getLogger("bootkit")

#: what a console line or a file that shell code reads may carry: printable ASCII without the characters a
#: shell gives meaning to inside or around double quotes
_UNSAFE = re.compile(r"[^\x20-\x7e]|[\"'$`\\]")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
#: a console line is at most this long once sanitised (a URL or a reason phrase can be any length)
MAX_SAFE_TEXT = 400


def safe_text(text: str, limit: int = MAX_SAFE_TEXT) -> str:
    """``text`` made harmless for a console line or a file that the dracut scripts read.

    Text from the network or an image (an HTTP reason phrase, a redirect target, a backing file name) ends up
    in failure causes. Dracut's ``die`` writes its message into a hook file that is sourced later, so anything
    stored for shell must not carry quotes, ``$``, backquotes or backslashes; control characters would drive
    the console. Each such character becomes ``?``, and the text is cut to ``limit`` characters.
    """
    text = _UNSAFE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ConsoleFormatter(logging.Formatter):
    """Formats records as usual, then replaces every non-printable character: log lines that quote a server's
    words (URLs, headers) cannot move the cursor or recolour the console."""

    def format(self, record: logging.LogRecord) -> str:
        return _NOT_PRINTABLE.sub("?", super().format(record))


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
