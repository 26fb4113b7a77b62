"""Signed image channels: ``root=qcow2:channel:URL`` boots the image a signed, versioned pointer names.

``bootkit publish --sign KEY --channel NAME`` writes ``NAME.json`` next to the content-addressed images and
its detached Ed25519 signature ``NAME.json.sig`` (the 64 raw bytes of RFC 8032's pure Ed25519 over the exact
bytes of ``NAME.json``). The channel file is JSON, at most :data:`MAX_CHANNEL_BYTES`::

    {
     "bootkit-channel": 1,
     "channel": "stable",
     "version": 7,
     "not_before": "2026-12-02T16:30:00Z",
     "expires": "2027-01-01T16:30:00Z",
     "image": "web-1a2b3c4d5e6f.qcow2",
     "size": 123456789,
     "sha256": "<64 hex>",
     "manifest_sha256": "<64 hex>",
     "backing": {"base-0a1b2c3d4e5f.qcow2": {"sha256": "<64 hex>", "manifest_sha256": "<64 hex>"}}
    }

The initramfs (:func:`follow`) fetches both files, checks the signature against each key installed by
``build-initrd --trust-key`` (:data:`TRUST_PATH`) before it parses a byte, then checks strictly: every field
present and of its type, nothing else; ``channel`` is the file's own name (a signed ``testing`` cannot be
served as ``stable``); the clock is inside [not_before - :data:`CLOCK_SKEW`, expires]; ``version`` is at least
``rd.qcow2.channel.min-version`` and at least the highest version this machine remembers for the channel
(:class:`VersionStore`). The image is then booted exactly as if its hashes were pinned on the command line
(``rd.qcow2.sha256``, ``rd.qcow2.manifest-sha256``, ``rd.qcow2.sha256.<backing file>``), from the channel's
URL directory.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.parse
from typing import Any, Dict, List, Optional, Tuple

from bootkit.boot import ed25519
from bootkit.boot.cmdline import HEX64, PREFIX, BootConfig, Verify
from bootkit.boot.stages import Stages
from bootkit.boot.status import RUN_DIR
from bootkit.errors import BootkitError
from bootkit.log import log, safe_text
from bootkit.record import record, replace

FORMAT = 1
MAGIC_KEY = "bootkit-channel"
MAX_CHANNEL_BYTES = 64 << 10
#: where ``bootkit build-initrd --trust-key`` puts the trusted keys (no leading slash: a cpio name); one
#: base64 raw key per line
TRUST_FILE = "usr/lib/bootkit/channel-keys"
TRUST_PATH = "/" + TRUST_FILE
#: where the boot remembers the highest version of each channel when no persistent directory is given
RUN_STATE_DIR = RUN_DIR + "/channels"
#: how far the machine's clock may be behind a channel's not_before (RTCs kept in local time, slow clocks)
CLOCK_SKEW = 3600
SIG_SUFFIX = ".sig"
SUFFIX = ".json"
#: a channel or file name: what a URL path segment and a rd.qcow2.sha256.<file> pin can carry
NAME = re.compile(r"^[A-Za-z0-9._+-]{1,128}$")
MAX_BACKING = 16
MAX_VERSION = (1 << 53) - 1
_TIME = re.compile(r"^([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})Z$")
_FIELDS = ("channel", "version", "not_before", "expires", "image", "size", "sha256", "manifest_sha256", "backing")


class ChannelRefused(BootkitError):
    """A channel that is not to be booted (signature, format, time, version); the message is one line."""


# -- UTC times as text, without datetime (not in the initramfs' module list) --------------------------


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def format_time(seconds: float) -> str:
    """``2026-12-02T16:30:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(seconds)))


