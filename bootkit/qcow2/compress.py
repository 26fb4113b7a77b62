"""Compressed clusters: deflate and zstd, decoded exactly as QEMU does (block/qcow2-threads.c).

Both decoders write one cluster into the caller's buffer and must fill it exactly; anything else is a
CorruptImage for that cluster. Both release the GIL while decoding, so several threads decode in parallel.

Deflate goes through libdeflate (ctypes) when the system has ``libdeflate.so.0``, else through zlib; zlib
also decides every case libdeflate does not accept outright, so the choice changes speed, never results.
Zstd frames are found and bounded here, then decoded by the system's libzstd (ctypes) straight into the
cluster, or by the ``zstandard`` module when libzstd is missing: the same checks either way.

Runs inside the initramfs: standard library only (ctypes for the C libraries); ``zstandard`` is imported
only when a zstd cluster is decoded without libzstd, never for deflate images. Python >= 3.9.
"""

from __future__ import annotations

import os
import threading
import zlib
from typing import Any, Callable, Optional, Tuple

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

class _Library:
    """A system C library a decoder uses through ctypes when it is there (and not turned off by ``env``).

    Loaded once, by the first thread that asks, or up front by ``preload()`` (a server that must not open
    files after the root switch). ``api`` is what ``bind`` made of it, False when unavailable. Each thread
    keeps its own decoder state (``state()``): neither library's contexts may be shared between threads.
    """

    def __init__(self, soname: str, env: str, off: str, bind: Callable[[Any, Any], Any],
                 state: Callable[[Any], Any]) -> None:
        self.soname = soname
        self._env = env
        self._off = off
        self._bind = bind
        self._make_state = state
        self.api: Any = None
        self._lock = threading.Lock()
        self._local = threading.local()

    def load(self) -> bool:
        with self._lock:
            if self.api is None:
                self.api = False
                if os.environ.get(self._env) != self._off:
                    try:
                        import ctypes

                        self.api = self._bind(ctypes, self.soname)
                    except (OSError, AttributeError, ImportError):
                        pass
        return self.api is not False

    def state(self) -> Any:
        """This thread's decoder state, or None when the library is not in use."""
        if self.api is None:
            self.load()
        if not self.api:
            return None
        st = getattr(self._local, "st", None)
        if st is None:
            st = self._local.st = self._make_state(self.api)
        return st


def _bind_libdeflate(ctypes: Any, soname: str) -> Tuple[Any, Any, Any]:
    lib = ctypes.CDLL(soname)
    fn = lib.libdeflate_deflate_decompress_ex
    fn.restype = ctypes.c_int
    size_p = ctypes.POINTER(ctypes.c_size_t)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, size_p,
                   size_p]
    alloc = lib.libdeflate_alloc_decompressor
    alloc.restype = ctypes.c_void_p
    alloc.argtypes = []
    free = lib.libdeflate_free_decompressor
    free.restype = None
    free.argtypes = [ctypes.c_void_p]
    return fn, alloc, free


_LIBDEFLATE_SUCCESS = 0


class _LibDeflate:
    """One thread's libdeflate decompressor: whole-buffer raw inflate through ctypes, twice zlib's speed.

    libdeflate decodes into the cluster buffer in one call, as QEMU's inflate() does, and ctypes releases the
    GIL around it. Only its clear success is taken: a stream that ends having produced exactly one cluster.
    Anything else (a stream longer than the cluster, one cut short, bad data) is decided by zlib, which QEMU
    uses, so the two can differ in speed only.
    """

    def __init__(self, api: Tuple[Any, Any, Any]) -> None:
        import ctypes

        self._ctypes = ctypes
        self._fn, alloc, self._free = api
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


#: libdeflate's stable ABI (libdeflate0 on Debian/Ubuntu, libdeflate on RHEL/Fedora); BOOTKIT_INFLATE=zlib
#: turns it off
LIBDEFLATE = _Library("libdeflate.so.0", "BOOTKIT_INFLATE", "zlib", _bind_libdeflate, _LibDeflate)


def inflater() -> str:
    """Which deflate decoder clusters go through: "libdeflate" or "zlib"."""
    return "libdeflate" if LIBDEFLATE.load() else "zlib"


