"""The boot sequence in the initramfs: fetch → verify → open → choose the root → attach → mount.

Started by the dracut module (``/usr/lib/bootkit/bootkit-boot``) with argv[0] ``@bootkit``: by the netroot
handler ``qcow2root`` once the network is up (shell initramfs), or by ``bootkit-root.service`` after
``network-online.target`` (systemd initramfs).

The process forks the NBD server daemon first (``bootkit.nbd.kernel.fork_daemon``: before any thread
exists) and the daemon does the work that needs the image: download and verify it into ``/run`` (or open it
lazily over HTTP), open the QCOW2 chain, pick the root partition from the image itself, attach the kernel
NBD device, then report the device to the parent and serve for the rest of the system's life. The daemon is
a root storage daemon (systemd docs/ROOT_STORAGE_DAEMONS.md): it inherits the '@' argv[0], everything is
imported before anything else happens (``bootkit.boot.preload``), its memory is locked and
``oom_score_adj`` is -1000, the image is an open fd under ``/run`` (which survives the root switch), and
after the switch it never opens a file by path (the status file is written through a directory fd).

The parent waits for the partition device, mounts the root filesystem read-only and a tmpfs overlayfs over
it at the new root, and exits 0. Each stage prints one console line with the guest's monotonic time and
its duration; a failure prints one line naming the cause, leaves it in ``/run/bootkit/failed`` and exits
1, and the dracut module then follows dracut's failure path. Nothing is mounted before it is verified.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

# Import everything first: after switch_root the daemon cannot import anything (dracut-notes §7).
from bootkit.boot.preload import preload

preload(strict=False)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import posixpath  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence  # noqa: E402

from bootkit.boot.cmdline import BootConfig, parse_cmdline  # noqa: E402
from bootkit.boot.partitions import Partition, choose_root, read_disk  # noqa: E402
from bootkit.boot.status import RUN_DIR, StatusFile  # noqa: E402
from bootkit.errors import BootkitError, ConfigError, ImageError  # noqa: E402
from bootkit.log import ConsoleFormatter, human_size, log, safe_text  # noqa: E402
from bootkit.source import ByteSource, FileSource  # noqa: E402

IMAGE_DIR = RUN_DIR + "/images"
LOWER_DIR = RUN_DIR + "/lower"
OVERLAY_DIR = RUN_DIR + "/overlay"
FAILED_FILE = RUN_DIR + "/failed"
CMDLINE = "/proc/cmdline"


class BootFailed(BootkitError):
    """A boot stage failed; the message is the one console line."""


class Stages:
    """One console line per stage: guest monotonic time (seconds since boot) and the stage's duration."""

    def __init__(self) -> None:
        self.stage = "start"
        self.started = time.monotonic()
        self.timeline: Dict[str, float] = {}

    def begin(self, stage: str, what: str = "") -> None:
        self.stage, self.started = stage, time.monotonic()
        if what:
            log.info("[%8.2f] %s: %s", self.started, stage, what)

    def done(self, what: str) -> None:
        now = time.monotonic()
        self.timeline[self.stage] = round(now, 3)
        log.info("[%8.2f] %s: %s (%.2f s)", now, self.stage, what, now - self.started)

    def failed(self, cause: str) -> str:
        """Print and return the one failure line; the cause may quote the network, so it is made safe here."""
        line = safe_text(f"FAILED at {self.stage}: {cause}")
        log.error("[%8.2f] %s", time.monotonic(), line)
        return line


# -- the daemon: fetch, open, choose, attach, serve ------------------------------------------------------------


def _fetch_options(cfg: BootConfig, sha256: Optional[str], verify: str) -> Any:
    from bootkit.fetch import FetchOptions

    return FetchOptions(
        sha256=sha256,
        verify=verify,
        retries=cfg.retries,
        timeout=cfg.timeout,
        cacert=cfg.cacert,
        insecure=cfg.insecure,
        reserve_bytes=cfg.minmem_mib << 20,
    )


