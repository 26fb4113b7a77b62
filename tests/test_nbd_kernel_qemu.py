"""The kernel NBD path, proven in a QEMU guest (TCG): `bootkit attach` -> /dev/nbdN with partitions.

The build host has no NBD driver, so the guest does the attaching. It boots the cached Debian kernel
(bootkit.host.kernelpkg) with a tiny initramfs assembled here: static busybox, the host's python3 and standard
library, the bootkit package, nbd.ko, and a >2 GiB QCOW2 image whose GPT has one partition below and one
above the 2 GiB mark. The guest's /init attaches it (as a daemon, and a second time in the foreground over
two connections), prints sizes, partitions and checksums on the serial console, reads again with the files
it was started from moved away (as after switch_root), detaches and powers off; the host compares what it
printed with what it knows the image holds.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bkharness.guest import GUEST_KERNEL_ARGS, qemu_direct

from bootkit.host.kernelpkg import Kernel

MiB = 1024 * 1024
#: virtual size: above 2 GiB (the C-int limit of fcntl.ioctl), a multiple of 512 but not of 4096
SIZE = 3 * 1024 * MiB + 3 * 512
P1 = (1 * MiB, 8 * MiB)  # (offset, length)
P2 = (2 * 1024 * MiB + 64 * MiB, 8 * MiB)
PYTHON = "/usr/bin/python3"
BUSYBOX = Path("/bin/busybox")

pytestmark = pytest.mark.qemu

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
say() { echo "NBDTEST $*"; }
insmod /lib/modules/nbd.ko nbds_max=4 max_part=16 || say insmod-failed
export PYTHONPATH=/opt/bootkit PYTHONDONTWRITEBYTECODE=1
dev=$(python3 -m bootkit attach /disk.qcow2 --daemon --pid-file /run/nbd.pid 2>/run/attach.err)
say attach-rc=$? device=$dev
cat /run/attach.err
pid=$(cat /run/nbd.pid)
say argv0=$(tr '\0' '\n' < /proc/$pid/cmdline | head -n1)
say oom=$(cat /proc/$pid/oom_score_adj) locked-kb=$(grep VmLck /proc/$pid/status | tr -dc 0-9)
total=0; plain=0
for t in /proc/$pid/task/*; do  # PF_MEMALLOC_NOIO (0x80000), set by PR_SET_IO_FLUSHER, on every thread
    f=$(cut -d ' ' -f 9 $t/stat); total=$((total + 1)); [ $(( (f >> 19) & 1 )) = 1 ] || plain=$((plain + 1))
done
say threads=$total not-io-flusher=$plain
say size=$(blockdev --getsize64 $dev) ro=$(cat /sys/block/${dev#/dev/}/ro)
say parts=$(grep -o 'nbd0p[0-9]*' /proc/partitions | sort | tr '\n' ,)
say p1=$(sha256sum < ${dev}p1 | cut -c1-64)
say p2=$(sha256sum < ${dev}p2 | cut -c1-64)
dd if=/dev/zero of=${dev}p1 bs=512 count=1 conv=fsync 2>/dev/null; say write-rc=$?
python3 -m bootkit attach /disk.qcow2 --device /dev/nbd1 --connections 2 > /run/fg.out 2>/run/fg.err &
fg=$!
i=0; while [ ! -b /dev/nbd1p2 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
say fg-device=$(cat /run/fg.out) fg-p2=$(sha256sum < /dev/nbd1p2 | cut -c1-64)
python3 -m bootkit detach /dev/nbd1; say fg-detach-rc=$?
wait $fg; say fg-rc=$?
cat /run/fg.err
# what switch_root does to the daemon: the files it was started from vanish; it must keep serving
mkdir /run/away && mv /opt/bootkit /usr/lib/python3* /usr/bin/python3 /run/away/
echo 3 > /proc/sys/vm/drop_caches
say gone-p1=$(sha256sum < ${dev}p1 | cut -c1-64) gone-p2=$(sha256sum < ${dev}p2 | cut -c1-64)
mv /run/away/bootkit /opt/ && mv /run/away/python3 /usr/bin/ && mv /run/away/python3* /usr/lib/
python3 -m bootkit detach $dev; say detach-rc=$?
i=0; while [ -d /proc/$pid ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
say daemon-gone=$([ -d /proc/$pid ] && echo no || echo yes) size-after=$(cat /sys/block/nbd0/size)
say done
poweroff -f
"""


def _libraries(files: list[Path]) -> set[Path]:
    libs: set[Path] = set()
    for f in files:
        out = subprocess.run(["ldd", str(f)], capture_output=True, text=True, check=False).stdout
        libs.update(Path(m) for m in re.findall(r"(/\S+\.so[.\d]*)", out))
    return libs


