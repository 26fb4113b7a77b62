"""``bootkit check``: decode every allocated cluster of every layer and report each bad one.

Reads never stop at the first problem here: a broken L2 table is reported and its range skipped, a broken
entry is reported and the walk goes on cluster by cluster, every compressed cluster is decoded (in a thread
pool), and data that lies past the end of the file, which QEMU silently reads as zeros, is reported too,
because for a boot image it means truncation.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Deque, Iterator, List, NamedTuple, Optional, Union

from bootkit.errors import CorruptImage
from bootkit.qcow2.image import COMPRESSED, DATA, L1E_OFFSET_MASK, Image, Run


class Problem(NamedTuple):
    image: str
    guest_offset: int
    length: int
    host_offset: Optional[int]
    message: str

    def __str__(self) -> str:
        host = "" if self.host_offset is None else f", host offset {self.host_offset:#x}"
        return f"{self.image}: guest offset {self.guest_offset:#x} (+{self.length}{host}): {self.message}"


class CheckResult(NamedTuple):
    clusters_checked: int
    compressed_checked: int


def check(
    image: Image, *, threads: Optional[int] = None, stats: Optional[List[CheckResult]] = None
) -> Iterator[Problem]:
    """Every problem in every qcow2 layer of the chain, in order of layer then guest offset."""
    workers = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="check") as pool:
        for layer in image.chain():
            if isinstance(layer, Image):
                yield from _check_layer(layer, pool, workers * 4, stats)


def _check_layer(
    layer: Image, pool: ThreadPoolExecutor, limit: int, stats: Optional[List[CheckResult]]
) -> Iterator[Problem]:
    file_size = layer.source.size
    data_size = (layer.data_file or layer.source).size
    cs = layer.cluster_size
    step = 1 << layer._l1_shift
    pending: Deque[Future[Optional[Problem]]] = deque()
    clusters = compressed = 0
    for l1_index in range((layer.virtual_size + step - 1) // step):
        start = l1_index * step
        length = min(step, layer.virtual_size - start)
        l2_offset = layer._l1[l1_index] & L1E_OFFSET_MASK if l1_index < len(layer._l1) else 0
        if l2_offset and l2_offset + cs > file_size:
            yield Problem(layer.name, start, length, l2_offset,
                          f"L2 table (L1 index {l1_index:#x}) lies past the end of the file; it reads as zeros")
        for item in _runs_tolerant(layer, start, length):
            if isinstance(item, Problem):
                yield item
                continue
            run = item
            if run.kind == DATA:
                clusters += (run.length + cs - 1) // cs
                if run.host + run.length > data_size:
                    yield Problem(layer.name, run.offset, run.length, run.host,
                                  "data lies past the end of the file; it reads as zeros")
            elif run.kind == COMPRESSED:
                clusters += 1
                compressed += 1
                if run.host >= file_size:
                    yield Problem(layer.name, run.offset, run.length, run.host,
                                  "compressed cluster starts past the end of the file")
                    continue
                pending.append(pool.submit(_decode, layer, run))
                while len(pending) >= limit:
                    problem = pending.popleft().result()
                    if problem:
                        yield problem
    while pending:
        problem = pending.popleft().result()
        if problem:
            yield problem
    if stats is not None:
        stats.append(CheckResult(clusters, compressed))


def _runs_tolerant(layer: Image, start: int, length: int) -> Iterator[Union[Run, Problem]]:
    """The layer's runs over one L2 table's range; where the table or an entry is bad, a Problem for each
    bad cluster and the good runs around it."""
    try:
        runs = list(layer._layer_runs(start, length))
    except CorruptImage:
        runs = None
    if runs is not None:
        yield from runs
        return
    cs = layer.cluster_size
    for offset in range(start, start + length, cs):
        n = min(cs, start + length - offset)
        try:
            yield from list(layer._layer_runs(offset, n))
        except CorruptImage as e:
            yield Problem(layer.name, offset, n, None, _strip(str(e), layer.name))


def _decode(layer: Image, run: Run) -> Optional[Problem]:
    try:
        layer.decompress(run.host, run.csize, run.offset)
    except CorruptImage as e:
        return Problem(layer.name, run.offset - (run.offset & (layer.cluster_size - 1)), layer.cluster_size,
                       run.host, _strip(str(e), layer.name))
    return None


def _strip(message: str, name: str) -> str:
    prefix = f"{name}: "
    return message[len(prefix):] if message.startswith(prefix) else message
