"""Root images for the test guests, built without loop devices or mounts, cached between runs.

A root image is a GPT disk (raw file) with an EFI system partition and a root partition of the Discoverable
Partitions root type for x86-64, the way a real machine's image would look:

    sector 2048    ESP   FAT, 8 MiB           (type C12A7328-F81F-11D2-BA4B-00A0C93EC93B)
    then           root  ext4, label "root"   (type 4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709)

Each file system is made on its own image file (``mke2fs -t ext4 -d DIR``, ``mkfs.vfat``), the partition
table by ``sfdisk`` on the raw disk file, and the file systems are copied into place with
``dd conv=notrunc``. Then ``qemu-img convert -O qcow2`` makes the QCOW2 variants the tests serve.

Two kinds of root: ``busybox`` (busybox-static, /sbin/init from qemu-tests/rootfs/busybox: proves and powers
off; a few MiB) and ``debian`` (``debootstrap --variant=minbase --include=systemd-sysv bookworm`` trimmed of
docs, locales and apt lists, with the proof unit from qemu-tests/rootfs/debian). Both carry
qemu-tests/rootfs/common and a known file of pseudo-random bytes whose SHA-256 the host knows.

Cache (``$BOOTKIT_CACHE`` or ``<repo>/cache``), keyed by a hash of everything that goes into an image, so
editing a rootfs file rebuilds it and nothing else does::

    images/<kind>-<key>.raw  + .json     the GPT disk and its description (RootImage)
    images/<stem>.<variant>.qcow2        QCOW2 conversions
    rootfs/debian-bookworm-minbase/      the debootstrap tree (.complete written last)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from bkharness.paths import ROOTFS_FILES, cache_dir
from bootkit.log import log
from bootkit.run import run

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
#: Discoverable Partitions Specification: root partition, x86-64
ROOT_TYPE_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"

SECTOR = 512
MIB = 1024 * 1024
ESP_START = 1 * MIB
ESP_SIZE = 8 * MIB
ROOT_START = ESP_START + ESP_SIZE
#: room for the backup GPT at the end of the disk
GPT_TAIL = 1 * MIB

#: where the known file lives inside every test root (the proof script reads it)
KNOWN_FILE = "usr/share/bootkit-proof/known.bin"
KNOWN_SIZE = 1 * MIB

#: bump when the way images are built changes, to invalidate the cache
BUILDER_VERSION = "2"

DEBIAN_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class RootImage:
    """A built root disk and what the guest should prove about it."""

    kind: str
    raw: Path
    #: 1-based number of the root partition in the GPT
    root_partition: int
    #: sha256 of KNOWN_FILE inside the root file system
    known_sha256: str
    #: bytes of the root file system (ext4) inside the disk
    root_fs_size: int

    @property
    def stem(self) -> str:
        return self.raw.stem

    def to_json(self) -> str:
        d = asdict(self)
        d["raw"] = str(self.raw)
        return json.dumps(d, indent=2) + "\n"

    @classmethod
    def from_json(cls, path: Path) -> RootImage:
        d = json.loads(path.read_text())
        d["raw"] = Path(d["raw"])
        return cls(**d)


def known_bytes(seed: str, size: int = KNOWN_SIZE) -> bytes:
    """Deterministic, incompressible bytes (SHA-256 in counter mode): the data the guest checksums."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def _tree_digest(*roots: Path) -> str:
    """Hash of file names, modes and contents under ``roots`` (what goes into an image)."""
    h = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            h.update(f"{root.name}/{rel}:{path.stat().st_mode:o}\n".encode())
            if path.is_file():
                h.update(path.read_bytes())
    return h.hexdigest()


