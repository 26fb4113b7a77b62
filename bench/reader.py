#!/usr/bin/env python3
"""Benchmark: ``bootkit convert`` against ``qemu-img convert -O raw`` on the same images, in one run.

The disk is an ext4 filesystem of about 1.4 GiB holding about 1 GiB of real files (copied from this machine's
/usr by ``mke2fs -d``), made into three QCOW2 images by qemu-img: uncompressed, deflate and zstd. Each tool
decodes each image to a raw file on the same filesystem; the best of ``--repeat`` runs counts, runs of the
two tools alternate, and the outputs are compared byte for byte once. Prints a table with the ratio
qemu-img time / bootkit time (above 1.0: bootkit is faster).

The deflate image is decoded twice by bootkit: through libdeflate (what it uses when the system has
libdeflate.so.0) and, as a second row, through Python's zlib alone (BOOTKIT_INFLATE=zlib).

    python bench/reader.py [--workdir DIR] [--size-mib 1024] [--repeat 5]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"uncompressed": 1.0, "deflate": 1.5, "deflate (zlib)": 1.5, "zstd": 1.5}


def build_content(staging: Path, limit: int) -> int:
    """Hard-link regular files from /usr into ``staging`` until ``limit`` bytes (same filesystem) or copy."""
    total = 0
    for dirpath, _dirs, files in os.walk("/usr/lib"):
        for name in sorted(files):
            src = Path(dirpath) / name
            try:
                st = src.lstat()
            except OSError:
                continue
            if not src.is_file() or src.is_symlink() or st.st_size == 0:
                continue
            dst = staging / src.relative_to("/usr")
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            total += st.st_size
            if total >= limit:
                return total
    return total


def make_images(work: Path, size_mib: int) -> dict[str, Path]:
    images = {
        "uncompressed": work / "disk.qcow2",
        "deflate": work / "disk-deflate.qcow2",
        "zstd": work / "disk-zstd.qcow2",
    }
    if all(p.exists() for p in images.values()):
        return images
    raw = work / "disk.raw"
    staging = work / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    content = build_content(staging, size_mib << 20)
    fs_mib = int(content / (1 << 20) * 1.4) + 64
    print(f"building: ext4 of {fs_mib} MiB with {content >> 20} MiB of files from /usr", file=sys.stderr)
    raw.unlink(missing_ok=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(staging), str(raw), f"{fs_mib}M"], check=True)
    shutil.rmtree(staging)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(images["uncompressed"])], check=True)
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(images["deflate"])], check=True)
    subprocess.run(
        ["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", str(raw), str(images["zstd"])],
        check=True,
    )
    raw.unlink()
    return images


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--workdir", type=Path, default=ROOT / "cache" / "bench-reader")
    parser.add_argument("--size-mib", type=int, default=1024, help="MiB of real files in the filesystem")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    images = make_images(work, args.size_mib)
    # as an installed package is: byte-compiled (PYTHONDONTWRITEBYTECODE may keep a checkout from it)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "bootkit")], check=True)
    ours_out, theirs_out = work / "out-bootkit.raw", work / "out-qemu.raw"
    bootkit = [sys.executable, "-m", "bootkit", "-q", "convert"]
    runs: list[tuple[str, Path, dict[str, str] | None]] = [(kind, image, None) for kind, image in images.items()]
    runs.insert(2, ("deflate (zlib)", images["deflate"], {**os.environ, "BOOTKIT_INFLATE": "zlib"}))
    rows = []
    for kind, image, env in runs:
        best_ours = best_theirs = float("inf")
        for _ in range(args.repeat):
            theirs_out.unlink(missing_ok=True)
            best_theirs = min(best_theirs, timed(["qemu-img", "convert", "-O", "raw", str(image), str(theirs_out)]))
            ours_out.unlink(missing_ok=True)
            best_ours = min(best_ours, timed([*bootkit, str(image), str(ours_out)], env))
        if not filecmp.cmp(ours_out, theirs_out, shallow=False):
            print(f"MISMATCH: bootkit and qemu-img decode {image} differently", file=sys.stderr)
            return 1
        size = int(subprocess.run(["qemu-img", "info", "--output=json", str(image)], capture_output=True,
                                  check=True, text=True).stdout.split('"virtual-size":')[1].split(",")[0])
        rows.append((kind, image.stat().st_size, size, best_theirs, best_ours))
    ours_out.unlink(missing_ok=True)
    theirs_out.unlink(missing_ok=True)

    print(f"bootkit convert vs qemu-img convert -O raw  (best of {args.repeat}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f})")
    print(f"{'image':<16}{'file MiB':>10}{'disk MiB':>10}{'qemu-img s':>12}{'bootkit s':>11}"
          f"{'qemu MB/s':>11}{'bootkit MB/s':>14}{'ratio':>8}{'target':>8}")
    below = []
    for kind, file_size, size, theirs, ours in rows:
        ratio = theirs / ours
        target = TARGETS[kind]
        if ratio < target:
            below.append(kind)
        print(f"{kind:<16}{file_size / 2**20:>10.0f}{size / 2**20:>10.0f}{theirs:>12.2f}{ours:>11.2f}"
              f"{size / theirs / 1e6:>11.0f}{size / ours / 1e6:>14.0f}{ratio:>7.2f}x{target:>7.1f}x")
    if below:
        print(f"below target: {', '.join(below)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
