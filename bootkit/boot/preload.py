"""Everything the boot code and the NBD server it leaves behind can ever import, imported up front.

After switch_root the server's own root directory is empty: a lazy ``import`` there fails with
``ModuleNotFoundError`` (measured; docs/initramfs.md, "After the root switch"). So the boot code imports this
whole list before it does anything, error and logging paths included; a ``bootkit serve-nbd|attach --daemon``
imports it before it locks its memory; and ``bootkit build-initrd`` imports the same list on the host to learn
which files to put into the initramfs: one list, three uses. tests/test_nbd_daemon.py checks that it names
every module of bootkit's initramfs side.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import importlib
from typing import List, Tuple

#: bootkit's own runtime modules (never the CLI, templates or host-side builders)
BOOTKIT_MODULES: Tuple[str, ...] = (
    "bootkit",
    "bootkit.boot",
    "bootkit.boot.preload",
    "bootkit.errors",
    "bootkit.log",
    "bootkit.record",
    "bootkit.source",
    "bootkit.run",
    "bootkit.daemon",
    "bootkit.boot.cmdline",
    "bootkit.boot.loaderargs",
    "bootkit.boot.urlhost",
    "bootkit.boot.partitions",
    "bootkit.boot.status",
    "bootkit.boot.stages",
    "bootkit.boot.images",
    "bootkit.boot.ed25519",
    "bootkit.boot.channel",
    "bootkit.boot.channelcache",
    "bootkit.boot.mount",
    "bootkit.boot.netinfo",
    "bootkit.boot.serve",
    "bootkit.boot.report",
    "bootkit.boot.cacheopts",
    "bootkit.boot.cachedev",
    "bootkit.qcow2",
    "bootkit.qcow2.chain",
    "bootkit.qcow2.compress",
    "bootkit.qcow2.header",
    "bootkit.qcow2.image",
    "bootkit.qcow2.snapshot",
    "bootkit.nbd",
    "bootkit.nbd.protocol",
    "bootkit.nbd.receiver",
    "bootkit.nbd.budget",
    "bootkit.nbd.handshake",
    "bootkit.nbd.replies",
    "bootkit.nbd.scheduler",
    "bootkit.nbd.server",
    "bootkit.nbd.transport",
    "bootkit.nbd.kernel",
    "bootkit.fetch",
    "bootkit.fetch.client",
    "bootkit.fetch.http1",
    "bootkit.fetch.download",
    "bootkit.fetch.errors",
    "bootkit.fetch.lazy",
    "bootkit.fetch.manifest",
    "bootkit.fetch.mirrors",
    "bootkit.fetch.options",
    "bootkit.fetch.progress",
    "bootkit.fetch.room",
    "bootkit.fetch.checksums",
    "bootkit.fetch.ranges",
    "bootkit.fetch.rangeclient",
    "bootkit.fetch.stream",
    "bootkit.fetch.deferred",
    "bootkit.fetch.diskcache",
    "bootkit.boot.main",
)

#: initramfs-side modules that nothing at boot or in a serving daemon imports: the host's ``bootkit check``,
#: ``bootkit convert`` and ``bootkit compress`` (the writer, its layout and encoders) beside the reader
NOT_PRELOADED: Tuple[str, ...] = (
    "bootkit.qcow2.check",
    "bootkit.qcow2.convert",
    "bootkit.qcow2.encode",
    "bootkit.qcow2.layout",
    "bootkit.qcow2.writer",
)

#: initramfs-side modules that run as processes of their own before the boot code starts (the UEFI boot-NIC
#: helper, ``bootkit-efi-bootif``): not preloaded, but ``build-initrd`` puts what they import into the image
OWN_PROCESS: Tuple[str, ...] = ("bootkit.boot.efiboot",)

#: standard library modules used lazily somewhere on the boot, serve, error or log paths
STDLIB_MODULES: Tuple[str, ...] = (
    "base64",
    "binascii",
    "codecs",
    "concurrent.futures",
    "concurrent.futures.thread",
    "ctypes",
    "encodings.ascii",
    "encodings.idna",
    "encodings.latin_1",
    "encodings.utf_8",
    "errno",
    "fcntl",
    "hashlib",
    "json",
    "logging",
    "mmap",
    "os",
    "queue",
    "resource",
    "select",
    "selectors",
    "signal",
    "socket",
    "stat",
    "struct",
    "subprocess",
    "threading",
    "time",
    "traceback",
    "urllib.parse",
    "zlib",
)

#: TLS (https URLs): imported up front only when a connection may come after the root switch
TLS_MODULES: Tuple[str, ...] = ("ssl",)

#: third-party modules: zstandard decodes zstd-compressed clusters when the system's libzstd is missing
EXTRA_MODULES: Tuple[str, ...] = ("zstandard",)


def preload(*, strict: bool = True, fallbacks: bool = True, tls: bool = True) -> List[str]:
    """Import every module the runtime may need; returns the names that could not be imported.

    ``strict`` raises on the first missing module (the boot code: a missing module must fail now, not after
    the root switch); non-strict is for ``build-initrd`` while parts of bootkit are still missing, and for a
    ``--daemon`` on a host without zstandard. ``fallbacks=False`` (the boot code) imports a module that stands
    in for a C library (``zstandard`` for libzstd) only when that library is missing: loading it costs the
    boot a tenth of a second of an emulated CPU for a decoder it would never call. ``tls=False`` (the boot
    code, when nothing reaches the network after the root switch) leaves ``ssl`` to the first HTTPS
    connection, which imports it from the initramfs like any other module before the switch.
    """
    missing: List[str] = []

    def load(names: Tuple[str, ...]) -> None:
        for name in names:
            try:
                importlib.import_module(name)
            except ImportError:
                if strict:
                    raise
                missing.append(name)

    load(STDLIB_MODULES)
    if tls:
        load(TLS_MODULES)
    # libdeflate and libzstd (shared libraries the reader uses through ctypes when present): opened now
    from bootkit.qcow2 import compress

    compress.preload()
    if fallbacks or not compress.LIBZSTD.load():
        load(EXTRA_MODULES)
    load(BOOTKIT_MODULES)
    # traceback formats exceptions lazily through linecache and its tokenizer
    import linecache  # noqa: F401
    import tokenize  # noqa: F401

    return missing
