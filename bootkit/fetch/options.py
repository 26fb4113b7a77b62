"""How one fetch behaves: verification, retries, time limits, TLS, RAM reserve, progress.

Built once (from argv in ``bootkit fetch``, from the kernel command line at boot) and passed down.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

from typing import Optional

from bootkit.boot.cmdline import HEX64, VERIFY_MODES
from bootkit.errors import UsageError

# the command-line contract owns what a hash and a verification mode are; `bootkit fetch` takes the same
from bootkit.record import record


@record
class FetchOptions:
    """Settings of a download (ram mode) or of an HTTP byte source (lazy mode).

    ``verify``: ``pinned`` checks against ``sha256`` (required then), ``sidecar`` against ``IMAGE.sha256`` or
    ``SHA256SUMS`` next to the image, ``none`` checks nothing. Lazy mode verifies chunks with a ``Manifest``
    instead and ignores ``sha256``.

    ``retries`` bounds the consecutive failed attempts that made no progress (an attempt that delivered bytes
    resets the count), ``total_timeout`` bounds the whole fetch; ``timeout`` applies to each connect and read.
    ``reserve_bytes`` is the RAM that must stay free after a download into a RAM-backed filesystem (dracut's
    ``rd.minmem``).
    """

    sha256: Optional[str] = None
    verify: str = "pinned"
    retries: int = 5
    timeout: float = 30.0
    total_timeout: float = 3600.0
    cacert: Optional[str] = None
    insecure: bool = False
    reserve_bytes: int = 256 << 20
    progress_interval: float = 5.0
    #: first delay between attempts; doubled after each failure up to ``retry_delay_max`` (with jitter)
    retry_delay: float = 1.0
    retry_delay_max: float = 30.0

    def __post_init__(self) -> None:
        if self.verify not in VERIFY_MODES:
            raise UsageError(f"verify={self.verify!r}: must be one of {', '.join(VERIFY_MODES)}")
        if self.sha256 is not None:
            digest = self.sha256.strip().lower()
            if not HEX64.fullmatch(digest):
                raise UsageError(f"sha256={self.sha256!r}: not 64 hexadecimal digits")
            object.__setattr__(self, "sha256", digest)
            if self.verify != "pinned":
                raise UsageError(f"sha256 is given but verify={self.verify}: pin a hash or choose a mode, not both")
        elif self.verify == "pinned":
            raise UsageError("verify=pinned needs sha256 (or choose verify=sidecar / verify=none)")
        if self.retries < 0:
            raise UsageError(f"retries={self.retries}: must be >= 0")
        for name in ("timeout", "total_timeout", "progress_interval", "retry_delay", "retry_delay_max"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name}={getattr(self, name)}: must be > 0")
        if self.reserve_bytes < 0:
            raise UsageError(f"reserve_bytes={self.reserve_bytes}: must be >= 0")