def _grow_run(cfg: BootConfig) -> None:
    """Let /run (dracut mounts it with tmpfs' default, half the RAM) hold all but the RAM reserve.

    The fetcher itself refuses an image that would leave less than ``rd.qcow2.minmem`` free (dracut's
    ``check_live_ram`` does the same for live images).
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        return
    size_kib = total_kib - (cfg.minmem_mib << 10)
    if size_kib > 0:
        subprocess.run(["mount", "-o", f"remount,size={size_kib}k", "/run"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


class ImageFetcher:
    """Gets the image and its backing files: verified downloads into /run (ram) or range reads (lazy)."""

    def __init__(self, cfg: BootConfig, stages: Stages, image_dir: str = IMAGE_DIR) -> None:
        self.cfg = cfg
        self.stages = stages
        self.image_dir = image_dir
        self.base_url = cfg.url.rsplit("/", 1)[0] + "/"
        self.sources: List[ByteSource] = []
        self.verified: Dict[str, str] = {}

    def top(self) -> ByteSource:
        return self._get(self.cfg.url, top=True)

    def backing(self, name: str, what: str, referrer: ByteSource) -> ByteSource:
        """``bootkit.qcow2.open`` resolver: a backing file comes from the image's URL directory."""
        if what != "backing file":
            raise ImageError(f"{referrer.name}: names {what} {name!r}; only backing files can be fetched")
        if "/" in name or name in (".", "..") or not name:
            raise ImageError(
                f"{referrer.name}: backing file {name!r} is not a plain file name; bootkit fetches backing "
                "files only from the image's own URL directory"
            )
        return self._get(self.base_url + urllib.parse.quote(name), top=False)

    def _get(self, url: str, *, top: bool) -> ByteSource:
        cfg = self.cfg
        name = posixpath.basename(urllib.parse.urlsplit(url).path)
        sha256, verify = self._verification(name, top)
        self.stages.begin("fetch", f"{url} ({cfg.mode}, verify {verify})")
        if cfg.mode == "lazy":
            return self._lazy(url, name, top, verify)
        from bootkit.fetch import download

        os.makedirs(self.image_dir, exist_ok=True)
        result = download(url, os.path.join(self.image_dir, name), _fetch_options(cfg, sha256, verify))
        self.verified[url] = result.sha256
        rate = result.size / max(time.monotonic() - self.stages.started, 1e-3)
        self.stages.done(f"{name}: {human_size(result.size)} at {human_size(rate)}/s, sha256 {result.sha256} "
                         f"({'NOT verified' if verify == 'none' else verify})")  # fmt: skip
        source = FileSource(result.path)
        self.sources.append(source)
        return source

    def _verification(self, name: str, top: bool) -> "tuple[Optional[str], str]":
        cfg = self.cfg
        if top:
            return cfg.sha256, cfg.verify
        pinned = cfg.backing_sha256.get(name)
        if pinned:
            return pinned, "pinned"
        if cfg.verify == "pinned" and cfg.mode == "ram":
            raise ConfigError(
                f"backing file {name} has no pinned hash: add rd.qcow2.sha256.{name}=<sha256> "
                "(the image's own hash is pinned, so its backing files must be too)"
            )
        return None, "sidecar" if cfg.verify == "pinned" else cfg.verify

    def _lazy(self, url: str, name: str, top: bool, verify: str) -> ByteSource:
        from bootkit.fetch import HTTPSource, Manifest
        from bootkit.fetch.download import sidecar_checksum

        cfg = self.cfg
        options = _fetch_options(cfg, None, "none")
        manifest = None
        if verify != "none":
            murl = (cfg.manifest if top else None) or url + ".manifest"
            mname = posixpath.basename(urllib.parse.urlsplit(murl).path)
            msha = cfg.manifest_sha256 if top else cfg.backing_sha256.get(mname)
            if msha is None and cfg.verify == "pinned":
                raise ConfigError(
                    f"lazy mode with a pinned hash needs the manifest's hash pinned: "
                    f"{'rd.qcow2.manifest-sha256' if top else 'rd.qcow2.sha256.' + mname}=<sha256>"
                )
            if msha is None:
                msha, _where = sidecar_checksum(murl, options)
            manifest = Manifest.load(murl, options, sha256=msha)
            if top and cfg.sha256 and manifest.sha256 != cfg.sha256:
                raise BootFailed(f"{murl}: describes an image with sha256 {manifest.sha256}, "
                                 f"rd.qcow2.sha256 pins {cfg.sha256}")  # fmt: skip
        source = HTTPSource(url, options, manifest=manifest)
        self.verified[url] = "manifest " + (manifest.digest if manifest else "none")
        self.sources.append(source)
        self.stages.done(f"{name}: {human_size(source.size)}, read lazily "
                         f"({'chunks verified by manifest' if manifest else 'NOT verified'})")  # fmt: skip
        return source


