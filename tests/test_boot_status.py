"""The runtime status file and ``bootkit status`` (the counterpart of the seed's debugfs entries)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bootkit.boot.status import StatusFile, read_status


def status_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bootkit", "status", *args], capture_output=True, text=True)


def test_written_through_a_directory_fd(tmp_path: Path) -> None:
    run = tmp_path / "run" / "bootkit"
    status = StatusFile(str(run))
    status.update(url="http://10.0.2.2/disk.qcow2", mode="ram", device="/dev/nbd0")
    # the directory moves (as /run does at switch_root): writes follow the fd, not the path
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    status.update(counters={"l2_hits": 3})
    status.close()
    data = json.loads((moved / "bootkit" / "status.json").read_text())
    assert data == {"url": "http://10.0.2.2/disk.qcow2", "mode": "ram", "device": "/dev/nbd0",
                    "counters": {"l2_hits": 3}}  # fmt: skip
    assert read_status(moved / "bootkit" / "status.json") == data
    assert not (moved / "bootkit" / "status.json.tmp").exists()


def test_cli(tmp_path: Path) -> None:
    status = StatusFile(str(tmp_path))
    status.update(url="http://h/d.qcow2", root="/dev/nbd0p2", counters={"cluster_hits": 5, "l2_misses": 1})
    status.close()
    proc = status_cli("--file", str(tmp_path / "status.json"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "counters:\n  cluster_hits: 5\n  l2_misses: 1\nroot: /dev/nbd0p2\nurl: http://h/d.qcow2\n"
    proc = status_cli("--file", str(tmp_path / "status.json"), "--json")
    assert json.loads(proc.stdout)["root"] == "/dev/nbd0p2"


def test_cli_not_booted_by_bootkit(tmp_path: Path) -> None:
    proc = status_cli("--file", str(tmp_path / "none.json"))
    assert proc.returncode == 1
    assert proc.stderr == f"error: {tmp_path}/none.json: no such file: this system was not booted by bootkit\n"
