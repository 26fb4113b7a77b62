"""Fetch images over HTTP(S): whole into RAM (``download``) or lazily by range (``HTTPSource``).

Ram mode streams the image to a file under a tmpfs with a RAM check, progress lines, retries with resume
(``Range`` + ``If-Range``) and SHA-256 verification (pinned or sidecar) before the file gets its name. Lazy
mode is a byte source for the QCOW2 reader backed by range requests, verified chunk by chunk against a
``Manifest`` whose own hash the boot configuration pins, with an optional background fill to a local copy.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

from bootkit.errors import FetchError
from bootkit.fetch.download import DownloadResult, download
from bootkit.fetch.errors import (
    ChecksumMismatch,
    ChecksumMissing,
    ChunkError,
    FetchTimeout,
    GaveUp,
    HTTPStatusError,
    NotEnoughSpace,
    NotFound,
    RedirectError,
    RemoteChanged,
    SizeMismatch,
    TLSError,
    TransientError,
)
from bootkit.fetch.lazy import HTTPSource
from bootkit.fetch.manifest import Manifest
from bootkit.fetch.options import FetchOptions

__all__ = [
    "ChecksumMismatch",
    "ChecksumMissing",
    "ChunkError",
    "DownloadResult",
    "FetchError",
    "FetchOptions",
    "FetchTimeout",
    "GaveUp",
    "HTTPSource",
    "HTTPStatusError",
    "Manifest",
    "NotEnoughSpace",
    "NotFound",
    "RedirectError",
    "RemoteChanged",
    "SizeMismatch",
    "TLSError",
    "TransientError",
    "download",
]
