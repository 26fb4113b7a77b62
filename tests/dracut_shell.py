"""dracut's shell scripts run on the host: bootkit's hooks with dracut's own ``dracut-lib.sh``, in a private
mount namespace with its own /run, /dev/kmsg and /proc/cmdline (tests of the shell initramfs's hooks)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "dracut-module" / "90bootkit"
DRACUT_BASE = Path("/usr/lib/dracut/modules.d/99base")


def dracut_lib(tmp_path: Path) -> Path:
    """dracut's dracut-lib.sh as the initramfs has it: its helpers where it looks for them (/lib, $PATH)."""
    if not (DRACUT_BASE / "dracut-lib.sh").exists():
        pytest.skip(f"{DRACUT_BASE} not found: install the Debian package 'dracut-core'")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("dracut-getarg", "dracut-getargs"):
        if not (bin_dir / name).exists():
            (bin_dir / name).symlink_to("/usr/lib/dracut/dracut-util")
    lib = tmp_path / "dracut-lib.sh"
    text = (DRACUT_BASE / "dracut-lib.sh").read_text()
    lib.write_text(text.replace("/lib/dracut-dev-lib.sh", str(DRACUT_BASE / "dracut-dev-lib.sh")))
    return lib


def in_namespace(
    script: str, tmp_path: Path, cmdline: str = "", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` under bash in a private mount namespace: its own /run, /dev/kmsg and /proc/cmdline,
    with dracut's shell library sourced first."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace (unshare -m)")
    lib = dracut_lib(tmp_path)
    kmsg = tmp_path / "kmsg"
    kmsg.touch()
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    prologue = (
        "mount -t tmpfs tmpfs /run\n"
        f"mount --bind {kmsg} /dev/kmsg\n"
        f"mount --bind {tmp_path / 'cmdline'} /proc/cmdline\n"
        f"export PATH={tmp_path / 'bin'}:$PATH\n"
        f". {lib}\n"
        # after dracut-lib.sh, which sets the initramfs' own hookdir
        f"export hookdir={tmp_path}/hooks\n"
        'mkdir -p "$hookdir/emergency" "$hookdir/shutdown-emergency" "$hookdir/initqueue/finished" /run/bootkit\n'
    )
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", prologue + script],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def source_die_hook(tmp_path: Path) -> str:
    """What sourcing the hook that dracut's die wrote prints (dracut sources it in the emergency path)."""
    hook = tmp_path / "hooks" / "emergency" / "01-die.sh"
    assert hook.exists(), "dracut's die did not run"
    proc = subprocess.run(
        ["bash", "-c", 'warn() { echo "$*"; }; . "$1"', "bash", str(hook)], capture_output=True, text=True
    )
    return proc.stdout + proc.stderr


def boot_entry(tmp_path: Path) -> Path:
    """``bootkit-boot`` for this checkout (the initramfs has it in /usr/lib/bootkit, zstandard beside it)."""
    import zstandard

    site = str(Path(zstandard.__file__).resolve().parent.parent)
    entry = tmp_path / "bootkit-boot"
    entry.write_text(
        "#!/usr/bin/python3 -SE\nimport sys\n"
        f"sys.path.insert(0, {site!r})\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from bootkit.boot.main import entry\n"
        "entry()\n"
    )
    entry.chmod(0o755)
    return entry


def module_script(tmp_path: Path, name: str, entry: Path) -> Path:
    """A script of the module as shipped, except for where it finds the boot code (``entry`` for
    ``bootkit-boot``, and this checkout's ``bootkit-start.sh`` pointed at it) and dracut's library."""
    start = tmp_path / "bootkit-start"
    start.write_text((MODULE / "bootkit-start.sh").read_text().replace("/usr/lib/bootkit/bootkit-boot", str(entry)))
    start.chmod(0o755)
    text = (MODULE / name).read_text()
    text = text.replace("/usr/lib/bootkit/bootkit-boot", str(entry))
    text = text.replace("/usr/lib/bootkit/bootkit-start", str(start))
    text = text.replace(". /lib/dracut-lib.sh", f". {dracut_lib(tmp_path)}")
    out = tmp_path / name
    out.write_text(text)
    out.chmod(0o755)
    return out