def _make_image(d: Path) -> tuple[Path, dict[str, str]]:
    raw = d / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(SIZE)
    script = f"label: gpt\nstart={P1[0] // 512}, size={P1[1] // 512}\nstart={P2[0] // 512}, size={P2[1] // 512}\n"
    subprocess.run(["sfdisk", "-q", str(raw)], input=script, text=True, check=True, capture_output=True)
    sums = {}
    with raw.open("r+b") as f:
        for name, (offset, length), seed in (("p1", P1, b"one"), ("p2", P2, b"two")):
            data = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(length // 32))
            data = data[: length // 2] + b"bootkit " * (length // 16)  # half random, half compressible
            f.seek(offset)
            f.write(data)
            sums[name] = hashlib.sha256(data).hexdigest()
    image = d / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", str(raw), str(image)], check=True)
    raw.unlink()
    return image, sums


def _initramfs(d: Path, kmoddir: Path, image: Path) -> Path:
    root = d / "root"
    for sub in ("bin", "dev", "proc", "sys", "run", "lib/modules", "usr/bin", "opt/bootkit"):
        (root / sub).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    shutil.copy2(os.path.realpath(PYTHON), root / "usr" / "bin" / "python3")
    stdlib = Path(f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}")
    skip = {"test", "idlelib", "tkinter", "lib2to3", "ensurepip", "distutils", "site-packages", "dist-packages"}
    shutil.copytree(
        stdlib,
        root / stdlib.relative_to("/"),
        ignore=lambda _, names: [n for n in names if n in skip or n.startswith("config-")],
        symlinks=True,
    )
    dynload = list((stdlib / "lib-dynload").glob("*.so"))
    for lib in _libraries([Path(PYTHON), *dynload]):
        dest = root / lib.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib.resolve(), dest)
    repo = Path(__file__).resolve().parent.parent
    shutil.copytree(
        repo / "bootkit", root / "opt" / "bootkit" / "bootkit", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(root / "opt" / "bootkit")], check=True)
    shutil.copy2(kmoddir / "kernel" / "drivers" / "block" / "nbd.ko", root / "lib" / "modules" / "nbd.ko")
    shutil.copy2(image, root / "disk.qcow2")
    (root / "init").write_text(INIT)
    os.chmod(root / "init", 0o755)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    cpio = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
        input=("\n".join([".", *names]) + "\n").encode(),
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    out = d / "initramfs.cpio"
    out.write_bytes(cpio)
    shutil.rmtree(root)
    return out


def test_attach_in_a_guest(tmp_path: Path, kernel: Kernel) -> None:
    for tool in ("qemu-system-x86_64", "sfdisk", "cpio", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not BUSYBOX.exists() or not Path(PYTHON).exists():
        pytest.skip("busybox-static and the host's python3 are needed for the guest's initramfs")
    pytest.importorskip("bootkit.qcow2", reason="the QCOW2 reader (bootkit.qcow2) is not there yet")
    image, sums = _make_image(tmp_path)
    initrd = _initramfs(tmp_path, kernel.kmoddir, image)
    append = " ".join((*GUEST_KERNEL_ARGS, "quiet"))
    # the guest has a NIC (the harness's default) that it never uses: its initramfs loads only nbd.ko
    with qemu_direct(kernel.vmlinuz, initrd, append, log_dir=tmp_path, name="nbd-attach", boot_timeout=900) as vm:
        vm.wait_exit(900)
        console = vm.output
    said: dict[str, str] = {}
    for line in console.splitlines():
        if line.startswith("NBDTEST "):
            for m in re.finditer(r"(\S+?)=(\S*)", line):
                said[m.group(1)] = m.group(2)
    tail = "\n".join(console.splitlines()[-40:])
    assert "NBDTEST done" in console, tail
    assert said["attach-rc"] == "0" and said["device"] == "/dev/nbd0", tail
    assert said["argv0"] == "@bootkit-nbd"
    assert said["oom"] == "-1000" and int(said["locked-kb"] or 0) > 0, tail
    assert int(said["threads"]) > 1 and said["not-io-flusher"] == "0", tail
    assert said["size"] == str(SIZE)
    assert said["ro"] == "1"
    assert said["parts"] == "nbd0p1,nbd0p2,"
    assert (said["p1"], said["p2"]) == (sums["p1"], sums["p2"])
    assert said["write-rc"] != "0"
    assert (said["gone-p1"], said["gone-p2"]) == (sums["p1"], sums["p2"]), tail
    assert (said["fg-device"], said["fg-p2"]) == ("/dev/nbd1", sums["p2"]), tail
    assert (said["fg-detach-rc"], said["fg-rc"]) == ("0", "0"), tail
    assert said["detach-rc"] == "0"
    assert (said["daemon-gone"], said["size-after"]) == ("yes", "0"), tail
