"""``bootkit publish NAME.qcow2 DOCROOT``: an image, its kernel and initramfs into a docroot, and its boot entry.

    result = publish(PublishOptions(image=Path("out/web.qcow2"), docroot=Path("/srv/netboot"),
                                    toml=Path("site.toml"), entry="web"))

For the image (and ``NAME.vmlinuz`` / ``NAME.initrd`` next to it, when present) in this order:

1. an overlay (built with ``--base``) names its base by local plain name: the base must already be published
   in the same docroot (its published name is its content hash, after its own backing rewrite, recursively);
   the overlay's published bytes carry the base's published name (:mod:`.backing`);
2. each file goes to ``DOCROOT/NAME-<sha256 prefix>.<suffix>`` (:mod:`.docroot`: never replacing a file),
   with ``.sha256`` sidecars for the image and its manifest, and the lazy-mode manifest
   ``NAME-<hash>.qcow2.manifest`` (the name the initramfs looks for next to a backing file);
3. ``--sign KEY``: the signed channel file ``DOCROOT/<channel>.json`` (+ ``.sig``) points at the image
   (:mod:`.channel`);
4. the TOML entry gets the new names and pinned hashes, and pins for every backing file of the chain
   (``rd.qcow2.sha256.<file>``, in lazy mode ``rd.qcow2.sha256.<file>.manifest`` too), and is loaded with
   ``pxe-config``'s own loader before it replaces the old description; with ``--sign`` the entry names the
   channel instead (``channel = "<channel>.json"``, no image, hashes or pins: the channel carries them);
5. ``--prune N`` (:mod:`.prune`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bootkit.boot.channel import SUFFIX as CHANNEL_SUFFIX
from bootkit.boot.channel import Pin
from bootkit.errors import BootkitError
from bootkit.host.publish import backing, docroot, prune, tomledit
from bootkit.host.publish.channel import ChannelOptions, ChannelResult, Target, check_options, publish_channel
from bootkit.host.publish.docroot import Placed, PublishError
from bootkit.log import log

IMAGE_SUFFIX = ".qcow2"
MANIFEST_SUFFIX = ".manifest"
#: backing chains bootkit follows are short; a loop of names must not recurse forever
MAX_CHAIN = 16


@dataclass(frozen=True)
class PublishOptions:
    """What ``bootkit publish`` was asked for."""

    image: Path
    docroot: Path
    #: NAME of the published files (default: the entry's name, else the image's stem)
    name: str | None = None
    toml: Path | None = None
    #: the [[entry]] to write (default: NAME)
    entry: str | None = None
    #: lazy or ram; None: the entry's current mode, else lazy
    mode: str | None = None
    #: for a new TOML file: the URL the docroot is served at
    base_url: str | None = None
    prune_keep: int | None = None
    grace: float = prune.DEFAULT_GRACE
    #: ``--sign KEY``: also point the signed channel at the image (:mod:`.channel`)
    channel: ChannelOptions | None = None


@dataclass(frozen=True)
class Published:
    """A file of the chain as published: local path, published name, SHA-256, manifest hash."""

    local: Path
    name: str
    sha256: str
    manifest_sha256: str


@dataclass
class PublishResult:
    entry: str = ""
    placed: list[Placed] = field(default_factory=list)
    changes: list[tomledit.Change] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    image: Published | None = None
    chain: list[Published] = field(default_factory=list)
    channel: ChannelResult | None = None

    def lines(self, toml: Path | None) -> list[str]:
        entry = self.entry
        out = [p.line() for p in self.placed]
        if toml is not None:
            if self.changes:
                out += [f"{toml}: entry {entry!r}: {c.line()}" for c in self.changes]
            else:
                out.append(f"{toml}: entry {entry!r} unchanged")
        if self.channel is not None:
            out += [p.line() for p in self.channel.placed]
            out.append(self.channel.line)
        out += [f"removed {p}" for p in self.removed]
        return out


def publish(opts: PublishOptions) -> PublishResult:
    """Publish ``opts.image``; see the module docstring."""
    image = opts.image
    if not image.name.endswith(IMAGE_SUFFIX) or not image.is_file():
        raise PublishError(f"{image}: not a NAME.qcow2 file")
    root = opts.docroot.resolve()
    if not root.is_dir():
        raise PublishError(f"{opts.docroot}: no such directory")
    stem = image.name[: -len(IMAGE_SUFFIX)]
    if opts.entry is not None:
        docroot.check_name(opts.entry, "--entry")
    what = "--name" if opts.name or opts.entry else f"{image}: name"
    name = docroot.check_name(opts.name or opts.entry or stem, what)
    entry = opts.entry or name
    if opts.mode not in (None, "lazy", "stream", "ram"):
        raise PublishError(f"--mode {opts.mode!r}: lazy, stream or ram")
    if opts.prune_keep is not None and opts.toml is None:
        raise PublishError("--prune needs --toml: a version is removed only when no entry references it")
    if opts.prune_keep is not None and opts.prune_keep < 1:
        raise PublishError(f"--prune {opts.prune_keep}: keep at least the version just published")
    if opts.channel is not None:
        check_options(opts.channel, root)
    toml_text = _toml_text(opts, root)
    mode = opts.mode or _current_mode(toml_text, entry, opts.toml) or "lazy"

    result = PublishResult(entry=entry)
    rewrite, sha, chain = _published_form(image, root)
    top = _publish_image(image, name, rewrite, sha, root, result)
    result.image, result.chain = top, chain
    files: dict[str, str] = {}
    for suffix, key in ((".vmlinuz", "kernel"), (".initrd", "initrd")):
        local = image.with_name(stem + suffix)
        if local.is_file():
            sha = docroot.sha256_file(local)
            placed = docroot.place_file(local, root / docroot.content_name(name, sha, suffix), sha)
            result.placed.append(placed)
            files[key] = placed.path.name
    prune.record_published(root, [top.name, *files.values()])
    if opts.channel is not None:
        # before the TOML: a channel entry names the channel file, which must exist for pxe-config's loader
        result.channel = publish_channel(opts.channel, _target(top, chain, root), root)
    if opts.toml is not None:
        assert toml_text is not None
        channel = None if opts.channel is None else opts.channel.name + CHANNEL_SUFFIX
        _update_toml(opts.toml, toml_text, entry, mode, top, chain, files, root, result, channel)
        if opts.prune_keep is not None:
            result.removed = prune.prune(root, name, opts.toml, keep=opts.prune_keep, grace=opts.grace)
        else:
            prune.observe(root, name, opts.toml)  # starts the grace clock of the version this one replaced
    return result


def _target(top: Published, chain: list[Published], root: Path) -> Target:
    """What the channel points at: the published image, its size and pins, and its backing files'."""
    return Target(
        image=top.name,
        size=(root / top.name).stat().st_size,
        pin=Pin(top.sha256, top.manifest_sha256),
        backing=tuple((b.name, Pin(b.sha256, b.manifest_sha256)) for b in chain),
    )


