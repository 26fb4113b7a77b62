"""``build-image --base OLD.qcow2``: what a delta build takes from the image it builds on.

An overlay is small only if the new disk matches the old one cluster for cluster wherever the tree did not
change. ``mke2fs -d`` places files in sorted order from the start of the file system, so an unchanged file
lands on the same blocks as long as everything before it kept its size; but three things of a build would
move *every* block group's metadata if they were chosen afresh:

- the identifiers (file-system UUID and hash seed: every metadata checksum is seeded with the UUID; the GPT
  GUIDs): derived from the tree's digest, they would change with any file;
- the file-system size (the content plus headroom) and the inode count: they decide the number of block
  groups and where each group's bitmaps and inode tables lie.

So a delta build reads all four identifiers, the file-system size and the inode count back from the base
(decoded with bootkit's own reader, the GPT and the ext4 superblock), and keeps them whenever the new tree
fits; only when it does not is the file system made larger (the overlay then grows the disk: a backing image
smaller than its overlay reads as zeros past its end, QEMU's rule).

The overlay names its base by plain file name (bootkit's reader follows backing names only inside the
image's directory), so the base must lie in the output's directory; ``bootkit publish`` later rewrites the
name to the base's published, content-addressed one.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from bootkit.boot.partitions import read_gpt
from bootkit.errors import BootkitError, UsageError
from bootkit.host.image import disk
from bootkit.host.image.disk import PART_START, ROOT_TYPE_X86_64, DiskIds

#: ext4 superblock (at 1024 in the file system): fields a delta build keeps
_EXT4_MAGIC = 0xEF53
_SB_OFFSET = 1024


class BaseImageError(UsageError):
    """The ``--base`` image cannot be built on (not one of build-image's disks, other cluster size, ...)."""


@dataclass(frozen=True)
class BaseImage:
    """What a delta build keeps from its base."""

    path: Path
    #: the plain file name recorded as the overlay's backing file
    name: str
    cluster_size: int
    virtual_size: int
    fs_size: int
    inodes: int
    ids: DiskIds


def read_base(path: Path, output: Path) -> BaseImage:
    """Open ``path`` with bootkit's reader and read what the overlay keeps; ``output`` is the overlay's path."""
    from bootkit.qcow2 import open as open_image

    if not path.is_file():
        raise BaseImageError(f"--base {path}: no such file")
    if path.resolve().parent != output.resolve().parent:
        raise BaseImageError(f"--base {path}: must be in the output's directory {output.resolve().parent}"
                             " (the overlay names its base by plain file name)")
    if path.resolve() == output.resolve():
        raise BaseImageError(f"--base {path}: is the output itself")
    try:
        image = open_image(str(path))
    except BootkitError as e:
        raise BaseImageError(f"--base {path}: {e}") from None
    with image:
        disk_guid = _disk_guid(image.pread(512, 512))
        try:
            parts = read_gpt(image)
        except BootkitError as e:
            raise BaseImageError(f"--base {path}: {e}") from None
        if disk_guid is None or not parts:
            raise BaseImageError(f"--base {path}: no GPT partition table: not an image of bootkit build-image")
        root = parts[0]
        if len(parts) != 1 or root.type != ROOT_TYPE_X86_64 or root.start != PART_START:
            raise BaseImageError(f"--base {path}: not an image of bootkit build-image (one x86-64 root"
                                 " partition at 1 MiB)")
        sb = image.pread(root.start + _SB_OFFSET, 1024)
        if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != _EXT4_MAGIC:
            raise BaseImageError(f"--base {path}: partition 1 holds no ext4 file system")
        inodes, blocks_lo = struct.unpack_from("<II", sb, 0)
        log_block = struct.unpack_from("<I", sb, 0x18)[0]
        blocks_hi = struct.unpack_from("<I", sb, 0x150)[0] if struct.unpack_from("<I", sb, 0x60)[0] & 0x80 else 0
        if log_block > 6:
            raise BaseImageError(f"--base {path}: ext4 superblock: s_log_block_size {log_block} out of range")
        fs_size = (blocks_lo | blocks_hi << 32) << (10 + log_block)
        if fs_size > root.size:
            raise BaseImageError(f"--base {path}: ext4 of {fs_size} bytes in a partition of {root.size}")
        ids = DiskIds(
            fs_uuid=str(uuid.UUID(bytes=sb[0x68:0x78])),
            hash_seed=str(uuid.UUID(bytes=sb[0xEC:0xFC])),
            disk_guid=disk_guid,
            part_guid=root.partuuid,
        )
        return BaseImage(path=path, name=path.name, cluster_size=image.cluster_size,
                         virtual_size=image.virtual_size, fs_size=root.size, inodes=inodes, ids=ids)


def _disk_guid(header: bytes) -> str | None:
    if len(header) < 72 or header[:8] != b"EFI PART":
        return None
    return str(uuid.UUID(bytes_le=header[56:72]))


def check_cluster_size(base: BaseImage, cluster_size: int | None) -> int:
    """The overlay's cluster size: the base's; a different one asked for is refused."""
    if cluster_size is not None and cluster_size != base.cluster_size:
        raise BaseImageError(f"--cluster-size {cluster_size}: the base {base.name} has {base.cluster_size}-byte"
                             " clusters; an overlay must use the same")
    return base.cluster_size


def check_size(base: BaseImage, size: int | None) -> None:
    """``--size`` may only grow the file system: a smaller disk than the base's would cut it short."""
    if size is not None and size < base.fs_size:
        raise BaseImageError(f"--size {size}: smaller than the base's file system ({base.fs_size} bytes)")


def fs_geometry(base: BaseImage, *, data: int, entries: int, headroom: int, size: int | None) -> tuple[int, int]:
    """(file-system size, inode count) for a tree of ``data`` bytes in ``entries`` inodes.

    The base's when the tree fits in them (the layout stays put; the headroom is the base's free space);
    otherwise a size with ``headroom`` as without a base, never below the base's; ``size`` (``--size``) wins.
    """
    check_size(base, size)
    inodes = base.inodes if entries + 16 <= base.inodes else max(entries + entries // 4 + 1024, base.inodes)
    if size is not None:
        return size, inodes
    if disk.fs_size_for(data, entries, 0) <= base.fs_size:
        return base.fs_size, inodes
    return max(base.fs_size, disk.fs_size_for(data, entries, headroom)), inodes
