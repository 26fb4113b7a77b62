"""Opening an image: header, snapshot selection, L1 table, external data file and the backing chain.

Image-supplied paths (backing file names, external data file names) are followed only to a file right next to
the image (after symlinks), or into directory trees the caller allows, never to an arbitrary host file: a
qcow2 header naming ``/etc/shadow`` must not make bootkit serve it (CVE-class issue, see Launchpad bug
2059809), nor one naming ``.ssh/id_rsa`` when the image sits in a home directory. When the
backing-format extension is present it is obeyed (qcow2 or raw); the format is guessed from the magic only
when the image does not say. Chains are capped in depth and checked for loops.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import os
import sys
from array import array
from typing import Callable, List, Optional, Set, Tuple, Union

from bootkit.errors import InvalidImage, UnsupportedFeature
from bootkit.qcow2.header import (
    INT64_MAX,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW_MAGIC,
    QCOW_MAX_L1_SIZE,
    read_header,
    size_to_l1,
    validate_table,
)
from bootkit.qcow2.image import Image
from bootkit.qcow2.snapshot import Snapshot, find_snapshot, read_snapshots
from bootkit.source import ByteSource, FileSource

DEFAULT_MAX_CHAIN_DEPTH = 16
DEFAULT_L2_CACHE_BYTES = 8 << 20
DEFAULT_CLUSTER_CACHE_BYTES = 16 << 20

PathOrSource = Union[str, "os.PathLike[str]", ByteSource]
#: opens a file that an image names: (name as written in the image, what it is: "backing file" or
#: "data file", the source of the image that names it) -> source
Resolver = Callable[[str, str, ByteSource], ByteSource]


class UnsafePath(InvalidImage):
    """An image names a file outside the directories bootkit may read on its behalf."""


def open(
    target: PathOrSource,
    *,
    snapshot: Optional[str] = None,
    backing: Union[bool, PathOrSource, None] = None,
    data_file: Optional[PathOrSource] = None,
    resolver: Optional[Resolver] = None,
    allow_dirs: Tuple[str, ...] = (),
    max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH,
    l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
    cluster_cache_bytes: int = DEFAULT_CLUSTER_CACHE_BYTES,
) -> Image:
    """Open a QCOW2 image read-only.

    ``target`` is a path or a byte source (``bootkit.source``, an HTTP range source, ...). ``snapshot`` reads
    the disk as of an internal snapshot (id or name). ``backing``: None follows the image's own backing file
    under the path rules; False ignores it (unallocated clusters read as zeros); a path or source given here
    is the top image's backing file, trusted because the caller named it. ``data_file`` likewise for an
    external data file. ``resolver`` opens every file an image names (for images that are not local files,
    e.g. fetched over HTTP). Image-supplied local paths must name a file right next to the image; ``allow_dirs``
    adds directory trees (subdirectories included) where they may point.
    """
    opener = _Opener(resolver, allow_dirs, max_chain_depth, l2_cache_bytes, cluster_cache_bytes)
    try:
        return opener.open(target, snapshot=snapshot, backing=backing, data_file=data_file)
    except BaseException:
        opener.close_all()
        raise


class _Opener:
    def __init__(
        self,
        resolver: Optional[Resolver],
        allow_dirs: Tuple[str, ...],
        max_depth: int,
        l2_cache_bytes: int,
        cluster_cache_bytes: int,
    ) -> None:
        self.resolver = resolver
        self.allow_dirs = tuple(os.path.realpath(d) for d in allow_dirs)
        self.max_depth = max_depth
        self.l2_cache_bytes = l2_cache_bytes
        self.cluster_cache_bytes = cluster_cache_bytes
        self.opened: List[ByteSource] = []
        self.seen: Set[object] = set()

    def close_all(self) -> None:
        for s in self.opened:
            s.close()

    def _source(self, target: PathOrSource) -> ByteSource:
        if isinstance(target, (str, os.PathLike)):
            source: ByteSource = FileSource(target)
            self.opened.append(source)
            return source
        return target

    def open(
        self,
        target: PathOrSource,
        *,
        snapshot: Optional[str] = None,
        backing: Union[bool, PathOrSource, None] = None,
        data_file: Optional[PathOrSource] = None,
        depth: int = 0,
    ) -> Image:
        source = self._source(target)
        self._enter_chain(source, depth)
        info = read_header(source)
        h = info.header
        snapshots = read_snapshots(source, h)
        chosen: Optional[Snapshot] = None
        l1_offset, l1_size, size = h.l1_table_offset, h.l1_size, h.size
        if snapshot is not None:
            chosen = find_snapshot(snapshots, snapshot, source.name)
            l1_offset, l1_size, size = chosen.l1_table_offset, chosen.l1_size, chosen.disk_size
            cluster_size = 1 << h.cluster_bits
            try:
                validate_table("Snapshot L1 table", l1_offset, l1_size, 8, QCOW_MAX_L1_SIZE, cluster_size)
            except InvalidImage as e:
                raise InvalidImage(f"{source.name}: snapshot {chosen.id}: {e}") from None
            l2_bits = h.cluster_bits - (4 if info.extended_l2 else 3)
            if l1_size < size_to_l1(size, h.cluster_bits, l2_bits) or size > INT64_MAX:
                raise InvalidImage(f"{source.name}: snapshot {chosen.id}: L1 table is too small for disk size {size}")
        l1 = _read_l1(source, l1_offset, l1_size)

        data_source: Optional[ByteSource] = None
        if h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE:
            if data_file is not None:
                data_source = self._source(data_file)
            elif info.data_file:
                data_source = self._named(info.data_file, "data file", source)
            else:
                raise UnsupportedFeature(
                    f"{source.name}: the image keeps its data in an external data file but names none; "
                    "pass it with --data-file"
                )
        elif data_file is not None:
            raise InvalidImage(f"{source.name}: a data file was given but the image has no external data file")

        backing_source: Optional[ByteSource] = None
        if backing is False:
            pass
        elif backing is not None and backing is not True:
            backing_source = self._layer(self._source(backing), info.backing_format, source, depth + 1)
        elif info.backing_file:
            named = self._named(info.backing_file, "backing file", source)
            backing_source = self._layer(named, info.backing_format, source, depth + 1)

        return Image(
            source,
            info,
            l1=l1,
            virtual_size=size & ~511,  # QEMU counts whole sectors: bs->total_sectors = size / 512
            snapshots=snapshots,
            snapshot=chosen,
            backing=backing_source,
            data_file=data_source,
            l2_cache_bytes=self.l2_cache_bytes,
            cluster_cache_bytes=self.cluster_cache_bytes,
            owned=tuple(self.opened) if depth == 0 else (),
        )

    def _enter_chain(self, source: ByteSource, depth: int) -> None:
        if depth > self.max_depth:
            raise InvalidImage(f"{source.name}: backing chain is deeper than {self.max_depth} images")
        key: object = source.name
        if isinstance(source, FileSource):
            st = os.fstat(source.fd)
            key = (st.st_dev, st.st_ino)
        if key in self.seen:
            raise InvalidImage(f"backing chain loop: {source.name} is already in the chain")
        self.seen.add(key)

    def _layer(self, source: ByteSource, fmt: Optional[str], referrer: ByteSource, depth: int) -> ByteSource:
        if fmt is None:
            fmt = "qcow2" if source.pread(0, 4) == QCOW_MAGIC else "raw"
        if fmt == "qcow2":
            return self.open(source, depth=depth)
        if fmt == "raw":
            self._enter_chain(source, depth)
            return source
        raise UnsupportedFeature(
            f"{referrer.name}: backing file format {fmt!r} is not supported (backing format extension; "
            "supported: qcow2, raw)"
        )

    def _named(self, name: str, what: str, referrer: ByteSource) -> ByteSource:
        """Open a file that an image names, under the path rules (or through the caller's resolver)."""
        if self.resolver is not None:
            source = self.resolver(name, what, referrer)
            self.opened.append(source)
            return source
        if not isinstance(referrer, FileSource):
            raise UnsafePath(
                f"{referrer.name}: names {what} {name!r}, but it was not opened from a local file; "
                "bootkit does not guess where to find it"
            )
        base = os.path.dirname(os.path.abspath(referrer.name))
        candidate = name if os.path.isabs(name) else os.path.join(base, name)
        real = os.path.realpath(candidate)
        real_base = os.path.realpath(base)
        option = "--backing" if what == "backing file" else "--data-file"
        if any(real.startswith(d.rstrip(os.sep) + os.sep) for d in self.allow_dirs):
            pass  # the caller allowed this directory tree
        elif real.startswith(real_base.rstrip(os.sep) + os.sep) and os.path.dirname(real) != real_base:
            # an image in a home directory must not name .ssh/id_rsa (and make bootkit convert print it)
            raise UnsafePath(
                f"{referrer.name}: {what} {name!r} is in a subdirectory of the image's directory; only files"
                f" right next to the image are followed: pass it explicitly ({option}) or allow its directory"
                f" (--allow-dir {os.path.dirname(real)})"
            )
        elif os.path.dirname(real) != real_base:
            raise UnsafePath(
                f"{referrer.name}: {what} {name!r} is outside the image's directory; pass it explicitly "
                f"({option}) or allow its directory (--allow-dir)"
            )
        return self._source(real)


def _read_l1(source: ByteSource, offset: int, entries: int) -> array:  # type: ignore[type-arg]
    raw = source.pread(offset, entries * 8) if entries else b""
    if len(raw) < entries * 8:  # past end of file: QEMU's block layer reads zeros there
        raw = raw + bytes(entries * 8 - len(raw))
    l1 = array("Q", raw)
    if sys.byteorder == "little":
        l1.byteswap()
    return l1
