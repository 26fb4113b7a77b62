"""How one setting's value is read: the parse functions the settings in :mod:`.settings` declare.

Each takes the value as TOML (or a flag) gave it, already type-checked by the table reader (a non-empty
string, an integer or a list of strings), and returns the typed value, or raises :class:`BadValue` with a
message that the reader prefixes with where the value came from (``pxe.toml: entry.a.mode: ...``). Rules
that tie several settings together (a manifest only in lazy mode, a range only with full DHCP) live with the
table in :mod:`.load`; everything about the kernel command line comes from :mod:`bootkit.boot.cmdline`.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from typing import TypeVar
from urllib.parse import urlsplit

from bootkit.boot.cmdline import Overlay, OverlayKind, RootSpec, check_url, parse_root, valid_tmpfs_size
from bootkit.errors import ConfigError
from bootkit.host.pxecfg.model import Bootloader

#: names that become menu labels, GRUB ids, snapshot and interface names
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# characters that are literal for the kernel, iPXE (which expands ${...}) and GRUB (once quoted)
ARG = re.compile(r"^[A-Za-z0-9_.,:/=+@%?&~!*()\[\]-]+$")
_ROOT = re.compile(r"^(?:[1-9][0-9]*|(?:LABEL|UUID|PARTUUID)=[A-Za-z0-9_.:-]+)$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(?:([:-])[0-9a-fA-F]{2})(?:\1[0-9a-fA-F]{2}){4}$")
_TITLE_FORBIDDEN = set("$'\"\\`")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_LEASE = re.compile(r"^(?:[0-9]+[smhdw]?|infinite)$")

E = TypeVar("E", bound=enum.Enum)


class BadValue(ValueError):
    """A setting's value is wrong; the message says how, the reader adds where."""


def choice(kind: type[E]) -> Callable[[str], E]:
    """A member of ``kind`` by its value."""

    def parse(value: str) -> E:
        try:
            return kind(value)
        except ValueError:
            choices = ", ".join(str(m.value) for m in kind)
            raise BadValue(f"{value!r} is not one of: {choices}") from None

    return parse


def name(value: str) -> str:
    if not NAME.match(value):
        raise BadValue(f"{value!r}: use letters, digits, '_', '.' and '-' (it becomes a menu label)")
    return value


def title(value: str) -> str:
    if any(c in _TITLE_FORBIDDEN or not c.isprintable() for c in value):
        raise BadValue(f"{value!r}: quotes, '$', '\\' and control characters cannot be shown safely")
    return value


def snapshot(value: str) -> str:
    if not NAME.match(value):
        raise BadValue(f"{value!r}: snapshot names here use letters, digits, '_', '.' and '-'")
    return value


def interface(value: str) -> str:
    if not NAME.match(value):
        raise BadValue(f"{value!r} is not an interface name")
    return value


def hostname(value: str) -> str:
    """One RFC 1123 label: it goes into dracut's ``ip=``, which dracut writes into a file it sources."""
    if not _HOSTNAME.fullmatch(value):
        raise BadValue(f"{value!r}: a host name here is one label of letters, digits and '-' (at most 63, "
                       "not starting or ending with '-')")  # fmt: skip
    return value


def printable(value: str) -> str:
    if not value.isprintable():
        raise BadValue("control characters")
    return value


def kernel_args(values: Sequence[str]) -> tuple[str, ...]:
    """Kernel arguments as single words that every boot loader carries literally."""
    for v in values:
        if not ARG.match(v):
            raise BadValue(f"{v!r}: kernel arguments here are single words of [A-Za-z0-9_.,:/=+@%?&~!*()[]-]")
    return tuple(values)


def mirror_urls(values: Sequence[str]) -> tuple[str, ...]:
    """Absolute http(s) URLs of the same image on other servers, each a single kernel-argument word."""
    for v in values:
        if not ARG.match(v):
            raise BadValue(f"{v!r}: a mirror URL here is a single word of [A-Za-z0-9_.,:/=+@%?&~!*()[]-]")
        try:
            check_url("mirror", v)
        except ConfigError:
            raise BadValue(f"{v!r} is not an http:// or https:// URL of a file") from None
    if len(set(values)) != len(values):
        raise BadValue("a mirror is named twice")
    return tuple(values)


