"""Small helpers shared by the tests (a module of its own: ``conftest`` is a name qemu-tests/ has too)."""

from __future__ import annotations

import shutil

import pytest


def require_tools(*tools: str) -> None:
    """Skip the calling test, naming the missing tool, when a real tool it drives is not installed."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/setup.sh installs them)")
