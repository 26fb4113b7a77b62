"""A tiny busybox initramfs (newc cpio), for testing the harness itself and for the local-disk floor boot.

Not bootkit's initramfs (that one is ``bootkit build-initrd``): this is the smallest thing that lets the
harness prove, with a real kernel, that its QEMU command lines, console reading, PXE chain and root images
work, and lets bench/boot.py boot the same root from a local virtio disk.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bkharness.images import BUSYBOX
from bootkit.run import run


def _module_closure(kmoddir: Path, names: Sequence[str]) -> list[str]:
    """The module files (relative to kmoddir) for ``names`` and everything they depend on, load order."""
    deps: dict[str, list[str]] = {}
    for line in (kmoddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    builtin = set()
    builtin_file = kmoddir / "modules.builtin"
    if builtin_file.exists():
        builtin = {Path(m).name.split(".ko")[0].replace("-", "_")
                   for m in builtin_file.read_text().split()}
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        # modules.dep lists a module's dependencies, deepest last: load them in reverse
        for dep in reversed(deps[mod]):
            visit(dep)
        order.append(mod)

    for name in names:
        key = name.replace("-", "_")
        if key in builtin:
            continue
        if key not in by_name:
            raise FileNotFoundError(f"kernel module {name} not in {kmoddir}/modules.dep")
        visit(by_name[key])
    return order


def tiny_initramfs(out: Path, init: str, *, kmoddir: Path | None = None,
                   modules: Sequence[str] = ()) -> Path:
    """Write a newc cpio at ``out``: static busybox, ``/init`` = ``init`` (a shell script), and ``modules``
    (with their dependencies) under /lib/modules, loaded by ``/init`` through ``insmod`` in order.
    """
    with tempfile.TemporaryDirectory(prefix=".initramfs.", dir=out.parent) as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "run", "newroot", "lib/modules"):
            (root / d).mkdir(parents=True)
        shutil.copyfile(BUSYBOX, root / "bin" / "busybox")
        os.chmod(root / "bin" / "busybox", 0o755)
        (root / "bin" / "sh").symlink_to("busybox")
        load = ""
        if modules:
            assert kmoddir is not None, "modules need the kernel's module directory"
            for rel in _module_closure(kmoddir, modules):
                target = root / "lib" / "modules" / Path(rel).name
                shutil.copyfile(kmoddir / rel, target)
                load += f"/bin/busybox insmod /lib/modules/{target.name}\n"
        script = init.replace("@LOAD_MODULES@", load)
        (root / "init").write_text(script)
        os.chmod(root / "init", 0o755)
        names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
        listing = "\n".join([".", *names]) + "\n"
        cpio = run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], input=listing.encode(), cwd=root,
                   capture=True).stdout
    out.write_bytes(cpio)
    return out


#: /init of the harness's smoke-test initramfs: prints a marker with what it sees, then powers off
SMOKE_INIT = """#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
read -r up _ < /proc/uptime
echo "HARNESS-SMOKE cmdline=$(/bin/busybox cat /proc/cmdline) uptime=$up"
/bin/busybox poweroff -f
"""

#: /init for the local-disk floor: mount the root partition of the virtio disk and switch to it
LOCAL_DISK_INIT = """#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
@LOAD_MODULES@
i=0
while [ ! -b /dev/vda2 ] && [ $i -lt 100 ]; do /bin/busybox sleep 0.1; i=$((i + 1)); done
/bin/busybox mount -t ext4 -o ro /dev/vda2 /newroot || { echo "LOCAL-DISK-FAILED mount"; \
/bin/busybox poweroff -f; }
/bin/busybox mount --move /dev /newroot/dev
/bin/busybox mount --move /proc /newroot/proc
/bin/busybox mount --move /sys /newroot/sys
exec /bin/busybox switch_root /newroot /sbin/init
"""
