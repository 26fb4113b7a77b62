"""Compressing clusters for bootkit's QCOW2 writer (``bootkit.qcow2.writer``): deflate and zstd, as QEMU
writes them (block/qcow2-threads.c), through the same C libraries the decoders use.

A compressed cluster must be smaller than the cluster, or QEMU stores the cluster as it is: each encoder
returns None then. Deflate goes through libdeflate when present (raw deflate), else zlib; zstd through
libzstd (one frame carrying its content size), else the ``zstandard`` module. The C calls release the GIL, so
the writer's threads compress in parallel.

Host use only (``bootkit compress``), but standard library and ctypes like the rest of ``bootkit.qcow2``.
"""

from __future__ import annotations

import threading
import zlib
from typing import Any, Callable, Dict, Optional, Tuple

from bootkit.errors import UnsupportedFeature, UsageError
from bootkit.qcow2.compress import DEFLATE_WBITS, _Library, _zstd
from bootkit.qcow2.header import COMPRESSION_DEFLATE, COMPRESSION_ZSTD


class Buffer:
    """A bytearray the C encoders read or write by address: exported through a ctypes view once, when it is
    made (it can never be resized then), so no view is made per cluster (one per call cost as much as 3% of
    the compression time). The writer makes a few and reuses them chunk after chunk."""

    __slots__ = ("_view", "address", "data")

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.address = 0
        self._view: Any = None
        if size:
            import ctypes

            self._view = (ctypes.c_char * size).from_buffer(self.data)
            self.address = ctypes.addressof(self._view)


Encoder = Callable[[Buffer, int, int, Buffer, int], int]
"""``encode(src, start, n, dst, at)`` compresses one cluster, ``src.data[start:start + n]``, into
``dst.data[at:at + n - 1]`` and returns the compressed size; 0 when the result would not be smaller than the
cluster (QEMU's rule: then the cluster is stored as it is). Compressing straight into the writer's output
buffer spares a bytes object and a copy per cluster. Safe to call from any thread: each thread gets its own
compressor state."""

#: QEMU's zlib level: deflateInit2(Z_DEFAULT_COMPRESSION)
DEFAULT_DEFLATE_LEVEL = 6
#: QEMU compresses with zstd's default level, 3. Level 2 takes a third less CPU time for 1.5% more bytes
#: (an ext4 of /usr in 64 KiB clusters, bench/writer.py): within the 2% the project allows, so it is ours.
DEFAULT_ZSTD_LEVEL = 2
#: libdeflate's level 2 makes smaller clusters than QEMU's zlib at level 6 with its 4 KiB window (4% on an
#: ext4 of /usr in 64 KiB clusters) in a third of the time (bench/writer.py)
DEFAULT_LIBDEFLATE_LEVEL = 2
#: ZSTD_c_compressionLevel (zstd.h, stable API)
ZSTD_C_COMPRESSION_LEVEL = 100


def _bind_libdeflate_encoder(ctypes: Any, soname: str) -> Tuple[Any, Any, Any]:
    lib = ctypes.CDLL(soname)  # CDLL: the compress call releases the GIL
    fn = lib.libdeflate_deflate_compress
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
    alloc = lib.libdeflate_alloc_compressor
    alloc.restype = ctypes.c_void_p
    alloc.argtypes = [ctypes.c_int]
    free = lib.libdeflate_free_compressor
    free.restype = None
    free.argtypes = [ctypes.c_void_p]
    return fn, alloc, free


class _Contexts:
    """One thread's compressor contexts, by level (contexts are never shared between threads); freed when
    the thread ends and its thread-local state goes."""

    def __init__(self, api: Any, free: Callable[[Any], Any]) -> None:
        self.api = api
        self.by_level: Dict[int, Any] = {}
        self._free = free

    def __del__(self) -> None:
        for handle in self.by_level.values():
            self._free(handle)
        self.by_level.clear()


#: libdeflate's compressor; BOOTKIT_DEFLATE=zlib turns it off (then zlib compresses: other bytes, same format)
LIBDEFLATE_ENCODER = _Library(
    "libdeflate.so.0", "BOOTKIT_DEFLATE", "zlib", _bind_libdeflate_encoder, lambda api: _Contexts(api, api[2])
)


def _bind_libzstd_encoder(ctypes: Any, soname: str) -> Any:
    c_size_t, c_void_p = ctypes.c_size_t, ctypes.c_void_p
    lib = ctypes.PyDLL(soname)  # quick calls keep the GIL (see _bind_libzstd); compressing releases it
    compress = ctypes.CDLL(soname).ZSTD_compress2
    compress.restype = c_size_t
    compress.argtypes = [c_void_p, c_void_p, c_size_t, c_void_p, c_size_t]
    for name, restype, argtypes in (
        ("ZSTD_createCCtx", c_void_p, []),
        ("ZSTD_freeCCtx", c_size_t, [c_void_p]),
        ("ZSTD_CCtx_setParameter", c_size_t, [c_void_p, ctypes.c_int, ctypes.c_int]),
        ("ZSTD_isError", ctypes.c_uint, [c_size_t]),
        ("ZSTD_getErrorName", ctypes.c_char_p, [c_size_t]),
        ("ZSTD_minCLevel", ctypes.c_int, []),
        ("ZSTD_maxCLevel", ctypes.c_int, []),
    ):
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    lib.compress2 = compress
    return lib


#: the system's libzstd for compressing; BOOTKIT_ZSTD=zstandard turns it off (as for decoding)
LIBZSTD_ENCODER = _Library(
    "libzstd.so.1", "BOOTKIT_ZSTD", "zstandard", _bind_libzstd_encoder, lambda api: _Contexts(api, api.ZSTD_freeCCtx)
)


