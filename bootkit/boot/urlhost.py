"""The host and port of an http(s) URL, IPv6 literals included (RFC 3986 section 3.2.2, RFC 6874).

``urllib.parse`` checks bracketed hosts only on some Python versions (3.11.4+), lower-cases a zone id and
leaves its ``%25`` encoded, and reads ``http://2001:db8::1/x`` as host ``2001`` with a bad port. One
function here says what a URL's authority means, for the kernel command-line parser (which must refuse a bad
URL before the network comes up) and for the HTTP client (which connects to it) alike.

A zone id (``http://[fe80::1%25eth0]/x``, RFC 6874) is accepted: it names the interface a link-local
address is reached through, ``eth0`` here, which is what ``getaddrinfo`` takes as ``fe80::1%eth0``. It is
not sent to the server: the ``Host`` header carries ``[fe80::1]`` (RFC 6874 section 4).

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple, Optional

_BRACKETED = re.compile(r"\[([^\[\]]*)\](?::([0-9]*))?")
#: RFC 6874 ZoneID: unreserved characters (an interface name or number); ``%25`` is the encoded ``%``
_ZONE = re.compile(r"[A-Za-z0-9._~-]+")
_NAME = re.compile(r"[^\s\[\]:/?#@]+")
_PORT = re.compile(r"[0-9]*")


class Host(NamedTuple):
    """Where a URL points: the name to look up, the ``Host`` header text, and the port, if one is given."""

    #: what ``getaddrinfo`` takes: ``images.lab``, ``10.0.0.1``, ``2001:db8::1``, ``fe80::1%eth0``
    name: str
    #: the host as the ``Host`` header carries it (no port): IPv6 literals in brackets, without a zone
    header: str
    port: Optional[int]


class BadHost(ValueError):
    """The authority of a URL is malformed; the message says how, without the URL (the caller adds it)."""


def split_authority(authority: str) -> Host:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port``, ``[v6%25zone]:port`` (user info before ``@`` dropped).

    Raises :class:`BadHost` for unbalanced or stray brackets, an IPv6 address without brackets, a bad
    address or zone inside them, or a port that is not a number from 1 to 65535.
    """
    hostport = authority.rpartition("@")[2]
    if hostport.startswith("["):
        m = _BRACKETED.fullmatch(hostport)
        if m is None:
            raise BadHost(f"malformed IPv6 literal {hostport!r}: expected [ADDRESS] or [ADDRESS]:PORT")
        literal, port_text = m.group(1), m.group(2)
        address, pct, zone = literal.partition("%")
        if pct:
            if not zone.startswith("25") or not _ZONE.fullmatch(zone[2:]):
                raise BadHost(f"zone id in [{literal}]: write it as %25 and an interface name, e.g. [fe80::1%25eth0]")
            zone = zone[2:]
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise BadHost(f"[{literal}]: {address!r} is not an IPv6 address") from None
        name = f"{address}%{zone}" if zone else address
        return Host(name, f"[{address}]", _port(port_text))
    if "[" in hostport or "]" in hostport:
        raise BadHost(f"bracket outside an IPv6 literal in {hostport!r}: write [ADDRESS] or [ADDRESS]:PORT")
    if hostport.count(":") > 1:
        raise BadHost(f"{hostport!r}: an IPv6 address must be in brackets, e.g. [2001:db8::1]:8080")
    name, colon, port_text = hostport.partition(":")
    if not name or not _NAME.fullmatch(name):
        raise BadHost(f"no valid host name in {hostport!r}")
    return Host(name, name, _port(port_text) if colon else None)


def _port(text: Optional[str]) -> Optional[int]:
    if text is None or text == "":
        return None
    if not _PORT.fullmatch(text) or not 0 < int(text) < 65536:
        raise BadHost(f"port {text}: expected a number from 1 to 65535")
    return int(text)
