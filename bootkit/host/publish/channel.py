"""``bootkit publish --sign KEY``: the signed channel file that points machines at the image just published.

Writes ``DOCROOT/<channel>.json`` (format: :mod:`bootkit.boot.channel`) and its detached Ed25519 signature
``DOCROOT/<channel>.json.sig``, each replaced atomically (temp file, fsync, rename); the images stay
content-addressed and are never replaced. The signature comes from ``openssl pkeyutl -sign -rawin`` through
bootkit's run edge, so the private key stays in a file that only openssl reads (any key file openssl takes);
before anything is replaced, the new signature is checked with the key's public half by the same code the
initramfs runs.

The version is one more than the channel file's current one (or ``--channel-version``, which must be
higher): machines refuse a version lower than one they booted, so a channel never goes back; to return to
an older image, publish it again as a new version.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bootkit.boot import ed25519
from bootkit.boot.channel import SIG_SUFFIX, SUFFIX, Channel, ChannelRefused, Pin, format_time
from bootkit.errors import BootkitError
from bootkit.host.publish import docroot
from bootkit.host.publish.docroot import Placed, PublishError
from bootkit.run import run

#: how long a channel version is valid when --valid-for is not given
DEFAULT_VALID_FOR = 30 * 86400.0


@dataclass(frozen=True)
class ChannelOptions:
    """What ``publish --sign`` was asked for."""

    key: Path
    #: the channel's name (``<name>.json``)
    name: str
    valid_for: float = DEFAULT_VALID_FOR
    #: None: the current version + 1 (1 for a new channel)
    version: int | None = None


@dataclass(frozen=True)
class Target:
    """The published image a channel points at: its name, size and pins, and its backing files'."""

    image: str
    size: int
    pin: Pin
    backing: tuple[tuple[str, Pin], ...] = ()


def public_key(key: Path) -> bytes:
    """The raw public half of the Ed25519 private key file ``key``, through ``openssl pkey``."""
    if not key.is_file():
        raise PublishError(f"--sign {key}: no such file")
    try:
        pem = run(["openssl", "pkey", "-in", key, "-pubout"], capture=True).stdout.decode("ascii", "replace")
    except BootkitError as e:
        raise PublishError(f"--sign {key}: openssl cannot read the key: {e}") from None
    try:
        return ed25519.parse_public_key(pem, f"--sign {key}")
    except ed25519.BadKey:
        raise PublishError(f"--sign {key}: not an Ed25519 key (make one: openssl genpkey -algorithm ed25519)") from None


def current_version(path: Path) -> int:
    """The version of the channel file at ``path``; 0 when there is none."""
    if not path.exists():
        return 0
    try:
        return Channel.parse(path.read_bytes(), str(path)).version
    except ChannelRefused as e:
        raise PublishError(f"{e} (remove it, or give --channel-version, to start the channel again)") from None


def sign(key: Path, data: bytes, directory: Path) -> bytes:
    """``openssl pkeyutl``'s Ed25519 signature (pure, RFC 8032) of ``data``."""
    fd, name = tempfile.mkstemp(prefix=".channel.", suffix=".tbs", dir=directory)
    tbs = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        proc = run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", key, "-in", tbs], capture=True)
    except BootkitError as e:
        raise PublishError(f"--sign {key}: signing failed: {e}") from None
    finally:
        tbs.unlink(missing_ok=True)
    return proc.stdout


@dataclass(frozen=True)
class ChannelResult:
    """The files written (signature, then channel file) and the line that says what the channel is now."""

    placed: tuple[Placed, ...]
    line: str


def check_options(opts: ChannelOptions, root: Path) -> tuple[Path, int, bytes]:
    """The channel file's path, the version to write and the key's public half; PublishError when the
    options cannot work (so that ``publish`` refuses them before it places any file)."""
    docroot.check_name(opts.name, "--channel")
    if opts.valid_for <= 0:
        raise PublishError("--valid-for must be longer than 0")
    path = root / (opts.name + SUFFIX)
    current = current_version(path)
    if opts.version is not None and opts.version <= current:
        raise PublishError(f"--channel-version {opts.version}: {path} is at version {current} already; machines "
                           "that booted it refuse a lower one (publish a higher version)")  # fmt: skip
    version = opts.version if opts.version is not None else current + 1
    return path, version, public_key(opts.key)


def publish_channel(opts: ChannelOptions, target: Target, root: Path, now: float | None = None) -> ChannelResult:
    """Write and sign ``root/<name>.json`` pointing at ``target``."""
    path, version, pub = check_options(opts, root)
    sig_path = path.with_name(path.name + SIG_SUFFIX)
    start = int(time.time() if now is None else now)
    channel = Channel(name=opts.name, version=version, not_before=start, expires=start + int(opts.valid_for),
                      image=target.image, size=target.size, pin=target.pin, backing=target.backing)  # fmt: skip
    data = channel.dumps()
    Channel.parse(data, str(path))  # what the initramfs will read back
    signature = sign(opts.key, data, root)
    if not ed25519.verify(pub, signature, data):
        raise PublishError(f"--sign {opts.key}: openssl's signature does not verify with the key's public half")
    # The signature first: a machine that reads the old channel file with the new signature (or the reverse)
    # refuses it, and reads both again once (bootkit.boot.channel.follow).
    docroot.atomic_replace(sig_path, signature)
    docroot.atomic_replace(path, data)
    return ChannelResult(
        placed=(Placed(sig_path, len(signature), "written"), Placed(path, len(data), "written")),
        line=f"{path}: {channel.describe()} -> {target.image}, valid until {format_time(channel.expires)}, "
        f"signed by Ed25519 key {ed25519.fingerprint(pub)}",
    )
