"""bootkit.fetch runs inside the initramfs: standard library only, and Python 3.9 syntax and APIs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bootkit.fetch

FETCH_DIR = Path(bootkit.fetch.__file__).parent


def test_imports_only_the_standard_library() -> None:
    code = (
        "import sys; before = set(sys.modules); import bootkit.fetch;"
        "names = {m.split('.')[0] for m in set(sys.modules) - before};"
        "print('\\n'.join(sorted(n for n in names if n not in sys.stdlib_module_names and n != 'bootkit')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []


def test_python_3_9_compatible() -> None:
    vermin = shutil.which("vermin") or str(Path(sys.executable).parent / "vermin")
    if not Path(vermin).exists():
        pytest.skip("vermin is not installed (dev extra)")
    result = subprocess.run(
        [vermin, "-t=3.9-", "--violations", "--no-tips", str(FETCH_DIR)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
