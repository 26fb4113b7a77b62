"""The persistent local chunk cache end to end (issue 16): three boots of one machine with a second virtio disk
as its cache, each one's fetched bytes read from nginx's access log.

1. Empty cache: a GPT partition of bootkit's cache type with no filesystem; ``rd.qcow2.cache.format=auto``
   formats it in the initramfs, stream mode fills every chunk into it behind the boot; the host stops the
   server once the guest reports the fill complete, and the guest reads every file of its root from the cache.
   Fetched: the image (about once) and its manifest.
2. Same image, image server gone before the boot (nothing listens on its port): the manifest comes from the
   cache by its pinned hash, every chunk from the disk; the console says it booted from the local cache and
   the server was not contacted. Fetched: nothing (the bound is 0 bytes).
3. New version = the same base (now a backing file) + a small overlay, with one base chunk in the cache
   flipped on the host (and a stray file dropped into it): fetched are the overlay's bytes and that one base
   chunk only; the guest sees the new known file, every file reads back, the console names the repaired chunk.

Busybox-based stream root (qemu-tests/rootfs/stream) with an 8 MiB incompressible bulk file; -kernel/-initrd
boots (the PXE part is not under test); the shell initramfs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from bkharness.fixtures import BootDir
from bkharness.guest import GUEST_KERNEL_ARGS, HOST_FROM_GUEST, Guest, qemu_direct
from bkharness.images import modified_copy, qcow2_image, stream_image
from bkharness.pieces import bootkit
from bkharness.servers import WebServer, free_port, nginx_server

from bootkit.boot.cacheopts import CACHE_TYPE_GUID
from bootkit.run import run

BOOT_TIMEOUT = 300.0
CACHE_DISK_SIZE = 160 << 20
#: the cache partition as the kernel line names it (its GPT name, which sfdisk writes below)
CACHE_SPEC = "PARTLABEL=bootkit-cache"
#: the cache partition's byte offset on the cache disk (sfdisk's default alignment)
PART_OFFSET = 1 << 20
#: what opening a file's server costs besides its chunks (the size probe asks for byte 0; slack for a retry)
PROBE = 4096
#: nginx's combined log: "GET /path HTTP/1.1" status body_bytes_sent
_ACCESS = re.compile(r'"(?:GET|HEAD) (/\S*) HTTP/1\.[01]" (\d{3}) (\d+)')


def fetched(web: WebServer) -> dict[str, int]:
    """Body bytes the server sent, by path."""
    out: dict[str, int] = {}
    for path, _status, size in _ACCESS.findall(web.requests_log()):
        out[path] = out.get(path, 0) + int(size)
    return out


def manifest_of(image: Path, dest: Path) -> tuple[Path, str, list[str]]:
    """``bootkit manifest`` of ``image``: the file, its SHA-256 (what the command line pins), its chunk hashes."""
    bootkit("manifest", "-o", dest, image)
    data = dest.read_bytes()
    return dest, hashlib.sha256(data).hexdigest(), data.decode().split("\n")[5:-1]


def serve_dir(www: Path, files: dict[str, Path]) -> Path:
    shutil.rmtree(www, ignore_errors=True)
    www.mkdir(parents=True)
    for name, src in files.items():
        shutil.copyfile(src, www / name)
    return www


@contextmanager
def cache_mounted(disk: Path, mnt: Path) -> Iterator[Path]:
    """The cache partition of ``disk`` mounted on the host (to damage it as a failing disk would)."""
    mnt.mkdir(exist_ok=True)
    run(["mount", "-t", "ext4", "-o", f"loop,offset={PART_OFFSET}", disk, mnt])
    try:
        yield mnt
    finally:
        run(["umount", mnt])


def boot(kernel: Any, initrd: Path, disk: Path, url: str, pins: list[str], *, work: Path, name: str) -> Any:
    append = " ".join((
        f"root=qcow2:{url}",
        "rd.qcow2.mode=stream", "rd.qcow2.fill-rate=0", *pins,
        f"rd.qcow2.cache={CACHE_SPEC}", "rd.qcow2.cache.format=auto",
        "rd.qcow2.overlay=tmpfs", "rw", "ip=dhcp", "rd.neednet=1",
        *GUEST_KERNEL_ARGS, "rd.shell=0", "rd.emergency=poweroff",
    ))  # fmt: skip
    return qemu_direct(kernel.vmlinuz, initrd, append, writable_disks=[disk], log_dir=work, name=name,
                       boot_timeout=BOOT_TIMEOUT)  # fmt: skip


def after_fill(vm: Guest, web: WebServer | None, bulk_sha256: str) -> None:
    """The stream root's proof: fill complete, then (server stopped) every file of the root reads back."""
    vm.expect(r"^BOOTKIT-PROOF-INFO fill=complete", BOOT_TIMEOUT)
    if web is not None:
        web.stop()
    vm.expect(r"^BOOTKIT-PROOF-INFO server=gone", 120)
    m = vm.expect(r"^BOOTKIT-PROOF-INFO after-fill files=(\d+) read-errors=(\d+) bulk-sha256=(\S+)", 180)
    assert (int(m[2]), m[3]) == (0, bulk_sha256), m[0]
    assert int(m[1]) >= 10, m[0]


