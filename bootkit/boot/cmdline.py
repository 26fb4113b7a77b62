"""The kernel command line of a bootkit netboot: ``root=qcow2:<URL>`` and every ``rd.qcow2.*`` option.

This module owns the contract between whoever writes the command line (``bootkit pxe-config``, through
:meth:`BootConfig.to_args`) and the initramfs that parses it (:meth:`BootConfig.parse`): the option names,
their values and the rules that tie them together live here and nowhere else. A property test proves that
``BootConfig.parse(join_args(c.to_args())) == c`` for every valid configuration.

Parsed once into a frozen :class:`BootConfig`; every value is checked here, so that a typo fails the boot
as soon as the boot code starts (right after dracut's cmdline hooks), before the network comes up, with one
line naming the option. Unknown options that look like ours (anything starting with ``rd.qcow``) are errors
too, with the nearest known name: a mistyped ``rd.qcow2.sha256`` must not silently turn pinning off.

Options come and go with releases while a fleet boots initramfs images of several ages, so each initramfs
records which :data:`CONTRACT_VERSION` and :data:`KNOWN_OPTIONS` it understands (:func:`contract_info`,
written next to bootkit's modules by ``bootkit build-initrd``); ``pxe-config --check`` compares.

The network part of the command line is filled in by the boot loader from the lease it was handed
(:mod:`bootkit.boot.loaderargs`); :meth:`BootConfig.substitute` is what the loader does.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import re
import shlex
from typing import Dict, List, Mapping, Optional, Tuple, cast

from bootkit.boot.cacheopts import CacheFormat, parse_cache_device, parse_cache_format, parse_cache_max
from bootkit.boot.loaderargs import Arg, Loader, LoaderVar
from bootkit.boot.urlhost import BadHost, split_authority
from bootkit.errors import ConfigError
from bootkit.record import Choice, field, record, replace

#: bumped when an option is added or changes meaning; the options themselves are listed in KNOWN_OPTIONS
CONTRACT_VERSION = 2
#: where ``bootkit build-initrd`` puts :func:`contract_info` inside the initramfs (no leading slash: a cpio name)
CONTRACT_FILE = "usr/lib/bootkit/bootkit-contract.json"

PREFIX = "rd.qcow2."
#: anything starting like this is taken to be meant for bootkit (``rd.qcow2sha256=`` is a typo, not someone
#: else's option)
NEAR_PREFIX = "rd.qcow"

DEFAULT_RETRIES = 3
DEFAULT_TIMEOUT = 30.0
DEFAULT_MINMEM_MIB = 128
#: stream mode's background fill, bytes per second (``rd.qcow2.fill-rate``, 0: no cap): about half a 1 GbE link,
#: so that the fill of one machine leaves room on a shared link (the boot's own reads pre-empt it anyway)
DEFAULT_FILL_RATE = 64 << 20

#: a SHA-256 as text: 64 hexadecimal digits, either case (normalised to lower case where stored)
HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_TMPFS_SIZE = re.compile(r"^([0-9]+[kKmMgG]?|[0-9]{1,3}%)$")
_BACKING_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")
_URL = re.compile(r"^https?://[^/\s]+/\S*[^/]$")


class Mode(Choice):
    """How the initramfs uses the image: ``ram`` downloads it whole first, ``lazy`` reads ranges on demand,
    ``stream`` reads ranges on demand while it fills the whole image into RAM behind the boot."""

    ram = "ram"
    lazy = "lazy"
    stream = "stream"

    @property
    def reads_ranges(self) -> bool:
        """Whether the image is read by range requests, each chunk checked against a manifest."""
        return self is not Mode.ram


class Verify(Choice):
    """What the downloaded bytes are checked against: a pinned hash, the ``.sha256`` sidecar, or nothing."""

    pinned = "pinned"
    sidecar = "sidecar"
    none = "none"


class OverlayKind(Choice):
    """The writable layer over the read-only image: a tmpfs overlay, or none (root mounted read-only)."""

    tmpfs = "tmpfs"
    none = "none"


VERIFY_MODES = Verify.words()
MODES = Mode.words()


#: dracut's network options, kept in :attr:`BootConfig.network` as given (dracut, not bootkit, reads them)
NETWORK_KEYS = ("ip", "rd.neednet", "ifname", "vlan", "bond")


#: options that take no value (a bare ``rd.qcow2.debug`` means on; ``=0``/``=1`` work as well)
_FLAGS = ("insecure", "debug")
_VALUED = (
    "sha256",
    "verify",
    "mode",
    "root",
    "overlay",
    "manifest",
    "manifest-sha256",
    "snapshot",
    "retries",
    "timeout",
    "minmem",
    "cacert",
    "fill-rate",
)
#: options that may be given more than once, each adding a value (in the order written)
_REPEATABLE = ("mirror",)
#: valued options added after the first contract-2 release, listed last in KNOWN_OPTIONS (added, not reshuffled)
_VALUED_LATER = ("report", "channel.min-version", "cache", "cache.format", "cache.max")
#: ``root=qcow2:channel:<URL>``: the URL names a signed channel file (bootkit.boot.channel), not an image
CHANNEL_ROOT = "channel:"
#: every option this initramfs understands, as written on the command line
KNOWN_OPTIONS: Tuple[str, ...] = (
    *(PREFIX + o for o in _VALUED + _FLAGS),
    PREFIX + "sha256.<file>",
    *(PREFIX + o for o in _REPEATABLE),
    *(PREFIX + o for o in _VALUED_LATER),
)


def contract_info() -> Dict[str, object]:
    """What this initramfs understands: ``{"version": N, "options": [...]}`` (JSON, see :data:`CONTRACT_FILE`)."""
    return {"version": CONTRACT_VERSION, "options": list(KNOWN_OPTIONS)}


def describe_contract() -> str:
    """One line for people: the contract version and the option names."""
    return f"kernel command-line contract {CONTRACT_VERSION}: root=qcow2:<URL> {' '.join(KNOWN_OPTIONS)}"


def option_name(key: str) -> str:
    """The :data:`KNOWN_OPTIONS` spelling of a command-line key (``rd.qcow2.sha256.base.qcow2`` ->
    ``rd.qcow2.sha256.<file>``); keys that are not ours come back unchanged."""
    if key.startswith(PREFIX + "sha256."):
        return PREFIX + "sha256.<file>"
    return key


@record
class RootSpec:
    """Which partition or filesystem holds the root: ``kind`` is auto, number, label, uuid or partuuid."""

    kind: str = "auto"
    value: str = ""

    def __str__(self) -> str:
        return {"auto": "auto", "number": self.value}.get(self.kind, f"{self.kind.upper()}={self.value}")


@record
class Overlay:
    """The writable layer over the read-only root: ``tmpfs`` (with an optional size) or ``none``."""

    kind: OverlayKind = OverlayKind.tmpfs
    #: tmpfs ``size=`` (``512m``, ``25%``); None: the tmpfs default (half the RAM)
    size: Optional[str] = None

    def __str__(self) -> str:
        return self.kind.value + (f":size={self.size}" if self.size else "")


def valid_tmpfs_size(size: str) -> bool:
    """``512m``, ``2G``, ``1048576``, ``25%``: what tmpfs takes as ``size=``, and not zero."""
    return bool(_TMPFS_SIZE.match(size)) and size.rstrip("%kKmMgG").strip("0") != ""


@record
class BootConfig:
    """Everything the boot code is asked for on the kernel command line."""

    url: str
    sha256: Optional[str] = None
    verify: Verify = Verify.sidecar
    mode: Mode = Mode.ram
    root: RootSpec = field(default_factory=RootSpec)
    overlay: Overlay = field(default_factory=Overlay)
    manifest: Optional[str] = None
    manifest_sha256: Optional[str] = None
    snapshot: Optional[str] = None
    retries: int = DEFAULT_RETRIES
    timeout: float = DEFAULT_TIMEOUT
    minmem_mib: int = DEFAULT_MINMEM_MIB
    cacert: Optional[str] = None
    #: stream mode: bytes per second the background fill may take (0: no cap)
    fill_rate: int = DEFAULT_FILL_RATE
    insecure: bool = False
    debug: bool = False
    #: pinned hashes of backing files, by file name (``rd.qcow2.sha256.<file>=``)
    backing_sha256: Dict[str, str] = field(default_factory=dict)
    rootfstype: Optional[str] = None
    rootflags: Optional[str] = None
    #: ``rw`` on the command line: the new root is mounted read-write (dracut's default is ``ro``)
    rw: bool = False
    #: dracut's network options (``ip=``, ``rd.neednet=``) as written; bootkit passes them by
    network: Tuple[Arg, ...] = ()
    #: ``rd.qcow2.mirror=`` (repeatable): absolute URLs of the same image on other servers, tried after ``url``;
    #: only with a pinned hash or manifest, which every mirror's bytes are checked against
    mirrors: Tuple[str, ...] = ()
    #: ``rd.qcow2.report=``: where the boot POSTs its stage timeline and result (``bootkit fleet collect``)
    report: Optional[str] = None
    #: ``root=qcow2:channel:<URL>``: ``url`` is a signed channel file that names the image and its hashes
    channel: bool = False
    #: ``rd.qcow2.channel.min-version=``: the lowest channel version this machine boots (0: any)
    channel_min_version: int = 0
    #: ``rd.qcow2.cache=``: the local cache device (``bootkit.boot.cacheopts``), lazy and stream mode only
    cache: Optional[str] = None
    #: ``rd.qcow2.cache.format=auto``: format a bootkit cache partition that has no filesystem
    cache_format: CacheFormat = CacheFormat.off
    #: ``rd.qcow2.cache.max=``: the cache's size bound (``20G``, ``50%``); None: 90 % of its filesystem
    cache_max: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> Optional[BootConfig]:
        """The boot configuration, or None when ``root=`` does not name a QCOW2 image.

        Raises :class:`ConfigError` naming the first bad or unknown option.
        """
        return parse_cmdline(text)

    def to_args(self, loader: Optional[Loader] = None) -> Tuple[str, ...]:
        """The command-line words that :meth:`parse` reads back as this configuration, in a fixed order.

        Options at their default are left out, except the few a reader of the line wants to see: how the
        image is verified (``rd.qcow2.verify=`` unless a pinned hash says so), the overlay, and ``rw``/``ro``.
        ``loader`` renders :class:`LoaderVar` values in :attr:`network` in that loader's syntax.
        """
        return tuple(w.render(loader) for w in self.to_words())

    def to_words(self) -> Tuple[Arg, ...]:
        """:meth:`to_args` before a loader renders it: each word as an :class:`Arg` (a boot loader that
        quotes has to know which words hold its variables)."""
        args = [f"root=qcow2:{CHANNEL_ROOT if self.channel else ''}{self.url}"]
        if self.sha256 is not None:
            args.append(f"{PREFIX}sha256={self.sha256}")
        if self.verify is not Verify.pinned and not self.channel:
            args.append(f"{PREFIX}verify={self.verify.value}")
        # else a pinned hash is given (sha256 or manifest-sha256 below), and pinned is implied
        if self.mode is not Mode.ram:
            args.append(f"{PREFIX}mode={self.mode.value}")
        if self.root.kind != "auto":
            args.append(f"{PREFIX}root={self.root}")
        args.append(f"{PREFIX}overlay={self.overlay}")
        # The image itself is always read-only (a read-only NBD device); rw/ro is how the root is mounted on
        # top of it.
        args.append("rw" if self.rw else "ro")
        if self.manifest is not None:
            args.append(f"{PREFIX}manifest={self.manifest}")
        if self.manifest_sha256 is not None:
            args.append(f"{PREFIX}manifest-sha256={self.manifest_sha256}")
        if self.snapshot is not None:
            args.append(f"{PREFIX}snapshot={self.snapshot}")
        if self.retries != DEFAULT_RETRIES:
            args.append(f"{PREFIX}retries={self.retries}")
        if self.timeout != DEFAULT_TIMEOUT:
            args.append(f"{PREFIX}timeout={self.timeout!r}")
        if self.minmem_mib != DEFAULT_MINMEM_MIB:
            args.append(f"{PREFIX}minmem={self.minmem_mib}")
        if self.cacert is not None:
            args.append(f"{PREFIX}cacert={self.cacert}")
        if self.fill_rate != DEFAULT_FILL_RATE:
            args.append(f"{PREFIX}fill-rate={self.fill_rate}")
        args += [PREFIX + name for name in _FLAGS if getattr(self, name)]
        args += [f"{PREFIX}sha256.{name}={h}" for name, h in sorted(self.backing_sha256.items())]
        args += [f"{PREFIX}mirror={m}" for m in self.mirrors]
        if self.report is not None:
            args.append(f"{PREFIX}report={self.report}")
        if self.channel_min_version:
            args.append(f"{PREFIX}channel.min-version={self.channel_min_version}")
        if self.cache is not None:
            args.append(f"{PREFIX}cache={self.cache}")
        if self.cache_format is not CacheFormat.off:
            args.append(f"{PREFIX}cache.format={self.cache_format.value}")
        if self.cache_max is not None:
            args.append(f"{PREFIX}cache.max={self.cache_max}")
        if self.rootfstype is not None:
            args.append(f"rootfstype={self.rootfstype}")
        if self.rootflags is not None:
            args.append(f"rootflags={self.rootflags}")
        return (*(Arg.of(a) for a in args), *self.network)

    def substitute(self, values: Mapping[LoaderVar, str]) -> BootConfig:
        """This configuration as the initramfs parses it after the boot loader filled in ``values``."""
        return replace(self, network=tuple(a.substitute(values) for a in self.network))


def split_cmdline(text: str) -> List[str]:
    """Split a kernel command line into words; double quotes group, as the kernel does."""
    try:
        return shlex.split(text)
    except ValueError:
        # an unbalanced quote: the kernel takes the rest of the line; so does a plain split
        return text.split()


def join_args(args: Tuple[str, ...]) -> str:
    """Words joined into a command line that :func:`split_cmdline` (and the kernel) split back into them.

    A word with white space is put in double quotes; quotes and backslashes have no escape that the kernel,
    dracut and systemd all read the same way, so a word holding one is refused.
    """
    out = []
    for word in args:
        if any(c in word for c in "\"'\\") or not word.isprintable():
            raise ConfigError(f"{word!r}: quotes, backslashes and control characters cannot be carried on a "
                              "kernel command line")  # fmt: skip
        out.append(f'"{word}"' if not word or any(c.isspace() for c in word) else word)
    return " ".join(out)


def _hex64(option: str, value: str) -> str:
    if not HEX64.fullmatch(value):
        raise ConfigError(f"{option}={value}: expected 64 hexadecimal digits (a SHA-256)")
    return value.lower()


def _int(option: str, value: str, minimum: int) -> int:
    try:
        n = int(value, 10)
    except ValueError:
        raise ConfigError(f"{option}={value}: expected a whole number") from None
    if n < minimum:
        raise ConfigError(f"{option}={value}: must be at least {minimum}")
    return n


def _flag(option: str, value: Optional[str]) -> bool:
    if value is None or value.lower() in ("1", "yes", "true", "on"):
        return True
    if value.lower() in ("0", "no", "false", "off"):
        return False
    raise ConfigError(f"{option}={value}: expected no value, or 0/1")


def _url(option: str, value: str) -> str:
    """An http(s) URL of a file; its host may be an IPv6 literal, ``[2001:db8::1]:8080`` or, link-local with
    the interface it is reached through, ``[fe80::1%25eth0]`` (RFC 6874; see ``bootkit.boot.urlhost``)."""
    if not _URL.match(value):
        raise ConfigError(f"{option}={value}: expected an http:// or https:// URL of a file")
    try:
        split_authority(value.split("/", 3)[2])
    except BadHost as e:
        raise ConfigError(f"{option}={value}: {e}") from None
    return value


def check_url(option: str, value: str) -> str:
    """``value`` if it is a URL the initramfs takes for ``option`` (``root=qcow2:``, ``rd.qcow2.mirror=``), else
    ConfigError naming ``option``; for ``pxe-config``, which checks a setting before it writes the option."""
    return _url(option, value)


def parse_root(option: str, value: str) -> RootSpec:
    """``N`` | ``LABEL=..`` | ``UUID=..`` | ``PARTUUID=..``."""
    if re.fullmatch(r"[0-9]+", value) and int(value) > 0:
        return RootSpec("number", str(int(value)))
    key, sep, rest = value.partition("=")
    if sep and rest and key.upper() in ("LABEL", "UUID", "PARTUUID"):
        if key.upper() == "LABEL":
            return RootSpec("label", rest)
        return RootSpec(key.lower(), rest.lower())
    raise ConfigError(f"{option}={value}: expected a partition number, LABEL=, UUID= or PARTUUID=")


def parse_overlay(option: str, value: str) -> Overlay:
    """``tmpfs`` | ``tmpfs:size=<N[kmg]|P%>`` | ``none``."""
    if value == "none":
        return Overlay(OverlayKind.none)
    if value == "tmpfs":
        return Overlay(OverlayKind.tmpfs)
    if value.startswith("tmpfs:size="):
        size = value[len("tmpfs:size=") :]
        if valid_tmpfs_size(size):
            return Overlay(OverlayKind.tmpfs, size)
    raise ConfigError(f"{option}={value}: expected tmpfs, tmpfs:size=<N[k|m|g]|P%> or none")


_RATE = re.compile(r"^([0-9]+)([kKmMgG]?)$")


def parse_rate(option: str, value: str) -> int:
    """``0`` (no cap), ``500k``, ``20M``, ``1G``, ``1048576``: bytes per second, binary suffixes."""
    m = _RATE.match(value)
    if not m:
        raise ConfigError(f"{option}={value}: expected bytes per second, e.g. 20M, 500k or 0 (no cap)")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def _unknown(keys: List[str]) -> ConfigError:
    by_lower = {k.lower(): k for k in KNOWN_OPTIONS}
    names = []
    for key in keys:
        import difflib  # only for a misspelt option, long before the root switch

        near = difflib.get_close_matches(key.lower(), list(by_lower), n=1)
        names.append(f"{key} (did you mean {by_lower[near[0]]}?)" if near else key)
    return ConfigError(
        f"unknown option{'s' if len(keys) > 1 else ''} {', '.join(names)} (known: {', '.join(KNOWN_OPTIONS)})"
    )


def parse_cmdline(text: str) -> Optional[BootConfig]:
    """The boot configuration, or None when ``root=`` does not name a QCOW2 image.

    Raises :class:`ConfigError` naming the first bad or unknown option.
    """
    url: Optional[str] = None
    values: Dict[str, object] = {}
    backing: Dict[str, str] = {}
    unknown: List[str] = []
    network: List[Arg] = []
    mirrors: List[str] = []
    rw = False
    channel = False
    for word in split_cmdline(text):
        key, sep, value = word.partition("=")
        val: Optional[str] = value if sep else None
        if key == "root":
            # the last root= wins, as for the kernel and dracut
            rest = value[len("qcow2:") :] if value.startswith("qcow2:") else None
            channel = rest is not None and rest.startswith(CHANNEL_ROOT)
            if channel:
                rest = value[len("qcow2:" + CHANNEL_ROOT) :]
                try:
                    url = _url("root", rest)
                except ConfigError as e:
                    raise ConfigError(str(e).replace("root=", "root=qcow2:channel:", 1)) from None
            else:
                url = _url("root", rest) if rest is not None else None
        elif key == "rootfstype" and val:
            values["rootfstype"] = val
        elif key == "rootflags" and val:
            values["rootflags"] = val
        elif word == "rw":
            rw = True
        elif word == "ro":
            rw = False
        elif key in NETWORK_KEYS:
            network.append(Arg.of(word))
        elif key.startswith(PREFIX):
            name = key[len(PREFIX) :]
            if name.startswith("sha256."):
                fname = name[len("sha256.") :]
                if not _BACKING_NAME.match(fname) or val is None:
                    raise ConfigError(f"{word}: expected {PREFIX}sha256.<file name>=<sha256>")
                backing[fname] = _hex64(key, val)
            elif name == "mirror":
                if not val:
                    raise ConfigError(f"{key}: needs a value ({key}=...)")
                mirrors.append(_url(key, val))
            elif name in _FLAGS:
                values[name] = _flag(key, val)
            elif name in _VALUED or name in _VALUED_LATER:
                if not val:
                    raise ConfigError(f"{key}: needs a value ({key}=...)")
                values[name] = _parse_value(key, name, val)
            else:
                unknown.append(key)
        elif key.lower().startswith(NEAR_PREFIX):
            # rd.qcow2sha256=, rd.qcow.sha256=: meant for us; ignoring them would fall back to the sidecar
            unknown.append(key)
    if unknown:
        raise _unknown(unknown)
    if url is None:
        return None
    if channel:
        _check_channel(values, backing, tuple(mirrors))
        values["verify"] = Verify.pinned
    elif "channel.min-version" in values:
        raise ConfigError(f"{PREFIX}channel.min-version is only used with root=qcow2:channel:<URL>")
    return _build(url, values, backing, rw, tuple(network), tuple(mirrors), channel=channel)


def _check_channel(values: Dict[str, object], backing: Dict[str, str], mirrors: Tuple[str, ...]) -> None:
    """A channel names the image and pins its hashes: the options that would do the same are refused."""
    for name in ("sha256", "manifest-sha256", "manifest", "verify"):
        if name in values:
            raise ConfigError(f"{PREFIX}{name}: not with root=qcow2:channel:<URL> (the signed channel pins the image)")
    if backing:
        raise ConfigError(f"{PREFIX}sha256.{sorted(backing)[0]}: not with root=qcow2:channel:<URL> "
                          "(the signed channel pins the backing files)")  # fmt: skip
    if mirrors:
        raise ConfigError(f"{PREFIX}mirror: not with root=qcow2:channel:<URL> (a mirror names one image, "
                          "a channel names the image it points to now)")  # fmt: skip


def _choice(option: str, value: str, kind: type[Choice]) -> Choice:
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{option}={value}: expected one of {'|'.join(kind.words())}") from None


def _parse_value(option: str, name: str, value: str) -> object:
    if name in ("sha256", "manifest-sha256"):
        return _hex64(option, value)
    if name == "verify":
        return _choice(option, value, Verify)
    if name == "mode":
        return _choice(option, value, Mode)
    if name == "root":
        return parse_root(option, value)
    if name == "overlay":
        return parse_overlay(option, value)
    if name in ("manifest", "report"):
        return _url(option, value)
    if name == "channel.min-version":
        return _int(option, value, 0)
    if name == "retries":
        return _int(option, value, 0)
    if name == "minmem":
        return _int(option, value, 0)
    if name == "timeout":
        try:
            seconds = float(value)
        except ValueError:
            raise ConfigError(f"{option}={value}: expected a number of seconds") from None
        if not seconds > 0 or seconds != seconds or seconds == float("inf"):
            raise ConfigError(f"{option}={value}: must be a positive number of seconds")
        return seconds
    if name == "cacert":
        if not value.startswith("/"):
            raise ConfigError(f"{option}={value}: expected an absolute path in the initramfs")
        return value
    if name == "snapshot":
        return value
    if name == "fill-rate":
        return parse_rate(option, value)
    if name == "cache":
        return parse_cache_device(option, value)
    if name == "cache.format":
        return parse_cache_format(option, value)
    if name == "cache.max":
        return parse_cache_max(option, value)
    raise AssertionError(name)


def _check_mirrors(url: str, mirrors: Tuple[str, ...], verify: object) -> None:
    """Mirrors only with a pinned hash: a sidecar would come from the primary (a dead primary fails the boot
    anyway) or from a mirror (which could then serve any image); ``none`` checks nothing at all."""
    if not mirrors:
        return
    if verify is not Verify.pinned:
        raise ConfigError(
            f"{PREFIX}mirror needs a pinned hash ({PREFIX}sha256=, with {PREFIX}mode=lazy {PREFIX}manifest-sha256=),"
            f" not {PREFIX}verify={verify}: an unpinned mirror could serve any image"
        )
    seen = {url}
    for m in mirrors:
        if m in seen:
            raise ConfigError(f"{PREFIX}mirror={m}: given twice (or the same as root=)")
        seen.add(m)


def _build(
    url: str,
    values: Dict[str, object],
    backing: Dict[str, str],
    rw: bool,
    network: Tuple[Arg, ...],
    mirrors: Tuple[str, ...] = (),
    *,
    channel: bool = False,
) -> BootConfig:
    sha256 = values.get("sha256")
    mode = cast(Mode, values.get("mode", Mode.ram))
    verify = values.get("verify")
    if verify is None:
        verify = Verify.pinned if sha256 or values.get("manifest-sha256") else Verify.sidecar
    # ram mode reads a manifest only to keep the bytes it has when a download moves to another mirror
    if not mode.reads_ranges and not mirrors and (values.get("manifest") or values.get("manifest-sha256")):
        raise ConfigError(
            f"{PREFIX}manifest and {PREFIX}manifest-sha256 are only used with {PREFIX}mode=lazy or stream"
            f" (or with {PREFIX}mirror=, to resume a download on another mirror)"
        )
    if not mode.reads_ranges and values.get("manifest") and not values.get("manifest-sha256"):
        raise ConfigError(f"{PREFIX}manifest in ram mode needs {PREFIX}manifest-sha256=<hex>")
    if mode is not Mode.stream and "fill-rate" in values:
        raise ConfigError(f"{PREFIX}fill-rate is only used with {PREFIX}mode=stream")
    _check_mirrors(url, mirrors, verify)
    if "cache" in values and (not mode.reads_ranges or verify is Verify.none):
        raise ConfigError(
            f"{PREFIX}cache needs {PREFIX}mode=lazy or stream with a manifest (not {PREFIX}mode={mode}, "
            f"{PREFIX}verify={verify}): the cache holds chunks by their manifest hash"
        )
    if ("cache.format" in values or "cache.max" in values) and "cache" not in values:
        raise ConfigError(f"{PREFIX}cache.format and {PREFIX}cache.max need {PREFIX}cache=<device>")
    # a channel pins, when it is followed at boot, what the two checks below ask the command line for
    if verify is Verify.pinned and mode is Mode.ram and not sha256 and not channel:
        raise ConfigError(f"{PREFIX}verify=pinned needs {PREFIX}sha256=<hex>")
    if verify is Verify.pinned and mode.reads_ranges and not values.get("manifest-sha256") and not channel:
        raise ConfigError(
            f"{PREFIX}verify=pinned with {PREFIX}mode={mode} needs {PREFIX}manifest-sha256=<hex> "
            "(lazy mode checks every chunk against the manifest, whose hash is pinned)"
        )
    if verify is not Verify.pinned and (sha256 or values.get("manifest-sha256")):
        raise ConfigError(f"a hash is pinned but {PREFIX}verify={verify}: drop one of them")
    return BootConfig(
        url=url,
        sha256=sha256,  # type: ignore[arg-type]
        verify=verify,  # type: ignore[arg-type]
        mode=mode,
        root=values.get("root", RootSpec()),  # type: ignore[arg-type]
        overlay=values.get("overlay", Overlay()),  # type: ignore[arg-type]
        manifest=values.get("manifest"),  # type: ignore[arg-type]
        manifest_sha256=values.get("manifest-sha256"),  # type: ignore[arg-type]
        snapshot=values.get("snapshot"),  # type: ignore[arg-type]
        retries=values.get("retries", DEFAULT_RETRIES),  # type: ignore[arg-type]
        timeout=values.get("timeout", DEFAULT_TIMEOUT),  # type: ignore[arg-type]
        minmem_mib=values.get("minmem", DEFAULT_MINMEM_MIB),  # type: ignore[arg-type]
        cacert=values.get("cacert"),  # type: ignore[arg-type]
        fill_rate=values.get("fill-rate", DEFAULT_FILL_RATE),  # type: ignore[arg-type]
        insecure=bool(values.get("insecure", False)),
        debug=bool(values.get("debug", False)),
        backing_sha256=backing,
        rootfstype=values.get("rootfstype"),  # type: ignore[arg-type]
        rootflags=values.get("rootflags"),  # type: ignore[arg-type]
        rw=rw,
        network=network,
        mirrors=mirrors,
        report=values.get("report"),  # type: ignore[arg-type]
        channel=channel,
        channel_min_version=values.get("channel.min-version", 0),  # type: ignore[arg-type]
        cache=values.get("cache"),  # type: ignore[arg-type]
        cache_format=values.get("cache.format", CacheFormat.off),  # type: ignore[arg-type]
        cache_max=values.get("cache.max"),  # type: ignore[arg-type]
    )
