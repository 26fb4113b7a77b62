"""Initramfs images for the pxe-config tests, made as dracut makes them: a tree archived by GNU cpio in the
"newc" format (``find . | cpio -o -H newc``), compressed by the zstd or gzip tool, optionally after an
uncompressed early archive (dracut's early microcode)."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from testtools import require_tools

from bootkit.boot.cmdline import CONTRACT_FILE, contract_info


def _cpio(files: dict[str, bytes]) -> bytes:
    require_tools("cpio")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        names = subprocess.run(["find", ".", "-print0"], cwd=root, capture_output=True, check=True).stdout
        return subprocess.run(["cpio", "--null", "-o", "-H", "newc", "--quiet"], cwd=root, input=names,
                              capture_output=True, check=True).stdout  # fmt: skip


def _compress(data: bytes, how: str | None) -> bytes:
    if how is None:
        return data
    require_tools(how)
    return subprocess.run([how, "-c", "-q"], input=data, capture_output=True, check=True).stdout


def contract_json(**override: object) -> bytes:
    return json.dumps({**contract_info(), **override}).encode()


def make_initramfs(
    path: Path,
    files: dict[str, bytes] | None = None,
    *,
    compress: str | None = "zstd",
    early: dict[str, bytes] | None = None,
) -> Path:
    """An initramfs at ``path`` holding ``files`` (default: bootkit's contract and a little filler)."""
    if files is None:
        files = {CONTRACT_FILE: contract_json(), "usr/lib/bootkit/bootkit-boot": b"#!/usr/bin/python3\n" * 50}
    image = b""
    if early is not None:
        image = _cpio(early)
        image += b"\0" * (-len(image) % 512)  # as dracut pads the early archive
    path.write_bytes(image + _compress(_cpio(files), compress))
    return path
