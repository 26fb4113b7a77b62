"""Getting the image and its backing files, and the rules that say how each is verified.

``rd.qcow2.mode=ram`` downloads each file whole into ``/run/bootkit/images`` and checks its SHA-256 before
anything opens it; ``rd.qcow2.mode=lazy`` reads byte ranges over HTTP and checks every chunk against the file's
manifest. Where the expected hash comes from is ``rd.qcow2.verify``: pinned on the command line
(``rd.qcow2.sha256``, ``rd.qcow2.sha256.<file>``), a sidecar from the same server, or nothing.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import os
import posixpath
import time
import urllib.parse
from typing import Any, Dict, List, Optional

from bootkit.boot.cmdline import BootConfig
from bootkit.boot.stages import BootFailed, Stages
from bootkit.boot.status import RUN_DIR
from bootkit.errors import ConfigError, ImageError
from bootkit.log import human_size
from bootkit.run import run
from bootkit.source import ByteSource, FileSource

IMAGE_DIR = RUN_DIR + "/images"


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


def grow_run(cfg: BootConfig) -> None:
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
        # best effort: without it the fetcher's own space check still refuses an image that does not fit
        run(["mount", "-o", f"remount,size={size_kib}k", "/run"], check=False, capture=True)


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

    def close(self) -> None:
        for source in self.sources:
            source.close()

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
