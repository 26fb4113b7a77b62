"""Compressed clusters: deflate and zstd, decoded exactly as QEMU does (block/qcow2-threads.c).

Both decoders write one cluster into the caller's buffer and must fill it exactly; anything else is a
CorruptImage for that cluster. Both release the GIL while decoding, so several threads decode in parallel.

Deflate goes through libdeflate (ctypes) when the system has ``libdeflate.so.0``, else through zlib; zlib
also decides every case libdeflate does not accept outright, so the choice changes speed, never results.

Runs inside the initramfs: standard library only (ctypes for libdeflate); ``zstandard`` is imported the first
time a zstd cluster is decoded, never for deflate images. Python >= 3.9.
"""

from __future__ import annotations

import os
import threading
import zlib
from typing import Any, Callable, Optional

from bootkit.errors import CorruptImage, UnsupportedFeature
from bootkit.qcow2.header import COMPRESSION_DEFLATE, COMPRESSION_ZSTD

Decoder = Callable[[bytes, memoryview], None]
"""Decodes one compressed cluster into ``out`` (exactly one cluster long), or raises CorruptImage."""

# QEMU compresses with deflateInit2(..., -12, ...): raw deflate, 4 KiB window. It inflates with
# inflateInit2(-12) but in a single inflate() call into the whole cluster buffer, and zlib checks a distance
# against the output of the call, not against the window size: a stream made with a 32 KiB window (other
# writers' default) reads fine in QEMU. Python's zlib inflates into 32 KiB blocks, one inflate() call each, so
# a 4 KiB window would refuse such a stream across a block; a 32 KiB window makes every distance valid exactly
# when it stays inside the cluster's output, as in QEMU.
DEFLATE_WBITS = -15

#: libdeflate's stable ABI (libdeflate0 on Debian/Ubuntu, libdeflate on RHEL/Fedora)
LIBDEFLATE_SONAME = "libdeflate.so.0"
_LIBDEFLATE_SUCCESS = 0


class _LibDeflate:
    """One thread's libdeflate decompressor: whole-buffer raw inflate through ctypes, twice zlib's speed.

    libdeflate decodes into the cluster buffer in one call, as QEMU's inflate() does, and ctypes releases the
    GIL around it. Only its clear success is taken: a stream that ends having produced exactly one cluster.
    Anything else (a stream longer than the cluster, one cut short, bad data) is decided by zlib, which QEMU
    uses, so the two can differ in speed only.
    """

    def __init__(self, fn: Any, alloc: Any, free: Any) -> None:
        import ctypes

        self._ctypes = ctypes
        self._fn = fn
        self._free = free
        self._handle = alloc()
        if not self._handle:
            raise MemoryError("libdeflate_alloc_decompressor")
        self._in = ctypes.c_size_t()
        self._out = ctypes.c_size_t()
        self._in_ref = ctypes.byref(self._in)
        self._out_ref = ctypes.byref(self._out)

    def __del__(self) -> None:
        if getattr(self, "_handle", None):
            self._free(self._handle)
            self._handle = None

    def __call__(self, data: bytes, out: memoryview) -> bool:
        n = len(out)
        dst = (self._ctypes.c_char * n).from_buffer(out)
        rc = self._fn(self._handle, data, len(data), dst, n, self._in_ref, self._out_ref)
        return bool(rc == _LIBDEFLATE_SUCCESS and self._out.value == n)


_libdeflate_lock = threading.Lock()
_libdeflate_api: Any = None  # (decompress_ex, alloc, free) once loaded; False when not available
_libdeflate_local = threading.local()


def load_libdeflate() -> bool:
    """Load libdeflate if the system has it (once; ``BOOTKIT_INFLATE=zlib`` forbids it); True when in use.

    Called by the first deflate decode, and up front by a server that must not open files later.
    """
    global _libdeflate_api
    with _libdeflate_lock:
        if _libdeflate_api is None:
            _libdeflate_api = False
            if os.environ.get("BOOTKIT_INFLATE", "auto") != "zlib":
                try:
                    import ctypes

                    lib = ctypes.CDLL(LIBDEFLATE_SONAME)
                    fn = lib.libdeflate_deflate_decompress_ex
                    fn.restype = ctypes.c_int
                    size_p = ctypes.POINTER(ctypes.c_size_t)
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p,
                                   ctypes.c_size_t, size_p, size_p]
                    alloc = lib.libdeflate_alloc_decompressor
                    alloc.restype = ctypes.c_void_p
                    alloc.argtypes = []
                    free = lib.libdeflate_free_decompressor
                    free.restype = None
                    free.argtypes = [ctypes.c_void_p]
                    _libdeflate_api = (fn, alloc, free)
                except (OSError, AttributeError, ImportError):
                    pass
    return _libdeflate_api is not False


def inflater() -> str:
    """Which deflate decoder clusters go through: "libdeflate" or "zlib"."""
    return "libdeflate" if load_libdeflate() else "zlib"


def _thread_libdeflate() -> Optional[_LibDeflate]:
    if _libdeflate_api is None:
        load_libdeflate()
    if not _libdeflate_api:
        return None
    d: Optional[_LibDeflate] = getattr(_libdeflate_local, "d", None)
    if d is None:
        d = _libdeflate_local.d = _LibDeflate(*_libdeflate_api)
    return d


