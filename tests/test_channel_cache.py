"""Signed channels with the local chunk cache: the verified channel and the highest version booted are kept on
the cache disk, and a machine whose image server is unreachable boots the kept channel (verified again), for a
stated grace period after its expiry."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
from test_channel_boot import Site, config, served_copy, site, stable  # noqa: F401 - site is a fixture

from bootkit.boot.channel import ChannelRefused, Trust
from bootkit.boot.channelcache import OFFLINE_GRACE, CacheVersionStore, _key
from bootkit.boot.serve import Prepared, prepare
from bootkit.boot.stages import Stages
from bootkit.errors import FetchError
from bootkit.fetch.diskcache import DiskCache
from bootkit.host.httpserve import http_server
from bootkit.host.publish.channel import ChannelOptions, Target, publish_channel

DAY = 86400.0


def cached_boot(url: str, tmp_path: Path, cache_dir: Path, site: Site, now: float, extra: str = "") -> Prepared:  # noqa: F811
    cache = DiskCache.open(str(cache_dir))
    cfg = config(f"root=qcow2:channel:{url}stable.json rd.qcow2.mode=lazy rd.qcow2.cache=/dev/x {extra}")
    return prepare(cfg, Stages(), str(tmp_path / "images"), Trust((site.pub,), CacheVersionStore(cache), now), cache)


def first_boot_fills_the_cache(site: Site, tmp_path: Path, now: float) -> tuple[Path, Path]:  # noqa: F811
    """A docroot whose channel is valid for a day from ``now``; one online boot reads every chunk into the cache."""
    d = served_copy(site, tmp_path)
    channel = stable(site)
    publish_channel(ChannelOptions(site.key, "stable", valid_for=DAY),
                    Target(channel.image, channel.size, channel.pin, channel.backing), d, now=now)  # fmt: skip
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    with http_server(str(d)) as url:
        ready = cached_boot(url, tmp_path / "first", cache_dir, site, now)
        try:
            for source in ready.fetcher.sources:
                source.pread(0, source.size)  # every chunk, as stream mode's fill does
        finally:
            ready.close()
    return d, cache_dir


def test_offline_boot_from_the_kept_channel_and_its_grace(site: Site, tmp_path: Path,  # noqa: F811
                                                           caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    now = time.time()
    d, cache_dir = first_boot_fills_the_cache(site, tmp_path, now)
    version = json.loads((d / "stable.json").read_bytes())["version"]
    assert CacheVersionStore(DiskCache.open(str(cache_dir))).highest("stable") == version
    gone = "http://127.0.0.1:9/"  # the image server is unreachable (nothing listens on the discard port)
    with caplog.at_level(logging.INFO, logger="bootkit"):
        ready = cached_boot(gone, tmp_path / "offline", cache_dir, site, now + 3600)
    try:
        data = site.expected.read_bytes()
        assert ready.image.pread(0, len(data)) == data
        assert ready.fetcher.offline
    finally:
        ready.close()
    assert "the server is unreachable" in caplog.text
    assert "the last verified channel from the local cache" in caplog.text
    # expired two days ago: within the grace, it boots and says so
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bootkit"):
        cached_boot(gone, tmp_path / "grace", cache_dir, site, now + DAY + 2 * DAY).close()
    assert f"booting it offline within the {int(OFFLINE_GRACE // DAY)}-day grace" in caplog.text
    # past the grace: refused, one line
    with pytest.raises(ChannelRefused, match=r"expired at .*publish it again"):
        cached_boot(gone, tmp_path / "late", cache_dir, site, now + DAY + OFFLINE_GRACE + 60).close()


def test_a_reachable_server_gives_no_grace(site: Site, tmp_path: Path) -> None:  # noqa: F811
    now = time.time()
    d, cache_dir = first_boot_fills_the_cache(site, tmp_path, now)
    with http_server(str(d)) as url, pytest.raises(ChannelRefused, match="expired at"):
        cached_boot(url, tmp_path / "later", cache_dir, site, now + 2 * DAY).close()


def test_a_kept_channel_altered_on_the_disk_is_refused(site: Site, tmp_path: Path) -> None:  # noqa: F811
    now = time.time()
    _d, cache_dir = first_boot_fills_the_cache(site, tmp_path, now)
    cache = DiskCache.open(str(cache_dir))
    name = _key("stable") + ".json"
    kept = cache.get_meta(name)
    assert kept is not None
    doc = json.loads(kept)
    doc["version"] += 1  # the cache's own checksum is made to match: only the signature can tell
    cache.put_meta(name, json.dumps(doc).encode())
    with pytest.raises(ChannelRefused, match="the signature does not verify"):
        cached_boot("http://127.0.0.1:9/", tmp_path / "offline", cache_dir, site, now + 60).close()


def test_without_a_kept_channel_an_unreachable_server_fails_the_boot(site: Site, tmp_path: Path) -> None:  # noqa: F811
    (tmp_path / "cache").mkdir()
    with pytest.raises(FetchError):
        cached_boot("http://127.0.0.1:9/", tmp_path, tmp_path / "cache", site, time.time()).close()


def test_the_version_kept_on_the_cache_stops_a_rollback_after_power_off(site: Site, tmp_path: Path) -> None:  # noqa: F811
    now = time.time()
    d, cache_dir = first_boot_fills_the_cache(site, tmp_path, now)
    newer = json.loads((d / "stable.json").read_bytes())["version"]
    # the site's older channel (version 1), served again
    old = tmp_path / "old"
    shutil.copytree(site.docroot, old)
    with http_server(str(old)) as url, pytest.raises(ChannelRefused, match="which this machine booted before"):
        cached_boot(url, tmp_path / "rollback", cache_dir, site, now + 60).close()
    assert stable(site).version < newer
