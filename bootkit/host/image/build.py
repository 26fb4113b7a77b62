"""``bootkit build-image``: a root tree (directory or tar archive) to a bootable, compressed QCOW2 image.

    result = build_image(BuildOptions(source=Path("root.tar.zst"), output=Path("out/web.qcow2")))

Steps, each logged: stage a private copy of the tree (``tree.stage_tree``), find its kernel, strip per-machine
identity, make ext4 with ``mke2fs -d`` and a GPT disk around it (``disk``), write the QCOW2 image with
bootkit's own writer, copy the kernel to ``NAME.vmlinuz`` and build ``NAME.initrd`` with build-initrd.

All work happens in a hidden directory next to the output, removed at the end; outputs are renamed into
place only when everything succeeded: nothing partial is left behind on error.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bootkit.errors import UsageError
from bootkit.host.image import delta, disk, tree
from bootkit.host.image.oci import Platform
from bootkit.log import human_size, log
from bootkit.qcow2.writer import Compression, WriteProgress

DEFAULT_HEADROOM = 256 << 20
DEFAULT_CLUSTER_SIZE = 64 << 10


class KernelError(UsageError):
    """The tree has no kernel (or no modules for it) and ``--no-kernel`` was not given."""


@dataclass(frozen=True)
class BuildOptions:
    """What ``bootkit build-image`` was asked for."""

    source: Path
    #: NAME.qcow2; the kernel and initramfs go next to it as NAME.vmlinuz and NAME.initrd
    output: Path
    label: str = "root"
    #: file system size in bytes (None: content plus ``headroom``)
    size: int | None = None
    headroom: int = DEFAULT_HEADROOM
    compression: Compression = Compression.zstd
    #: None: 64 KiB, or the base's with ``base``
    cluster_size: int | None = None
    #: seed for every UUID (None: the tree's content digest)
    seed: str | None = None
    keep_identity: bool = False
    kernel: bool = True
    #: build-initrd's --drivers (None: every NIC driver)
    drivers: tuple[str, ...] | None = None
    systemd: bool = False
    #: timestamp clamp (SOURCE_DATE_EPOCH); None: the newest mtime in the tree
    epoch: int | None = None
    #: the image to take from an OCI index or docker-archive (None: linux/amd64; a root tree refuses one)
    platform: Platform | None = None
    #: build an overlay on this image (``--base``): only the clusters that differ (``delta``)
    base: Path | None = None


@dataclass(frozen=True)
class TreeKernel:
    kver: str
    vmlinuz: Path
    kmoddir: Path


@dataclass(frozen=True)
class BuildResult:
    image: Path
    image_size: int
    disk_size: int
    fs_size: int
    vmlinuz: Path | None
    initrd: Path | None
    kver: str | None
    seed: str


def outputs_for(output: Path) -> tuple[Path, Path, Path]:
    """(NAME.qcow2, NAME.vmlinuz, NAME.initrd) for the output path."""
    stem = output.name[: -len(".qcow2")] if output.name.endswith(".qcow2") else output.name
    return output, output.with_name(f"{stem}.vmlinuz"), output.with_name(f"{stem}.initrd")


def build_image(opts: BuildOptions) -> BuildResult:
    """Build the image described by ``opts``; see the module docstring."""
    _check_label(opts.label)
    image, vmlinuz_out, initrd_out = outputs_for(opts.output.resolve())
    source = opts.source.resolve()
    if not source.exists():
        raise tree.TreeError(f"{opts.source}: no such directory or tar archive")
    if source.is_dir() and image.parent.is_relative_to(source):
        # the work directory and the outputs would be copied into the image (cp: "into itself")
        raise UsageError(f"-o {opts.output}: the output must not be inside SOURCE {opts.source}")
    image.parent.mkdir(parents=True, exist_ok=True)
    base: delta.BaseImage | None = None
    cluster_size = opts.cluster_size or DEFAULT_CLUSTER_SIZE
    if opts.base is not None:
        if opts.seed is not None:
            raise UsageError("--seed and --base contradict each other: an overlay keeps its base's identifiers")
        base = delta.read_base(opts.base, image)
        cluster_size = delta.check_cluster_size(base, opts.cluster_size)
        delta.check_size(base, opts.size)
        log.info("build-image: overlay on %s (%s, %d KiB clusters): its identifiers and file-system geometry"
                 " are kept", base.name, human_size(base.virtual_size), cluster_size >> 10)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".{image.name}.build-", dir=image.parent))
    try:
        root = work / "root"
        root.mkdir()
        tree.stage_tree(source, root, opts.platform)
        kernel = find_kernel(root) if opts.kernel else None
        if kernel is None and opts.kernel:
            raise KernelError(f"{opts.source}: no kernel in the tree (boot/vmlinuz-* or usr/lib/modules/*/vmlinuz"
                              " with its modules): add one or pass --no-kernel")
        if opts.keep_identity:
            log.info("build-image: per-machine identity kept (--keep-identity): machine-id and SSH host keys"
                     " as in the tree")
        else:
            stripped = tree.strip_identity(root)
            log.info("build-image: per-machine identity removed (--keep-identity keeps it): %s",
                     ", ".join([f"{p} emptied" for p in stripped.emptied] + [f"{p} removed" for p in stripped.removed])
                     or "the tree had none")
        epoch = opts.epoch if opts.epoch is not None else tree.newest_mtime(root)
        if opts.epoch is not None:
            tree.settle_times(root, epoch)  # the digest sees the clamped times
        if base is not None:
            seed = f"the identifiers of {base.name}"  # the tree's digest would be unused
        elif opts.seed is not None:
            seed = opts.seed
        else:
            log.info("build-image: hashing the tree")
            seed = tree.tree_digest(root)
        tree.settle_times(root, epoch)
        entries, data = tree.count_entries(root)
        if base is None:
            ids = disk.DiskIds.from_seed(seed)
            fs_size = opts.size if opts.size is not None else disk.fs_size_for(data, entries, opts.headroom)
            inodes = max(entries + entries // 4 + 1024, 4096)
        else:
            ids = base.ids
            fs_size, inodes = delta.fs_geometry(base, data=data, entries=entries, headroom=opts.headroom,
                                                size=opts.size)
            if fs_size > base.fs_size:
                log.info("build-image: the tree does not fit in the base's %s file system: the overlay grows the"
                         " disk (fewer clusters stay shared)", human_size(base.fs_size))
        fs_size = (fs_size + disk.MIB - 1) // disk.MIB * disk.MIB
        log.info("build-image: ext4 '%s' of %s for %d entries, %s of data", opts.label, human_size(fs_size),
                 entries, human_size(data))
        fs_image = work / "root.ext4"
        disk.make_ext4(root, fs_image, size=fs_size, inodes=inodes, label=opts.label, ids=ids, epoch=epoch)
        disk.log_fs(fs_image)
        raw = work / "disk.raw"
        disk_size = disk.assemble_gpt(fs_image, raw, ids=ids, label=opts.label)
        fs_image.unlink()
        log.info("build-image: writing QCOW2 (%s, %d KiB clusters)", opts.compression.value, cluster_size >> 10)
        from bootkit.qcow2 import write_qcow2

        work_image = work / image.name
        written = write_qcow2(raw, work_image, compression=opts.compression.value, cluster_size=cluster_size,
                              backing=None if base is None else base.path,
                              backing_name=None if base is None else base.name, progress=_WriteMeter())
        log.info("build-image: QCOW2 %s for a %s disk (%d clusters with data) in %.1f s",
                 human_size(written.file_size), human_size(written.virtual_size), written.clusters_written,
                 written.seconds)
        if base is not None:
            log.info("build-image: %d of %d clusters differ from %s (%d kept from it, %d zeroed)",
                     written.clusters_written + written.clusters_zero, written.clusters_total, base.name,
                     written.clusters_same, written.clusters_zero)
        raw.unlink()
        staged: list[tuple[Path, Path]] = [(work_image, image)]
        if kernel is not None:
            work_vmlinuz = work / vmlinuz_out.name
            shutil.copyfile(kernel.vmlinuz, work_vmlinuz)
            work_initrd = work / initrd_out.name
            _build_initrd(kernel, work_initrd, opts)
            staged += [(work_vmlinuz, vmlinuz_out), (work_initrd, initrd_out)]
        _publish(staged)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = BuildResult(
        image=image,
        image_size=image.stat().st_size,
        disk_size=disk_size,
        fs_size=fs_size,
        vmlinuz=vmlinuz_out if kernel else None,
        initrd=initrd_out if kernel else None,
        kver=kernel.kver if kernel else None,
        seed=seed,
    )
    log.info("build-image: done in %.1f s", time.monotonic() - started)
    return result


class _WriteMeter:
    """A progress line every ``interval`` seconds while the QCOW2 image is written."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self.last = time.monotonic()

    def __call__(self, p: WriteProgress) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        log.info("build-image: QCOW2 %d%% (%d of %d clusters), wrote %s", 100 * p.clusters_done // max(
            p.clusters_total, 1), p.clusters_done, p.clusters_total, human_size(p.file_size))


