"""What an HTTP response says about byte ranges and file versions: ``Content-Range`` and ``If-Range``.

Both modes rely on these: ram mode to resume a broken download without splicing two versions of a file,
lazy mode to check that each range answer is the range asked for, of the file it opened.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Tuple

_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def if_range_validator(response: Any) -> Optional[str]:
    """What ``If-Range`` can send: a strong ETag, else Last-Modified (None if the server gives neither)."""
    etag: Optional[str] = response.getheader("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    modified: Optional[str] = response.getheader("Last-Modified")
    return modified


def content_range(response: Any) -> Tuple[Optional[int], Optional[int]]:
    """(first byte, total size) from a Content-Range header; None where the server says ``*`` or nothing."""
    m = _CONTENT_RANGE.fullmatch((response.getheader("Content-Range") or "").strip())
    if not m:
        return None, None
    first = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return first, total