def inflate_cluster(data: bytes, out: memoryview) -> None:
    """qcow2_zlib_decompress: success iff the output buffer is exactly filled.

    QEMU tolerates Z_BUF_ERROR because the compressed length is only known to the sector: trailing bytes
    after the stream, or a stream longer than the cluster, are fine as long as one full cluster comes out.
    """
    fast: Optional[_LibDeflate] = LIBDEFLATE.state()
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


def _bind_libzstd(ctypes: Any, soname: str) -> Any:
    """libzstd's functions; only ZSTD_decompressStream releases the GIL (CDLL). The others return at once,
    and through PyDLL keep the GIL: every release is a chance for another thread to take it, and getting it
    back then costs a context switch (measured with fio, random 4 KiB reads at depth 16: 61 us of server CPU
    per read, against 67 us when all three calls released it)."""
    c_size_t, c_void_p = ctypes.c_size_t, ctypes.c_void_p
    lib = ctypes.PyDLL(soname)
    stream = ctypes.CDLL(soname).ZSTD_decompressStream

    class InBuffer(ctypes.Structure):  # type: ignore[misc]  # ZSTD_inBuffer (ctypes is imported lazily)
        _fields_ = (("src", ctypes.c_char_p), ("size", c_size_t), ("pos", c_size_t))

    class OutBuffer(ctypes.Structure):  # type: ignore[misc]  # ZSTD_outBuffer
        _fields_ = (("dst", c_void_p), ("size", c_size_t), ("pos", c_size_t))

    for name, restype, argtypes in (
        ("ZSTD_createDCtx", c_void_p, []),
        ("ZSTD_freeDCtx", c_size_t, [c_void_p]),
        ("ZSTD_DCtx_reset", c_size_t, [c_void_p, ctypes.c_int]),
        ("ZSTD_isError", ctypes.c_uint, [c_size_t]),
        ("ZSTD_getErrorName", ctypes.c_char_p, [c_size_t]),
    ):
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    stream.restype = c_size_t
    stream.argtypes = [c_void_p, ctypes.POINTER(OutBuffer), ctypes.POINTER(InBuffer)]
    lib.decompress_stream = stream
    lib.InBuffer = InBuffer
    lib.OutBuffer = OutBuffer
    return lib


_ZSTD_RESET_SESSION_ONLY = 1


class _LibZstd:
    """One thread's libzstd stream: QEMU's own decoding loop (qcow2_zstd_decompress), through ctypes.

    The same library QEMU links, called the same way: ZSTD_decompressStream into the cluster buffer until it
    is full, failing on an error, on a call that makes no progress, and on a frame not finished when the
    buffer is full. So a damaged payload reads, or fails, exactly as in QEMU (the zstandard module, with its
    own zstd and a one-shot API, judged 34 of 40 sampled damaged frames differently). The frame goes straight
    into the cluster, no allocation or copy: 10-20 us less of the 60 us a 64 KiB cluster takes. As in QEMU,
    a frame header may make the stream allocate a window of up to 128 MiB (libzstd's default limit); only
    the pages decoding touches (about a cluster) become resident.
    """

    def __init__(self, lib: Any) -> None:
        import ctypes

        self._ctypes = ctypes
        self._lib = lib
        self._dctx = lib.ZSTD_createDCtx()
        if not self._dctx:
            raise MemoryError("ZSTD_createDCtx")
        self._in = lib.InBuffer()
        self._out = lib.OutBuffer()
        self._in_ref = ctypes.byref(self._in)
        self._out_ref = ctypes.byref(self._out)

    def __del__(self) -> None:
        if getattr(self, "_dctx", None):
            self._lib.ZSTD_freeDCtx(self._dctx)
            self._dctx = None

    def __call__(self, data: bytes, dest: memoryview) -> None:
        lib, inb, outb = self._lib, self._in, self._out
        n = len(dest)
        dst = (self._ctypes.c_char * n).from_buffer(dest)
        lib.ZSTD_DCtx_reset(self._dctx, _ZSTD_RESET_SESSION_ONLY)  # as fresh as QEMU's per-cluster context
        inb.src, inb.size, inb.pos = data, len(data), 0
        outb.dst, outb.size, outb.pos = self._ctypes.addressof(dst), n, 0
        ret = 0
        while outb.pos < n:
            last_in, last_out = inb.pos, outb.pos
            ret = lib.decompress_stream(self._dctx, self._out_ref, self._in_ref)
            if lib.ZSTD_isError(ret):
                raise CorruptImage(f"zstd error: {lib.ZSTD_getErrorName(ret).decode(errors='replace')}")
            if inb.pos <= last_in and outb.pos <= last_out:
                raise CorruptImage(f"zstd data ends after {outb.pos} of {n} bytes")
        if ret > 0:
            raise CorruptImage("zstd frame overflows the cluster (not finished when the cluster is full)")


