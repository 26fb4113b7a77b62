"""The initramfs side of bootkit imports only the standard library and runs on Python 3.9.

The layout states the line: everything under ``bootkit/`` runs inside the initramfs except ``bootkit/host/``
(the command line, initramfs builder, PXE configuration generator and other host-only tools) and
``bootkit/__main__.py`` (``python -m bootkit``, the command line).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bootkit"
#: host-only code lives under this package; everything else in bootkit/ runs inside the initramfs
HOST = PACKAGE / "host"
#: ``python -m bootkit``: the command line's second door, host-only as well
MAIN = PACKAGE / "__main__.py"
#: third-party modules the initramfs side may import, and only lazily (inside a function)
LAZY_ALLOWED = {"zstandard"}


def initramfs_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if HOST not in p.parents and p != MAIN)


def initramfs_module(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "bootkit" and parts[1:2] != ["host"]


def test_there_are_initramfs_modules() -> None:
    files = initramfs_files()
    assert PACKAGE / "qcow2" / "image.py" in files
    assert PACKAGE / "run.py" in files
    assert not any(HOST in p.parents for p in files)


@pytest.mark.parametrize("path", initramfs_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_initramfs_imports_only_stdlib(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    # imports guarded by `if TYPE_CHECKING:` at module level count as top level too (they never run)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside bootkit
                continue
            names = [node.module or ""]
        else:
            continue
        for name in names:
            root = name.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if root == "bootkit":
                assert initramfs_module(name), f"{where}: initramfs code imports host-side module {name}"
            elif root in LAZY_ALLOWED:
                assert id(node) not in top_level, f"{where}: {name} must be imported lazily (inside a function)"
            else:
                assert root in sys.stdlib_module_names, f"{where}: {name} is not in the standard library"


def vermin(*files: str) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).parent / "vermin"
    return subprocess.run(
        [str(tool), "--no-tips", "--violations", "-t=3.9-", *files], capture_output=True, text=True, check=False
    )


def test_initramfs_code_runs_on_python_3_9() -> None:
    proc = vermin(*(str(p) for p in initramfs_files()))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_python_3_9_check_catches_newer_syntax(tmp_path: Path) -> None:
    newer = tmp_path / "newer.py"
    newer.write_text("def f(x):\n    match x:\n        case 1:\n            return 1\n")
    assert vermin(str(newer)).returncode != 0


def test_zstandard_is_not_imported_for_deflate_images(tmp_path: Path) -> None:
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    code = (
        "import sys, bootkit.qcow2 as q\n"
        f"im = q.open({str(image)!r}); im.pread(0, 4096)\n"
        "print('zstandard' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_command_table_names_the_module_that_registers_each_command() -> None:
    """``bootkit CMD`` imports only COMMANDS[CMD]; a command missing from the table would still work (all
    modules are imported then) but pay every module's import time."""
    import argparse

    from bootkit.host import cli

    registered: dict[str, str] = {}
    for module_name in cli.COMMAND_MODULES:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        __import__(module_name, fromlist=["register"]).register(sub)
        registered.update((name, module_name) for name in sub.choices)
    assert registered == cli.COMMANDS


def test_a_command_imports_only_its_own_cli_module() -> None:
    code = (
        "import sys\n"
        "from bootkit.host.cli import main\n"
        "main(['inspect', '--help'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code + "\n"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: bootkit inspect" in proc.stdout
    code = (
        "import sys\n"
        "from bootkit.host.cli import build_parser\n"
        "build_parser('convert')\n"
        "print(sorted(m for m in sys.modules if m.startswith(('bootkit.host.cli.', 'jinja2', 'requests'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['bootkit.host.cli.image']"
