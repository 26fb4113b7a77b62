"""Container images as root trees: an OCI image layout or a docker-archive (``docker save``/``podman save``).

    kind = image_kind(path)                       # ImageKind.oci, ImageKind.docker or None
    stage_image(path, shown, dest, kind, None)    # the linux/amd64 image's layers applied to dest, in order

Both come as a directory or a tar archive of one (``tree.stage_tree`` extracts the archive with its hostile
archive filter first, then calls here). An OCI layout (image-spec ``image-layout.md``) has ``oci-layout``,
``index.json`` and ``blobs/<alg>/<hex>``; the index names manifests (or nested indexes) per platform, a
manifest names the config and the layers by digest. A docker-archive has ``manifest.json``: a list of images,
each with its ``Config`` file and its ``Layers`` files; the config's ``rootfs.diff_ids`` are the digests of
the uncompressed layers.

An image is hostile input like any archive:

- every digest is checked: each blob against its descriptor (digest and size), each layer's uncompressed
  tar against the config's ``diff_ids`` (a docker-archive has no other digests);
- JSON documents are at most ``MAX_JSON`` bytes, read whole only then; layers at most ``MAX_LAYERS``;
- a blob is a regular file inside the image: a symlink out of it or to a device is refused;
- layer members pass the same filter as a tar SOURCE (no absolute names, ``..``, writes through symlinks,
  hard links out of the tree).

Layers are applied as image-spec ``layer.md`` says: a ``.wh.NAME`` member removes NAME of the lower layers,
``.wh..wh..opq`` empties its directory of what the lower layers put there; entries of the same layer are
never hidden by its own whiteouts. A changed file replaces the old one by unlink and create, so a hard link a
lower layer made keeps the old content, as in an overlay mount.
"""

from __future__ import annotations

import enum
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from bootkit.host.image.tree import (
    ZSTD_MAGIC,
    TreeError,
    TreeState,
    checked_target,
    extract_member,
    one_line,
    remove_existing,
)
from bootkit.log import human_size, log, safe_text

#: the largest index, manifest or config read (registries refuse manifests over 4 MiB)
MAX_JSON = 4 << 20
#: docker refuses images of more than 127 layers; a generous bound against a manifest of millions
MAX_LAYERS = 1000
#: indexes nested in indexes
MAX_INDEX_DEPTH = 4
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
AUFS_META = ".wh..wh."
GZIP_MAGIC = b"\x1f\x8b"

INDEX_TYPES = frozenset({
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
})
MANIFEST_TYPES = frozenset({
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
})
LAYER_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})
_DIGEST = re.compile(r"(sha256):([0-9a-f]{64})|(sha512):([0-9a-f]{128})")
_PLATFORM = re.compile(r"([a-z0-9]+)/([a-z0-9_]+)(?:/([a-z0-9]+))?")


class ImageKind(enum.StrEnum):
    """The two container image formats a SOURCE may be."""

    oci = "OCI image layout"
    docker = "docker-archive"


@dataclass(frozen=True)
class Platform:
    """``OS/ARCH[/VARIANT]`` as ``--platform`` and the image index spell it."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        m = _PLATFORM.fullmatch(text)
        if not m:
            raise TreeError(f"--platform {safe_text(text, 60)!r}: not OS/ARCH[/VARIANT], e.g. linux/amd64")
        return cls(m.group(1), m.group(2), m.group(3))

    def matches(self, doc: Any) -> bool:
        """Whether an index's ``platform`` object (or a config) describes this platform."""
        if not isinstance(doc, dict):
            return False
        return (doc.get("os") == self.os and doc.get("architecture") == self.architecture
                and (self.variant is None or doc.get("variant") == self.variant))

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


DEFAULT_PLATFORM = Platform("linux", "amd64")


@dataclass(frozen=True)
class Layer:
    """One layer to apply: its file in the image and the digests it must have."""

    path: str  # relative to the image directory
    #: the blob's digest and size (OCI descriptors; a docker-archive has none)
    digest: str | None
    size: int | None
    #: the uncompressed tar's digest (the config's rootfs.diff_ids)
    diff_id: str


def image_kind(path: Path) -> ImageKind | None:
    """Which container image format the directory ``path`` holds, if any (else it is a root tree)."""
    if (path / "oci-layout").is_file() and (path / "index.json").is_file():
        return ImageKind.oci
    manifest = path / "manifest.json"
    if manifest.is_file() and not manifest.is_symlink() and manifest.stat().st_size <= MAX_JSON:
        try:
            doc = json.loads(manifest.read_bytes())
        except (ValueError, RecursionError):
            return None
        if isinstance(doc, list) and doc and all(isinstance(d, dict) and "Layers" in d for d in doc):
            return ImageKind.docker
    return None