def _toml_text(opts: PublishOptions, root: Path) -> str | None:
    """The description's current text (a new one with --base-url when the file does not exist)."""
    if opts.toml is None:
        if opts.base_url is not None:
            raise PublishError("--base-url is for a new --toml file")
        return None
    if opts.toml.exists():
        if opts.base_url is not None:
            raise PublishError(f"--base-url: {opts.toml} exists; its base_url stays as it is")
        text = opts.toml.read_text()
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise PublishError(f"{opts.toml}: invalid TOML: {e}") from None
        doc_root = data.get("docroot")
        if not isinstance(doc_root, str) or (opts.toml.parent / doc_root).resolve() != root:
            raise PublishError(f"{opts.toml}: docroot {doc_root!r} is not {root}: pxe-config would look for the"
                               " published files elsewhere")
        return text
    if opts.base_url is None:
        raise PublishError(f"{opts.toml}: no such file; give --base-url (the URL {root} is served at) to create it")
    rel = os.path.relpath(root, opts.toml.resolve().parent)
    return tomledit.new_document(opts.base_url, rel)


def _current_mode(text: str | None, entry: str, toml: Path | None) -> str | None:
    if text is None:
        return None
    import tomllib

    for t in tomllib.loads(text).get("entry", []):
        if isinstance(t, dict) and t.get("name") == entry and isinstance(t.get("mode"), str):
            return str(t["mode"])
    return None


def _published_form(local: Path, root: Path, depth: int = 0) -> tuple[backing.Rewrite | None, str, list[Published]]:
    """(the rewrite of ``local``'s backing name or None, its published SHA-256, its published chain below)."""
    if depth > MAX_CHAIN:
        raise PublishError(f"{local}: backing chain longer than {MAX_CHAIN} (a loop?)")
    base_name, base_format = backing.backing_name(local)
    if base_name is None:
        return None, docroot.sha256_file(local), []
    if base_format not in (None, "qcow2"):
        raise PublishError(f"{local}: backing file {base_name!r} of format {base_format!r}: only qcow2 bases")
    if "/" in base_name or base_name in (".", ".."):
        raise PublishError(f"{local}: backing file name {base_name!r} is not a plain name (bootkit's path rules:"
                           " the base next to the image)")
    base_local = local.parent / base_name
    if not base_local.is_file():
        raise PublishError(f"{local}: its base {base_name} is not next to it")
    chain = _base_chain_of(base_local, root, depth + 1)
    rewrite = backing.rewrite(local, chain[0].name)
    return rewrite, rewrite.sha256(), chain


