"""``pxe-config --check``: does the web server serve what the generated configuration points to?

For every kernel, initrd, image and manifest URL of the description (each once): a HEAD request must answer
200; when the local file is known, the served size must equal it; when a SHA-256 is pinned (or left to a
``.sha256`` sidecar), the served bytes are streamed through SHA-256 and compared. The result is one line per
problem, ``URL: what is wrong``; an empty list means everything answered as described.

Each initramfs must also understand every ``rd.qcow2.*`` option its entries pass (:func:`check_initrds`):
``bootkit build-initrd`` records the command-line contract in the image (``CONTRACT_FILE``), and an image
built before an option existed would stop the boot at "unknown option". An entry that follows a signed
channel (``root=qcow2:channel:``) needs an initramfs that knows channels and trusts keys
(``build-initrd --trust-key``), and a channel file that one of those keys signed and that is valid now
(:func:`check_channel_entry`, the initramfs' own checks).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import unquote

import requests

from bootkit.boot.channel import (
    MAX_CHANNEL_BYTES,
    SIG_SUFFIX,
    SUFFIX,
    TRUST_FILE,
    Channel,
    ChannelRefused,
    check_signature,
)
from bootkit.boot.channel import check_channel as check_channel_values
from bootkit.boot.cmdline import CONTRACT_FILE, PREFIX, option_name
from bootkit.boot.ed25519 import SIGNATURE_SIZE
from bootkit.host.pxecfg.cmdline import kernel_args
from bootkit.host.pxecfg.initramfs import UnreadableInitramfs, read_member, read_trust_keys
from bootkit.host.pxecfg.model import Artifact, Config, Entry
from bootkit.log import human_size, log

CHUNK = 1 << 20
#: an initramfs that lists this option follows root=qcow2:channel: (both came in the same release)
CHANNEL_OPTION = PREFIX + "channel.min-version"


@dataclass(frozen=True)
class Target:
    """One URL to check and what is expected of it."""

    artifact: Artifact
    #: expected SHA-256 of the served bytes; None: not pinned
    sha256: str | None = None
    #: compare against the ``<url>.sha256`` sidecar instead of a pinned value
    sidecar: bool = False


def targets(config: Config) -> list[Target]:
    """Every distinct URL of ``config`` with the strongest expectation any entry states about it."""
    found: dict[str, Target] = {}

    def add(target: Target) -> None:
        old = found.get(target.artifact.url)
        if old is None or (old.sha256 is None and not old.sidecar):
            found[target.artifact.url] = target

    for e in config.entries:
        add(Target(e.kernel))
        add(Target(e.initrd))
        # a channel file is signed, not pinned: the initramfs checks it (only its presence is checked here)
        add(Target(e.image, e.sha256, sidecar=e.sha256 is None and e.manifest is None and not e.channel))
        if e.manifest is not None:
            add(Target(e.manifest, e.manifest_sha256))
    if config.dhcp is not None and config.dhcp.http_boot is not None:
        add(Target(config.dhcp.http_boot))
    return list(found.values())


def _stream_sha256(session: requests.Session, url: str, timeout: float) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with session.get(url, stream=True, timeout=timeout) as r:
        r.raise_for_status()
        for chunk in r.iter_content(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _sidecar(session: requests.Session, url: str, timeout: float) -> str:
    """The hash in ``<url>.sha256`` (``sha256sum`` format: the first word)."""
    r = session.get(url + ".sha256", timeout=timeout)
    r.raise_for_status()
    words = r.text.split()
    if not words:
        raise ValueError(f"{url}.sha256 is empty")
    return words[0].lower()


def check_target(session: requests.Session, target: Target, timeout: float) -> list[str]:
    """The problems of one URL (none: it is served as described)."""
    url = target.artifact.url
    problems = []
    try:
        head = session.head(url, allow_redirects=True, timeout=timeout)
    except requests.RequestException as e:
        return [f"{url}: no answer: {e}"]
    if head.status_code != 200:
        return [f"{url}: HEAD answered {head.status_code} {head.reason}"]
    served_size = head.headers.get("Content-Length")
    path = target.artifact.path
    if path is not None and served_size is not None:
        local_size = path.stat().st_size
        if int(served_size) != local_size:
            problems.append(f"{url}: served size {served_size} differs from {path} ({local_size} bytes)")
    expected = target.sha256
    try:
        if target.sidecar:
            expected = _sidecar(session, url, timeout)
        if expected is not None:
            log.info("check: hashing %s (%s)", url, human_size(int(served_size or 0)))
            actual, size = _stream_sha256(session, url, timeout)
            if actual != expected:
                what = "the .sha256 sidecar" if target.sidecar else "the pinned hash"
                problems.append(f"{url}: served bytes have SHA-256 {actual}, {what} says {expected}")
            if served_size is not None and size != int(served_size):
                problems.append(f"{url}: served {size} bytes, Content-Length said {served_size}")
    except (requests.RequestException, ValueError) as e:
        problems.append(f"{url}: {e}")
    return problems


def check(config: Config, *, timeout: float = 30.0) -> list[str]:
    """Check every URL of ``config``; one line per problem."""
    problems = []
    with requests.Session() as session:
        for target in targets(config):
            log.info("check: %s", target.artifact.url)
            problems += check_target(session, target, timeout)
    return problems


# -- the command-line contract of each initramfs ---------------------------------------------------------


@dataclass(frozen=True)
class InitrdContract:
    """What one initramfs understands: :data:`~bootkit.boot.cmdline.CONTRACT_VERSION` and option names."""

    version: int
    options: frozenset[str]


def read_contract(read: Callable[[int], bytes], what: str) -> InitrdContract:
    """The contract recorded in the initramfs that ``read(n)`` streams; ``what`` names it in messages."""
    data = read_member(read, CONTRACT_FILE, what=what)
    if data is None:
        raise UnreadableInitramfs(
            f"{what}: has no {CONTRACT_FILE}: built before bootkit recorded its command-line contract, or not "
            "by bootkit build-initrd; rebuild it with bootkit build-initrd"
        )
    try:
        info = json.loads(data)
        version, options = info["version"], info["options"]
        if not isinstance(version, int) or not isinstance(options, list):
            raise TypeError
        if not all(isinstance(o, str) for o in options):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise UnreadableInitramfs(f"{what}: {CONTRACT_FILE} is not a bootkit contract file") from None
    return InitrdContract(version, frozenset(options))


@contextlib.contextmanager
def _initrd_reader(session: requests.Session, artifact: Artifact, timeout: float) -> Iterator[Callable[[int], bytes]]:
    """The local copy when known (its size is compared with the served one), else the served bytes."""
    if artifact.path is not None:
        with artifact.path.open("rb") as f:
            yield f.read
    else:
        with session.get(artifact.url, stream=True, timeout=timeout) as r:
            r.raise_for_status()
            yield functools.partial(r.raw.read, decode_content=True)


def _options(entry: Entry, config: Config) -> dict[str, str]:
    """Every ``rd.qcow2.*`` option any menu passes for ``entry``, with who passes it."""
    found: dict[str, str] = {}
    for machine in (None, *config.machines):
        for arg in kernel_args(entry, machine):
            key = arg.partition("=")[0]
            if key.startswith(PREFIX):
                found.setdefault(option_name(key), f"entry {entry.name!r}" + (f" on {machine.mac}" if machine else ""))
    return found


def check_initrds(config: Config, *, timeout: float = 30.0) -> list[str]:
    """One line per initramfs that cannot be read, predates the contract, or does not know an option its
    entries pass. An initramfs that cannot be fetched is left to :func:`check`, which reports its URL."""
    problems: list[str] = []
    by_url: dict[str, list[Entry]] = {}
    for e in config.entries:
        by_url.setdefault(e.initrd.url, []).append(e)
    with requests.Session() as session:
        for url, entries in by_url.items():
            initrd = entries[0].initrd
            try:
                with _initrd_reader(session, initrd, timeout) as read:
                    contract = read_contract(read, url)
            except UnreadableInitramfs as e:
                problems.append(str(e))
                continue
            except (requests.RequestException, OSError) as e:
                log.debug("check: %s: %s", url, e)
                continue
            log.info("check: %s understands command-line contract %d", url, contract.version)
            for entry in entries:
                for option, who in _options(entry, config).items():
                    if option not in contract.options:
                        problems.append(
                            f"{url}: this initramfs (contract {contract.version}) does not know {option}, "
                            f"which {who} passes: rebuild it with bootkit build-initrd"
                        )
            channels = [e for e in entries if e.channel]
            if not channels:
                continue
            if CHANNEL_OPTION not in contract.options:
                problems.append(f"{url}: this initramfs (contract {contract.version}) does not know signed channels, "
                                f"which entry {channels[0].name!r} boots: rebuild it with bootkit build-initrd")
                continue
            try:
                with _initrd_reader(session, initrd, timeout) as read:
                    keys = read_trust_keys(read, what=url)
            except UnreadableInitramfs as e:
                problems.append(str(e))
                continue
            except (requests.RequestException, OSError) as e:
                problems.append(f"{url}: {TRUST_FILE}: {e}")
                continue
            if not keys:
                problems.append(f"{url}: this initramfs trusts no channel key, and entry {channels[0].name!r} boots a "
                                "signed channel: rebuild it with bootkit build-initrd --trust-key PUB")
                continue
            problems += [p for e in channels for p in check_channel_entry(session, e, keys, timeout)]
    return problems


def check_channel_entry(session: requests.Session, entry: Entry, keys: tuple[bytes, ...], timeout: float) -> list[str]:
    """What the initramfs would refuse about ``entry``'s channel today (signature, name, validity period,
    ``channel_min_version``); the version this machine remembers is the machine's, not checked here."""
    url = entry.image.url
    try:
        got = []
        for u, limit in ((url, MAX_CHANNEL_BYTES), (url + SIG_SUFFIX, SIGNATURE_SIZE)):
            with session.get(u, stream=True, timeout=timeout) as r:
                r.raise_for_status()
                data = r.raw.read(limit + 1, decode_content=True)
            if len(data) > limit:
                return [f"{u}: larger than {limit} bytes"]
            got.append(data)
        data, signature = got
        check_signature(data, signature, keys, url)
        channel = Channel.parse(data, url)
        name = unquote(url.rsplit("/", 1)[-1]).removesuffix(SUFFIX)
        check_channel_values(channel, url, name, time.time(), entry.channel_min_version, None, "")
    except requests.RequestException as e:
        return [f"{url}: {e}"]
    except ChannelRefused as e:
        return [str(e)]
    log.info("check: %s: %s, image %s", url, channel.describe(), channel.image)
    return []
