"""The systemd generator of bootkit's dracut module (bootkit-generator.sh), run for real on the host.

Each run happens in a new mount namespace (``unshare --user --map-root-user --mount``) with a file
bind-mounted over /proc/cmdline, so the script reads the kernel command line exactly where it does at boot;
its two output directories are temporary ones, given as the arguments systemd passes.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootkit.boot.cmdline import split_cmdline

GENERATOR = Path(__file__).resolve().parent.parent / "dracut-module" / "90bootkit" / "bootkit-generator.sh"
SHELLS = [s for s in ("dash", "bash") if shutil.which(s)]
URL = "http://10.0.2.2:8080/disk.qcow2"


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--user", "--map-root-user", "--mount", "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


pytestmark = pytest.mark.skipif(not _can_unshare(), reason="needs unshare --user --mount (a new mount namespace)")


def generate(tmp_path: Path, cmdline: str, shell: str = "sh") -> tuple[Path, Path]:
    """Run the generator with ``cmdline`` as /proc/cmdline; returns (normal_dir, early_dir)."""
    work = Path(tmp_path)
    work.mkdir(parents=True, exist_ok=True)
    fake = work / "cmdline"
    fake.write_text(cmdline + "\n")
    normal, early = work / "normal", work / "early"
    for d in (normal, early):
        shutil.rmtree(d, ignore_errors=True)
    # the command line reaches the shell as a file only: never as an argument of this script
    script = 'mount --bind "$1" /proc/cmdline && exec "$2" "$3" "$4" "$5"'
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
         str(fake), shell, str(GENERATOR), str(normal), str(early)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return normal, early


def claimed(normal: Path, early: Path) -> bool:
    mount = early / "sysroot.mount"
    link = normal / "initrd-root-fs.target.requires" / "bootkit-root.service"
    # the boot code starts early and waits for this unit to say the network is online
    network_up = normal / "initrd-root-fs.target.wants" / "bootkit-network-up.service"
    assert mount.exists() == link.is_symlink() == network_up.is_symlink()
    return mount.exists()


def last_root_is_ours(cmdline: str) -> bool:
    """What bootkit's own parser decides: the last root= word names a QCOW2 image."""
    roots = [w[len("root=") :] for w in split_cmdline(cmdline) if w.startswith("root=")]
    return bool(roots) and roots[-1].startswith("qcow2:")


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    ("cmdline", "ours"),
    [
        (f"root=qcow2:{URL} ip=dhcp", True),
        (f"console=ttyS0 root=qcow2:{URL} root=/dev/sda2", False),  # issue 12 §3: boot the local disk
        (f"root=/dev/sda2 root=qcow2:{URL}", True),
        (f'root="qcow2:{URL}" rw', True),
        (f'"root=qcow2:{URL}" rw', True),
        (f"root='qcow2:{URL}'", True),
        (f'root=qcow2:{URL} root="LABEL=my disk"', False),
        (f'systemd.setenv="X= root=qcow2:{URL}"', False),  # inside a quoted word: not a root= word
        (f'root=qcow2:{URL} "a root=/dev/sda1"', True),
        ("root=/dev/sda2", False),
        ("quiet", False),
        (f"xroot=qcow2:{URL}", False),
        (f'root=qcow2:{URL} unbalanced="quote root=/dev/sda1', False),  # falls back to a plain split
    ],
)
def test_the_last_root_decides(tmp_path: Path, shell: str, cmdline: str, ours: bool) -> None:
    assert last_root_is_ours(cmdline) is ours  # the generator and the boot code agree
    assert claimed(*generate(tmp_path, cmdline, shell)) is ours


def test_the_unit_is_fixed_text_whatever_the_url(tmp_path: Path) -> None:
    _, early = generate(tmp_path / "plain", f"root=qcow2:{URL}")
    expected = (early / "sysroot.mount").read_bytes()
    assert b"What=/run/bootkit/root\nWhere=/sysroot\nOptions=bind\n" in expected
    hostile = (
        "root=qcow2:http://h/x$(touch${IFS}/tmp/bootkit-pwned)`id`;.qcow2%0a[Service]%0aExecStart=/bin/sh "
        '"root=qcow2:http://h/$(id)\\"${x}\\\\/d.qcow2 [Service]" rw'
    )
    normal2, early2 = generate(tmp_path / "hostile", hostile)
    assert claimed(normal2, early2) and last_root_is_ours(hostile)
    assert (early2 / "sysroot.mount").read_bytes() == expected
    assert sorted(p.name for p in early2.iterdir()) == ["sysroot.mount"]
    assert not Path("/tmp/bootkit-pwned").exists()
    link = normal2 / "initrd-root-fs.target.requires" / "bootkit-root.service"
    assert str(link.readlink()) == "/usr/lib/systemd/system/bootkit-root.service"
    assert sorted(p.name for p in normal2.iterdir()) == [
        "initrd-root-fs.target.requires",
        "initrd-root-fs.target.wants",
    ]
    wants = normal2 / "initrd-root-fs.target.wants" / "bootkit-network-up.service"
    assert str(wants.readlink()) == "/usr/lib/systemd/system/bootkit-network-up.service"


_WORDS = st.sampled_from(
    [" ", " ", "\t", '"', "'", "\\", "a", "=", "root=", "root=qcow2:", "qcow2:", "root=/dev/sda2", f"root=qcow2:{URL}"]
)


@settings(max_examples=120, deadline=None)
@given(st.lists(_WORDS, max_size=12).map("".join), st.sampled_from(SHELLS))
def test_the_generator_splits_words_as_the_boot_code_does(
    tmp_path_factory: pytest.TempPathFactory, text: str, shell: str
) -> None:
    cmdline = text.strip(" \t")
    normal, early = generate(tmp_path_factory.mktemp("gen"), cmdline, shell)
    assert claimed(normal, early) is last_root_is_ours(cmdline), repr(cmdline)