def stage_image(image: Path, shown: Path, dest: Path, kind: ImageKind, platform: Platform | None) -> None:
    """Apply the layers of the image in the directory ``image`` (``shown`` in messages) to the empty ``dest``."""
    want = platform or DEFAULT_PLATFORM
    reader = _Image(image, shown)
    layers = reader.oci_layers(want) if kind is ImageKind.oci else reader.docker_layers(want)
    state = TreeState()
    for number, layer in enumerate(layers, 1):
        _apply_layer(reader, layer, f"{shown}: layer {number} ({layer.path})", dest, state)
        log.info("build-image: layer %d of %d applied (%s)", number, len(layers), layer.diff_id[:19])
    state.finish(dest)


class _Image:
    """Reads the files of one image directory: bounded, verified, never outside it."""

    def __init__(self, root: Path, shown: Path) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.shown = shown

    def error(self, what: str) -> TreeError:
        return TreeError(f"{self.shown}: {what}")

    def open(self, rel: str) -> BinaryIO:
        """The regular file ``rel`` of the image; refused when it leads out of the image or is no file."""
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise self.error(f"'{safe_text(rel, 200)}' is not a plain path inside the image")
        path = self.root.joinpath(*parts)
        real = os.path.realpath(path)
        if not real.startswith(self.real_root + os.sep):
            raise self.error(f"'{safe_text(rel, 200)}' is a symlink out of the image")
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self.error(f"'{safe_text(rel, 200)}' is missing") from None
        except OSError as e:
            raise self.error(f"'{safe_text(rel, 200)}': {e.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self.error(f"'{safe_text(rel, 200)}' is not a regular file")
        return os.fdopen(fd, "rb")

    def blob_path(self, descriptor: Any, what: str) -> tuple[str, str, int]:
        """(path, digest, size) of an OCI descriptor, checked."""
        if not isinstance(descriptor, dict):
            raise self.error(f"{what}: not a descriptor object")
        digest, size = descriptor.get("digest"), descriptor.get("size")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise self.error(f"{what}: digest {safe_text(str(digest), 80)!r} is not sha256:<64 hex> or"
                             " sha512:<128 hex>")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise self.error(f"{what}: size {safe_text(str(size), 40)!r} is not a byte count")
        algorithm, hexdigest = digest.split(":")
        return f"blobs/{algorithm}/{hexdigest}", digest, size

    def json(self, rel: str, digest: str | None = None, size: int | None = None) -> Any:
        """The JSON document ``rel`` (checked against ``digest`` and ``size`` when given)."""
        with self.open(rel) as f:
            actual = os.fstat(f.fileno()).st_size
            if actual > MAX_JSON or (size is not None and size > MAX_JSON):
                raise self.error(f"'{safe_text(rel, 200)}': {human_size(max(actual, size or 0))} of JSON,"
                                 f" more than the {human_size(MAX_JSON)} allowed")
            data = f.read(MAX_JSON + 1)
        if size is not None and len(data) != size:
            raise self.error(f"'{safe_text(rel, 200)}': {len(data)} bytes, its descriptor says {size}")
        if digest is not None:
            _verify(digest, _hasher(digest, data).hexdigest(), self.error, f"'{safe_text(rel, 200)}'")
        try:
            return json.loads(data)
        except RecursionError:
            raise self.error(f"'{safe_text(rel, 200)}': JSON nested too deeply") from None
        except ValueError as e:
            raise self.error(f"'{safe_text(rel, 200)}': not JSON: {one_line(e)}") from None

    # -- OCI image layout --------------------------------------------------------------------------------

    def oci_layers(self, want: Platform) -> list[Layer]:
        layout = self.json("oci-layout")
        if not isinstance(layout, dict) or not isinstance(layout.get("imageLayoutVersion"), str):
            raise self.error("oci-layout: no imageLayoutVersion")
        index = self.json("index.json")
        name = "index.json"
        for _depth in range(MAX_INDEX_DEPTH):
            descriptor = self._pick(index, name, want)
            path, digest, size = self.blob_path(descriptor, name)
            doc = self.json(path, digest, size)
            media_type = descriptor.get("mediaType") or (doc.get("mediaType") if isinstance(doc, dict) else None)
            if media_type in INDEX_TYPES:
                index, name = doc, f"index {digest[:19]}"
                continue
            return self._manifest_layers(doc, f"manifest {digest[:19]}", want)
        raise self.error(f"indexes nested more than {MAX_INDEX_DEPTH} deep")

    def _pick(self, index: Any, name: str, want: Platform) -> dict[str, Any]:
        """The descriptor of ``want``'s image in an index."""
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list) or not manifests:
            raise self.error(f"{name}: no manifests")
        usable = [d for d in manifests if isinstance(d, dict) and d.get("mediaType") in INDEX_TYPES | MANIFEST_TYPES]
        if not usable:
            raise self.error(f"{name}: no image manifest or index among its {len(manifests)} entries")
        matching = [d for d in usable if want.matches(d.get("platform"))]
        if not matching and len(usable) == 1 and "platform" not in usable[0]:
            matching = usable  # one image without a platform: its config says (checked later)
        if len(matching) == 1:
            return matching[0]
        if not matching:
            have = sorted({str(_platform_of(d.get("platform"))) for d in usable})
            raise self.error(f"{name}: no {want} image (it has {safe_text(', '.join(have), 200)});"
                             " choose one with --platform")
        refs = sorted(str(d.get("annotations", {}).get("org.opencontainers.image.ref.name", d.get("digest")))
                      for d in matching)
        raise self.error(f"{name}: {len(matching)} {want} images ({safe_text(', '.join(refs), 200)}): a SOURCE"
                         " must hold one")

    def _manifest_layers(self, manifest: Any, name: str, want: Platform) -> list[Layer]:
        if not isinstance(manifest, dict) or manifest.get("mediaType", next(iter(MANIFEST_TYPES))) not in (
                MANIFEST_TYPES):
            raise self.error(f"{name}: not an image manifest")
        config_path, config_digest, config_size = self.blob_path(manifest.get("config"), f"{name}: config")
        config = self.json(config_path, config_digest, config_size)
        diff_ids = self._diff_ids(config, f"config {config_digest[:19]}", want)
        descriptors = manifest.get("layers")
        if not isinstance(descriptors, list):
            raise self.error(f"{name}: no layers list")
        if len(descriptors) != len(diff_ids):
            raise self.error(f"{name}: {len(descriptors)} layers, its config has {len(diff_ids)} diff_ids")
        layers = []
        for number, (descriptor, diff_id) in enumerate(zip(descriptors, diff_ids, strict=True), 1):
            path, digest, size = self.blob_path(descriptor, f"{name}: layer {number}")
            media_type = descriptor.get("mediaType")
            if media_type not in LAYER_TYPES:
                raise self.error(f"{name}: layer {number} has media type {safe_text(str(media_type), 100)!r},"
                                 " not a (gzip or zstd) tar layer")
            layers.append(Layer(path, digest, size, diff_id))
        log.info("build-image: %s, %s image %s, %d layers", ImageKind.oci.value, want, name.split()[-1],
                 len(layers))
        return layers

    def _diff_ids(self, config: Any, name: str, want: Platform) -> list[str]:
        if not isinstance(config, dict):
            raise self.error(f"{name}: not an image config")
        if not want.matches(config):
            raise self.error(f"{name}: the image is {_platform_of(config)}, not {want}: choose the platform with"
                             " --platform")
        rootfs = config.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list):
            raise self.error(f"{name}: no rootfs.diff_ids")
        if len(diff_ids) > MAX_LAYERS:
            raise self.error(f"{name}: {len(diff_ids)} layers, more than the {MAX_LAYERS} allowed")
        for number, diff_id in enumerate(diff_ids, 1):
            if not isinstance(diff_id, str) or not _DIGEST.fullmatch(diff_id):
                raise self.error(f"{name}: diff_id {number} {safe_text(str(diff_id), 80)!r} is not a digest")
        return diff_ids

    # -- docker-archive ----------------------------------------------------------------------------------

    def docker_layers(self, want: Platform) -> list[Layer]:
        images = self.json("manifest.json")
        if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], dict):
            count = len(images) if isinstance(images, list) else 0
            raise self.error(f"manifest.json: {count} images: a SOURCE must hold one (docker save one image)")
        entry = images[0]
        config_path, files = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_path, str) or not isinstance(files, list) or not all(
                isinstance(f, str) for f in files):
            raise self.error("manifest.json: no Config file name or Layers list")
        # docker and podman name the config by its digest (<hex>.json or blobs/sha256/<hex>): check it
        m = re.fullmatch(r"(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json)?", config_path)
        config = self.json(config_path, f"sha256:{m.group(1)}" if m else None)
        diff_ids = self._diff_ids(config, f"config {safe_text(config_path, 80)}", want)
        if len(files) != len(diff_ids):
            raise self.error(f"manifest.json: {len(files)} layers, the config has {len(diff_ids)} diff_ids")
        tags = entry.get("RepoTags")
        tag = tags[0] if isinstance(tags, list) and tags and isinstance(tags[0], str) else "untagged"
        log.info("build-image: %s, %s image %s, %d layers", ImageKind.docker.value, want, safe_text(tag, 100),
                 len(files))
        return [Layer(f, None, None, d) for f, d in zip(files, diff_ids, strict=True)]