class Prepared:
    """A verified, opened image and the partition that holds the root."""

    def __init__(self, image: Any, fetcher: ImageFetcher, root: Partition) -> None:
        self.image, self.fetcher, self.root = image, fetcher, root

    def close(self) -> None:
        _close(self.image, self.fetcher)


def _close(image: Any, fetcher: ImageFetcher) -> None:
    if image is not None:
        image.close()
    for source in fetcher.sources:
        source.close()


def prepare(cfg: BootConfig, stages: Stages, image_dir: str = IMAGE_DIR) -> Prepared:
    """Fetch and verify the image (and its backing files), open the chain, choose the root partition."""
    from bootkit import qcow2

    fetcher = ImageFetcher(cfg, stages, image_dir)
    try:
        top = fetcher.top()
        stages.begin("open")
        image = qcow2.open(top, snapshot=cfg.snapshot, resolver=fetcher.backing)
    except BaseException:
        _close(None, fetcher)
        raise
    try:
        chain = " <- ".join(posixpath.basename(s.name) for s in image.chain())
        snapshot = f", snapshot {cfg.snapshot}" if cfg.snapshot else ""
        stages.done(f"qcow2 {human_size(image.virtual_size)} virtual{snapshot}, chain: {chain}")
        stages.begin("root")
        root = choose_root(read_disk(image, image.virtual_size), cfg.root)
        how = f"rd.qcow2.root={cfg.root}" if cfg.root.kind != "auto" else "auto"
        stages.done(f"{root.describe()} ({how})")
    except BaseException:
        _close(image, fetcher)
        raise
    return Prepared(image, fetcher, root)


def run_daemon(cfg: BootConfig, stages: Stages, report: Any) -> int:
    """The forked daemon: prepare the device, report it, then serve until the kernel disconnects."""
    from bootkit.nbd import kernel

    status = StatusFile()
    try:
        kernel.harden()
        if cfg.mode == "ram":
            _grow_run(cfg)
        ready = prepare(cfg, stages)
        image, fetcher, root = ready.image, ready.fetcher, ready.root
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
        counters=_counters(image, fetcher, devstats),
    )
    status.refresh_every(10.0, lambda: _counters(image, fetcher, devstats))
    report.send(0, json.dumps({"device": device, "fstype": root.fs.type if root.fs else None}))
    attachment.wait()
    return 0


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


def _counters(image: Any, fetcher: ImageFetcher, device: Optional[DeviceStats] = None) -> Dict[str, Any]:
    """Cache counters of the reader, request counters of the device, HTTP counters in lazy mode."""
    counters: Dict[str, Any] = {}
    if hasattr(image, "cache_stats"):
        counters.update(image.cache_stats())
    if device is not None:
        counters.update(device.read())
    for source in fetcher.sources:
        stats = getattr(source, "stats", None)
        if stats:
            counters.update({f"http_{k}": v for k, v in dict(stats).items()})
    return counters


# -- the parent: wait for the device, mount ------------------------------------------------------------------


