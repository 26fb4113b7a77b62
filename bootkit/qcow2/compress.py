"""Compressed clusters: deflate and zstd, decoded exactly as QEMU does (block/qcow2-threads.c).

Both decoders produce at most one cluster and must fill it exactly; anything else is a CorruptImage for that
cluster. Both release the GIL while decoding, so several threads decode in parallel.

Runs inside the initramfs: standard library only; ``zstandard`` is imported the first time a zstd cluster is
decoded, never for deflate images. Python >= 3.9.
"""

from __future__ import annotations

import threading
import zlib
from typing import Any, Callable, Optional

from bootkit.errors import CorruptImage, UnsupportedFeature
from bootkit.qcow2.header import COMPRESSION_DEFLATE, COMPRESSION_ZSTD

Decoder = Callable[[bytes, int], bytes]

# QEMU compresses with deflateInit2(..., -12, ...) and inflates with inflateInit2(-12): raw deflate, 4 KiB
# window. Using the same window makes a stream that QEMU rejects ("distance too far back") fail here too.
DEFLATE_WBITS = -12


def inflate_cluster(data: bytes, cluster_size: int) -> bytes:
    """qcow2_zlib_decompress: success iff the output buffer is exactly filled.

    QEMU tolerates Z_BUF_ERROR because the compressed length is only known to the sector: trailing bytes
    after the stream, or a stream longer than the cluster, are fine as long as one full cluster comes out.
    """
    try:
        out = zlib.decompressobj(DEFLATE_WBITS).decompress(data, cluster_size)
    except zlib.error as e:
        raise CorruptImage(f"deflate error: {e}") from None
    if len(out) != cluster_size:
        raise CorruptImage(f"deflate stream ends after {len(out)} of {cluster_size} bytes")
    return out


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


def zstd_cluster(data: bytes, cluster_size: int) -> bytes:
    """qcow2_zstd_decompress: decode frames until one cluster is produced; the last frame must end there.

    QEMU streams ``ZSTD_decompressStream`` into a cluster-sized buffer, across frames, and fails when the last
    frame is not finished once the buffer is full (``zstd_ret > 0``): a frame that would produce more than a
    cluster is corrupt. Trailing bytes after the last needed frame are normal (sector padding). The output is
    bounded by the cluster size whatever the frame header claims (decompression bombs).
    """
    zstd = _zstd()
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
    return out


def decoder_for(compression_type: int) -> Optional[Decoder]:
    if compression_type == COMPRESSION_DEFLATE:
        return inflate_cluster
    if compression_type == COMPRESSION_ZSTD:
        return zstd_cluster
    return None