def _base_chain_of(base_local: Path, root: Path, depth: int) -> list[Published]:
    """``base_local`` as published in ``root`` (refused when it is not), followed by its own chain."""
    _rewrite, sha, below = _published_form(base_local, root, depth)
    candidates = [p for p in root.iterdir() if p.name.endswith(f"-{sha[:docroot.HASH_PREFIX]}{IMAGE_SUFFIX}")]
    found = [p for p in candidates if docroot.sha256_file(p) == sha]
    if not found:
        raise PublishError(f"base {base_local.name} is not published in {root}: publish it first"
                           f" (bootkit publish {base_local} {root} ...)")
    published = sorted(found)[0]
    msha = _manifest_sha(published)
    return [Published(base_local, published.name, sha, msha), *below]


def _manifest_sha(published: Path) -> str:
    manifest = published.with_name(published.name + MANIFEST_SUFFIX)
    if not manifest.is_file():
        raise PublishError(f"{manifest}: missing (the base was not published by bootkit publish)")
    return docroot.sha256_file(manifest)


def _publish_image(image: Path, name: str, rewrite: backing.Rewrite | None, sha: str, root: Path,
                   result: PublishResult) -> Published:
    from bootkit.fetch import Manifest

    dst = root / docroot.content_name(name, sha, IMAGE_SUFFIX)
    if rewrite is None:
        placed = docroot.place_file(image, dst, sha)
    else:
        log.info("publish: %s names its base %s by its published name", image.name, backing.backing_name(image)[0])
        placed = docroot.write_file(dst, sha, rewrite.write_to)
    result.placed.append(placed)
    result.placed.append(docroot.write_bytes(dst.with_name(dst.name + ".sha256"), f"{sha}  {dst.name}\n".encode()))
    try:
        manifest = Manifest.build(str(dst))
    except BootkitError as e:
        raise PublishError(f"{dst}: manifest: {e}") from None
    if manifest.sha256 != sha:
        raise PublishError(f"{dst}: changed while publishing (SHA-256 {manifest.sha256}, expected {sha})")
    mdst = dst.with_name(dst.name + MANIFEST_SUFFIX)
    data = manifest.dumps()
    result.placed.append(docroot.write_bytes(mdst, data))
    msha = hashlib.sha256(data).hexdigest()
    result.placed.append(docroot.write_bytes(mdst.with_name(mdst.name + ".sha256"), f"{msha}  {mdst.name}\n".encode()))
    return Published(image, dst.name, sha, msha)


def _update_toml(toml: Path, text: str, entry: str, mode: str, top: Published, chain: list[Published],
                 files: dict[str, str], root: Path, result: PublishResult, channel: str | None = None) -> None:
    # lazy and stream mode read ranges, each chunk checked against the manifest
    lazy = mode in ("lazy", "stream")
    values: dict[str, str | None] = {
        "image": top.name,
        "sha256": top.sha256,
        "mode": mode,
        "manifest": top.name + MANIFEST_SUFFIX if lazy else None,
        "manifest_sha256": top.manifest_sha256 if lazy else None,
        **files,
    }
    if channel is not None:
        # the entry follows the signed channel, which names the image and pins it and its backing files: the
        # entry stays as it is when only the image changes
        values.update(channel=channel, image=None, sha256=None, manifest=None, manifest_sha256=None)
        chain = []
    pins: list[str] = []
    for base in chain:
        pins.append(f"{tomledit.PIN_PREFIX}{base.name}={base.sha256}")
        if lazy:
            pins.append(f"{tomledit.PIN_PREFIX}{base.name}{MANIFEST_SUFFIX}={base.manifest_sha256}")
    new_text, changes = tomledit.update_entry(text, tomledit.EntryUpdate(entry, values, tuple(pins)), str(toml))
    # pxe-config's own loader must accept the result (every file found, every pin well-formed) before it
    # replaces the description
    from bootkit.host.pxecfg.load import load_file

    fd, tmp_name = tempfile.mkstemp(prefix=f".{toml.name}.", suffix=".check.toml", dir=toml.resolve().parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.write_text(new_text)
        try:
            load_file(tmp)
        except BootkitError as e:
            raise PublishError(f"{toml}: the updated description does not load: "
                               f"{str(e).replace(str(tmp), str(toml))}") from None
    finally:
        tmp.unlink(missing_ok=True)
    if changes or not toml.exists():
        docroot.atomic_replace(toml, new_text.encode())
    result.changes = changes
