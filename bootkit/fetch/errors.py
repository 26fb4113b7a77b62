"""The ways a fetch can fail, each with its own one-line message naming the URL and the cause.

All are ``bootkit.errors.FetchError``; ``TransientError`` is the one kind the retry loop retries.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

from bootkit.errors import FetchError


class TransientError(FetchError):
    """A failure worth retrying: connection refused/reset/dropped, timeout, HTTP 5xx, 408, 429."""


class NotFound(FetchError):
    """HTTP 404 or 410: the URL names nothing on the server."""


class HTTPStatusError(FetchError):
    """Any other HTTP status that is not a success (401, 403, 400, ...)."""


class TLSError(FetchError):
    """The server's certificate could not be verified (unknown CA, wrong host name, expired)."""


class RedirectError(FetchError):
    """A redirect loop, too many redirects, or a redirect without a usable Location."""


class SizeMismatch(FetchError):
    """The server announced one size and delivered another."""


class ChecksumMismatch(FetchError):
    """The SHA-256 of the downloaded bytes is not the expected one; the file was deleted."""


class ChecksumMissing(FetchError):
    """verify=sidecar, but neither ``IMAGE.sha256`` nor a ``SHA256SUMS`` entry for the image exists."""


class NotEnoughSpace(FetchError):
    """The image does not fit in the RAM (minus the reserve) or the free space of the target filesystem."""


class FetchTimeout(FetchError):
    """The total time limit for one fetch ran out."""


class GaveUp(FetchError):
    """The retry limit was reached; the message carries the last cause."""


class RemoteChanged(FetchError):
    """The file on the server changed (ETag, size) after a lazy image was opened, or kept changing during a
    download (more than a few restarts from zero)."""


class ChunkError(FetchError):
    """Lazy mode: a chunk did not match the manifest, even after fetching it again. Never served."""
