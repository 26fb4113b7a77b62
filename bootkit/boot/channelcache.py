"""What a signed channel keeps in the local chunk cache (``rd.qcow2.cache=``): the highest version this
machine booted (rollback protection across power cycles) and the last verified channel file with its
signature, so that a machine whose image server is unreachable boots the last channel it verified.

Nothing here is trusted because it is on the disk: the stored channel is verified again (signature, name,
version, validity) exactly like one fetched from the server; the only difference is a grace period after its
expiry (:data:`OFFLINE_GRACE`), which the console states. A stored version is the disk's word: whoever can
write the cache disk can remove it, so ``rd.qcow2.channel.min-version=`` stays the rollback floor that no
disk can lower.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional, Tuple

from bootkit.boot.channel import VersionStore

#: how long after its expiry a channel kept in the local cache still boots a machine whose image server is
#: unreachable (an offline classroom over a long weekend); a reachable server's channel gets no grace
OFFLINE_GRACE = 7 * 86400
#: with a verified channel in the cache, how long the boot tries the server before it uses that copy: one
#: attempt, with this connect/read timeout (seconds)
OFFLINE_WAIT = 5.0


def _key(channel: str) -> str:
    """A metadata name for ``channel`` (the cache's names are lower case; channel names are not)."""
    return "channel-" + hashlib.sha256(channel.encode("utf-8")).hexdigest()[:32]


class CacheVersionStore(VersionStore):
    """The highest version of each channel, as a metadata blob of the local cache."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def where(self) -> str:
        return f"the local cache {self.cache.where}"

    def highest(self, channel: str) -> Optional[int]:
        data = self.cache.get_meta(_key(channel) + ".version")
        if data is None:
            return None
        text = data.decode("ascii", "replace").strip()
        return int(text) if text.isdigit() and len(text) <= 16 else None

    def remember(self, channel: str, version: int) -> None:
        self.cache.put_meta(_key(channel) + ".version", f"{version}\n".encode("ascii"))


class ChannelCopy:
    """The last verified channel file and signature for the channel ``name``, kept in ``cache``."""

    def __init__(self, cache: Any, name: str) -> None:
        self.cache = cache
        self.name = name

    def load(self) -> Optional[Tuple[bytes, bytes]]:
        """(channel file, signature), or None when the cache holds no copy."""
        data = self.cache.get_meta(_key(self.name) + ".json")
        signature = self.cache.get_meta(_key(self.name) + ".sig")
        if data is None or signature is None:
            return None
        return data, signature

    def save(self, data: bytes, signature: bytes) -> None:
        self.cache.put_meta(_key(self.name) + ".json", data)
        self.cache.put_meta(_key(self.name) + ".sig", signature)
