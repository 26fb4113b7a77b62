"""What a downloaded file must hash to, when the boot configuration does not pin it: the sidecar files.

``IMAGE.sha256`` next to the image (a bare digest, or a ``sha256sum`` line), else the image's entry in a
``SHA256SUMS`` file in the same directory, in GNU (``HASH  NAME``, ``HASH *NAME``) or BSD
(``SHA256 (NAME) = HASH``) format.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import posixpath
import re
import urllib.parse
from typing import Optional, Tuple

from bootkit.fetch import client
from bootkit.fetch.errors import ChecksumMissing, NotFound
from bootkit.fetch.options import FetchOptions

_DIGEST = re.compile(r"[0-9a-f]{64}")
_SUMS_LINE = re.compile(r"([0-9a-fA-F]{64})\s+\*?(.+)")
_BSD_SUMS_LINE = re.compile(r"SHA256\s*\((.+)\)\s*=\s*([0-9a-fA-F]{64})")


def parse_sums(text: str, name: str) -> Optional[str]:
    """The hash for ``name`` in a ``sha256sum``-style (GNU or BSD) listing; None if not listed."""
    for line in text.splitlines():
        line = line.strip()
        m = _SUMS_LINE.fullmatch(line)
        if m and posixpath.basename(m.group(2).strip()) == name:
            return m.group(1).lower()
        m = _BSD_SUMS_LINE.fullmatch(line)
        if m and posixpath.basename(m.group(1).strip()) == name:
            return m.group(2).lower()
    return None


def sidecar_checksum(url: str, options: FetchOptions) -> Tuple[str, str]:
    """The expected SHA-256 from ``URL.sha256``, else from ``SHA256SUMS`` in the same directory.

    Returns (hex digest, URL it came from).
    """
    parts = urllib.parse.urlsplit(url)
    name = urllib.parse.unquote(posixpath.basename(parts.path))
    sidecar = urllib.parse.urlunsplit(parts._replace(path=parts.path + ".sha256", fragment=""))
    try:
        text = client.get_small(sidecar, options).decode("utf-8", errors="replace")
    except NotFound:
        pass
    else:
        words = text.split()
        digest = words[0].lower() if words else ""
        if not _DIGEST.fullmatch(digest):
            digest = parse_sums(text, name) or ""
        if not digest:
            raise ChecksumMissing(f"{sidecar}: no SHA-256 in it")
        return digest, sidecar
    sums = urllib.parse.urljoin(urllib.parse.urlunsplit(parts._replace(query="", fragment="")), "SHA256SUMS")
    try:
        text = client.get_small(sums, options).decode("utf-8", errors="replace")
    except NotFound as e:
        raise ChecksumMissing(f"{url}: verify=sidecar but neither {sidecar} nor {sums} exists") from e
    found = parse_sums(text, name)
    if found is None:
        raise ChecksumMissing(f"{sums}: no entry for {name}")
    return found, sums
