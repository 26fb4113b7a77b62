"""Mounting the root on the host, as root, with real mounts in a private mount namespace.

``bootkit.boot.mount.mount_root`` mounts an ext4 filesystem (on a loop device) read-only, a tmpfs and the
overlay, exactly as in the initramfs. Each case runs in ``unshare --mount --propagation private``: whatever
it mounts vanishes with the namespace and never reaches the host's mount table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from boot_fixtures import make_ext4

ROOT = Path(__file__).resolve().parent.parent

#: runs inside the namespace: attach the filesystem image to a loop device, mount_root, report as JSON what
#: happened and what is mounted under the test's directory, detach the loop device
SCRIPT = """
import json, os, subprocess, sys
from bootkit.boot.cmdline import parse_cmdline
from bootkit.boot.mount import mount_root
from bootkit.errors import BootkitError

image, run_dir, newroot, top, fstype, path = sys.argv[1:7]
cfg = parse_cmdline("root=qcow2:http://10.0.2.2/disk.qcow2")
loop = subprocess.run(["losetup", "--find", "--show", "--read-only", image],
                      check=True, capture_output=True, text=True).stdout.strip()
result = {}
try:
    try:
        saved, os.environ["PATH"] = os.environ["PATH"], path
        try:
            result["done"] = mount_root(cfg, loop, fstype, newroot, run_dir)
        finally:
            os.environ["PATH"] = saved
        with open(newroot + "/marker") as f:
            result["marker"] = f.read()
    except BootkitError as e:
        result["error"] = str(e)
    with open("/proc/self/mountinfo") as f:
        result["mounted"] = [line.split()[4] for line in f if line.split()[4].startswith(top)]
    for path in reversed(result["mounted"]):
        subprocess.run(["umount", path], check=True)
finally:
    subprocess.run(["losetup", "--detach", loop], check=False)
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root: loop devices, mounts and a private mount namespace (unshare -m)")
    for tool in ("unshare", "losetup", "mke2fs", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    if "overlay" not in Path("/proc/filesystems").read_text().split():
        pytest.skip("the host kernel has no overlayfs")
    d = tmp_path_factory.mktemp("rootfs")
    (d / "tree").mkdir()
    (d / "tree" / "marker").write_text("bootkit lower\n")
    return make_ext4(d / "root.ext4", 8, label="bkroot", content=d / "tree")


def mount_in_namespace(rootfs: Path, run_dir: Path, newroot: Path, top: Path, fstype: str = "ext4",
                       path: str | None = None) -> dict[str, object]:
    """``path``: the PATH mount_root runs with (default: this process's)."""
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", SCRIPT,
         str(rootfs), str(run_dir), str(newroot), str(top), fstype, os.environ["PATH"] if path is None else path],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def test_root_under_a_tmpfs_overlay(rootfs: Path, tmp_path: Path) -> None:
    """The setup itself works: the same mounts succeed where nothing forces a failure. With no mount(8) to
    be found: the boot code's own mounts are system calls (a process each costs boot time under TCG)."""
    empty = tmp_path / "no-tools"
    empty.mkdir()
    result = mount_in_namespace(rootfs, tmp_path / "run" / "bootkit", tmp_path / "sysroot", tmp_path,
                                path=str(empty))
    assert "error" not in result, result
    assert result["marker"] == "bootkit lower\n"
    assert result["mounted"] == [f"{tmp_path}/run/bootkit/lower", f"{tmp_path}/run/bootkit/overlay",
                                 f"{tmp_path}/sysroot"]  # fmt: skip


def test_failed_overlay_leaves_nothing_mounted(rootfs: Path, tmp_path: Path) -> None:
    """The overlay mount fails (a ',' in the run directory's path ends overlayfs' lowerdir= option early and
    makes the rest an unknown option); the lower root and the tmpfs mounted before it are unmounted again."""
    run_dir = tmp_path / "run,x" / "bootkit"
    result = mount_in_namespace(rootfs, run_dir, tmp_path / "sysroot", tmp_path)
    assert str(result["error"]).startswith(f"mount -t overlay -o ro,lowerdir={run_dir}/lower,"), result
    assert result["mounted"] == []


def test_wrong_filesystem_type_is_one_line(rootfs: Path, tmp_path: Path) -> None:
    """mount(2) refuses the lower root (an ext4 filesystem mounted as xfs): the line names the mount and
    says what mount(8) would have said, and nothing stays mounted."""
    if "xfs" not in Path("/proc/filesystems").read_text().split():
        subprocess.run(["modprobe", "-q", "xfs"], check=False)
    result = mount_in_namespace(rootfs, tmp_path / "run" / "bootkit", tmp_path / "sysroot", tmp_path, "xfs")
    error = str(result["error"])
    assert error.startswith("mount -t xfs -o ro /dev/loop"), result
    assert error.endswith(f"{tmp_path}/run/bootkit/lower: wrong fs type, bad option or bad superblock (EINVAL)") \
        or error.endswith("unknown filesystem type (ENODEV)"), result
    assert result["mounted"] == []
