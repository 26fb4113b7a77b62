"""The one exception hierarchy of bootkit.

Library code raises these with the field, offset, URL or option at fault in the message. Only the edges
turn them into something else: ``cli.py`` into ``error: ...`` and an exit status, the NBD server into NBD
error replies, the boot code into one console line.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations


class BootkitError(Exception):
    """Base of every error bootkit raises on purpose."""

    #: exit status the CLI uses for this kind of error (2: bad input, 1: runtime failure)
    exit_status = 1


class UsageError(BootkitError):
    """A command line or option that cannot be acted on."""

    exit_status = 2


class ConfigError(BootkitError):
    """A configuration file or kernel command line that is invalid."""

    exit_status = 2


class ImageError(BootkitError):
    """Something is wrong with a disk image."""

    exit_status = 2


class InvalidImage(ImageError):
    """The image is not a valid QCOW2 image (bad header, tables out of bounds, ...)."""


class UnsupportedFeature(ImageError):
    """A valid image that uses a feature bootkit does not implement (encryption, unknown bits, ...)."""


class CorruptImage(ImageError):
    """Valid header, but a table entry or compressed cluster is broken; raised at read time.

    The NBD server answers EIO for the request that hit it and keeps serving.
    """

    exit_status = 1


class FetchError(BootkitError):
    """Downloading or verifying an image over HTTP(S) failed."""


class NBDError(BootkitError):
    """The NBD server or the kernel attach failed."""