def _check_label(label: str) -> None:
    if not label or len(label.encode()) > 16 or not re.fullmatch(r"[A-Za-z0-9._-]+", label):
        raise UsageError(f"--label {label!r}: 1-16 characters of A-Z a-z 0-9 . _ -")


def _publish(staged: list[tuple[Path, Path]]) -> None:
    """Rename the finished files into place; on failure take back what was already renamed."""
    done: list[Path] = []
    try:
        for src, dst in staged:
            os.replace(src, dst)
            done.append(dst)
    except BaseException:
        for dst in done:
            dst.unlink(missing_ok=True)
        raise


def _build_initrd(kernel: TreeKernel, output: Path, opts: BuildOptions) -> None:
    from bootkit.host.initrd import InitrdOptions, build_initrd

    log.info("build-image: building the initramfs for kernel %s", kernel.kver)
    build_initrd(InitrdOptions(output=output, kver=kernel.kver, kmoddir=kernel.kmoddir, systemd=opts.systemd,
                               drivers=opts.drivers))


def resolve_in(root: Path, rel: str) -> Path | None:
    """``rel`` resolved inside ``root`` as if ``root`` were ``/`` (absolute symlinks stay inside); None if absent."""
    parts = [p for p in rel.split("/") if p]
    current: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if current:
                current.pop()
            continue
        path = root.joinpath(*current, part)
        if path.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(path)
            if target.startswith("/"):
                current = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        if not path.exists():
            return None
        current.append(part)
    return root.joinpath(*current)


