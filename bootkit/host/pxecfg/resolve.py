"""Files of a boot description: paths made into URLs under ``base_url``, found under ``docroot``, hashed.

Paths in the description are resolved against ``base_url`` (the HTTP directory the boot fetches from) and,
when ``docroot`` names the local directory served there, against ``docroot`` too: that is how bootkit finds
the local image to hash (``sha256 = "compute"``) and checks that files exist.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from bootkit.boot.cmdline import HEX64
from bootkit.host.pxecfg.model import Artifact, Bootloader
from bootkit.host.pxecfg.table import Origin, Table
from bootkit.host.pxecfg.values import ARG
from bootkit.log import human_size, log


@dataclass
class Context:
    """What resolving a file needs from the top of the description, and the hashes computed so far."""

    origin: Origin
    base_url: str | None
    docroot: Path | None
    bootloaders: frozenset[Bootloader]
    hashes: dict[Path, str] = field(default_factory=dict)

    def sha256_of(self, path: Path) -> str:
        """SHA-256 of a local file, streamed; each file is hashed once per description."""
        if path not in self.hashes:
            size = path.stat().st_size
            log.info("pxe-config: hashing %s (%s)", path, human_size(size))
            start = time.monotonic()
            with path.open("rb") as f:
                self.hashes[path] = hashlib.file_digest(f, "sha256").hexdigest()
            elapsed = max(time.monotonic() - start, 1e-6)
            log.info("pxe-config: sha256 %s in %.1f s (%s/s)", self.hashes[path], elapsed, human_size(size / elapsed))
        return self.hashes[path]


def _check_url(t: Table, key: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise t.error(key, f"{url!r} is not an http:// or https:// URL")
    if parts.path in ("", "/") or parts.path.endswith("/"):
        raise t.error(key, f"{url!r} names a directory, not a file")
    if not ARG.match(url):
        raise t.error(key, f"{url!r} contains characters a kernel command line or bootloader script cannot carry")


def artifact(t: Table, key: str, value: str, ctx: Context, *, http_only: bool) -> Artifact:
    """A URL as given, or a path made into a URL under base_url (and a file under docroot)."""
    if "://" in value:
        _check_url(t, key, value)
        path = None
        if ctx.docroot is not None and ctx.base_url is not None and value.startswith(ctx.base_url):
            path = ctx.docroot / value[len(ctx.base_url) :]
            if not path.is_file():
                path = None  # served from elsewhere (another location block): nothing local to check
        result = Artifact(value, path)
    else:
        if ctx.base_url is None:
            raise t.error(key, f"{value!r} is a path, but base_url is not set (the URL it is served at)")
        relative = value
        if ctx.docroot is not None and os.path.isabs(value):
            try:
                relative = Path(value).resolve().relative_to(ctx.docroot).as_posix()
            except ValueError:
                raise t.error(key, f"{value} is not under docroot {ctx.docroot}") from None
        if os.path.isabs(relative) or ".." in Path(relative).parts:
            raise t.error(key, f"{value!r}: give a path relative to base_url (and docroot), or a URL")
        url = ctx.base_url + quote(relative)
        _check_url(t, key, url)
        path = None
        if ctx.docroot is not None:
            path = ctx.docroot / relative
            if not path.is_file():
                raise t.error(key, f"{path}: no such file")
        result = Artifact(url, path)
    if http_only and Bootloader.grub in ctx.bootloaders:
        parts = urlsplit(result.url)
        if parts.scheme != "http" or parts.query or parts.fragment:
            raise t.error(
                key,
                f"{result.url}: GRUB's http module fetches plain http:// URLs without a query only "
                "(or leave grub out of bootloaders)",
            )
        if parts.netloc.rpartition("@")[2].startswith("["):
            # GRUB 2.06's device name (http,HOST:PORT) has no bracket form for an IPv6 literal, and bootkit
            # has not booted GRUB over IPv6: refused here with one line rather than failing at boot
            raise t.error(
                key,
                f"{result.url}: GRUB 2.06 cannot fetch from an IPv6 literal host; use a host name, or leave "
                "grub out of bootloaders (iPXE fetches from IPv6 literals)",
            )
    return result


def sha256(t: Table, key: str, value: str, of: Artifact, ctx: Context) -> str:
    """64 hex digits as given (lower case), or ``compute``: the hash of the local file."""
    if value == "compute":
        if of.path is None:
            raise t.error(
                key,
                f"'compute' needs {of.url} as a local file: set docroot to the directory served at "
                "base_url, or give the 64 hex digits",
            )
        return ctx.sha256_of(of.path)
    if not HEX64.fullmatch(value):
        raise t.error(key, f"{value!r} is not 64 hex digits (nor 'compute')")
    return value.lower()