@pytest.mark.timeout(3 * BOOT_TIMEOUT)  # three boots: under a loaded host more than the suite's 600 s per test
def test_cache_fills_then_boots_offline_then_fetches_only_the_delta(
    kernel: Any, shell_initrd: Path, boot_dir: BootDir
) -> None:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("damaging the cache on the host mounts it through a loop device: needs root and losetup")
    work = boot_dir.path
    root, bulk_sha256 = stream_image(8)
    base = qcow2_image(root.raw, compression="zstd")
    base_manifest, base_pin, base_chunks = manifest_of(base, work / "base.manifest")
    disk = work / "cache.raw"
    with open(disk, "wb") as f:
        f.truncate(CACHE_DISK_SIZE)
    # bootkit's cache type, no filesystem: rd.qcow2.cache.format=auto formats it in the initramfs
    run(["sfdisk", "--quiet", disk], input=f'label: gpt\ntype={CACHE_TYPE_GUID}, name="bootkit-cache"\n'.encode())

    # 1. empty cache: formatted, filled by stream mode, then the server goes
    www = serve_dir(work / "www", {"disk.qcow2": base, "disk.qcow2.manifest": base_manifest})
    with nginx_server(www, log_dir=work / "web1") as web:
        url = f"{web.guest_url}/disk.qcow2"
        with boot(kernel, shell_initrd, disk, url, [f"rd.qcow2.manifest-sha256={base_pin}"], work=work,
                  name="cache-cold") as vm:  # fmt: skip
            vm.expect(r"cache: formatting /dev/vda1 \(a bootkit cache partition; it has no filesystem\)", BOOT_TIMEOUT)
            vm.expect(rf"0 of {len(base_chunks)} chunks in the local cache", BOOT_TIMEOUT)
            after_fill(vm, web, bulk_sha256)
            boot_dir.prove(vm, root, BOOT_TIMEOUT, mode="stream", cache="cold", root="stream", initrd="shell")
            # bootkit status on the booted system: the cache the line names, the image server asked
            assert vm.seen(rf'status: "cache": \{{ .*"device": "{CACHE_SPEC}", "server_contacted": true \}}'), vm.tail()
        first = fetched(web)
    assert vm.seen(r"fill complete: .* in the local cache"), vm.tail()
    size = base.stat().st_size
    assert size <= first.get("/disk.qcow2", 0) <= size * 1.25, (first, size)

    # 2. the same image with the image server gone: everything from the cache, nothing fetched
    port_nobody_listens_on = free_port()
    url = f"http://{HOST_FROM_GUEST}:{port_nobody_listens_on}/disk.qcow2"
    with boot(kernel, shell_initrd, disk, url, [f"rd.qcow2.manifest-sha256={base_pin}"], work=work,
              name="cache-offline") as vm:  # fmt: skip
        n = len(base_chunks)
        vm.expect(rf"{n} of {n} chunks in the local cache: the image server is not needed", BOOT_TIMEOUT)
        vm.expect(r"cache: booted from the local cache: every chunk is local, the image server is not needed, "
                  r"and was not contacted", BOOT_TIMEOUT)  # fmt: skip
        after_fill(vm, None, bulk_sha256)
        boot_dir.prove(vm, root, BOOT_TIMEOUT, mode="stream", cache="warm-offline", root="stream", initrd="shell")
        status = rf'status: "cache": \{{ "complete": true, "device": "{CACHE_SPEC}", "server_contacted": false \}}'
        assert vm.seen(status), vm.tail()
    assert vm.seen(rf"fetch: manifest {base_pin} from the local cache"), vm.tail()

    # 3. base + new overlay, one base chunk damaged on the host: the overlay and that chunk are fetched
    new = modified_copy(root, work / "v2.raw", seed="cache-v2")
    overlay = qcow2_image(new.raw, compression="zstd", backing=base, out=work / "v2.qcow2")
    overlay_manifest, overlay_pin, _ = manifest_of(overlay, work / "v2.manifest")
    bad = base_chunks[0]
    with cache_mounted(disk, work / "mnt") as mnt:
        chunk_file = mnt / "chunks" / bad[:2] / bad
        data = bytearray(chunk_file.read_bytes())
        data[4096] ^= 0xFF
        chunk_file.write_bytes(bytes(data))
        (mnt / "chunks" / "stray.txt").write_bytes(b"not a chunk")
    www = serve_dir(work / "www", {"disk.qcow2": overlay, "disk.qcow2.manifest": overlay_manifest,
                                   base.name: base, f"{base.name}.manifest": base_manifest})  # fmt: skip
    pins = [f"rd.qcow2.manifest-sha256={overlay_pin}", f"rd.qcow2.sha256.{base.name}.manifest={base_pin}"]
    with nginx_server(www, log_dir=work / "web3") as web:
        with boot(kernel, shell_initrd, disk, f"{web.guest_url}/disk.qcow2", pins, work=work, name="cache-delta") as vm:
            vm.expect(rf"chunk {bad} in /run/bootkit/cache does not match its hash", BOOT_TIMEOUT)
            after_fill(vm, web, bulk_sha256)
            boot_dir.prove(vm, new, BOOT_TIMEOUT, mode="stream", cache="delta", root="stream", initrd="shell")
        third = fetched(web)
    assert vm.seen(r"removed 1 file\(s\) that are not part of a bootkit cache"), vm.tail()
    chunk_size = 1 << 20
    # the damaged chunk (and the one byte of the size probe), nothing else of the base; the overlay about once
    assert 0 < third.get(f"/{base.name}", 0) <= chunk_size + PROBE, third
    assert 0 < third.get("/disk.qcow2", 0) <= overlay.stat().st_size + PROBE, (third, overlay.stat().st_size)
    assert overlay.stat().st_size < size // 4  # the delta is small: what the cache saved is the base
    print(f"\nfetched: cold {first}, offline nothing, delta {third} (image {size}, overlay {overlay.stat().st_size})")


def test_cache_harness_pieces_exist() -> None:
    """What the cache test drives: a raw disk attached writable, without QEMU's snapshot."""
    from bkharness.guest import qemu_command

    cmd = qemu_command(kernel=Path("k"), append="x", writable_disks=[Path("/tmp/c.raw")])
    drive = next(c for c in cmd if c.startswith("if=none") and "c.raw" in c)
    assert "snapshot" not in drive and "format=raw" in drive
