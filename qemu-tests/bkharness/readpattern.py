"""A boot-like guest read pattern, for replays of lazy mode without QEMU (tests/test_fetch_lazy.py,
bench/lazyreplay.py)."""

from __future__ import annotations

import random
from pathlib import Path

from bootkit import qcow2


def boot_like_reads(image: Path, piece: int, seed: int) -> list[tuple[int, int]]:
    """Guest reads (offset, length) like a boot's: per "file" (a ``piece``-sized part of a data extent) three
    scattered 4 KiB metadata reads, then the file in 128 KiB reads (often whole, sometimes only its head),
    files in a random order drawn from ``seed``."""
    with qcow2.open(str(image)) as local:
        extents = [(e.offset, e.length) for e in local.extents() if e.kind in (qcow2.DATA, qcow2.COMPRESSED)]
    files = [(o, min(piece, offset + length - o)) for offset, length in extents
             for o in range(offset, offset + length, piece)]  # fmt: skip
    rng = random.Random(seed)
    reads: list[tuple[int, int]] = []
    for offset, length in rng.sample(files, len(files) * 3 // 5):
        for _ in range(3):
            at, n = rng.choice(files)
            reads.append((at + rng.randrange(max(1, n - 4096)) // 4096 * 4096, 4096))
        size = length if rng.random() < 0.7 else min(length, 64 << 10)
        reads += [(o, min(128 << 10, offset + size - o)) for o in range(offset, offset + size, 128 << 10)]
    return reads