def parse_time(text: str, where: str) -> int:
    """Seconds since the epoch of a ``YYYY-MM-DDTHH:MM:SSZ`` time."""
    m = _TIME.match(text)
    if not m:
        raise ChannelRefused(f"{where}: {text!r} is not a UTC time like 2026-12-02T16:30:00Z")
    y, mo, d, h, mi, s = (int(g) for g in m.groups())
    if not (1 <= mo <= 12 and 1 <= d <= 31 and h < 24 and mi < 60 and s < 60):
        raise ChannelRefused(f"{where}: {text!r} is not a valid time")
    seconds = _days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s
    if format_time(seconds) != text:  # 2026-02-30 and the like
        raise ChannelRefused(f"{where}: {text!r} is not a valid time")
    return seconds


# -- the channel file ------------------------------------------------------------------------------------


@record
class Pin:
    """A file's pinned SHA-256 and the SHA-256 of its lazy-mode manifest."""

    sha256: str
    manifest_sha256: str


@record
class Channel:
    """One version of a channel: which image to boot, its pins, and when the pointer is valid."""

    name: str
    version: int
    not_before: int
    expires: int
    image: str
    size: int
    pin: Pin
    #: the image's backing files, by their published name
    backing: Tuple[Tuple[str, Pin], ...] = ()

    def dumps(self) -> bytes:
        """The channel file's bytes (what is signed): JSON, one field a line, in a fixed order."""
        doc: Dict[str, Any] = {
            MAGIC_KEY: FORMAT,
            "channel": self.name,
            "version": self.version,
            "not_before": format_time(self.not_before),
            "expires": format_time(self.expires),
            "image": self.image,
            "size": self.size,
            "sha256": self.pin.sha256,
            "manifest_sha256": self.pin.manifest_sha256,
            "backing": {n: {"sha256": p.sha256, "manifest_sha256": p.manifest_sha256} for n, p in self.backing},
        }
        return (json.dumps(doc, indent=1) + "\n").encode("ascii")

    @classmethod
    def parse(cls, data: bytes, where: str) -> Channel:
        """A channel from its (already authenticated) bytes; ChannelRefused naming the field otherwise."""
        if len(data) > MAX_CHANNEL_BYTES:
            raise ChannelRefused(f"{where}: {len(data)} bytes; a channel file is at most {MAX_CHANNEL_BYTES}")
        try:
            doc = json.loads(data.decode("ascii"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError) as e:
            raise ChannelRefused(f"{where}: not a bootkit channel file ({type(e).__name__}: {e})") from None
        if not isinstance(doc, dict) or doc.get(MAGIC_KEY) != FORMAT:
            raise ChannelRefused(f"{where}: not a bootkit channel file (no \"{MAGIC_KEY}\": {FORMAT})")
        extra = sorted(set(doc) - {MAGIC_KEY, *_FIELDS})
        if extra:
            raise ChannelRefused(f"{where}: unknown field {extra[0]!r}")
        missing = [f for f in _FIELDS if f not in doc]
        if missing:
            raise ChannelRefused(f"{where}: field {missing[0]!r} missing")
        backing = doc["backing"]
        if not isinstance(backing, dict) or len(backing) > MAX_BACKING:
            raise ChannelRefused(f"{where}: field 'backing' must be an object of at most {MAX_BACKING} files")
        return cls(
            name=_name(doc, "channel", where),
            version=_integer(doc, "version", where, 1),
            not_before=parse_time(_string(doc, "not_before", where), f"{where}: not_before"),
            expires=parse_time(_string(doc, "expires", where), f"{where}: expires"),
            image=_name(doc, "image", where),
            size=_integer(doc, "size", where, 0),
            pin=_pin({k: doc[k] for k in ("sha256", "manifest_sha256")}, where),
            backing=tuple(
                (_checked_name(n, f"{where}: backing"), _pin(p, f"{where}: backing {n}"))
                for n, p in sorted(backing.items())
            ),
        )

    def describe(self) -> str:
        return f"channel {self.name} version {self.version}"


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    doc: Dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise ValueError(f"field {key!r} given twice")
        doc[key] = value
    return doc


def _string(doc: Dict[str, Any], key: str, where: str) -> str:
    value = doc[key]
    if not isinstance(value, str):
        raise ChannelRefused(f"{where}: field {key!r} must be a string")
    return value


def _checked_name(value: object, where: str) -> str:
    if not isinstance(value, str) or not NAME.match(value) or value in (".", ".."):
        raise ChannelRefused(f"{where}: {value!r} is not a plain file name (letters, digits and . _ + -)")
    return value


def _name(doc: Dict[str, Any], key: str, where: str) -> str:
    return _checked_name(doc[key], f"{where}: field {key!r}")


def _integer(doc: Dict[str, Any], key: str, where: str, minimum: int) -> int:
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_VERSION:
        raise ChannelRefused(f"{where}: field {key!r} must be a whole number from {minimum} to {MAX_VERSION}")
    return value


def _pin(doc: object, where: str) -> Pin:
    if not isinstance(doc, dict):
        raise ChannelRefused(f"{where}: must be an object with sha256 and manifest_sha256")
    if set(doc) != {"sha256", "manifest_sha256"}:
        raise ChannelRefused(f"{where}: must have exactly the fields sha256 and manifest_sha256")
    for key in ("sha256", "manifest_sha256"):
        value = doc[key]
        if not isinstance(value, str) or not HEX64.fullmatch(value) or value != value.lower():
            raise ChannelRefused(f"{where}: field {key!r} must be 64 lowercase hexadecimal digits")
    return Pin(doc["sha256"], doc["manifest_sha256"])


# -- trust: keys and the versions seen -------------------------------------------------------------------


def load_keys(path: str = TRUST_PATH) -> Tuple[bytes, ...]:
    """The trusted keys installed in the initramfs (none when the file is missing)."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read(64 << 10)
    except FileNotFoundError:
        return ()
    except (OSError, UnicodeDecodeError) as e:
        raise ChannelRefused(f"{path}: cannot read the trusted keys: {e}") from None
    return tuple(ed25519.parse_public_key(line, f"{path}: line {i}")
                 for i, line in enumerate(text.splitlines(), 1) if line.strip())  # fmt: skip


class VersionStore:
    """Remembers the highest version of each channel this machine accepted (rollback protection).

    The interface a persistent store implements: :meth:`highest` and :meth:`remember`.
    """

    def highest(self, channel: str) -> Optional[int]:
        raise NotImplementedError

    def remember(self, channel: str, version: int) -> None:
        raise NotImplementedError

    def where(self) -> str:
        """Where the versions are kept, for messages."""
        raise NotImplementedError


class FileVersionStore(VersionStore):
    """One small file per channel, ``<directory>/<channel>.version``, holding the version in decimal."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def where(self) -> str:
        return self.directory

    def _path(self, channel: str) -> str:
        return os.path.join(self.directory, _checked_name(channel, "channel") + ".version")

    def highest(self, channel: str) -> Optional[int]:
        path = self._path(channel)
        try:
            with open(path, "rb") as f:
                data = f.read(32)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ChannelRefused(f"{path}: cannot read the remembered version: {e.strerror}") from None
        text = data.decode("ascii", "replace").strip()
        if not text.isdigit() or len(text) > 16:
            # fail closed: a damaged record must not turn rollback protection off; removing it does, knowingly
            raise ChannelRefused(f"{path}: not a version number (remove the file to forget the channel's history)")
        return int(text)

    def remember(self, channel: str, version: int) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        path = self._path(channel)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{version}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


@record
class Trust:
    """What a channel is checked against: the trusted keys, the remembered versions and the clock."""

    keys: Tuple[bytes, ...]
    versions: VersionStore
    #: seconds since the epoch; None: the machine's clock
    now: Optional[float] = None

    @classmethod
    def installed(cls, state_dir: Optional[str] = None) -> Trust:
        """The initramfs' keys, and the versions remembered in ``state_dir``: a persistent directory (the local
        cache's) keeps them across power cycles; without one they live under /run until power-off."""
        return cls(load_keys(), FileVersionStore(state_dir or RUN_STATE_DIR))


# -- the checks, in order --------------------------------------------------------------------------------


def check_signature(data: bytes, signature: bytes, keys: Tuple[bytes, ...], where: str) -> bytes:
    """The trusted key that signed ``data``; ChannelRefused when none did."""
    if not keys:
        raise ChannelRefused(f"{where}: this initramfs trusts no channel key (bootkit build-initrd --trust-key PUB)")
    if len(signature) != ed25519.SIGNATURE_SIZE:
        raise ChannelRefused(f"{where}{SIG_SUFFIX}: {len(signature)} bytes; an Ed25519 signature is "
                             f"{ed25519.SIGNATURE_SIZE}")  # fmt: skip
    for key in keys:
        if ed25519.verify(key, signature, data):
            return key
    raise ChannelRefused(f"{where}: the signature does not verify with any of the {len(keys)} trusted "
                         f"key{'s' if len(keys) > 1 else ''} (altered, or signed by another key)")  # fmt: skip


def check_channel(channel: Channel, where: str, expected_name: str, now: float, min_version: int,
                  remembered: Optional[int], store: str, grace: float = 0) -> None:  # fmt: skip
    """Name, validity period (``grace`` seconds past its expiry still pass: an offline boot from the local
    cache) and version; ChannelRefused with one line naming what failed."""
    what = channel.describe()
    if channel.name != expected_name:
        raise ChannelRefused(f"{where}: signed for channel {channel.name!r}, but the file is {expected_name!r}")
    clock = format_time(now)
    if now > channel.expires + grace:
        raise ChannelRefused(f"{where}: {what} expired at {format_time(channel.expires)} (this machine's clock "
                             f"says {clock}): publish it again, or set the clock if it is wrong")  # fmt: skip
    if now < channel.not_before - CLOCK_SKEW:
        raise ChannelRefused(f"{where}: {what} is not valid before {format_time(channel.not_before)} (this "
                             f"machine's clock says {clock}): set the clock if it is wrong")  # fmt: skip
    if channel.version < min_version:
        raise ChannelRefused(f"{where}: {what} is older than {PREFIX}channel.min-version={min_version} "
                             "(a rollback?)")  # fmt: skip
    if remembered is not None and channel.version < remembered:
        raise ChannelRefused(f"{where}: {what} is older than version {remembered}, which this machine booted "
                             f"before (remembered in {store}; a rollback?)")  # fmt: skip


def pinned_config(cfg: BootConfig, channel: Channel) -> BootConfig:
    """``cfg`` as if the channel's image and hashes had been written on the command line."""
    directory = cfg.url.rsplit("/", 1)[0] + "/"
    backing: Dict[str, str] = {}
    for name, pin in channel.backing:
        backing[name] = pin.sha256
        if cfg.mode.reads_ranges:  # ram mode reads no manifest, and a pin that matches no file fails the boot
            backing[name + ".manifest"] = pin.manifest_sha256
    return replace(
        cfg,
        url=directory + urllib.parse.quote(channel.image),
        channel=False,
        verify=Verify.pinned,
        sha256=channel.pin.sha256,
        manifest_sha256=channel.pin.manifest_sha256 if cfg.mode.reads_ranges else None,
        backing_sha256=backing,
    )


def _fetch(url: str, options: Any) -> Tuple[bytes, bytes]:
    """The channel file and its signature, each read to a bound."""
    from bootkit.fetch.client import get_small

    data = get_small(url, options, limit=MAX_CHANNEL_BYTES, what="a channel file")
    signature = get_small(url + SIG_SUFFIX, options, limit=ed25519.SIGNATURE_SIZE, what="an Ed25519 signature")
    return data, signature


def follow(cfg: BootConfig, stages: Stages, trust: Trust, cache: Any = None) -> Tuple[BootConfig, Channel]:
    """Fetch, verify and check the channel ``cfg`` names; the configuration that boots its image, pinned.

    With a local ``cache`` (``bootkit.fetch.diskcache.DiskCache``) the verified channel is kept there, and
    when the server cannot be reached the kept copy is verified again and used (``bootkit.boot.channelcache``).
    """
    from bootkit.boot.channelcache import OFFLINE_GRACE, OFFLINE_WAIT, ChannelCopy
    from bootkit.fetch import FetchOptions
    from bootkit.fetch.errors import FetchTimeout, GaveUp, TransientError

    url = cfg.url
    stages.begin("channel", url)
    base = urllib.parse.unquote(url.rsplit("/", 1)[1])
    if not base.endswith(SUFFIX) or not NAME.match(base[: -len(SUFFIX)]):
        raise ChannelRefused(f"root=qcow2:channel:{url}: expected the URL of a NAME{SUFFIX} channel file")
    expected = base[: -len(SUFFIX)]
    copy = ChannelCopy(cache, expected) if cache is not None else None
    kept = copy.load() if copy is not None else None
    # with a verified copy at hand, an unreachable server costs one short attempt, not the whole retry budget
    retries, timeout = (min(cfg.retries, 1), min(cfg.timeout, OFFLINE_WAIT)) if kept else (cfg.retries, cfg.timeout)
    options = FetchOptions(verify="none", retries=retries, timeout=timeout, cacert=cfg.cacert,
                           insecure=cfg.insecure)  # fmt: skip
    offline = False
    try:
        data, signature = _fetch(url, options)
    except (TransientError, GaveUp, FetchTimeout) as e:
        if kept is None:
            raise
        data, signature = kept
        offline = True
        log.warning("[%8.2f] channel: %s: the server is unreachable (%s): the last verified channel from the "
                    "local cache", time.monotonic(), url, safe_text(str(e), 200))  # fmt: skip
    try:
        key = check_signature(data, signature, trust.keys, url)
    except ChannelRefused:
        if offline:
            raise
        # publish replaces the signature, then the channel file: a machine that read one of each in between
        # reads both again, once
        again, signature = _fetch(url, options)
        if again == data:
            raise
        data = again
        key = check_signature(data, signature, trust.keys, url)
    channel = Channel.parse(data, url)
    remembered = trust.versions.highest(channel.name)
    now = time.time() if trust.now is None else trust.now
    check_channel(channel, url, expected, now, cfg.channel_min_version, remembered, trust.versions.where(),
                  grace=OFFLINE_GRACE if offline else 0)  # fmt: skip
    if offline and now > channel.expires:
        log.warning("[%8.2f] channel: WARNING: %s expired at %s; booting it offline within the %d-day grace "
                    "of a channel kept in the local cache (until %s)", time.monotonic(), channel.describe(),
                    format_time(channel.expires), OFFLINE_GRACE // 86400,
                    format_time(channel.expires + OFFLINE_GRACE))  # fmt: skip
    if remembered is None or channel.version > remembered:
        trust.versions.remember(channel.name, channel.version)
    if copy is not None and not offline:
        try:
            copy.save(data, signature)
        except (OSError, BootkitError) as e:  # the cache is a help, never a reason to fail the boot
            log.warning("[%8.2f] channel: WARNING: cannot keep the channel in the local cache: %s", time.monotonic(), e)
    source = " (from the local cache: the image server is unreachable)" if offline else ""
    stages.done(f"{channel.describe()}{source} signed by key {ed25519.fingerprint(key)}, valid until "
                f"{format_time(channel.expires)}: {channel.image} sha256 {channel.pin.sha256}")  # fmt: skip
    return pinned_config(cfg, channel), channel