def _version_key(kver: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.-]", kver)]


def find_kernel(root: Path) -> TreeKernel | None:
    """The newest kernel in the tree that has both an image and a modules directory."""
    found: dict[str, Path] = {}
    for modules in ("usr/lib/modules", "lib/modules"):
        moddir = resolve_in(root, modules)
        if moddir is None or not moddir.is_dir():
            continue
        for kdir in moddir.iterdir():
            image = resolve_in(root, f"{modules}/{kdir.name}/vmlinuz")
            if image is not None and image.is_file():
                found.setdefault(kdir.name, image)
    boot = resolve_in(root, "boot")
    if boot is not None and boot.is_dir():
        for entry in boot.iterdir():
            if entry.name.startswith("vmlinuz-"):
                image = resolve_in(root, f"boot/{entry.name}")
                if image is not None and image.is_file():
                    found.setdefault(entry.name[len("vmlinuz-"):], image)
    for kver in sorted(found, key=_version_key, reverse=True):
        for modules in ("usr/lib/modules", "lib/modules"):
            kmoddir = resolve_in(root, f"{modules}/{kver}")
            if kmoddir is not None and kmoddir.is_dir():
                # build-initrd wants the directory by a .../lib/modules/<kver> path
                if kmoddir.parent.name != "modules" or kmoddir.parent.parent.name != "lib":
                    continue
                log.info("build-image: kernel %s (%s)", kver, found[kver].relative_to(root))
                return TreeKernel(kver=kver, vmlinuz=found[kver], kmoddir=kmoddir)
    return None


def describe(result: BuildResult) -> str:
    """The summary line for standard output."""
    parts = [f"{result.image}: {human_size(result.image_size)} (disk {human_size(result.disk_size)}, ext4 "
             f"{human_size(result.fs_size)})"]
    if result.vmlinuz and result.initrd:
        parts.append(f"kernel {result.kver}: {result.vmlinuz.name} {human_size(result.vmlinuz.stat().st_size)},"
                     f" {result.initrd.name} {human_size(result.initrd.stat().st_size)}")
    return "; ".join(parts)
