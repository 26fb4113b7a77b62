"""The NBD server daemon's body: fetch, verify and open the image, choose the root, attach, serve.

``bootkit.boot.main`` forks this process first (before any thread exists). It is a root storage daemon
(systemd docs/ROOT_STORAGE_DAEMONS.md): hardened by ``bootkit.daemon.harden``, it prepares the image,
attaches the kernel NBD device, reports the root's device node to the parent over a pipe and then serves for
the rest of the system's life, keeping ``/run/bootkit/status.json`` current with its counters.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from typing import Any, Dict, Optional

from bootkit.boot.channel import Channel, ChannelRefused, Trust, follow, format_time
from bootkit.boot.cmdline import BootConfig
from bootkit.boot.images import IMAGE_DIR, ImageFetcher, grow_run
from bootkit.boot.partitions import Partition, choose_root, read_disk
from bootkit.boot.stages import Stages
from bootkit.boot.status import StatusFile
from bootkit.errors import BootkitError
from bootkit.log import human_size, log


class Prepared:
    """A verified, opened image and the partition that holds the root; ``cfg`` is the configuration it was
    fetched with (after a channel named the image: with the channel's pins)."""

    def __init__(self, image: Any, fetcher: ImageFetcher, root: Partition, cfg: BootConfig,
                 channel: Optional[Channel] = None, channel_url: Optional[str] = None) -> None:  # fmt: skip
        self.image, self.fetcher, self.root, self.cfg = image, fetcher, root, cfg
        #: the signed channel that named the image (``root=qcow2:channel:<channel_url>``), or None
        self.channel, self.channel_url = channel, channel_url

    def source(self) -> Dict[str, Any]:
        """Where the image came from, for the status file: the signed channel that named it (its name, version
        and expiry; every field checked when the channel was parsed), and the local cache (the device as the
        command line names it, whether it holds the whole image, and whether the image server was contacted).
        Read again while the root is served: a lazy read of a chunk the cache lacks contacts the server."""
        facts: Dict[str, Any] = {}
        fetcher = self.fetcher
        if self.channel is not None:
            facts["channel"] = {
                "url": self.channel_url,
                "name": self.channel.name,
                "version": self.channel.version,
                "image": self.channel.image,
                "expires": format_time(self.channel.expires),
            }
        if fetcher.cache is not None:
            facts["cache"] = {
                "device": self.cfg.cache,
                # every chunk of the image is on the cache disk: this machine needs no image server
                "complete": cache_complete(fetcher),
                # the image server was asked for something during this boot (the files' sizes, missing chunks)
                "server_contacted": not fetcher.offline,
            }
        return facts

    def close(self) -> None:
        self.image.close()
        self.fetcher.close()


def prepare(cfg: BootConfig, stages: Stages, image_dir: str = IMAGE_DIR, trust: Optional[Trust] = None,
            cache: Any = None) -> Prepared:
    """Follow the signed channel (``root=qcow2:channel:``, checked against ``trust``, default: the initramfs'
    keys), fetch and verify the image (and its backing files), open the chain, choose the root partition; with a
    local ``cache`` (``bootkit.fetch.diskcache.DiskCache``), chunks are read from it first and kept in it."""
    from bootkit import qcow2

    channel = None
    channel_url = cfg.url if cfg.channel else None
    if cfg.channel:
        if trust is None and cache is not None:  # versions remembered on the cache disk survive power-off
            from bootkit.boot.channel import load_keys
            from bootkit.boot.channelcache import CacheVersionStore

            trust = Trust(load_keys(), CacheVersionStore(cache))
        cfg, channel = follow(cfg, stages, trust or Trust.installed(), cache)
    fetcher = ImageFetcher(cfg, stages, image_dir)
    fetcher.cache = cache
    try:
        top = fetcher.top()
        if channel is not None and top.size != channel.size:
            raise ChannelRefused(f"{cfg.url}: {top.size} bytes, {channel.describe()} says {channel.size}")
        stages.begin("open")
        image = qcow2.open(top, snapshot=cfg.snapshot, resolver=fetcher.backing)
    except BaseException:
        fetcher.close()
        raise
    try:
        chain = " <- ".join(posixpath.basename(s.name) for s in image.chain())
        fetcher.check_pins(chain)
        snapshot = f", snapshot {cfg.snapshot}" if cfg.snapshot else ""
        stages.done(f"qcow2 {human_size(image.virtual_size)} virtual{snapshot}, chain: {chain}")
        stages.begin("root")
        root = choose_root(read_disk(image, image.virtual_size), cfg.root)
        how = f"rd.qcow2.root={cfg.root}" if cfg.root.kind != "auto" else "auto"
        stages.done(f"{root.describe()} ({how})")
    except BaseException:
        image.close()
        fetcher.close()
        raise
    return Prepared(image, fetcher, root, cfg, channel, channel_url)


def run_daemon(cfg: BootConfig, stages: Stages, report: Any) -> int:
    """The forked daemon: prepare the device, report it, then serve until the kernel disconnects."""
    from bootkit import daemon
    from bootkit.nbd import kernel

    status = StatusFile()
    try:
        daemon.harden()
        if cfg.mode in ("ram", "stream"):
            grow_run(cfg)
        from bootkit.boot.cachedev import open_cache

        ready = prepare(cfg, stages, cache=open_cache(cfg, stages))
        image, fetcher, root, cfg = ready.image, ready.fetcher, ready.root, ready.cfg
        _say_if_local(fetcher)
        stages.begin("attach")
        attachment = kernel.attach(image, connections=1)
        device = attachment.device if root.number == 0 else f"{attachment.device}p{root.number}"
        stages.done(f"{attachment.device} serving the image, root on {device}")
        devstats: Optional[DeviceStats] = None
        try:
            devstats = DeviceStats(attachment.device)
        except OSError as e:
            log.warning("status: no I/O counters for %s: %s", attachment.device, e.strerror)
    except BootkitError as e:
        report.send(1, stages.failed(str(e)))
        return 1
    except Exception as e:  # the boot must end with one clear line, whatever happened
        report.send(1, stages.failed(f"{type(e).__name__}: {e}"))
        return 1
    status.update(
        url=cfg.url,
        sha256={url: digest for url, digest in fetcher.verified.items()},
        verify=cfg.verify,
        mode=cfg.mode,
        snapshot=cfg.snapshot,
        device=attachment.device,
        root=device,
        root_fstype=cfg.rootfstype or (root.fs.type if root.fs else None),
        overlay=str(cfg.overlay),
        server_pid=os.getpid(),
        timeline=stages.timeline,
        counters=counters(image, fetcher, devstats),
        **ready.source(),
    )
    fill = None
    if fetcher.streams:
        from bootkit.fetch.stream import start_fill

        try:
            from bootkit.boot.mount import root_mounted

            # the fill starts once the boot's reads up to the root are done (the parent mounted the root)
            fill = start_fill(fetcher.streams, IMAGE_DIR, rate=cfg.fill_rate, reserve=cfg.minmem_mib << 20,
                              report=lambda fields: status.update(fill=fields), gate=root_mounted)  # fmt: skip
        except Exception as e:  # the root is attached: a fill that cannot start must not take its server down
            log.warning("fill: WARNING: cannot start (%s: %s): stream mode stays lazy", type(e).__name__, e)
    status.refresh_every(10.0, lambda: {"counters": counters(image, fetcher, devstats, fill), **ready.source()})
    report.send(0, json.dumps({"device": device, "fstype": root.fs.type if root.fs else None}))
    attachment.wait()
    return 0


def cache_complete(fetcher: ImageFetcher) -> bool:
    """True when every file of the image is read through the local cache and the cache holds all its chunks."""
    stores = [getattr(s, "store", None) for s in fetcher.sources]
    return bool(fetcher.remotes) and all(store is not None and store.complete() for store in stores)


def _say_if_local(fetcher: ImageFetcher) -> None:
    """One console line when the local cache holds every chunk of the image: the boot needs no image server."""
    if not cache_complete(fetcher):
        return
    contacted = "" if fetcher.offline else " (it was contacted for the chunks that were missing)"
    log.info("[%8.2f] cache: booted from the local cache: every chunk is local, the image server is not needed%s",
             time.monotonic(), contacted if not fetcher.offline else ", and was not contacted")  # fmt: skip


#: Documentation/block/stat.rst: reads completed, reads merged, sectors read, ms reading, ..., in flight
_BLOCK_STAT_FIELDS = (("nbd_reads", 0), ("nbd_read_sectors", 2), ("nbd_read_ms", 3), ("nbd_in_flight", 8))


class DeviceStats:
    """The kernel's I/O counters of the NBD device (``/sys/block/nbdN/stat``), read through an fd opened
    before the root switch: sysfs regenerates the file on every read at offset 0, and the path is
    unreachable from the daemon afterwards."""

    def __init__(self, device: str) -> None:
        self.fd = os.open(f"/sys/block/{posixpath.basename(device)}/stat", os.O_RDONLY | os.O_CLOEXEC)

    def read(self) -> Dict[str, int]:
        values = os.pread(self.fd, 4096, 0).split()
        return {k: int(values[i]) for k, i in _BLOCK_STAT_FIELDS if i < len(values)}


def counters(
    image: Any, fetcher: ImageFetcher, device: Optional[DeviceStats] = None, fill: Any = None
) -> Dict[str, Any]:
    """Cache counters of the reader, request counters of the device, HTTP counters in lazy and stream mode,
    and the bytes stream mode has filled into RAM so far."""
    result: Dict[str, Any] = {}
    if hasattr(image, "cache_stats"):
        result.update(image.cache_stats())
    if device is not None:
        result.update(device.read())
    for source in fetcher.sources:
        stats = getattr(source, "stats", None)
        if stats:
            result.update({f"http_{k}": v for k, v in dict(stats).items()})
    if fetcher.cache is not None:
        result.update(fetcher.cache.stats)
    mirrors = fetcher.mirror_status()
    if mirrors:
        result["mirrors"] = mirrors
    if fill is not None:
        result.update(fill_bytes=fill.filled, fill_total=fill.total)
    return result
