"""The daemon side of serving: one preload list that names every initramfs module, and a pid file that
cannot be turned into a write through someone else's symbolic link."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import bootkit
from bootkit import daemon
from bootkit.boot import preload

PACKAGE = Path(bootkit.__file__).resolve().parent


def _initramfs_modules() -> set[str]:
    """Every module of bootkit outside bootkit/host, and not bootkit/__main__.py, from the file tree."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[1:2] == ["host"] or parts == ["bootkit", "__main__"]:
            continue
        if parts[-1] == "__init__":
            parts.pop()
        names.add(".".join(parts))
    return names


def test_preload_names_every_initramfs_module() -> None:
    """A module the list forgets is missing from the initramfs (build-initrd copies what preload imports),
    or fails to import after the root switch."""
    listed = set(preload.BOOTKIT_MODULES) | set(preload.NOT_PRELOADED) | set(preload.OWN_PROCESS)
    assert _initramfs_modules() - listed == set()
    assert set(preload.BOOTKIT_MODULES) - _initramfs_modules() == set()
    assert {"bootkit.daemon", "bootkit.run", "bootkit.nbd.scheduler"} <= set(preload.BOOTKIT_MODULES)


def test_pid_file_is_written_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "nbd.pid"
    path.write_text("stale\n")
    daemon.write_pid_file(str(path))
    assert path.read_text() == f"{os.getpid()}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nbd.pid"]  # no temporary file left behind


def test_pid_file_never_writes_through_a_link_at_a_temporary_name(tmp_path: Path) -> None:
    """The temporary name was once PATH.PID.tmp, opened with O_TRUNC and no O_NOFOLLOW: a link planted there
    had the daemon (root) overwrite the link's target."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "nbd.pid"
    (tmp_path / f"nbd.pid.{os.getpid()}.tmp").symlink_to(victim)
    daemon.write_pid_file(str(path))
    assert victim.read_text() == "precious\n"
    assert not path.is_symlink() and path.read_text() == f"{os.getpid()}\n"


def test_pid_file_refuses_a_link_at_its_path(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "nbd.pid"
    path.symlink_to(victim)
    with pytest.raises(daemon.PidFileError, match=r"nbd\.pid: is a symbolic link"):
        daemon.write_pid_file(str(path))
    assert victim.read_text() == "precious\n"
    assert path.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nbd.pid", "victim"]


def test_daemon_with_a_linked_pid_file_exits_with_one_error_line(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    pid_file = tmp_path / "nbd.pid"
    pid_file.symlink_to(victim)
    sock = tmp_path / "nbd.sock"
    proc = subprocess.run(
        [sys.executable, "-m", "bootkit", "serve-nbd", str(image), "--unix", str(sock), "--daemon",
         "--pid-file", str(pid_file)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    # (warnings from hardening without the privileges may come first)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --pid-file {pid_file}: is a symbolic link, refusing to write through it"]
    assert proc.stderr.endswith(errors[0] + "\n")
    assert victim.read_text() == "precious\n" and pid_file.is_symlink()
    assert not sock.exists()
