"""The runtime status file: how this system was booted, for ``bootkit status`` on the booted system.

``/run/bootkit/status.json`` holds the image URL, the verified hash, the mode, the NBD device, the root
partition and the server's cache and request counters. The NBD server keeps it current after switch_root,
when its own root directory is empty: it writes through a directory fd opened before the switch (``/run``
is moved into the new root, the fd follows it), never by path.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from typing import Any, Callable, Dict, List, Optional

from bootkit.errors import BootkitError

RUN_DIR = "/run/bootkit"
STATUS_FILE = RUN_DIR + "/status.json"


class StatusFile:
    """``status.json`` in a directory held open by fd, so writes keep working after switch_root."""

    def __init__(self, directory: str = RUN_DIR) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self._dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._data: Dict[str, Any] = {}
        self._lock = threading.Lock()

    def update(self, **fields: Any) -> None:
        """Merge ``fields`` into the status and rewrite the file atomically."""
        with self._lock:
            self._data.update(fields)
            text = json.dumps(self._data, indent=2, sort_keys=True) + "\n"
            fd = os.open("status.json.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644,
                         dir_fd=self._dirfd)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
            os.replace("status.json.tmp", "status.json", src_dir_fd=self._dirfd, dst_dir_fd=self._dirfd)

    def refresh_every(self, seconds: float, fields: Callable[[], Dict[str, Any]]) -> threading.Thread:
        """Merge ``fields()`` (the counters, and whatever else changes while the root is served) into the
        status every ``seconds``, from a daemon thread (the NBD server process)."""

        def loop() -> None:
            while True:
                threading.Event().wait(seconds)
                # a status file must never take the root's server down
                with contextlib.suppress(Exception):
                    self.update(**fields())

        t = threading.Thread(target=loop, name="bootkit-status", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        if self._dirfd >= 0:
            os.close(self._dirfd)
            self._dirfd = -1


def read_status(path: Optional[os.PathLike[str]] = None) -> Dict[str, Any]:
    """The status as a dict; a clear error when this system was not booted by bootkit."""
    p = os.fspath(path) if path is not None else STATUS_FILE
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise BootkitError(f"{p}: no such file: this system was not booted by bootkit") from e
    except (OSError, ValueError) as e:
        raise BootkitError(f"{p}: cannot read the status: {e}") from e
    if not isinstance(data, dict):
        raise BootkitError(f"{p}: not a status object")
    return data


def format_status(data: Dict[str, Any]) -> str:
    """Human-readable lines, one ``key: value`` per field, nested fields (counters, each mirror) indented."""
    lines: List[str] = []

    def add(fields: Dict[str, Any], indent: str) -> None:
        for key in sorted(fields):
            value = fields[key]
            if isinstance(value, dict):
                lines.append(f"{indent}{key}:")
                add(value, indent + "  ")
            else:
                lines.append(f"{indent}{key}: {value}")

    add(data, "")
    return "".join(line + "\n" for line in lines)