def _replace_file(target: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file inside a root directory under construction.

    An existing entry is removed first, never written through: in a root tree, a symlink such as
    ``sbin/init -> /bin/busybox`` points at the HOST's file when followed from outside the guest.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.write_bytes(data)
    os.chmod(target, mode)


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy qemu-tests/rootfs/<part> into a root directory, as root-owned files with their modes."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            _replace_file(target, path.read_bytes(), path.stat().st_mode & 0o7777)


def _write_known_file(root: Path, seed: str) -> str:
    data = known_bytes(seed)
    _replace_file(root / KNOWN_FILE, data)
    return hashlib.sha256(data).hexdigest()


def assemble_gpt_disk(root_dir: Path, disk: Path, *, root_fs_size: int, label: str = "root") -> None:
    """Make ``disk``: GPT with an ESP and an ext4 root partition holding ``root_dir`` (no loop, no mount)."""
    work = disk.parent / f".{disk.name}.parts"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        esp = work / "esp.vfat"
        with esp.open("wb") as f:
            f.truncate(ESP_SIZE)
        run(["mkfs.vfat", "-n", "ESP", esp], capture=True)
        rootfs = work / "root.ext4"
        run([
            "mke2fs", "-q",
            "-t", "ext4",
            "-L", label,
            "-E", "root_owner=0:0",
            "-d", root_dir,
            rootfs,
            f"{root_fs_size // 1024}k",
        ], capture=True)  # fmt: skip
        total = ROOT_START + root_fs_size + GPT_TAIL
        with disk.open("wb") as f:
            f.truncate(total)
        table = (
            "label: gpt\n"
            f"start={ESP_START // SECTOR}, size={ESP_SIZE // SECTOR}, type={ESP_TYPE}, name=\"ESP\"\n"
            f"start={ROOT_START // SECTOR}, size={root_fs_size // SECTOR}, type={ROOT_TYPE_X86_64}, "
            f"name=\"root\"\n"
        )
        run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", disk], input=table.encode(), capture=True)
        for part, offset in ((esp, ESP_START), (rootfs, ROOT_START)):
            run([
                "dd",
                f"if={part}",
                f"of={disk}",
                "bs=1M",
                f"seek={offset // MIB}",
                "conv=notrunc,sparse",
                "status=none",
            ])  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _assemble_into_place(root: Path, raw: Path, size: int) -> None:
    tmp = raw.with_name(f".{raw.name}.{os.getpid()}.tmp")
    try:
        assemble_gpt_disk(root, tmp, root_fs_size=size)
        tmp.rename(raw)
    finally:
        tmp.unlink(missing_ok=True)


def _round_up(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


def _du(path: Path) -> int:
    out = run(["du", "-s", "--block-size=1", path], capture=True).stdout.decode()
    return int(out.split()[0])


def _cached(kind: str, key: str) -> RootImage | None:
    meta = cache_dir() / "images" / f"{kind}-{key[:16]}.json"
    if meta.exists():
        image = RootImage.from_json(meta)
        if image.raw.exists():
            return image
    return None


def _store(image: RootImage) -> RootImage:
    meta = image.raw.with_suffix(".json")
    meta.write_text(image.to_json())
    log.info("image: %s root image ready: %s", image.kind, image.raw)
    return image


# -- busybox ------------------------------------------------------------------------------------------------
BUSYBOX = Path("/bin/busybox")


def build_busybox_root(dest: Path) -> None:
    """A root directory: static busybox with every applet linked, plus the busybox and common rootfs files."""
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "etc", "root"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BUSYBOX, dest / "bin" / "busybox")
    os.chmod(dest / "bin" / "busybox", 0o755)
    applets = run([BUSYBOX, "--list-full"], capture=True).stdout.decode().split()
    for applet in applets:
        link = dest / applet
        if applet == "bin/busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        # relative, so that nothing on the host side ever resolves it to the host's /bin/busybox
        link.symlink_to(os.path.relpath(dest / "bin" / "busybox", link.parent))
    _replace_file(dest / "etc" / "hostname", b"bootkit-busybox\n")
    _replace_file(dest / "etc" / "passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    _replace_file(dest / "etc" / "group", b"root:x:0:\n")
    _copy_tree(ROOTFS_FILES / "common", dest)
    _copy_tree(ROOTFS_FILES / "busybox", dest)


def busybox_image() -> RootImage:
    """The busybox root disk (built once, then taken from the cache)."""
    if not BUSYBOX.exists():
        raise FileNotFoundError(f"{BUSYBOX}: install the Debian package 'busybox-static'")
    key = hashlib.sha256(
        (BUILDER_VERSION + _tree_digest(ROOTFS_FILES / "common", ROOTFS_FILES / "busybox")).encode()
        + BUSYBOX.read_bytes()
    ).hexdigest()
    image = _cached("busybox", key)
    if image is not None:
        return image
    out = cache_dir() / "images"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".busybox-root.") as tmp:
        root = Path(tmp)
        build_busybox_root(root)
        known = _write_known_file(root, f"busybox-{key}")
        size = 24 * MIB
        raw = out / f"busybox-{key[:16]}.raw"
        _assemble_into_place(root, raw, size)
    return _store(RootImage("busybox", raw, 2, known, size))


#: where the stream-mode root keeps its bulk file (incompressible, so that the image has some size)
BULK_FILE = "usr/share/bootkit-proof/bulk.bin"


def stream_image(bulk_mib: int = 32) -> tuple[RootImage, str]:
    """The busybox root plus a ``bulk_mib`` MiB bulk file and the after-fill proof (qemu-tests/rootfs/stream:
    its /sbin/init runs it, then the busybox root's own init); returns the image and the bulk file's sha256."""
    trees = _tree_digest(*(ROOTFS_FILES / part for part in ("common", "busybox", "stream")))
    key = hashlib.sha256(f"{BUILDER_VERSION} bulk={bulk_mib} {trees}".encode() + BUSYBOX.read_bytes()).hexdigest()
    bulk = known_bytes(f"bulk-{key}", bulk_mib * MIB)
    bulk_sha256 = hashlib.sha256(bulk).hexdigest()
    with _cache_lock():
        image = _cached("stream", key)
        if image is not None:
            return image, bulk_sha256
        out = cache_dir() / "images"
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out, prefix=".stream-root.") as tmp:
            root = Path(tmp)
            build_busybox_root(root)
            (root / "sbin" / "init").rename(root / "sbin" / "init.proof")
            _copy_tree(ROOTFS_FILES / "stream", root)
            _replace_file(root / BULK_FILE, bulk)
            known = _write_known_file(root, f"stream-{key}")
            size = 24 * MIB + _round_up(bulk_mib * MIB * 9 // 8, MIB)
            raw = out / f"stream-{key[:16]}.raw"
            _assemble_into_place(root, raw, size)
        return _store(RootImage("stream", raw, 2, known, size)), bulk_sha256


# -- Debian -------------------------------------------------------------------------------------------------
def debian_mirror() -> str:
    """The Debian mirror from the host's apt sources (one-line or deb822 format), else deb.debian.org."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for src in sources:
        try:
            text = src.read_text()
        except OSError:
            continue
        if src.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
                uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                if suites and uris and DEBIAN_SUITE in suites.group(1).split():
                    return uris.group(1).rstrip("/")
        else:
            for line in text.splitlines():
                m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s", line)
                if m and m.group(2) == DEBIAN_SUITE:
                    return m.group(1).rstrip("/")
    return DEFAULT_MIRROR


#: what the Debian image does not need: documentation, translations, apt's package lists and .deb cache
_DEBIAN_TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/lib/apt/lists",
    "var/cache/apt",
    "var/cache/debconf/templates.dat-old",
    "var/log",
)


def debootstrap_tree() -> Path:
    """``debootstrap --variant=minbase --include=systemd-sysv bookworm``, trimmed; cached."""
    tree = cache_dir() / "rootfs" / f"debian-{DEBIAN_SUITE}-minbase"
    if (tree / ".complete").exists():
        return tree
    if shutil.which("debootstrap") is None:
        raise FileNotFoundError("debootstrap not found: install the Debian package 'debootstrap'")
    shutil.rmtree(tree, ignore_errors=True)
    tree.parent.mkdir(parents=True, exist_ok=True)
    mirror = debian_mirror()
    log.info("image: debootstrap %s from %s (about a minute)", DEBIAN_SUITE, mirror)
    run(["debootstrap", "--variant=minbase", "--include=systemd-sysv", DEBIAN_SUITE, tree, mirror],
        capture=True)
    for rel in _DEBIAN_TRIM:
        target = tree / rel
        if target.is_dir():
            shutil.rmtree(target)
            target.mkdir()
    (tree / ".complete").write_text(f"{DEBIAN_SUITE} {mirror}\n")
    return tree


def _systemctl_link(root: Path, unit_dir: str, name: str, target: str) -> None:
    link = root / "etc" / "systemd" / "system" / unit_dir / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def configure_debian_root(root: Path) -> None:
    """Make the debootstrap copy a test guest: proof unit enabled, nothing that waits for a human."""
    _copy_tree(ROOTFS_FILES / "common", root)
    _copy_tree(ROOTFS_FILES / "debian", root)
    _replace_file(root / "etc" / "hostname", b"bootkit-debian\n")
    # an image must not carry the build's identity; systemd treats an empty machine-id as a first boot
    _replace_file(root / "etc" / "machine-id", b"", 0o444)
    dbus_id = root / "var" / "lib" / "dbus" / "machine-id"
    if dbus_id.is_symlink() or dbus_id.exists():
        dbus_id.unlink()
    _replace_file(root / "etc" / "fstab", b"# the root is mounted by the initramfs (bootkit)\n")
    _systemctl_link(root, "", "default.target", "/lib/systemd/system/multi-user.target")
    _systemctl_link(root, "multi-user.target.wants", "bootkit-proof.service",
                    "/etc/systemd/system/bootkit-proof.service")
    # no login prompts or first-boot questions on the console the host reads
    for unit in ("serial-getty@ttyS0.service", "getty@tty1.service", "systemd-firstboot.service"):
        _systemctl_link(root, "", unit, "/dev/null")


def debian_image() -> RootImage:
    """The Debian minimal + systemd root disk (debootstrap once, then taken from the cache)."""
    tree = debootstrap_tree()
    key = hashlib.sha256(
        (BUILDER_VERSION + (tree / ".complete").read_text()
         + _tree_digest(ROOTFS_FILES / "common", ROOTFS_FILES / "debian")).encode()
    ).hexdigest()
    image = _cached("debian", key)
    if image is not None:
        return image
    out = cache_dir() / "images"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".debian-root.") as tmp:
        root = Path(tmp) / "root"
        run(["cp", "-a", "--reflink=auto", tree, root])
        (root / ".complete").unlink()
        configure_debian_root(root)
        known = _write_known_file(root, f"debian-{key}")
        # ext4 metadata and a little free space for the guest (it writes through the overlay anyway)
        size = _round_up(int(_du(root) * 1.3) + 48 * MIB, MIB)
        raw = out / f"debian-{key[:16]}.raw"
        _assemble_into_place(root, raw, size)
    return _store(RootImage("debian", raw, 2, known, size))


def debian_bulk_image(bulk_mib: int) -> RootImage:
    """The Debian root plus a ``bulk_mib`` MiB incompressible file at :data:`BULK_FILE`: an image whose size
    shows in a boot (bench/bootmodes.py). Built like :func:`debian_image`, cached by its own key."""
    tree = debootstrap_tree()
    key = hashlib.sha256(
        (BUILDER_VERSION + f" bulk={bulk_mib} " + (tree / ".complete").read_text()
         + _tree_digest(ROOTFS_FILES / "common", ROOTFS_FILES / "debian")).encode()
    ).hexdigest()
    with _cache_lock():
        image = _cached("debian-bulk", key)
        if image is not None:
            return image
        out = cache_dir() / "images"
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out, prefix=".debian-bulk-root.") as tmp:
            root = Path(tmp) / "root"
            run(["cp", "-a", "--reflink=auto", tree, root])
            (root / ".complete").unlink()
            configure_debian_root(root)
            _replace_file(root / BULK_FILE, known_bytes(f"bulk-{key}", bulk_mib * MIB))
            known = _write_known_file(root, f"debian-bulk-{key}")
            size = _round_up(int(_du(root) * 1.3) + 48 * MIB, MIB)
            raw = out / f"debian-bulk-{key[:16]}.raw"
            _assemble_into_place(root, raw, size)
        return _store(RootImage("debian-bulk", raw, 2, known, size))


@contextmanager
def _cache_lock() -> Iterator[None]:
    """One image build at a time per cache (several test runs or a demo may share it)."""
    path = cache_dir() / "images" / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def root_image(kind: str) -> RootImage:
    """Build or reuse the root disk of ``kind`` (``busybox`` or ``debian``)."""
    builders = {"busybox": busybox_image, "debian": debian_image}
    if kind not in builders:
        raise ValueError(f"unknown root image kind {kind!r} (busybox, debian)")
    with _cache_lock():
        return builders[kind]()


# -- QCOW2 ---------------------------------------------------------------------------------------------------
def qcow2_image(
    raw: Path,
    *,
    compression: str | None = "deflate",
    extended_l2: bool = False,
    cluster_size: int | None = None,
    backing: Path | None = None,
    out: Path | None = None,
) -> Path:
    """``qemu-img convert -O qcow2`` of ``raw``: compressed with ``compression`` (deflate, zstd, or None).

    With ``backing``, only what differs from that QCOW2 is written and the result names it (by file name:
    both are served from the same URL directory). Cached next to the raw file unless ``out`` is given.
    """
    opts = []
    variant = [compression or "plain"]
    if compression is not None:
        # QEMU calls deflate "zlib" (docs/interop/qcow2.rst: compression type 0, deflate in zlib framing)
        opts.append(f"compression_type={'zlib' if compression == 'deflate' else compression}")
    if extended_l2:
        opts.append("extended_l2=on")
        variant.append("l2ext")
    if cluster_size is not None:
        opts.append(f"cluster_size={cluster_size}")
        variant.append(f"c{cluster_size}")
    if backing is not None:
        variant.append(f"on-{backing.stem}")
    target = out or raw.with_name(f"{raw.stem}.{'-'.join(variant)}.qcow2")
    if out is None and target.exists() and target.stat().st_mtime >= raw.stat().st_mtime:
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    source: list[str | os.PathLike[str]] = ["-f", "raw", raw]
    work = None
    if backing is not None:
        # qemu-img resolves a relative backing name against the image's directory, where the base must be
        if backing.parent.resolve() != target.parent.resolve():
            shutil.copyfile(backing, target.parent / backing.name)
        # convert -B copies every allocated cluster of its source, and all of a raw file is allocated; so
        # first make an uncompressed overlay holding only the differences from the base (rebase in safe
        # mode compares the two), then compress that overlay's clusters alone.
        work = target.with_name(f".{target.name}.{os.getpid()}.work")
        work.mkdir(exist_ok=True)
        full, diff = work / "full.qcow2", work / "diff.qcow2"
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, full])
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", full, "-F", "qcow2", diff])
        run(["qemu-img", "rebase", "-f", "qcow2", "-b", target.parent.resolve() / backing.name, "-F", "qcow2",
             diff])
        source = ["-f", "qcow2", diff]
    cmd: list[str | os.PathLike[str]] = ["qemu-img", "convert", *source[:2], "-O", "qcow2"]
    if compression is not None:
        cmd.append("-c")
    if opts:
        cmd += ["-o", ",".join(opts)]
    if backing is not None:
        cmd += ["-B", backing.name, "-F", "qcow2"]
    cmd += [source[2], tmp]
    try:
        run(cmd, cwd=target.parent)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    tmp.rename(target)
    return target


def image_info(path: Path) -> dict[str, object]:
    """``qemu-img info --output=json`` of ``path``."""
    out = run(["qemu-img", "info", "--output=json", path], capture=True).stdout
    info: dict[str, object] = json.loads(out)
    return info


def partition_table(raw: Path) -> dict[str, object]:
    """``sfdisk --json`` of ``raw``'s partition table."""
    out = run(["sfdisk", "--json", raw], capture=True).stdout
    table: dict[str, object] = json.loads(out)["partitiontable"]
    return table


def extract_root_fs(image: RootImage, dest: Path) -> Path:
    """Copy the root partition out of the disk into its own file (for debugfs, fsck, or a local-disk boot)."""
    run([
        "dd",
        f"if={image.raw}",
        f"of={dest}",
        "bs=1M",
        f"skip={ROOT_START // MIB}",
        f"count={image.root_fs_size // MIB}",
        "conv=sparse",
        "status=none",
    ])  # fmt: skip
    return dest


def modified_copy(image: RootImage, dest: Path, *, seed: str) -> RootImage:
    """A copy of ``image`` whose known file has different contents, changed with debugfs (no mount).

    For the backing-chain test: the overlay QCOW2 holds only this change, so a guest that sees the new
    checksum read both layers.
    """
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".modify.") as tmp:
        fs = extract_root_fs(image, Path(tmp) / "root.ext4")
        new = Path(tmp) / "known.bin"
        data = known_bytes(seed)
        new.write_bytes(data)
        script = f"rm /{KNOWN_FILE}\nwrite {new} /{KNOWN_FILE}\nsif /{KNOWN_FILE} mode 0100644\n"
        run(["debugfs", "-w", "-f", "-", fs], input=script.encode(), capture=True)
        run(["e2fsck", "-fn", fs], capture=True)
        shutil.copyfile(image.raw, dest)
        run(["dd", f"if={fs}", f"of={dest}", "bs=1M", f"seek={ROOT_START // MIB}", "conv=notrunc,sparse",
             "status=none"])
    return RootImage(image.kind, dest, image.root_partition, hashlib.sha256(data).hexdigest(),
                     image.root_fs_size)


def set_incompatible_feature(qcow2: Path, bit: int) -> None:
    """Set an incompatible-feature bit in a QCOW2 v3 header (offset 72, big-endian u64), in place.

    Used to make an image with a feature no reader knows: docs/interop/qcow2.rst says such an image
    must not be opened.
    """
    with qcow2.open("r+b") as f:
        f.seek(72)
        value = int.from_bytes(f.read(8), "big") | (1 << bit)
        f.seek(72)
        f.write(value.to_bytes(8, "big"))


def sparse_qcow2(path: Path, virtual_size: str) -> Path:
    """A QCOW2 with all metadata preallocated: a huge file on the wire, almost nothing on the host disk."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", path, virtual_size])
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def fsck_root(image: RootImage) -> str:
    """``e2fsck -fn`` of the root partition; returns its report (raises if the file system is damaged)."""
    with tempfile.TemporaryDirectory(dir=image.raw.parent, prefix=".fsck.") as tmp:
        fs = extract_root_fs(image, Path(tmp) / "root.ext4")
        proc = run(["e2fsck", "-fn", fs], capture=True, check=False)
    report = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise AssertionError(f"e2fsck -fn of {image.raw} root partition: {report}")
    return report
