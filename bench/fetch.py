#!/usr/bin/env python3
"""Benchmark: ``bootkit.fetch`` against ``curl`` on loopback (same file, same nginx, same run).

Makes a file of random bytes (``--size-mib``, default 512), serves it with nginx on a free loopback port and
downloads it into a tmpfs (/dev/shm when it has room, as the initramfs does into /run; the previous output is
deleted before each run, outside the timing) with:

- ``curl -s -o``: the reference;
- ``curl`` then ``sha256sum``: what a verified download costs with curl;
- ``bootkit.fetch.download`` with a pinned SHA-256 (the boot path; hashing overlaps the transfer);
- ``bootkit.fetch.download`` with verify=none (it still computes the hash it reports).

Then lazy mode: ``HTTPSource`` (with a manifest, so every chunk is verified) read sequentially in 1 MiB
reads and randomly in 64 KiB reads, against ``FileSource`` on the local file (warm page cache). Each figure
is the best of ``--repeat`` runs; runs alternate between tools. Prints throughputs, ratios and the client's
CPU seconds (a figure that a busy machine disturbs less than wall time); the target is bootkit >= 0.9x curl
for downloads.

    python bench/fetch.py [--size-mib 512] [--repeat 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bootkit.fetch import FetchOptions, HTTPSource, Manifest, download  # noqa: E402
from bootkit.source import FileSource  # noqa: E402

MIB = 1 << 20


@contextmanager
def nginx(root: Path, prefix: Path) -> Iterator[str]:
    """nginx serving ``root`` on a free loopback port, in the foreground as our child; stopped by PID."""
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kinds = ("proxy", "fastcgi", "uwsgi", "scgi")
    temp_paths = "".join(f"    {kind}_temp_path {prefix}/tmp/{kind};\n" for kind in kinds)
    conf = prefix / "nginx.conf"
    conf.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\n"
        + "events { worker_connections 64; }\n"
        + f"http {{\n    access_log off;\n    client_body_temp_path {prefix}/tmp/body;\n{temp_paths}"
        + "    sendfile on;\n    tcp_nopush on;\n    default_type application/octet-stream;\n"
        + f"    server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n"
    )
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"nginx did not start (see {prefix}/error.log)") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def best_of(repeat: int, fn: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (curl, sha256sum), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="where the served file lives (default: a temp dir)")
    args = parser.parse_args()
    logging.getLogger("bootkit").setLevel(logging.ERROR)  # no per-download lines in the table
    for tool in ("nginx", "curl", "sha256sum"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} is not installed")
    size = args.size_mib * MIB
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    (work / "www").mkdir(parents=True, exist_ok=True)
    image = work / "www" / "image.bin"
    if not image.exists() or image.stat().st_size != size:
        print(f"making {args.size_mib} MiB of random bytes in {image}", file=sys.stderr)
        with open(image, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MIB))
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    manifest_path = work / "www" / "image.bin.manifest"
    Manifest.build(str(image), MIB).write(str(manifest_path))
    manifest = Manifest.load(str(manifest_path))

    shm = Path("/dev/shm")
    out_dir = shm if shm.is_dir() and shutil.disk_usage(shm).free > 3 * size else work
    out = out_dir / f"bench-fetch-{os.getpid()}.bin"
    pinned = FetchOptions(sha256=sha, reserve_bytes=0, progress_interval=3600)
    unverified = FetchOptions(verify="none", reserve_bytes=0, progress_interval=3600)
    load = os.getloadavg()

    results: dict[str, float] = {}
    cpu: dict[str, float] = {}  # CPU seconds of the client (not nginx), best run
    with nginx(work / "www", work / "nginx") as base:
        url = f"{base}/image.bin"

        def curl() -> None:
            subprocess.run(["curl", "-s", "-f", "-o", str(out), url], check=True)

        def curl_sha() -> None:
            curl()
            subprocess.run(["sha256sum", str(out)], check=True, stdout=subprocess.DEVNULL)

        def bootkit_pinned() -> None:
            download(url, str(out), pinned)

        def bootkit_none() -> None:
            download(url, str(out), unverified)

        for _ in range(args.repeat):  # alternate the tools, keep the best of each
            for name, fn in [("curl", curl), ("curl + sha256sum", curl_sha), ("bootkit pinned", bootkit_pinned),
                             ("bootkit verify=none", bootkit_none)]:  # fmt: skip
                out.unlink(missing_ok=True)  # every tool writes a new file, as at boot (freeing is not timed)
                before = cpu_seconds()
                results[name] = min(results.get(name, float("inf")), best_of(1, fn))
                cpu[name] = min(cpu.get(name, float("inf")), cpu_seconds() - before)
        out.unlink()

        # lazy mode, against the local file (page cache warm: it was just read for the hash)
        seq_mib = min(args.size_mib, 256)
        rng = random.Random(1)
        offsets = [rng.randrange(0, size - 65536) for _ in range(2000)]
        local = FileSource(image)

        def seq(source: FileSource | HTTPSource) -> None:
            for offset in range(0, seq_mib * MIB, MIB):
                source.pread(offset, MIB)

        def rand(source: FileSource | HTTPSource) -> None:
            for offset in offsets:
                source.pread(offset, 65536)

        for _ in range(args.repeat):
            results["local sequential"] = min(results.get("local sequential", 1e9), best_of(1, lambda: seq(local)))
            with HTTPSource(url, unverified, manifest=manifest) as lazy:
                results["lazy sequential"] = min(results.get("lazy sequential", 1e9), best_of(1, lambda: seq(lazy)))
            results["local random"] = min(results.get("local random", 1e9), best_of(1, lambda: rand(local)))
            with HTTPSource(url, unverified, manifest=manifest, cache_bytes=64 * MIB) as lazy:
                results["lazy random"] = min(results.get("lazy random", 1e9), best_of(1, lambda: rand(lazy)))
        local.close()

    def mib_s(name: str, mib: float) -> float:
        return mib / results[name]

    print(f"\nbench/fetch.py: {args.size_mib} MiB over loopback from nginx into {out_dir},"
          f" best of {args.repeat}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f},"
          f" {os.cpu_count()} CPUs\n")  # fmt: skip
    print(f"| {'download':<22} | {'MiB/s':>8} | {'x curl':>6} | {'client CPU s':>12} |")
    print(f"|{'-' * 24}|{'-' * 10}|{'-' * 8}|{'-' * 14}|")
    curl_rate = mib_s("curl", args.size_mib)
    for name in ("curl", "curl + sha256sum", "bootkit pinned", "bootkit verify=none"):
        rate = mib_s(name, args.size_mib)
        print(f"| {name:<22} | {rate:8.1f} | {rate / curl_rate:6.2f} | {cpu[name]:12.2f} |")
    print()
    print(f"| {'lazy mode read':<22} | {'MiB/s':>8} | {'x local':>7} |")
    print(f"|{'-' * 24}|{'-' * 10}|{'-' * 9}|")
    for kind, mib in (("sequential", seq_mib), ("random", len(offsets) * 65536 / MIB)):
        local_rate, lazy_rate = mib_s(f"local {kind}", mib), mib_s(f"lazy {kind}", mib)
        print(f"| {'local ' + kind:<22} | {local_rate:8.1f} | {1.0:7.2f} |")
        print(f"| {'lazy ' + kind:<22} | {lazy_rate:8.1f} | {lazy_rate / local_rate:7.3f} |")
    ratio = mib_s("bootkit pinned", args.size_mib) / curl_rate
    print(f"\ndownload target bootkit pinned >= 0.9x curl: {'met' if ratio >= 0.9 else 'NOT met'} ({ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
