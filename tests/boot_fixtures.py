"""Fixtures for the boot tests: the Debian kernel, built initramfs images, a busybox root disk, QEMU.

Session-scoped: the kernel package and each initramfs are built once per run (the kernel is also cached
across runs under ``cache/kernel``). Imported by tests/test_boot_*.py and tests/test_initrd_*.py with
``from tests.boot_fixtures import *`` style imports of the fixtures they use.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bkharness.guest import GUEST_KERNEL_ARGS, GuestError, qemu_direct

from bootkit.host.initrd import InitrdOptions, InitrdResult, build_initrd
from bootkit.host.kernelpkg import Kernel

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "artifacts"

#: GPT type GUIDs
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
DPS_ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
LINUX_DATA = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"

MiB = 1 << 20


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


def sh(*cmd: str | os.PathLike[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([os.fspath(c) for c in cmd], check=True, capture_output=True, **kwargs)  # type: ignore[call-overload, no-any-return]


# -- disks made with real tools ---------------------------------------------------------------------------


def make_ext4(path: Path, size_mib: int, *, label: str = "", content: Path | None = None) -> Path:
    args = ["mke2fs", "-q", "-F", "-t", "ext4"]
    if label:
        args += ["-L", label]
    if content is not None:
        args += ["-d", str(content)]
    sh(*args, path, f"{size_mib}M")
    return path


def make_vfat(path: Path, size_mib: int, *, label: str = "") -> Path:
    path.unlink(missing_ok=True)
    sh("mkfs.vfat", *(["-n", label] if label else []), "-C", path, str(size_mib * 1024))
    return path


@dataclass(frozen=True)
class Part:
    image: Path
    type: str  # GPT type GUID or MBR hex type


def make_disk(path: Path, parts: list[Part], *, label: str = "gpt") -> Path:
    """A raw disk holding ``parts`` (each a filesystem image) in order, 1 MiB aligned, via sfdisk."""
    offsets = []
    start = MiB
    for p in parts:
        size = (p.image.stat().st_size + MiB - 1) // MiB * MiB
        offsets.append((start, size))
        start += size
    total = start + MiB  # room for the backup GPT
    with open(path, "wb") as f:
        f.truncate(total)
    script = f"label: {label}\n" + "".join(
        f"start={o // 512}, size={s // 512}, type={p.type}\n" for p, (o, s) in zip(parts, offsets, strict=True)
    )
    sh("sfdisk", "-q", path, input=script.encode())
    for p, (o, _s) in zip(parts, offsets, strict=True):
        sh("dd", f"if={p.image}", f"of={path}", "bs=1M", f"seek={o // MiB}", "conv=notrunc,sparse", "status=none")
    return path


# -- the busybox root ---------------------------------------------------------------------------------------

# /sbin/init of the test root: proves on the serial console what it sees, then powers off.
BUSYBOX_INIT = textwrap.dedent(
    """\
    #!/bin/sh
    export PATH=/bin:/sbin
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    echo "BOOTKIT-TEST init: pid $$, kernel $(uname -r)"
    while read -r dev mnt fstype opts rest; do
        case "$mnt" in /|/run/bootkit/*) echo "BOOTKIT-TEST mount: $dev $mnt $fstype $opts" ;; esac
    done < /proc/mounts
    echo "BOOTKIT-TEST sha256: $(sha256sum /etc/bootkit-test.data | cut -d' ' -f1)"
    if echo written > /bootkit-test.written && [ "$(cat /bootkit-test.written)" = written ]; then
        echo "BOOTKIT-TEST write: ok"
    else
        echo "BOOTKIT-TEST write: failed"
    fi
    for d in /proc/[0-9]*; do
        cmd=$(tr '\\0' ' ' < "$d/cmdline" 2>/dev/null)
        case "$cmd" in @*)
            echo "BOOTKIT-TEST server: pid ${d#/proc/} $cmd"
            echo "BOOTKIT-TEST server-oom: $(cat "$d/oom_score_adj")"
            echo "BOOTKIT-TEST server-root: $(ls -A "$d/root/" 2>&1 | wc -l) entries"
            ;;
        esac
    done
    if [ -d /run/bootkit/images ]; then
        echo "BOOTKIT-TEST images-mode: $(stat -c %a /run/bootkit/images /run/bootkit/images/* | tr '\\n' ' ')"
    fi
    if [ -e /run/bootkit/status.json ]; then
        echo "BOOTKIT-TEST status: $(tr -d '\\n' < /run/bootkit/status.json)"
    fi
    if [ -d /run/systemd/system ]; then
        echo "BOOTKIT-TEST units: $(ls /run/systemd/system | tr '\\n' ' ')"
    fi
    # read the whole root back through the NBD server after the switch
    if find / -xdev -type f -exec cat {} + > /dev/null 2>&1; then echo "BOOTKIT-TEST readall: ok"; fi
    sync
    if mount -o remount,ro /; then echo "BOOTKIT-TEST remount-ro: ok"; fi
    dmesg | grep -iE "I/O error|nbd.*(dead|error)" | sed 's/^/BOOTKIT-TEST kernel: /'
    echo "BOOTKIT-TEST done"
    poweroff -f
    """
)


@dataclass(frozen=True)
class RootImage:
    qcow2: Path
    sha256: str  # of the qcow2 file
    data_sha256: str  # of /etc/bootkit-test.data inside
    root_partition: int


def make_busybox_tree(root: Path) -> Path:
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("busybox (busybox-static) not installed")
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "root", "sysroot"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    applets = sh(busybox, "--list").stdout.decode().split()
    for applet in applets:
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    # systemd's switch-root refuses a tree without os-release ("does not seem to be an OS tree")
    (root / "etc" / "os-release").write_text('NAME="bootkit test root"\nID=bootkit-test\n')
    init = root / "sbin" / "init"
    init.write_text(BUSYBOX_INIT)
    init.chmod(0o755)
    (root / "etc" / "bootkit-test.data").write_bytes(os.urandom(3 * MiB + 12345))
    return root


def make_root_image(work: Path, *, table: str = "gpt") -> RootImage:
    """GPT disk: ESP (vfat) + root (ext4, DPS root type) holding the busybox root; compressed qcow2."""
    need("mke2fs", "mkfs.vfat", "sfdisk", "qemu-img")
    work.mkdir(parents=True, exist_ok=True)
    tree = make_busybox_tree(work / "tree")
    data_sha = hashlib.sha256((tree / "etc" / "bootkit-test.data").read_bytes()).hexdigest()
    esp = make_vfat(work / "esp.vfat", 8, label="ESP")
    rootfs = make_ext4(work / "root.ext4", 24, label="bkroot", content=tree)
    if table == "gpt":
        parts = [Part(esp, ESP_TYPE), Part(rootfs, DPS_ROOT_X86_64)]
    else:
        parts = [Part(esp, "ef"), Part(rootfs, "83")]
    raw = make_disk(work / "disk.raw", parts, label=table)
    qcow2 = work / "disk.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", raw, qcow2)
    raw.unlink()
    sha = hashlib.sha256(qcow2.read_bytes()).hexdigest()
    return RootImage(qcow2, sha, data_sha, 2)


# -- QEMU -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Boot:
    """A finished boot: its serial console (text, and the log file the harness wrote) and QEMU's exit status."""

    log: Path
    returncode: int  # -1: killed after the timeout
    elapsed: float
    text: str

    def lines(self, prefix: str) -> list[str]:
        return [line.split(prefix, 1)[1].strip() for line in self.text.splitlines() if prefix in line]


#: on the kernel line of every boot test: a failed boot powers off instead of waiting in a shell
BOOT_TEST_ARGS = (*GUEST_KERNEL_ARGS, "rd.shell=0", "rd.emergency=poweroff")


def qemu_boot(kernel: Kernel, initrd: Path, append: str, log: Path, *, timeout: float = 420) -> Boot:
    """Boot ``kernel`` + ``initrd`` with the harness (TCG, user networking); returns when the guest powers off.

    The serial console is logged to ``log``, which must be named ``NAME.serial.log`` (the harness's naming).
    """
    need("qemu-system-x86_64")
    name = log.name.removesuffix(".serial.log")
    args = " ".join((*BOOT_TEST_ARGS, append))
    with qemu_direct(kernel.vmlinuz, initrd, args, log_dir=log.parent, name=name, boot_timeout=timeout) as vm:
        try:
            returncode = vm.wait_exit(timeout + 60)  # the harness kills it at the timeout
        except GuestError:  # the harness killed it after the timeout
            returncode = -1
        return Boot(vm.log_path, returncode, vm.elapsed, vm.output)


def keep_artifact(path: Path, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    dest = ARTIFACTS / name
    shutil.copy(path, dest)
    return dest


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[int]:
    """Serve ``directory`` on 127.0.0.1 (bootkit serve-http's server); yields the port (guest: 10.0.2.2)."""
    from bootkit.host.httpserve import http_server

    with http_server(str(directory)) as url:
        yield int(url.rstrip("/").rsplit(":", 1)[1])


# -- session fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def debian_kernel(kernel: Kernel) -> Kernel:
    """The QEMU harness's kernel (bkharness.fixtures ``kernel``: bootkit.host.kernelpkg's cache), by this name."""
    return kernel


def _build(factory: pytest.TempPathFactory, kernel: Kernel, name: str, **kw: object) -> InitrdResult:
    need("dracut")
    out = factory.mktemp("initrd") / name
    return build_initrd(InitrdOptions(output=out, kver=kernel.kver, kmoddir=kernel.kmoddir, **kw))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def initrd_shell(tmp_path_factory: pytest.TempPathFactory, debian_kernel: Kernel) -> InitrdResult:
    """Shell initramfs (network-legacy), virtio_net only."""
    return _build(tmp_path_factory, debian_kernel, "shell.img", systemd=False, drivers=("virtio_net",))


@pytest.fixture(scope="session")
def initrd_systemd(tmp_path_factory: pytest.TempPathFactory, debian_kernel: Kernel) -> InitrdResult:
    """systemd initramfs (systemd-networkd), virtio_net only."""
    return _build(tmp_path_factory, debian_kernel, "systemd.img", systemd=True, drivers=("virtio_net",))


@pytest.fixture(scope="session")
def busybox_root(tmp_path_factory: pytest.TempPathFactory) -> RootImage:
    return make_root_image(tmp_path_factory.mktemp("busybox-root"))