def _platform_of(doc: Any) -> str:
    if not isinstance(doc, dict):
        return "unknown platform"
    parts = [doc.get("os"), doc.get("architecture"), doc.get("variant")]
    return safe_text("/".join(str(p) for p in parts if p), 60) or "unknown platform"


def _hasher(digest: str, data: bytes = b"") -> Any:
    return hashlib.new(digest.split(":")[0], data)


def _verify(digest: str, actual_hex: str, error: Any, what: str) -> None:
    if digest.split(":")[1] != actual_hex:
        raise error(f"{what}: digest mismatch: {digest.split(':')[0]}:{actual_hex[:16]}... instead of"
                    f" {digest[:23]}...")


class _Hashing:
    """A read-only stream that hashes what passes through it and counts the bytes."""

    def __init__(self, f: Any, digest: str) -> None:
        self._f = f
        self.hash = _hasher(digest)
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._f.read(size)
        self.hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _apply_layer(image: _Image, layer: Layer, shown: str, dest: Path, state: TreeState) -> None:
    error = image.error
    with image.open(layer.path) as blob:
        if layer.size is not None and os.fstat(blob.fileno()).st_size != layer.size:
            raise error(f"layer {layer.path}: {os.fstat(blob.fileno()).st_size} bytes, its descriptor says"
                        f" {layer.size}")
        magic = blob.read(4)
        blob.seek(0)
        packed: Any = _Hashing(blob, layer.digest or "sha256:")  # Any: the decompressors want a file type
        stream: Any
        if magic[:2] == GZIP_MAGIC:
            stream = gzip.GzipFile(fileobj=packed, mode="rb")
        elif magic == ZSTD_MAGIC:
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(packed, read_across_frames=True)
        else:
            stream = packed
        plain: Any = _Hashing(stream, layer.diff_id)
        try:
            with tarfile.open(fileobj=plain, mode="r|") as tar:
                _apply_members(tar, dest, Path(shown), state)
            plain.drain()
            packed.drain()
        except TreeError:
            raise
        except tarfile.TarError as e:
            raise TreeError(f"{shown}: broken tar layer: {one_line(e)}") from e
        except EOFError as e:
            raise TreeError(f"{shown}: truncated layer") from e
        except (OSError, ValueError, zlib.error) as e:
            if isinstance(e, OSError) and e.errno in (28, 122):  # ENOSPC, EDQUOT: not the image's fault
                raise
            raise TreeError(f"{shown}: cannot extract: {one_line(e)}") from e
        except Exception as e:  # zstandard.ZstdError is not an OSError
            if type(e).__name__ != "ZstdError":
                raise
            raise TreeError(f"{shown}: broken zstd layer: {one_line(e)}") from e
    if layer.digest is not None:
        _verify(layer.digest, packed.hash.hexdigest(), error, f"layer {layer.path}")
    _verify(layer.diff_id, plain.hash.hexdigest(), error, f"layer {layer.path} uncompressed (diff_id)")


