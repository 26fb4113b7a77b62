"""Lazy mode's bytes fetched for a boot-like read pattern, against the distinct chunks the pattern needs.

Replays, through bootkit's QCOW2 reader on an ``HTTPSource`` over ``bootkit serve-http`` (loopback), reads
like a boot's -- per "file" (a 2 MiB piece of a data extent) three scattered 4 KiB metadata reads, then the
file in 128 KiB reads, files in a random order, on 4 threads like the NBD server -- and prints the chunks the
reads need (traced on the local file), the bytes and requests the source fetched, and the read-ahead counters::

    python bench/lazyreplay.py IMAGE.qcow2 [--cache-mib 64] [--readahead 8]

No QEMU; seconds per run. Fetched bytes above needed x chunk size come from read-ahead guesses and from
chunks fetched again after they left the cache.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "qemu-tests"))

from bkharness import readpattern

from bootkit import qcow2
from bootkit.fetch import HTTPSource, Manifest
from bootkit.fetch.options import FetchOptions
from bootkit.host.httpserve import http_server

CHUNK = 1 << 20


def boot_like_reads(image: Path, seed: int = 5) -> list[tuple[int, int]]:
    """The read pattern (guest offset, length): :func:`bkharness.readpattern.boot_like_reads` with 2 MiB
    "files"."""
    return readpattern.boot_like_reads(image, 2 << 20, seed)


class _Tracing:
    """A local-file byte source that records which chunks were read."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self.size = path.stat().st_size
        self.chunks: set[int] = set()
        self._fd = os.open(path, os.O_RDONLY)

    def pread(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if end > offset:
            self.chunks.update(range(offset // CHUNK, (end - 1) // CHUNK + 1))
        return os.pread(self._fd, max(0, end - offset), offset)

    def close(self) -> None:
        os.close(self._fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("--cache-mib", type=int, default=64)
    parser.add_argument("--readahead", type=int, default=8)
    args = parser.parse_args()
    image: Path = args.image.resolve()
    reads = boot_like_reads(image)
    tracing = _Tracing(image)
    with qcow2.open(tracing) as img:
        for offset, length in reads:
            img.pread(offset, length)
    with tempfile.TemporaryDirectory() as tmp:
        manifest_path = os.path.join(tmp, "image.manifest")
        Manifest.build(str(image), CHUNK).write(manifest_path)
        manifest = Manifest.load(manifest_path)
        options = FetchOptions(verify="none", reserve_bytes=0)
        with http_server(str(image.parent)) as url:
            source = HTTPSource(url + image.name, options, manifest=manifest, cache_bytes=args.cache_mib << 20,
                                readahead=args.readahead)  # fmt: skip
            with source, qcow2.open(source) as img:

                def replay(part: list[tuple[int, int]]) -> None:
                    for offset, length in part:
                        img.pread(offset, length)

                threads = [threading.Thread(target=replay, args=(reads[i::4],)) for i in range(4)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                stats = dict(source.stats)
    print(f"image {image.stat().st_size / 2**20:.0f} MiB, cache {args.cache_mib} MiB, {len(reads)} reads: "
          f"{len(tracing.chunks)} distinct chunks needed ({len(tracing.chunks) * CHUNK / 2**20:.0f} MiB); "
          f"fetched {stats.get('bytes', 0) / 2**20:.1f} MiB in {stats.get('requests', 0)} requests; "
          f"read-ahead {stats.get('readahead', 0)} fetched, {stats.get('readahead_used', 0)} read")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
