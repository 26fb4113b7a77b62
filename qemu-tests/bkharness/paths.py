"""Where the harness keeps things: the source tree, the build cache, and the artifacts of failed boots."""

from __future__ import annotations

import os
from pathlib import Path

#: top of the bootkit source tree (qemu-tests/bkharness/paths.py -> ../..)
REPO = Path(__file__).resolve().parent.parent.parent

#: files that go into the guests' root filesystems
ROOTFS_FILES = REPO / "qemu-tests" / "rootfs"


def cache_dir() -> Path:
    """``$BOOTKIT_CACHE`` or ``cache/`` at the top of the tree (gitignored); the same rule as bootkit.host.kernelpkg."""
    env = os.environ.get("BOOTKIT_CACHE")
    return Path(env) if env else REPO / "cache"


def artifacts_dir() -> Path:
    """``$BOOTKIT_ARTIFACTS`` or ``artifacts/`` at the top of the tree (gitignored): serial logs, timelines."""
    env = os.environ.get("BOOTKIT_ARTIFACTS")
    return Path(env) if env else REPO / "artifacts"
