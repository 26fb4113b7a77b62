"""Getting the image and its backing files, and the rules that say how each is verified.

``rd.qcow2.mode=ram`` downloads each file whole into ``/run/bootkit/images`` and checks its SHA-256 before
anything opens it; ``rd.qcow2.mode=lazy`` reads byte ranges over HTTP and checks every chunk against the file's
manifest; ``rd.qcow2.mode=stream`` reads like lazy and has each file filled into RAM behind the boot
(:attr:`ImageFetcher.streams`, started by the server once the root is attached: ``bootkit.fetch.stream``).
Where the expected hash comes from is ``rd.qcow2.verify``: pinned on the command line
(``rd.qcow2.sha256``, ``rd.qcow2.sha256.<file>``), a sidecar from the same server, or nothing.

With ``rd.qcow2.cache=`` (lazy and stream mode), every file is read through the local chunk cache
(``bootkit.fetch.diskcache``): the manifest comes from the cache when it holds the pinned one, cached chunks from
the disk, and the server is contacted only for a chunk the cache lacks (``bootkit.fetch.deferred``).

``rd.qcow2.mirror=`` names the same image on other servers (only with a pinned hash, see
``bootkit.boot.cmdline``); a backing file comes from each mirror's own directory, as from the primary's.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import os
import posixpath
import re
import time
import urllib.parse
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from bootkit.boot.cmdline import BootConfig
from bootkit.boot.stages import BootFailed, Stages
from bootkit.boot.status import RUN_DIR
from bootkit.errors import ConfigError, ImageError
from bootkit.log import human_size, log
from bootkit.record import record
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


#: the file names ``rd.qcow2.sha256.<file>`` can carry (what bootkit.boot.cmdline accepts)
_PINNABLE = re.compile(r"^[A-Za-z0-9._+-]+$")


@record
class Verification:
    """How one file of the chain is checked: where its expected hash comes from."""

    #: pinned (a hash from the command line), sidecar (a hash from the image's server) or none
    how: str
    #: the pinned SHA-256 of the file itself (ram: the download is checked against it; lazy: the manifest's
    #: whole-image hash is), with the option that pinned it
    sha256: Optional[str] = None
    option: str = ""
    #: lazy mode: the pinned SHA-256 of the file's manifest (None: from the manifest's sidecar), and its option
    manifest_sha256: Optional[str] = None
    manifest_option: str = ""

    def describe(self, mode: str) -> str:
        if mode != "ram" and self.how != "none":
            return f"chunks by manifest, {'pinned' if self.manifest_sha256 else 'sidecar'}"
        return self.how


class ImageFetcher:
    """Gets the image and its backing files: verified downloads into /run (ram) or range reads (lazy).

    Backing files come from the image's own URL directory. Pins (``rd.qcow2.sha256.<file>``) name a file
    by its decoded name (``base+v2.qcow2``, not ``base%2Bv2.qcow2``); :meth:`check_pins` fails the boot on a
    pin that matched no file, so a typo cannot silently turn pinning into trusting the server.
    """

    def __init__(self, cfg: BootConfig, stages: Stages, image_dir: str = IMAGE_DIR) -> None:
        self.cfg = cfg
        self.stages = stages
        self.image_dir = image_dir
        self.base_url = cfg.url.rsplit("/", 1)[0] + "/"
        self.sources: List[ByteSource] = []
        #: stream mode: every file of the chain, for the background fill
        self.streams: List[Any] = []
        self.verified: Dict[str, str] = {}
        #: the rd.qcow2.sha256.<file> pins that matched a file
        self.pins_used: Set[str] = set()
        #: per-mirror counters of finished downloads (ram mode), by URL
        self._mirror_results: Dict[str, Dict[str, object]] = {}
        self._warned_unauthenticated = False
        #: the local chunk cache (``rd.qcow2.cache=``, opened by ``bootkit.boot.cachedev``), or None
        self.cache: Any = None
        #: per file: the deferred remote of a file read through the cache (did the boot contact its server?)
        self.remotes: List[Any] = []

    @property
    def offline(self) -> bool:
        """True when every file came from the local cache and no image server was contacted."""
        return bool(self.remotes) and not any(r.opened for r in self.remotes)

    def top(self) -> ByteSource:
        return self._get(self.cfg.url, _decoded_name(self.cfg.url), top=True)

    def backing(self, name: str, what: str, referrer: ByteSource) -> ByteSource:
        """``bootkit.qcow2.open`` resolver: a backing file comes from the image's URL directory."""
        if what != "backing file":
            raise ImageError(f"{referrer.name}: names {what} {name!r}; only backing files can be fetched")
        if "/" in name or name in (".", "..") or not name:
            raise ImageError(
                f"{referrer.name}: backing file {name!r} is not a plain file name; bootkit fetches backing "
                "files only from the image's own URL directory"
            )
        return self._get(self.base_url + urllib.parse.quote(name), name, top=False)

    def check_pins(self, chain: str) -> None:
        """Fail on a ``rd.qcow2.sha256.<file>`` that matched no file of the opened ``chain``."""
        unused = sorted(set(self.cfg.backing_sha256) - self.pins_used)
        if not unused:
            return
        name = unused[0]
        option = f"rd.qcow2.sha256.{name}"
        if name == _decoded_name(self.cfg.url):
            hint = "that is the image itself, whose hash is pinned with rd.qcow2.sha256="
        elif name.endswith(".manifest") and not self.cfg.mode.reads_ranges:
            hint = "manifests are only read with rd.qcow2.mode=lazy or stream"
        elif name.endswith(".manifest") and self.cfg.verify == "none":
            hint = "rd.qcow2.verify=none reads no manifest"
        else:
            hint = f"the image's chain is {chain}"
        raise ConfigError(f"{option}: matches no file bootkit fetched ({hint})")

    def close(self) -> None:
        for source in self.sources:
            source.close()

    def mirror_status(self) -> Dict[str, Dict[str, object]]:
        """Per-mirror state and counters (bytes, errors, bad chunks), by URL; empty without mirrors."""
        result = dict(self._mirror_results)
        for source in self.sources:
            mirrors = getattr(source, "mirrors", None)
            if mirrors is not None and len(mirrors) > 1:
                result.update(mirrors.describe())
        return result

    def _mirrors_of(self, url: str, top: bool) -> Tuple[str, ...]:
        """The same file on the mirrors: the image itself, or a backing file from each mirror's directory."""
        if top:
            return self.cfg.mirrors
        name = url.rsplit("/", 1)[1]
        return tuple(m.rsplit("/", 1)[0] + "/" + name for m in self.cfg.mirrors)

    def _get(self, url: str, name: str, *, top: bool) -> ByteSource:
        """Fetch ``url``; ``name`` is its decoded file name, which pins and console lines use."""
        cfg = self.cfg
        check = self._verification(name, top)
        mirrors = self._mirrors_of(url, top)
        also = f", {len(mirrors)} mirror{'s' if len(mirrors) > 1 else ''}" if mirrors else ""
        self.stages.begin("fetch", f"{url} ({cfg.mode}, verify {check.describe(cfg.mode)}{also})")
        if cfg.mode.reads_ranges:
            return self._lazy(url, name, top, check, mirrors)
        from bootkit.fetch import download

        if check.how == "sidecar":
            self._warn_if_unauthenticated(url)
        self._make_image_dir()
        # on disk under the URL's own last segment (%-encoded, so never a path outside the directory)
        dest = os.path.join(self.image_dir, posixpath.basename(urllib.parse.urlsplit(url).path))
        manifest = None
        if mirrors and check.manifest_sha256:  # lets the download keep what it has when it moves to a mirror
            murls = [cfg.manifest or url + ".manifest", *(m + ".manifest" for m in mirrors)]
            manifest = _load_manifest(murls, _fetch_options(cfg, None, "none"), check.manifest_sha256)
        result = download(url, dest, _fetch_options(cfg, check.sha256, check.how), mirrors=mirrors, manifest=manifest)
        self._mirror_results.update(result.mirrors)
        # the directory is 0700 already; the file is private too, like the root filesystem's own files
        os.chmod(result.path, 0o600)
        self.verified[url] = result.sha256
        rate = result.size / max(time.monotonic() - self.stages.started, 1e-3)
        source_note = f", from {result.url}" if result.url != url else ""
        self.stages.done(f"{name}: {human_size(result.size)} at {human_size(rate)}/s, sha256 {result.sha256} "
                         f"({'NOT verified' if check.how == 'none' else check.how}{source_note})")  # fmt: skip
        source = FileSource(result.path)
        self.sources.append(source)
        return source

    def _make_image_dir(self) -> None:
        """``/run/bootkit/images`` readable by root only: ``/run`` moves into the booted system, and the images
        hold every file of the root filesystem, whatever modes the files inside have."""
        os.makedirs(self.image_dir, mode=0o700, exist_ok=True)
        os.chmod(self.image_dir, 0o700)  # makedirs honours the umask and leaves an existing directory alone

    def _verification(self, name: str, top: bool) -> Verification:
        cfg = self.cfg
        if top:
            return Verification(cfg.verify, cfg.sha256, "rd.qcow2.sha256", cfg.manifest_sha256,
                                "rd.qcow2.manifest-sha256")  # fmt: skip
        option = f"rd.qcow2.sha256.{name}"
        mname = name + ".manifest"
        manifest_sha256 = cfg.backing_sha256.get(mname) if cfg.mode.reads_ranges else None
        pinned = cfg.backing_sha256.get(name)
        how = "pinned" if pinned else "sidecar" if cfg.verify == "pinned" else cfg.verify
        if pinned:
            self.pins_used.add(name)
        if manifest_sha256 and how != "none":
            self.pins_used.add(mname)
        if cfg.mode.reads_ranges or pinned:
            return Verification(how, pinned, option, manifest_sha256, f"rd.qcow2.sha256.{mname}")
        if cfg.verify == "pinned" and cfg.mode == "ram":
            if not _PINNABLE.match(name):
                raise ConfigError(
                    f"backing file {name!r} has no pinned hash, and rd.qcow2.sha256.<file> cannot name it "
                    "(letters, digits and . _ + - only): rename the backing file"
                )
            raise ConfigError(
                f"backing file {name} has no pinned hash: add {option}=<sha256> "
                "(the image's own hash is pinned, so its backing files must be too)"
            )
        return Verification(how)

    def _warn_if_unauthenticated(self, url: str) -> None:
        """One console line per boot when a hash comes from the server over an unauthenticated channel."""
        if self._warned_unauthenticated:
            return
        if url.startswith("http://"):
            channel = "http://"
        elif self.cfg.insecure:
            channel = "https with rd.qcow2.insecure"
        else:
            return
        self._warned_unauthenticated = True
        pin = "rd.qcow2.manifest-sha256" if self.cfg.mode.reads_ranges else "rd.qcow2.sha256"
        self.stages.warn(
            f"hashes fetched over {channel} catch corruption, not an attacker who can replace image and hash "
            f"together: pin {pin} on the command line, or use https with a verified certificate"
        )

    def _lazy(self, url: str, name: str, top: bool, check: Verification, mirrors: Sequence[str]) -> ByteSource:
        from bootkit.fetch import HTTPSource
        from bootkit.fetch.download import sidecar_checksum

        cfg = self.cfg
        options = _fetch_options(cfg, None, "none")
        manifest = None
        if check.how != "none":
            murl = (cfg.manifest if top else None) or url + ".manifest"
            msha = check.manifest_sha256
            if msha is None and cfg.verify == "pinned":
                raise ConfigError(
                    f"{cfg.mode} mode with a pinned hash needs the manifest's hash pinned: "
                    f"{check.manifest_option}=<sha256>"
                )
            if msha is None:
                self._warn_if_unauthenticated(murl)
                msha, _where = sidecar_checksum(murl, options)
            manifest = self._cached_manifest(msha, murl)
            if manifest is None:
                # pinned, so any mirror may supply it; a sidecar hash comes from the primary only (no mirrors then)
                manifest = _load_manifest([murl, *(m + ".manifest" for m in mirrors)], options, msha)
            # an image pin cannot check chunks (lazy mode never reads the whole file); it must agree with the
            # manifest's whole-image hash, so one command line pins both modes and a wrong pin fails here
            if check.sha256 and manifest.sha256 != check.sha256:
                raise BootFailed(f"{murl}: describes an image with sha256 {manifest.sha256}, "
                                 f"{check.option} pins {check.sha256}")  # fmt: skip
        if self.cache is not None and manifest is not None:
            return self._through_cache(url, name, options, manifest, mirrors)
        remote = HTTPSource(url, options, manifest=manifest, mirrors=mirrors)
        source: ByteSource = remote
        how = "read lazily"
        if cfg.mode == "stream":
            from bootkit.fetch.stream import StreamSource

            source = StreamSource(remote)
            self.streams.append(source)
            how = "read lazily, filled into RAM behind the boot"
        self.verified[url] = "manifest " + (manifest.digest if manifest else "none")
        self.sources.append(source)
        self.stages.done(f"{name}: {human_size(source.size)}, {how} "
                         f"({'chunks verified by manifest' if manifest else 'NOT verified'})")  # fmt: skip
        return source


    def _cached_manifest(self, sha256: str, url: str) -> Any:
        """The manifest with SHA-256 ``sha256`` from the local cache (checked there), or None."""
        from bootkit.fetch import Manifest

        if self.cache is None:
            return None
        data = self.cache.get_manifest(sha256)
        if data is None:
            return None
        log.info("[%8.2f] fetch: manifest %s from the local cache (the pinned hash)", time.monotonic(), sha256)
        return Manifest.parse(data, url, sha256)

    def _through_cache(self, url: str, name: str, options: Any, manifest: Any, mirrors: Sequence[str]) -> ByteSource:
        """A file read through the local cache: cached chunks from the disk (verified there), the others from
        the server, which is contacted only when the first chunk is missing (``bootkit.fetch.deferred``)."""
        from bootkit.fetch.deferred import DeferredRemote
        from bootkit.fetch.diskcache import CacheStore
        from bootkit.fetch.stream import StreamSource

        self.cache.put_manifest(manifest.dumps())  # remembered: its chunks are kept when the cache evicts
        remote = DeferredRemote(url, options, manifest, mirrors)
        source = StreamSource(remote)
        store = CacheStore(self.cache, manifest.chunks)
        source.attach(store)
        self.remotes.append(remote)
        if self.cfg.mode == "stream":
            self.streams.append(source)
        self.verified[url] = "manifest " + manifest.digest
        self.sources.append(source)
        behind = ", the rest filled into the cache behind the boot" if self.cfg.mode == "stream" else ""
        if store.complete():
            behind = ": the image server is not needed"
        self.stages.done(f"{name}: {human_size(source.size)}, {store.present} of {manifest.chunk_count} chunks in "
                         f"the local cache{behind} (chunks verified by manifest)")  # fmt: skip
        return source


def _load_manifest(urls: Sequence[str], options: Any, sha256: str) -> Any:
    """The manifest from the first of ``urls`` that has it with the pinned hash; else the first one's error."""
    from bootkit.fetch import Manifest

    first: Optional[BaseException] = None
    for url in urls:
        try:
            return Manifest.load(url, options, sha256=sha256)
        except Exception as e:  # the next mirror may have it; the first error is the one to report
            first = first or e
    assert first is not None
    raise first


def _decoded_name(url: str) -> str:
    """The file name a URL names, %-decoded: what ``rd.qcow2.sha256.<file>`` and the console call it."""
    return urllib.parse.unquote(posixpath.basename(urllib.parse.urlsplit(url).path))