#: the system's libzstd (libzstd1, which dpkg itself needs on Debian); BOOTKIT_ZSTD=zstandard turns it off
LIBZSTD = _Library("libzstd.so.1", "BOOTKIT_ZSTD", "zstandard", _bind_libzstd, _LibZstd)


def zstd_decoder() -> str:
    """Which zstd decoder clusters go through: "libzstd" or "zstandard"."""
    return "libzstd" if LIBZSTD.load() else "zstandard"


def zstd_cluster(data: bytes, dest: memoryview) -> None:
    """qcow2_zstd_decompress: decode frames until one cluster is produced; the last frame must end there.

    With libzstd, QEMU's loop itself (``_LibZstd``). Without it, the zstandard module frame by frame:
    QEMU streams ``ZSTD_decompressStream`` into a cluster-sized buffer, across frames, and fails when the
    last frame is not finished once the buffer is full (``zstd_ret > 0``): a frame that would produce more
    than a cluster is corrupt. Trailing bytes after the last needed frame are normal (sector padding). The
    output is bounded by the cluster size whatever the frame header claims (decompression bombs). Valid
    payloads decode alike either way; a damaged one may be judged differently from QEMU on this path.
    """
    if len(data) >= 4:
        magic = int.from_bytes(data[:4], "little")
        if magic != ZSTD_MAGIC and magic & ZSTD_SKIPPABLE_MASK != ZSTD_SKIPPABLE_MAGIC:
            raise CorruptImage(f"zstd: bad frame magic {magic:#010x}")
    fast: Optional[_LibZstd] = LIBZSTD.state()
    if fast is not None:
        fast(data, dest)
        return
    zstd = _zstd()
    cluster_size = len(dest)
    filled = 0
    pos = 0
    try:
        while filled < cluster_size:
            want = cluster_size - filled
            if pos >= len(data):
                raise CorruptImage(f"zstd data ends after {filled} of {cluster_size} bytes")
            size = zstd_frame_size(data, pos)
            frame = data[pos : pos + size]
            pos += size
            if int.from_bytes(frame[:4], "little") & ZSTD_SKIPPABLE_MASK == ZSTD_SKIPPABLE_MAGIC:
                continue
            content = zstd.get_frame_parameters(frame).content_size
            if content != ZSTD_CONTENTSIZE_UNKNOWN and content > want:
                raise CorruptImage(f"zstd frame of {content} bytes overflows the cluster")
            # An empty frame is not an error: QEMU's loop counts consumed input as progress and goes on to
            # the next frame (it fails only when neither input nor output moves, i.e. the data ran out, which
            # is the check at the top of this loop). Every frame advances ``pos``, so the loop ends.
            if content == ZSTD_CONTENTSIZE_UNKNOWN:
                piece = _decompressor().decompress(frame, max_output_size=want)
            else:
                piece = _decompressor().decompress(frame)
            dest[filled : filled + len(piece)] = piece
            filled += len(piece)
    except zstd.ZstdError as e:
        raise CorruptImage(f"zstd error: {e}") from None
    if filled != cluster_size:
        raise CorruptImage(f"zstd stream produced {filled} bytes, expected {cluster_size}")


def preload() -> None:
    """Load the C libraries the decoders may use now (a server does before the root switch: after it, the
    initramfs and its files are gone)."""
    LIBDEFLATE.load()
    LIBZSTD.load()


def decoder_for(compression_type: int) -> Optional[Decoder]:
    if compression_type == COMPRESSION_DEFLATE:
        return inflate_cluster
    if compression_type == COMPRESSION_ZSTD:
        return zstd_cluster
    return None
