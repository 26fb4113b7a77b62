"""The root tree an image is built from: a private copy of a directory or a tar archive, made ready.

``stage_tree`` turns SOURCE (a directory, or a ``.tar``/``.tar.gz``/``.tar.xz``/``.tar.zst`` archive) into a
private directory the build may change: the user's directory is never written. A tar archive is hostile
input: members are extracted one by one, each checked first (no absolute names, no ``..``, no path through a
symlink, no hard link out of the tree), owners, modes (setuid included), device nodes and xattrs kept — this
is a root tree, so Python's ``data`` filter (which drops all of these) cannot be used.

Also here: the per-machine identity strip (``/etc/machine-id``, SSH host keys) and the content digest
that seeds the image's UUIDs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bootkit.errors import UsageError
from bootkit.log import log, safe_text
from bootkit.run import CommandFailed, run

if TYPE_CHECKING:
    from bootkit.host.image.oci import Platform

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XATTR_PAX_PREFIX = "SCHILY.xattr."


class TreeError(UsageError):
    """SOURCE is not a usable root tree (missing, not a directory or archive, broken or hostile archive)."""


@dataclass(frozen=True)
class IdentityStrip:
    """What ``strip_identity`` removed or emptied (relative paths), for the log line."""

    emptied: tuple[str, ...]
    removed: tuple[str, ...]


def stage_tree(source: Path, dest: Path, platform: Platform | None = None) -> None:
    """Fill the empty directory ``dest`` with a copy of the root tree ``source``: a directory, a tar archive,
    or a container image (OCI layout or docker-archive, directory or tar) whose layers are applied in order
    (``platform``: which image of an index; default linux/amd64)."""
    from bootkit.host.image import oci

    if source.is_dir():
        kind = oci.image_kind(source)
        if kind is not None:
            oci.stage_image(source, source, dest, kind, platform)
            return
        _no_platform(source, platform)
        log.info("build-image: copying %s", source)
        # cp -a keeps owners, modes, hard links, device nodes, xattrs and timestamps
        try:
            run(["cp", "-a", "--reflink=auto", "--", f"{source}/.", dest])
        except CommandFailed as e:
            raise TreeError(f"{source}: cannot copy the tree: {e}") from e
        return
    if not source.is_file():
        raise TreeError(f"{source}: no such directory or tar archive")
    with source.open("rb") as f:
        magic = f.read(4)
    log.info("build-image: extracting %s", source)
    if magic == ZSTD_MAGIC:
        plain = dest.parent / "source.tar"
        try:
            run(["zstd", "-d", "-q", "-f", "-o", plain, "--", source])
            _extract(plain, source, dest)
        except CommandFailed as e:
            raise TreeError(f"{source}: not a readable zstd archive: {one_line(e)}") from e
        finally:
            plain.unlink(missing_ok=True)
    else:
        _extract(source, source, dest)
    kind = oci.image_kind(dest)
    if kind is None:
        _no_platform(source, platform)
        return
    # an archive of an image (docker save, an oci-archive): the extracted files are the image, not the tree
    image = dest.parent / "image"
    dest.rename(image)
    dest.mkdir()
    try:
        oci.stage_image(image, source, dest, kind, platform)
    finally:
        shutil.rmtree(image, ignore_errors=True)


def _no_platform(source: Path, platform: Platform | None) -> None:
    if platform is not None:
        raise TreeError(f"--platform {platform}: {source} is a root tree, not an OCI image or docker-archive")


def _extract(archive: Path, shown: Path, dest: Path) -> None:
    state = TreeState()
    try:
        with tarfile.open(archive, "r:*") as tar:
            peek = LastBlock(tar.fileobj)
            tar.fileobj = peek
            count = 0
            for member in tar:
                target = checked_target(member, dest, shown)
                if target is None:
                    state.root(member)
                    continue
                remove_existing(target, member, shown, replace_dirs=False)
                extract_member(tar, member, target, dest, shown, state)
                count += 1
            # tarfile stops quietly at a cut or garbled header: a complete archive ends with two zero blocks.
            # The first is the block tarfile read last (seeking back would make gzip/xz decompress again).
            at, first = peek.last
            end = first + peek.read(tarfile.BLOCKSIZE) if at == tar.offset else b""
            if len(end) < 2 * tarfile.BLOCKSIZE or end.count(0) != len(end):
                raise TreeError(f"{shown}: truncated or damaged archive: neither a member header nor the"
                                f" end-of-archive blocks at byte {tar.offset}")
    except tarfile.ReadError as e:
        if "could not be opened" in str(e) or "invalid header" in str(e) or "empty file" in str(e):
            raise TreeError(f"{shown}: not a tar archive (plain, gzip, bzip2, xz or zstd)") from e
        raise TreeError(f"{shown}: broken tar archive: {one_line(e)}") from e
    except tarfile.TarError as e:
        raise TreeError(f"{shown}: broken tar archive: {one_line(e)}") from e
    except EOFError as e:
        raise TreeError(f"{shown}: truncated archive") from e
    except (OSError, ValueError) as e:
        if isinstance(e, OSError) and e.errno in (28, 122):  # ENOSPC, EDQUOT: not the archive's fault
            raise
        raise TreeError(f"{shown}: cannot extract: {one_line(e)}") from e
    if count == 0:
        raise TreeError(f"{shown}: empty tar archive")
    state.finish(dest)


class TreeState:
    """What extracting one or more archives into a tree must remember: directory times (a directory's mtime
    changes as entries are created in it, so they are set at the end, deepest first, as tar does), the
    archive's own root entry, and the newest time seen (for directories no member described)."""

    def __init__(self) -> None:
        self.dir_mtimes: dict[str, int] = {}
        self.root_member: tarfile.TarInfo | None = None
        self.newest = 0

    def root(self, member: tarfile.TarInfo) -> None:
        """The archive's ``./`` entry: the attributes of the tree's root directory."""
        if member.isdir():
            self.root_member = member
            self.newest = max(self.newest, int(member.mtime))

    def finish(self, dest: Path) -> None:
        """Directory times, deepest first; directories no member described (made for a member's parents)
        get the newest time of the archive, so the tree's digest does not depend on when it was extracted."""
        for dirpath, dirnames, _files in os.walk(dest, topdown=False):
            for name in dirnames:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):  # os.walk lists symlinks to directories as directories
                    continue
                rel = os.path.relpath(path, dest)
                mtime = self.dir_mtimes.get(rel, self.newest)
                os.utime(path, (mtime, mtime), follow_symlinks=False)
        # the root directory: as the archive's "./" says, else 0755 root:root as new as its newest entry
        if self.root_member is not None:
            os.chown(dest, self.root_member.uid, self.root_member.gid)
            os.chmod(dest, self.root_member.mode & 0o7777)
            os.utime(dest, (self.root_member.mtime, self.root_member.mtime))
        else:
            os.chown(dest, 0, 0)
            os.chmod(dest, 0o755)
            os.utime(dest, (self.newest, self.newest))


def extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, dest: Path, shown: Path,
                   state: TreeState) -> None:
    """Create ``member`` (checked by ``checked_target``, its old entry removed) at ``target`` with its owner,
    mode, times and xattrs."""
    if member.islnk():
        # done here, not by tarfile: a target missing from the tree is one clear line (tarfile would look for
        # it in the archive, which a layer's stream cannot), and a link to a symlink links the symlink itself
        source = dest / member.linkname
        try:
            if stat.S_ISDIR(source.lstat().st_mode):
                raise TreeError(f"{shown}: hard link '{safe_text(member.name, 200)}' points to a directory")
        except FileNotFoundError:
            raise TreeError(f"{shown}: hard link '{safe_text(member.name, 200)}' to"
                            f" '{safe_text(member.linkname, 200)}', which is not in the tree") from None
        os.link(source, target, follow_symlinks=False)
    else:
        tar.extract(member, dest, set_attrs=True, numeric_owner=True)
        set_xattrs(member, target, shown)
        if member.issym():  # tarfile leaves a symlink's own mtime at the extraction time
            os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)
    if member.isdir():
        state.dir_mtimes[member.name] = int(member.mtime)
    state.newest = max(state.newest, int(member.mtime))


class LastBlock:
    """A file object that remembers the last block-sized read and where it started (all else passes through)."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.last: tuple[int, bytes] = (-1, b"")

    def read(self, size: int = -1) -> bytes:
        at = self._f.tell()
        data: bytes = self._f.read(size)
        if size == tarfile.BLOCKSIZE:
            self.last = (at, data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return safe_text(lines[0], 200)


def checked_target(member: tarfile.TarInfo, dest: Path, shown: Path) -> Path | None:
    """Where ``member`` goes under ``dest``; refuses names that leave ``dest`` (None: the root itself)."""
    name = member.name
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise TreeError(f"{shown}: member '{safe_text(name, 200)}' points outside the tree")
    if not parts:
        return None  # "./": the root directory itself keeps dest's attributes
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk() or member.ischr()
            or member.isblk() or member.isfifo()):
        raise TreeError(f"{shown}: member '{safe_text(name, 200)}' has unsupported type {member.type!r}")
    target = dest.joinpath(*parts)
    # the parent must really be inside dest: an earlier member may have made a component a symlink out
    real_dest = os.path.realpath(dest)
    real_parent = os.path.realpath(target.parent)
    if real_parent != real_dest and not real_parent.startswith(real_dest + os.sep):
        raise TreeError(f"{shown}: member '{safe_text(name, 200)}' would be written through a symlink out of the tree")
    member.name = "/".join(parts)
    if member.islnk():
        link_parts = [p for p in member.linkname.split("/") if p not in ("", ".")]
        if member.linkname.startswith("/") or ".." in link_parts or not link_parts:
            raise TreeError(f"{shown}: hard link '{safe_text(name, 200)}' points outside the tree")
        link = dest.joinpath(*link_parts)
        real_link_parent = os.path.realpath(link.parent)
        if real_link_parent != real_dest and not real_link_parent.startswith(real_dest + os.sep):
            raise TreeError(f"{shown}: hard link '{safe_text(name, 200)}' points outside the tree")
        member.linkname = "/".join(link_parts)
    return target


def remove_existing(target: Path, member: tarfile.TarInfo, shown: Path, *, replace_dirs: bool) -> None:
    """A later member replaces an earlier one (as GNU tar does) and is never written through a symlink or
    into an inode other names share (a hard link keeps its content). A directory stays for a directory
    member; for another member it is an error, or removed with its content with ``replace_dirs`` (image
    layers: an upper layer's file hides a lower layer's directory)."""
    try:
        st = target.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if member.isdir():
            return
        if not replace_dirs:
            raise TreeError(f"{shown}: member '{safe_text(member.name, 200)}' would replace a directory")
        shutil.rmtree(target)
        return
    target.unlink()


def set_xattrs(member: tarfile.TarInfo, target: Path, shown: Path) -> None:
    # tarfile reads but never applies xattrs (GNU tar --xattrs writes them as SCHILY.xattr.* pax records);
    # set after tarfile's chown, which would clear security.capability
    for key, value in sorted(member.pax_headers.items()):
        if not key.startswith(XATTR_PAX_PREFIX):
            continue
        attr = key[len(XATTR_PAX_PREFIX):]
        try:
            os.setxattr(target, attr, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
        except OSError as e:
            raise TreeError(f"{shown}: member '{safe_text(member.name, 200)}': cannot set xattr"
                            f" '{safe_text(attr, 100)}': {e.strerror}") from e


def strip_identity(root: Path) -> IdentityStrip:
    """Empty ``etc/machine-id`` and remove ``etc/ssh/ssh_host_*``: every machine booting the image is new."""
    etc = root / "etc"
    if etc.is_symlink() or not etc.is_dir():
        return IdentityStrip((), ())
    ssh = etc / "ssh"
    # removing entries changes their directories' mtimes: put them back, the image shows the tree's times
    dirs = [d for d in (etc, ssh) if d.is_dir() and not d.is_symlink()]
    times = [(d, d.lstat()) for d in dirs]
    try:
        return _strip_identity(etc)
    finally:
        for d, st in times:
            os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _strip_identity(etc: Path) -> IdentityStrip:
    emptied: list[str] = []
    removed: list[str] = []
    machine_id = etc / "machine-id"
    if machine_id.is_symlink():
        machine_id.unlink()
        removed.append("etc/machine-id")
    elif machine_id.is_file() and machine_id.stat().st_size:
        st = machine_id.stat()
        with machine_id.open("r+b") as f:
            f.truncate(0)
        os.utime(machine_id, ns=(st.st_atime_ns, st.st_mtime_ns))
        emptied.append("etc/machine-id")
    ssh = etc / "ssh"
    if ssh.is_dir() and not ssh.is_symlink():
        for key in sorted(ssh.glob("ssh_host_*")):
            key.unlink()
            removed.append(f"etc/ssh/{key.name}")
    return IdentityStrip(tuple(emptied), tuple(removed))


def tree_digest(root: Path) -> str:
    """SHA-256 over everything mke2fs copies: names, types, owners, modes, times, xattrs, links and contents.

    Sorted walk, so the same tree gives the same digest wherever it was extracted.
    """
    h = hashlib.sha256()
    inodes: dict[tuple[int, int], str] = {}

    def entry(path: Path, rel: str) -> None:
        st = path.lstat()
        h.update(f"{rel}\0{st.st_mode:o}\0{st.st_uid}\0{st.st_gid}\0{st.st_mtime_ns}\0".encode(
            "utf-8", "surrogateescape"))
        for attr in sorted(os.listxattr(path, follow_symlinks=False)):
            h.update(attr.encode() + b"=" + os.getxattr(path, attr, follow_symlinks=False) + b"\0")
        if stat.S_ISLNK(st.st_mode):
            h.update(os.fsencode(os.readlink(path)))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            h.update(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}".encode())
        elif stat.S_ISREG(st.st_mode):
            first = inodes.setdefault((st.st_dev, st.st_ino), rel)
            if first != rel:
                h.update(b"link:" + first.encode("utf-8", "surrogateescape"))
            else:
                with path.open("rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
        h.update(b"\n")

    entry(root, ".")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = base / name
            entry(path, path.relative_to(root).as_posix())
    return h.hexdigest()


def settle_times(root: Path, epoch: int) -> None:
    """Clamp every modification time to ``epoch`` (SOURCE_DATE_EPOCH semantics) and set access times to it.

    mke2fs copies atime too, and reading the tree (copy, digest) moves atimes: they would make builds differ.
    """
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            _settle(os.path.join(dirpath, name), epoch)
    _settle(str(root), epoch)


def _settle(path: str, epoch: int) -> None:
    mtime = min(os.lstat(path).st_mtime_ns, epoch * 10**9)
    os.utime(path, ns=(mtime, mtime), follow_symlinks=False)


def newest_mtime(root: Path) -> int:
    """The newest modification time below ``root`` (the default timestamp for what the build itself writes)."""
    newest = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            newest = max(newest, int(os.lstat(os.path.join(dirpath, name)).st_mtime))
    return newest


def count_entries(root: Path) -> tuple[int, int]:
    """(number of inodes, bytes of file data rounded to 4 KiB blocks) the tree needs."""
    seen: set[tuple[int, int]] = set()
    inodes, data = 1, 4096
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            data += (st.st_size + 4095) // 4096 * 4096 if not stat.S_ISLNK(st.st_mode) else 4096
    return inodes, data