def report_url(value: str) -> str:
    """Where machines POST their boot reports (``rd.qcow2.report=``): an http(s) URL, one kernel-argument word."""
    if not ARG.match(value):
        raise BadValue(f"{value!r}: a report URL here is a single word of [A-Za-z0-9_.,:/=+@%?&~!*()[]-]")
    try:
        check_url("report", value)
    except ConfigError:
        raise BadValue(f"{value!r} is not an http:// or https:// URL (e.g. http://10.0.0.1:8070/report)") from None
    return value


def cache_device(value: str) -> str:
    """``rd.qcow2.cache=``: ``PARTLABEL=..``, ``LABEL=..``, ``UUID=..``, ``PARTUUID=..`` or a ``/dev/`` path, as the
    initramfs reads it."""
    from bootkit.boot.cacheopts import parse_cache_device

    try:
        return parse_cache_device("cache", value)
    except ConfigError as e:
        raise BadValue(f"{value!r}: {str(e).split(': ', 1)[1]}") from None


def root(value: str) -> RootSpec:
    """``auto``, a partition number, ``LABEL=..``, ``UUID=..`` or ``PARTUUID=..``, as the initramfs reads it."""
    if value == "auto":
        return RootSpec()
    if not _ROOT.match(value):
        raise BadValue(f"{value!r} is not auto, a partition number, LABEL=.., UUID=.. or PARTUUID=..")
    try:
        return parse_root("root", value)
    except ConfigError as e:  # the pattern above is narrower than the initramfs parser: cannot happen
        raise BadValue(str(e)) from None


def overlay_size(value: str) -> str:
    if not valid_tmpfs_size(value):
        raise BadValue(f"{value!r} is not a size like 512m, 2G or 25%")
    return value


def overlay(kind: OverlayKind, size: str | None) -> Overlay:
    """The overlay of ``overlay`` and ``overlay_size`` together (the reader names overlay_size on error)."""
    if size is not None and kind is not OverlayKind.tmpfs:
        raise BadValue(f"contradicts overlay = {kind.value!r}: only a tmpfs overlay has a size")
    return Overlay(kind, size)


def mac(value: str) -> str:
    """Lower case with colons: ``52:54:00:12:34:56``."""
    if not _MAC.match(value):
        raise BadValue(f"{value!r} is not a MAC address like 52:54:00:12:34:56")
    return value.lower().replace("-", ":")


def ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise BadValue(f"{value!r} is not an IPv4 address") from None


def ipv4_list(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(ipv4(v) for v in values)


def lease_time(value: str) -> str:
    if not _LEASE.match(value):
        raise BadValue(f"{value!r} is not a dnsmasq lease time like 45m, 12h or infinite")
    return value


def server_path(value: str) -> str:
    if not os.path.isabs(value) or any(c.isspace() for c in value):
        raise BadValue(f"{value!r}: give an absolute path without spaces")
    return value


def non_negative(value: int) -> int:
    if value < 0:
        raise BadValue("must be >= 0")
    return value


def positive(value: int) -> int:
    if value <= 0:
        raise BadValue("must be > 0")
    return value


def base_url(value: str) -> str:
    """An http(s) directory URL, with the trailing ``/`` added when missing."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise BadValue(f"{value!r} is not an http:// or https:// directory URL")
    return value if value.endswith("/") else value + "/"


def bootloaders(values: Sequence[str]) -> frozenset[Bootloader]:
    try:
        found = frozenset(Bootloader(b) for b in values)
    except ValueError:
        raise BadValue(f"{list(values)} names one not in: ipxe, grub") from None
    if not found:
        raise BadValue("must name at least one of: ipxe, grub")
    return found
