"""What an HTTP response says about byte ranges and file versions: ``Content-Range`` and ``If-Range``.

Both modes rely on these: ram mode to resume a broken download without splicing two versions of a file,
lazy mode to check that each range answer is the range asked for, of the file it opened.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Tuple

from bootkit.fetch.errors import TransientError

# 20 digits hold any 64-bit size; more is hostile (and int() of over 4300 digits raises ValueError)
_CONTENT_RANGE = re.compile(r"bytes\s+(?:([0-9]{1,20})-([0-9]{1,20})|\*)/([0-9]{1,20}|\*)", re.ASCII)
_CONTENT_LENGTH = re.compile(r"[0-9]{1,20}", re.ASCII)


def if_range_validator(response: Any) -> Optional[str]:
    """What ``If-Range`` can send: a strong ETag, else Last-Modified (None if the server gives neither)."""
    etag: Optional[str] = response.getheader("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    modified: Optional[str] = response.getheader("Last-Modified")
    return modified


def content_range(response: Any) -> Tuple[Optional[int], Optional[int]]:
    """(first byte, total size) from a Content-Range header; None where the server says ``*`` or nothing."""
    first, _, total = content_span(response)
    return first, total


def content_span(response: Any) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """(first byte, last byte, total size) from a Content-Range header; None where it says ``*`` or nothing."""
    m = _CONTENT_RANGE.fullmatch((response.getheader("Content-Range") or "").strip())
    if not m:
        return None, None, None
    first = int(m.group(1)) if m.group(1) is not None else None
    last = int(m.group(2)) if m.group(2) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return first, last, total


def check_range_length(response: Any, url: str, first: int, last: int) -> None:
    """Check that a 206 answer to ``bytes=first-last`` announces exactly that many bytes.

    Content-Range must end at ``last`` and Content-Length, when sent, must be the range's length: a server
    that announces more than was asked for is not read at all (lazy mode holds every chunk in RAM).
    Raises TransientError naming the URL and the numbers.
    """
    length = last - first + 1
    _, got_last, _ = content_span(response)
    if got_last != last:
        raise TransientError(
            f"{url}: asked for bytes {first}-{last} ({length} bytes), the server sent Content-Range"
            f" {shown_header(response.getheader('Content-Range'))}"
        )
    announced = response.getheader("Content-Length")
    if announced is not None and not (
        _CONTENT_LENGTH.fullmatch(announced.strip()) and int(announced.strip()) == length
    ):
        raise TransientError(
            f"{url}: asked for bytes {first}-{last} ({length} bytes), the server announced Content-Length"
            f" {shown_header(announced)}"
        )


def read_range(response: Any, url: str, length: int) -> bytes:
    """The body of a range answer: exactly ``length`` bytes, never more read from the socket (plus one byte
    to see that nothing follows, when the body's end is not announced). Raises TransientError otherwise."""
    data: bytes = response.read(length)
    if len(data) != length:
        raise TransientError(f"{url}: got {len(data)} bytes for a range of {length}")
    if not response.isclosed() and response.read(1):
        # chunked or close-delimited: the server went on past the range
        raise TransientError(f"{url}: the server sent more than the {length} bytes asked for")
    return data


def shown_header(value: Optional[str]) -> str:
    """A header value from the network, fit for a one-line message: printable ASCII, at most 60 characters."""
    if value is None:
        return "(none)"
    text = "".join(c if " " <= c <= "~" else "?" for c in value[:60])
    return repr(text + ("..." if len(value) > 60 else ""))