def _put(data: bytes, n: int, dst: Buffer, at: int) -> int:
    """A Python encoder's result into ``dst`` at ``at``: its size, or 0 when it is not smaller than ``n``."""
    if len(data) >= n:
        return 0
    dst.data[at : at + len(data)] = data
    return len(data)


def _libdeflate_encoder(level: int) -> Encoder:
    if not 0 <= level <= 12:
        raise UsageError(f"deflate level {level} is out of range (libdeflate: 0..12)")

    def encode(src: Buffer, start: int, n: int, dst: Buffer, at: int) -> int:
        st: _Contexts = LIBDEFLATE_ENCODER.state()
        fn, alloc, _free = st.api
        handle = st.by_level.get(level)
        if handle is None:
            handle = st.by_level[level] = alloc(level)
            if not handle:
                raise MemoryError("libdeflate_alloc_compressor")
        # libdeflate returns 0 when the result does not fit: QEMU's rule, a compressed cluster is smaller
        # than the cluster (block/qcow2.c: qcow2_co_compress(..., s->cluster_size - 1, ...))
        size: int = fn(handle, src.address + start, n, dst.address + at, n - 1)
        return size

    return encode


def _zlib_encoder(level: int) -> Encoder:
    if not -1 <= level <= 9:
        raise UsageError(f"deflate level {level} is out of range (zlib: 0..9)")

    def encode(src: Buffer, start: int, n: int, dst: Buffer, at: int) -> int:
        # raw deflate; a 32 KiB window, wider than QEMU's 4 KiB, is read by QEMU all the same: every distance
        # stays inside the one cluster that QEMU inflates in a single call (see DEFLATE_WBITS)
        c = zlib.compressobj(level, zlib.DEFLATED, DEFLATE_WBITS)
        return _put(c.compress(memoryview(src.data)[start : start + n]) + c.flush(), n, dst, at)

    return encode


def _libzstd_encoder(level: int) -> Encoder:
    lib = LIBZSTD_ENCODER.api
    if not lib.ZSTD_minCLevel() <= level <= lib.ZSTD_maxCLevel():
        raise UsageError(f"zstd level {level} is out of range ({lib.ZSTD_minCLevel()}..{lib.ZSTD_maxCLevel()})")

    def encode(src: Buffer, start: int, n: int, dst: Buffer, at: int) -> int:
        st: _Contexts = LIBZSTD_ENCODER.state()
        cctx = st.by_level.get(level)
        if cctx is None:
            # one context per thread and level, its level set once and reused for every cluster (QEMU makes
            # one per cluster: slower, same bytes); ZSTD_compress2 keeps the parameters from call to call
            cctx = lib.ZSTD_createCCtx()
            if not cctx:
                raise MemoryError("ZSTD_createCCtx")
            st.by_level[level] = cctx
            if lib.ZSTD_isError(lib.ZSTD_CCtx_setParameter(cctx, ZSTD_C_COMPRESSION_LEVEL, level)):
                raise UsageError(f"zstd level {level}: refused by libzstd")
        # One frame with its content size, as QEMU's ZSTD_compressStream2(..., ZSTD_e_end) writes it: the same
        # parameters (level, and the source size known up front: the same bytes as ZSTD_compressCCtx). Too
        # big for n - 1 bytes is an error code.
        size: int = lib.compress2(cctx, dst.address + at, n - 1, src.address + start, n)
        # an error code ((size_t)-code, ZSTD_isError): no result of at most n - 1 bytes is one
        return size if size < n else 0

    return encode


def _zstandard_encoder(level: int) -> Encoder:
    zstd = _zstd()
    local = threading.local()

    def encode(src: Buffer, start: int, n: int, dst: Buffer, at: int) -> int:
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = zstd.ZstdCompressor(level=level, write_content_size=True)
        return _put(c.compress(memoryview(src.data)[start : start + n]), n, dst, at)

    return encode


def encoder_for(compression_type: int, level: Optional[int] = None) -> Encoder:
    """The cluster compressor of ``compression_type`` at ``level`` (None: the default level: zstd 2, libdeflate
    2, zlib 6; see DEFAULT_ZSTD_LEVEL and DEFAULT_LIBDEFLATE_LEVEL for how they compare with QEMU's).

    Deflate: libdeflate when the system has it, else zlib. Zstd: libzstd, else the ``zstandard`` module,
    else UnsupportedFeature naming the package to install.
    """
    if compression_type == COMPRESSION_DEFLATE:
        if LIBDEFLATE_ENCODER.load():
            return _libdeflate_encoder(DEFAULT_LIBDEFLATE_LEVEL if level is None else level)
        return _zlib_encoder(DEFAULT_DEFLATE_LEVEL if level is None else level)
    if compression_type == COMPRESSION_ZSTD:
        lvl = DEFAULT_ZSTD_LEVEL if level is None else level
        if LIBZSTD_ENCODER.load():
            return _libzstd_encoder(lvl)
        try:
            return _zstandard_encoder(lvl)
        except UnsupportedFeature:
            raise UnsupportedFeature(
                "zstd compression needs libzstd.so.1 (package libzstd1 on Debian/Ubuntu, libzstd on Fedora) "
                "or the Python module zstandard"
            ) from None
    raise UsageError(f"unknown compression type {compression_type}")


def encoder_name(compression_type: int) -> str:
    """Which library compresses clusters of ``compression_type``: libdeflate, zlib, libzstd or zstandard."""
    if compression_type == COMPRESSION_DEFLATE:
        return "libdeflate" if LIBDEFLATE_ENCODER.load() else "zlib"
    return "libzstd" if LIBZSTD_ENCODER.load() else "zstandard"