def inflate_cluster(data: bytes, out: memoryview) -> None:
    """qcow2_zlib_decompress: success iff the output buffer is exactly filled.

    QEMU tolerates Z_BUF_ERROR because the compressed length is only known to the sector: trailing bytes
    after the stream, or a stream longer than the cluster, are fine as long as one full cluster comes out.
    """
    fast = _thread_libdeflate()
    if fast is not None and fast(data if type(data) is bytes else bytes(data), out):
        return
    cluster_size = len(out)
    d = zlib.decompressobj(DEFLATE_WBITS)
    try:
        got = d.decompress(data, cluster_size)
        if len(got) == cluster_size and not d.eof:
            # QEMU's inflate() does not stop when the buffer is full: it goes on reading the stream (block
            # ends, block headers, code tables) until it would write a byte, and an error there fails the
            # cluster. Python's stops at max_length; asking for one more byte reads exactly that far.
            d.decompress(d.unconsumed_tail, 1)
    except zlib.error as e:
        raise CorruptImage(f"deflate error: {e}") from None
    if len(got) != cluster_size:
        raise CorruptImage(f"deflate stream ends after {len(got)} of {cluster_size} bytes")
    out[:] = got


# --- zstd ---------------------------------------------------------------------------------------------------

ZSTD_MAGIC = 0xFD2FB528
ZSTD_SKIPPABLE_MASK = 0xFFFFFFF0
ZSTD_SKIPPABLE_MAGIC = 0x184D2A50
ZSTD_CONTENTSIZE_UNKNOWN = (1 << 64) - 1

_zstd_module: Any = None
_zstd_local = threading.local()


def _zstd() -> Any:
    global _zstd_module
    if _zstd_module is None:
        try:
            import zstandard
        except ImportError:
            raise UnsupportedFeature("zstd-compressed image, but the 'zstandard' module is not installed") from None
        _zstd_module = zstandard
    return _zstd_module


def _decompressor() -> Any:
    # ZstdDecompressor objects are not thread-safe: one per thread.
    d = getattr(_zstd_local, "d", None)
    if d is None:
        d = _zstd_local.d = _zstd().ZstdDecompressor()
    return d


def zstd_frame_size(data: bytes, pos: int) -> int:
    """Compressed length of the zstd frame starting at ``pos`` (RFC 8878 §3.1), without decoding it."""
    end = len(data)
    if pos + 4 > end:
        raise CorruptImage("zstd: truncated frame magic")
    magic = int.from_bytes(data[pos : pos + 4], "little")
    if magic & ZSTD_SKIPPABLE_MASK == ZSTD_SKIPPABLE_MAGIC:
        if pos + 8 > end:
            raise CorruptImage("zstd: truncated skippable frame")
        return 8 + int.from_bytes(data[pos + 4 : pos + 8], "little")
    if magic != ZSTD_MAGIC:
        raise CorruptImage(f"zstd: bad frame magic {magic:#010x}")
    if pos + 5 > end:
        raise CorruptImage("zstd: truncated frame header")
    descriptor = data[pos + 4]
    fcs_flag = descriptor >> 6
    single_segment = (descriptor >> 5) & 1
    has_checksum = (descriptor >> 2) & 1
    dict_id_flag = descriptor & 3
    header = 1 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_id_flag]
    header += (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    p = pos + 4 + header
    while True:
        if p + 3 > end:
            raise CorruptImage("zstd: truncated block header")
        bh = int.from_bytes(data[p : p + 3], "little")
        last, btype, bsize = bh & 1, (bh >> 1) & 3, bh >> 3
        if btype == 3:
            raise CorruptImage("zstd: reserved block type")
        p += 3 + (1 if btype == 1 else bsize)
        if last:
            break
    p += 4 * has_checksum
    if p > end:
        raise CorruptImage("zstd: frame reaches past the compressed data")
    return p - pos


def zstd_cluster(data: bytes, dest: memoryview) -> None:
    """qcow2_zstd_decompress: decode frames until one cluster is produced; the last frame must end there.

    QEMU streams ``ZSTD_decompressStream`` into a cluster-sized buffer, across frames, and fails when the last
    frame is not finished once the buffer is full (``zstd_ret > 0``): a frame that would produce more than a
    cluster is corrupt. Trailing bytes after the last needed frame are normal (sector padding). The output is
    bounded by the cluster size whatever the frame header claims (decompression bombs).
    """
    zstd = _zstd()
    cluster_size = len(dest)
    out = b""
    pos = 0
    try:
        while len(out) < cluster_size:
            want = cluster_size - len(out)
            if pos >= len(data):
                raise CorruptImage(f"zstd data ends after {len(out)} of {cluster_size} bytes")
            size = zstd_frame_size(data, pos)
            frame = data[pos : pos + size]
            pos += size
            if int.from_bytes(frame[:4], "little") & ZSTD_SKIPPABLE_MASK == ZSTD_SKIPPABLE_MAGIC:
                continue
            content = zstd.get_frame_parameters(frame).content_size
            if content != ZSTD_CONTENTSIZE_UNKNOWN and content > want:
                raise CorruptImage(f"zstd frame of {content} bytes overflows the cluster")
            if content == ZSTD_CONTENTSIZE_UNKNOWN:
                piece = _decompressor().decompress(frame, max_output_size=want)
            else:
                piece = _decompressor().decompress(frame)
            # An empty frame is not an error: QEMU's loop counts consumed input as progress and goes on to
            # the next frame (it fails only when neither input nor output moves, i.e. the data ran out, which
            # is the check at the top of this loop). Every frame advances ``pos``, so the loop ends.
            if piece:
                out = piece if not out else out + piece
    except zstd.ZstdError as e:
        raise CorruptImage(f"zstd error: {e}") from None
    if len(out) != cluster_size:
        raise CorruptImage(f"zstd stream produced {len(out)} bytes, expected {cluster_size}")
    dest[:] = out


def decoder_for(compression_type: int) -> Optional[Decoder]:
    if compression_type == COMPRESSION_DEFLATE:
        return inflate_cluster
    if compression_type == COMPRESSION_ZSTD:
        return zstd_cluster
    return None
