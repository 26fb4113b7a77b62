"""The README demo: network-boot a small Linux system from a QCOW2 image, in QEMU, on this machine.

``python -m bkharness.demo`` from ``qemu-tests/`` (what ``scripts/demo.sh`` runs after installing what is
needed):

1. a Debian kernel package, unpacked into the cache (``bootkit.host.kernelpkg``);
2. the busybox root disk (GPT: ESP + root partition) as a deflate-compressed QCOW2 (built once, cached);
3. bootkit's initramfs (``bootkit build-initrd``, cached until bootkit's code changes);
4. the PXE configuration (``bootkit pxe-config``: iPXE script, GRUB config);
5. a web server for kernel, initramfs and image (``bootkit serve-http`` on 127.0.0.1);
6. QEMU (TCG) boots from the network: firmware PXE -> iPXE -> kernel + initramfs over HTTP -> the image
   over HTTP -> bootkit's QCOW2 reader + NBD server -> root mounted -> the system proves what it sees and
   powers off.

The serial console streams to the terminal, with a progress line per stage; the last line says SUCCESS or
FAILURE. Test code, not part of the installed package: it is the end-to-end harness of qemu-tests/ telling the
boot story. Host side.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[2]

STAGE_TEXT = {
    "kernel": "kernel started (firmware, iPXE and the HTTP downloads of kernel and initramfs are done)",
    "network": "network up in the initramfs",
    "download": "QCOW2 image downloaded and its SHA-256 verified",
    "attach": "image attached as /dev/nbd0 through bootkit's reader and NBD server",
    "mount": "root file system mounted under a tmpfs overlay",
    "switch_root": "switched to the real root",
    "target": "the system is up and reported what it sees",
    "poweroff": "powered off",
}


class Progress:
    """Prints the demo's own lines (``demo: ...``) and the guest console, and spots the boot stages."""

    def __init__(self, out: TextIO, console: bool) -> None:
        from bkharness.timeline import BOOT_STAGES

        self.out = out
        self.console = console
        self.stages = list(BOOT_STAGES)
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        self.out.write(f"demo: {text}\n")
        self.out.flush()

    def step(self, n: int, total: int, text: str) -> None:
        self.say(f"[{n}/{total}] {text}")

    def on_line(self, line: Any) -> None:
        import re

        if self.console:
            self.out.write(f"  | {line.text}\n")
        # stages are found in order: each one only after the previous one was seen
        while self.stages and re.search(self.stages[0].pattern, line.text):
            stage = self.stages.pop(0)
            self.out.write(f"demo: ==> [{line.t:6.1f} s] {STAGE_TEXT.get(stage.name, stage.name)}\n")
            break
        self.out.flush()


def _initrd_key(kver: str) -> str:
    """Hash of what goes into bootkit's initramfs: its Python code, the dracut module, the kernel version."""
    h = hashlib.sha256(kver.encode())
    for root in (REPO / "bootkit", REPO / "dracut-module"):
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                h.update(path.relative_to(REPO).as_posix().encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cached_initrd(kernel: Any, progress: Progress) -> Path:
    from bkharness import pieces
    from bkharness.paths import cache_dir

    out_dir = cache_dir() / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"initrd-{kernel.kver}-{_initrd_key(kernel.kver)}.img"
    if target.exists():
        progress.say(f"    reusing {target.name} ({target.stat().st_size / 2**20:.1f} MiB)")
        return target
    for old in out_dir.glob("initrd-*.img"):
        old.unlink()
    progress.say("    running bootkit build-initrd (dracut; about 15-30 s)")
    tmp = target.with_suffix(".tmp")
    pieces.initrd(tmp, systemd=False, drivers=("virtio_net",))
    tmp.rename(target)
    progress.say(f"    {target.name}: {target.stat().st_size / 2**20:.1f} MiB")
    return target


def run_demo(console: bool, keep: bool, out: TextIO, signed_kernel: bool = False) -> int:
    from bkharness import images, pieces
    from bkharness.guest import GuestError
    from bkharness.netboot import netboot
    from bkharness.paths import cache_dir
    from bkharness.proof import expect_clean_poweroff, expect_proof

    progress = Progress(out, console)
    total = 6
    progress.step(1, total, "kernel: Debian linux-image package, unpacked into the cache")
    # the signed package holds the same build (same modules): only the vmlinuz the guest boots differs
    kernel = pieces.signed_kernel() if signed_kernel else pieces.kernel()
    progress.say(f"    {kernel.kver}: {kernel.vmlinuz}")
    progress.step(2, total, "root image: busybox root in a GPT disk (ESP + root), as a deflate QCOW2")
    root = images.root_image("busybox")
    qcow2 = images.qcow2_image(root.raw, compression="deflate")
    progress.say(f"    {qcow2.name}: {qcow2.stat().st_size / 2**20:.1f} MiB for a "
                 f"{root.raw.stat().st_size / 2**20:.0f} MiB disk")
    progress.step(3, total, "initramfs: bootkit build-initrd")
    initrd = cached_initrd(kernel, progress)
    work = cache_dir() / "demo" / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    progress.step(4, total, "PXE configuration: bootkit pxe-config (iPXE script, pinned SHA-256)")
    progress.step(5, total, "web server: bootkit serve-http on 127.0.0.1 (the guest sees it as 10.0.2.2)")
    progress.step(6, total, "QEMU (TCG, BIOS, virtio-net) boots from the network"
                  + ("; serial console follows" if console else ""))
    started = time.monotonic()
    try:
        with netboot(kernel, initrd, qcow2, work=work, name="demo", on_line=progress.on_line) as boot:
            proof = expect_proof(boot.vm, 600)
            expect_clean_poweroff(boot.vm)
    except GuestError as e:
        progress.say(str(e).splitlines()[0])
        progress.say(f"serial log: {work / 'demo.serial.log'}")
        out.write("FAILURE: the guest did not boot to its proof (see the serial log above)\n")
        return 1
    problems = proof.problems(root)
    elapsed = time.monotonic() - started
    if problems:
        for p in problems:
            progress.say(f"    wrong: {p}")
        out.write(f"FAILURE: the guest booted but did not prove it ran from the image ({len(problems)} problems)\n")
        return 1
    if not keep:
        shutil.rmtree(work / "www", ignore_errors=True)
    out.write(
        f"SUCCESS: booted from {qcow2.name} over HTTP in {elapsed:.0f} s: root {proof.root} via overlay, "
        f"data verified (sha256 {proof.sha256[:16]}...), root writable, NBD server alive, clean power-off\n"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo.sh", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--no-console", dest="console", action="store_false",
                        help="show only the progress lines, not the guest's serial console")
    parser.add_argument("--keep", action="store_true", help="keep the web root under cache/demo/run")
    parser.add_argument("--signed-kernel", action="store_true",
                        help="boot Debian's signed kernel package (linux-image-VER) instead of the unsigned one")
    args = parser.parse_args(argv)
    from bkharness.pieces import MissingPiece
    from bootkit.errors import BootkitError

    try:
        return run_demo(args.console, args.keep, sys.stdout, args.signed_kernel)
    except MissingPiece as e:
        sys.stdout.write(f"FAILURE: a part of bootkit is missing, the demo cannot boot: {e}\n")
        return 1
    except BootkitError as e:
        sys.stdout.write(f"FAILURE: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stdout.write("FAILURE: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