def _apply_members(tar: tarfile.TarFile, dest: Path, shown: Path, state: TreeState) -> None:
    created: set[str] = set()  # what this layer made: its own whiteouts never hide it
    for member in tar:
        target = checked_target(member, dest, shown)
        if target is None:
            state.root(member)
            continue
        name = target.name
        if any(part.startswith(AUFS_META) and part != OPAQUE for part in member.name.split("/")):
            continue  # aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not part of the tree, as docker skips it
        if name.startswith(WHITEOUT):
            parent = os.path.dirname(member.name)
            if name == OPAQUE:
                _hide_lower(target.parent, parent, created)
            else:
                hidden = name[len(WHITEOUT):]
                if hidden in ("", ".", "..") or hidden.startswith(WHITEOUT):
                    raise TreeError(f"{shown}: whiteout '{safe_text(member.name, 200)}' names no entry")
                rel = f"{parent}/{hidden}" if parent else hidden
                if rel not in created:
                    _remove(target.parent / hidden)
            continue
        remove_existing(target, member, shown, replace_dirs=True)
        extract_member(tar, member, target, dest, shown, state)
        created.add(member.name)


def _hide_lower(directory: Path, rel: str, created: set[str]) -> None:
    """An opaque directory: remove what lower layers put in it (recursively), keep this layer's entries."""
    if directory.is_symlink() or not directory.is_dir():
        return
    for entry in sorted(os.listdir(directory)):
        path = directory / entry
        entry_rel = f"{rel}/{entry}" if rel else entry
        if entry_rel not in created:
            _remove(path)
        elif path.is_dir() and not path.is_symlink():
            _hide_lower(path, entry_rel, created)


def _remove(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()