def _mount(args: Sequence[str]) -> None:
    proc = subprocess.run(["mount", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise BootFailed(f"mount {' '.join(args)}: {msg[-1] if msg else 'exit status %d' % proc.returncode}")


def _wait_for(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise BootFailed(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.05)


def mount_root(cfg: BootConfig, device: str, fstype: Optional[str], newroot: str) -> str:
    """Mount ``device`` read-only and, unless ``rd.qcow2.overlay=none``, a tmpfs overlayfs at ``newroot``."""
    fstype = cfg.rootfstype or fstype or "auto"
    flags = ",".join(["ro", *([cfg.rootflags] if cfg.rootflags else [])])
    os.makedirs(newroot, exist_ok=True)
    if cfg.overlay.kind == "none":
        _mount(["-t", fstype, "-o", flags, device, newroot])
        return f"{device} ({fstype}) read-only at {newroot}"
    os.makedirs(LOWER_DIR, exist_ok=True)
    os.makedirs(OVERLAY_DIR, exist_ok=True)
    _mount(["-t", fstype, "-o", flags, device, LOWER_DIR])
    size = f",size={cfg.overlay.size}" if cfg.overlay.size else ""
    _mount(["-t", "tmpfs", "-o", f"mode=0755{size}", "bootkit-overlay", OVERLAY_DIR])
    os.makedirs(OVERLAY_DIR + "/upper", exist_ok=True)
    os.makedirs(OVERLAY_DIR + "/work", exist_ok=True)
    options = f"lowerdir={LOWER_DIR},upperdir={OVERLAY_DIR}/upper,workdir={OVERLAY_DIR}/work"
    _mount(["-t", "overlay", "-o", ("rw," if cfg.rw else "ro,") + options, "overlay", newroot])
    return f"{device} ({fstype}, read-only) under a tmpfs overlay{size.replace(',', ' ')} at {newroot}"


def boot(cfg: BootConfig, newroot: str, unit: Optional[str]) -> int:
    from bootkit.nbd import kernel

    stages = Stages()
    os.makedirs(RUN_DIR, exist_ok=True)
    log.info("[%8.2f] start: root=qcow2:%s", stages.started, cfg.url)
    report, fd = kernel.fork_daemon()
    if report is not None:  # the daemon
        os._exit(run_daemon(cfg, stages, report))
    code, line = kernel.wait_daemon(fd)
    if code != 0:
        return _fail(line)
    try:
        info = json.loads(line)
        stages.begin("mount")
        _wait_for(info["device"], cfg.timeout)
        what = mount_root(cfg, info["device"], info.get("fstype"), newroot)
        if unit and os.path.isdir("/run/systemd/system"):
            # the real root's systemd must know the unit, or it stops it at the default-target isolate
            # and the server with it (dracut-notes §7)
            shutil.copy(unit, "/run/systemd/system/")
        stages.done(what)
    except BootkitError as e:
        return _fail(stages.failed(str(e)))
    log.info("[%8.2f] ready: root mounted, switching root", time.monotonic())
    return 0


def _fail(line: str) -> int:
    """Leave the failure line for the dracut scripts and ``bootkit status``: safe text only (see safe_text)."""
    try:
        os.makedirs(RUN_DIR, exist_ok=True)
        with open(FAILED_FILE, "w", encoding="ascii") as f:
            f.write(safe_text(line) + "\n")
    except OSError:
        pass
    return 1


def _setup_logging(debug: bool) -> None:
    from bootkit.log import setup

    setup(1 if debug else 0)
    for handler in log.handlers:
        handler.setFormatter(ConsoleFormatter("bootkit: %(message)s"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bootkit-boot", allow_abbrev=False)
    parser.add_argument("--check-cmdline", action="store_true", help="only validate the command line")
    parser.add_argument("--newroot", default="/sysroot", help="where the root goes")
    parser.add_argument("--unit", help="systemd unit file to copy to /run/systemd/system")
    parser.add_argument("--cmdline", default=None, help="kernel command line (default: /proc/cmdline)")
    args = parser.parse_args(argv)
    text = args.cmdline
    if text is None:
        with open(CMDLINE, encoding="utf-8", errors="replace") as f:
            text = f.read()
    try:
        cfg = parse_cmdline(text)
    except ConfigError as e:
        # parse-qcow2.sh hands this line to dracut's die: safe text only
        sys.stderr.write(f"error: {safe_text(str(e))}\n")
        if not args.check_cmdline:
            _fail(f"bad kernel command line: {e}")
        return 2
    _setup_logging(bool(cfg and cfg.debug))
    if cfg is None:
        sys.stderr.write("error: root= does not name a QCOW2 image (root=qcow2:<URL>)\n")
        return 2
    if args.check_cmdline:
        if cfg.debug:
            log.info("python %s: command line ok: %s", sys.version.split()[0], cfg)
        return 0
    missing = preload(strict=False)
    if missing:
        return _fail(Stages().failed(f"bootkit runtime incomplete, missing modules: {', '.join(missing)}"))
    return boot(cfg, args.newroot, args.unit)


if __name__ == "__main__":
    sys.exit(main())
