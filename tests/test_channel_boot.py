"""``root=qcow2:channel:URL`` on the host: the boot code's first half follows a channel ``bootkit publish --sign``
wrote, served by bootkit's HTTP server on 127.0.0.1, and refuses every bad one with one line before it fetches
(or, for a bad image, before it opens) anything.

``bootkit.boot.serve.prepare`` is exactly what the initramfs daemon runs before it attaches /dev/nbd0; keys are
made by ``openssl genpkey``; images by qemu-img, mke2fs and sfdisk.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from boot_fixtures import DPS_ROOT_X86_64, Part, make_disk, make_ext4, need

from bootkit.boot.channel import Channel, ChannelRefused, FileVersionStore, Pin, Trust, follow, format_time, load_keys
from bootkit.boot.cmdline import BootConfig, parse_cmdline
from bootkit.boot.ed25519 import parse_public_key
from bootkit.boot.serve import Prepared, prepare
from bootkit.boot.stages import Stages
from bootkit.errors import BootkitError, ConfigError, FetchError
from bootkit.host.cli import main
from bootkit.host.httpserve import http_server
from bootkit.host.publish.channel import ChannelOptions, Target, publish_channel, sign


@dataclass(frozen=True)
class Site:
    """A docroot with base.qcow2 and the overlay top.qcow2 published, the channel ``stable`` at version 1."""

    docroot: Path
    key: Path
    pub: bytes
    other_key: Path
    other_pub: bytes
    expected: Path  # top.qcow2 as a raw disk
    url: str


def openssl_key(path: Path) -> tuple[Path, bytes]:
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(path)], check=True, capture_output=True)
    pem = subprocess.run(["openssl", "pkey", "-in", str(path), "-pubout"], check=True, capture_output=True).stdout
    return path, parse_public_key(pem.decode(), str(path))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    need("qemu-img", "qemu-io", "sfdisk", "mke2fs", "openssl")
    d = tmp_path_factory.mktemp("channel")
    work = d / "work"
    work.mkdir()
    root = make_ext4(work / "root.ext4", 8, label="chroot")
    raw = make_disk(work / "disk.raw", [Part(root, DPS_ROOT_X86_64)])
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", str(raw), str(work / "base.qcow2")],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(work / "top.qcow2")],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 5M 64k", str(work / "top.qcow2")], check=True, capture_output=True)
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(work / "top.qcow2"), str(d / "expected.raw")],
                   check=True, capture_output=True)  # fmt: skip
    docroot = d / "www"
    docroot.mkdir()
    key, pub = openssl_key(d / "channel.key")
    other_key, other_pub = openssl_key(d / "other.key")
    assert main(["publish", str(work / "base.qcow2"), str(docroot)]) == 0
    assert main(["publish", str(work / "top.qcow2"), str(docroot), "--sign", str(key), "--channel", "stable"]) == 0
    with http_server(str(docroot)) as url:
        yield Site(docroot, key, pub, other_key, other_pub, d / "expected.raw", url)


def config(text: str) -> BootConfig:
    cfg = parse_cmdline(text + " rd.qcow2.retries=0 rd.qcow2.timeout=10")
    assert cfg is not None
    return cfg


def trust(site: Site, tmp_path: Path, *keys: bytes, now: float | None = None) -> Trust:
    return Trust(keys or (site.pub,), FileVersionStore(str(tmp_path / "state")), now)


def boot(url: str, tmp_path: Path, t: Trust, extra: str = "") -> Prepared:
    return prepare(config(f"root=qcow2:channel:{url} {extra}"), Stages(), str(tmp_path / "images"), t)


def refused(url: str, tmp_path: Path, t: Trust, extra: str = "", kind: type[BootkitError] = ChannelRefused) -> str:
    """The one line a refused boot prints; nothing was downloaded."""
    with pytest.raises(kind) as info:
        boot(url, tmp_path, t, extra).close()
    assert not (tmp_path / "images").exists() or not any((tmp_path / "images").iterdir())
    line = str(info.value)
    assert "\n" not in line
    return line


def served_copy(site: Site, tmp_path: Path) -> Path:
    """A copy of the site's docroot to alter (the HTTP server serves no symlinks; the images are small)."""
    d = tmp_path / "www"
    shutil.copytree(site.docroot, d)
    return d


def write_signed(d: Path, key: Path, data: bytes, name: str = "stable") -> None:
    (d / f"{name}.json").write_bytes(data)
    (d / f"{name}.json.sig").write_bytes(sign(key, data, d))


def stable(site: Site) -> Channel:
    return Channel.parse((site.docroot / "stable.json").read_bytes(), "stable.json")


def assert_serves(ready: Prepared, expected: Path) -> None:
    data = expected.read_bytes()
    assert ready.image.pread(0, len(data)) == data


# -- good channels ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ram", "lazy"])
def test_channel_boots_its_image_pinned(site: Site, tmp_path: Path, mode: str) -> None:
    channel = stable(site)
    # key rotation: the old key and the new one are both trusted; the channel is signed by the second
    t = trust(site, tmp_path, site.other_pub, site.pub)
    ready = boot(f"{site.url}stable.json", tmp_path, t, f"rd.qcow2.mode={mode}")
    try:
        assert_serves(ready, site.expected)
        cfg = ready.cfg
        assert cfg.url == f"{site.url}{channel.image}" and not cfg.channel
        assert cfg.sha256 == channel.pin.sha256
        [(base, pin)] = channel.backing
        if mode == "ram":
            assert cfg.manifest_sha256 is None and cfg.backing_sha256 == {base: pin.sha256}
            assert ready.fetcher.verified == {cfg.url: channel.pin.sha256, f"{site.url}{base}": pin.sha256}
        else:
            assert cfg.manifest_sha256 == channel.pin.manifest_sha256
            assert cfg.backing_sha256 == {base: pin.sha256, base + ".manifest": pin.manifest_sha256}
        # what bootkit status shows: the channel that named the image, no cache
        assert ready.source() == {"channel": {
            "url": f"{site.url}stable.json", "name": channel.name, "version": channel.version,
            "image": channel.image, "expires": format_time(channel.expires),
        }}  # fmt: skip
    finally:
        ready.close()
    assert (tmp_path / "state" / "stable.version").read_text() == f"{channel.version}\n"


def test_a_newer_version_is_remembered(site: Site, tmp_path: Path) -> None:
    d = served_copy(site, tmp_path)
    channel = stable(site)
    target = Target(channel.image, channel.size, channel.pin, channel.backing)
    t = trust(site, tmp_path)
    t.versions.remember("stable", channel.version)
    publish_channel(ChannelOptions(site.key, "stable"), target, d)
    with http_server(str(d)) as url:
        boot(f"{url}stable.json", tmp_path / "a", t).close()
    assert t.versions.highest("stable") == channel.version + 1
    # the version this machine booted is now the floor: the site's own version 1 is a rollback
    line = refused(f"{site.url}stable.json", tmp_path / "b", t)
    assert line == (f"{site.url}stable.json: channel stable version {channel.version} is older than version "
                    f"{channel.version + 1}, which this machine booted before (remembered in {tmp_path / 'state'}; "
                    "a rollback?)")  # fmt: skip


# -- refusals: each one line, before any image byte is fetched ----------------------------------------------


def test_wrong_key(site: Site, tmp_path: Path) -> None:
    line = refused(f"{site.url}stable.json", tmp_path, trust(site, tmp_path, site.other_pub))
    assert line == (f"{site.url}stable.json: the signature does not verify with any of the 1 trusted key "
                    "(altered, or signed by another key)")  # fmt: skip
    assert not (tmp_path / "state").exists()


def test_no_trusted_key(site: Site, tmp_path: Path) -> None:
    t = Trust(load_keys(str(tmp_path / "no-such-file")), FileVersionStore(str(tmp_path / "state")))
    assert refused(f"{site.url}stable.json", tmp_path, t) == (
        f"{site.url}stable.json: this initramfs trusts no channel key (bootkit build-initrd --trust-key PUB)"
    )


def test_altered_channel_file(site: Site, tmp_path: Path) -> None:
    d = served_copy(site, tmp_path)
    data = (d / "stable.json").read_bytes()
    (d / "stable.json").write_bytes(data.replace(b'"version": 1,', b'"version": 9,'))
    with http_server(str(d)) as url:
        line = refused(f"{url}stable.json", tmp_path, trust(site, tmp_path))
    assert "the signature does not verify with any of the 1 trusted key" in line


def test_altered_signature(site: Site, tmp_path: Path) -> None:
    d = served_copy(site, tmp_path)
    sig = bytearray((d / "stable.json.sig").read_bytes())
    sig[10] ^= 1
    (d / "stable.json.sig").write_bytes(bytes(sig))
    with http_server(str(d)) as url:
        line = refused(f"{url}stable.json", tmp_path, trust(site, tmp_path))
        assert "the signature does not verify" in line
        (d / "stable.json.sig").write_bytes(bytes(sig[:63]))
        assert refused(f"{url}stable.json", tmp_path, trust(site, tmp_path)) == (
            f"{url}stable.json.sig: 63 bytes; an Ed25519 signature is 64"
        )
        (d / "stable.json.sig").write_bytes(bytes(sig) + b"\n")
        assert refused(f"{url}stable.json", tmp_path, trust(site, tmp_path), kind=FetchError) == (
            f"{url}stable.json.sig: larger than 64 bytes; not an Ed25519 signature"
        )


def test_expired_and_not_yet_valid(site: Site, tmp_path: Path) -> None:
    d = served_copy(site, tmp_path)
    channel = stable(site)
    target = Target(channel.image, channel.size, channel.pin, channel.backing)
    day = 86400.0
    with http_server(str(d)) as url:
        publish_channel(ChannelOptions(site.key, "stable", valid_for=day), target, d, now=time.time() - 3 * day)
        line = refused(f"{url}stable.json", tmp_path, trust(site, tmp_path))
        assert f"{url}stable.json: channel stable version 2 expired at " in line
        assert line.endswith(": publish it again, or set the clock if it is wrong")
        publish_channel(ChannelOptions(site.key, "stable", valid_for=day), target, d, now=time.time() + 2 * 3600)
        line = refused(f"{url}stable.json", tmp_path, trust(site, tmp_path))
        assert f"{url}stable.json: channel stable version 3 is not valid before " in line
        # a clock less than an hour behind not_before is taken to be slow: the channel boots
        boot(f"{url}stable.json", tmp_path, trust(site, tmp_path, now=time.time() + 5400)).close()


def test_older_than_min_version(site: Site, tmp_path: Path) -> None:
    line = refused(f"{site.url}stable.json", tmp_path, trust(site, tmp_path), "rd.qcow2.channel.min-version=2")
    assert line == (f"{site.url}stable.json: channel stable version 1 is older than rd.qcow2.channel.min-version=2 "
                    "(a rollback?)")  # fmt: skip


def test_signed_for_another_channel(site: Site, tmp_path: Path) -> None:
    d = served_copy(site, tmp_path)
    (d / "testing.json").write_bytes((d / "stable.json").read_bytes())
    (d / "testing.json.sig").write_bytes((d / "stable.json.sig").read_bytes())
    with http_server(str(d)) as url:
        line = refused(f"{url}testing.json", tmp_path, trust(site, tmp_path))
    assert line == f"{url}testing.json: signed for channel 'stable', but the file is 'testing'"


def test_oversized_and_garbage(site: Site, tmp_path: Path) -> None:
    d = served_copy(site, tmp_path)
    original = (d / "stable.json").read_bytes()
    doc = json.loads(original)
    with http_server(str(d)) as url:
        write_signed(d, site.key, b" " * (64 << 10) + original)
        assert refused(f"{url}stable.json", tmp_path, trust(site, tmp_path), kind=FetchError) == (
            f"{url}stable.json: larger than 65536 bytes; not a channel file"
        )
        (d / "stable.json").write_bytes(b"\x00garbage\xff")
        assert "the signature does not verify" in refused(f"{url}stable.json", tmp_path, trust(site, tmp_path))
        # garbage a trusted key signed is refused as garbage, naming what is wrong
        cases = [
            (b"\x00garbage\xff", "not a bootkit channel file (UnicodeDecodeError"),
            (b"[1, 2]", 'not a bootkit channel file (no "bootkit-channel": 1)'),
            (json.dumps({**doc, "extra": 1}).encode(), "unknown field 'extra'"),
            (json.dumps({**doc, "version": True}).encode(), "field 'version' must be a whole number"),
            (json.dumps({**doc, "image": "../etc/x.qcow2"}).encode(), "'../etc/x.qcow2' is not a plain file name"),
            (json.dumps({**doc, "sha256": "ab"}).encode(), "field 'sha256' must be 64 lowercase hexadecimal digits"),
            (json.dumps({**doc, "expires": "2026-02-30T00:00:00Z"}).encode(), "is not a valid time"),
            (original.rstrip()[:-1] + b', "version": 7}', "field 'version' given twice"),
        ]
        for data, why in cases:
            write_signed(d, site.key, data)
            line = refused(f"{url}stable.json", tmp_path, trust(site, tmp_path))
            assert line.startswith(f"{url}stable.json: ") and why in line, line


def test_image_whose_hash_does_not_match(site: Site, tmp_path: Path) -> None:
    """The channel is good, the image is not the one it pins: refused when fetched (ram) or by its manifest
    (lazy), nothing opened."""
    d = served_copy(site, tmp_path)
    channel = stable(site)
    wrong = Pin("0" * 64, channel.pin.manifest_sha256)
    data = Channel(channel.name, 2, channel.not_before, channel.expires, channel.image, channel.size, wrong,
                   channel.backing).dumps()  # fmt: skip
    with http_server(str(d)) as url:
        write_signed(d, site.key, data)
        line = refused(f"{url}stable.json", tmp_path / "ram", trust(site, tmp_path), kind=FetchError)
        assert f"{channel.image}: SHA-256 mismatch" in line, line
        line = refused(f"{url}stable.json", tmp_path / "lazy", trust(site, tmp_path), "rd.qcow2.mode=lazy",
                       kind=BootkitError)  # fmt: skip
        assert f"describes an image with sha256 {channel.pin.sha256}, rd.qcow2.sha256 pins {'0' * 64}" in line
        wrong_size = Channel(channel.name, 3, channel.not_before, channel.expires, channel.image, channel.size + 1,
                             channel.pin, channel.backing).dumps()  # fmt: skip
        write_signed(d, site.key, wrong_size)
        line = refused(f"{url}stable.json", tmp_path / "size", trust(site, tmp_path), "rd.qcow2.mode=lazy")
        assert line == f"{url}{channel.image}: {channel.size} bytes, channel stable version 3 says {channel.size + 1}"


def test_damaged_version_record_fails_closed(site: Site, tmp_path: Path) -> None:
    t = trust(site, tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "stable.version").write_text("x\n")
    assert refused(f"{site.url}stable.json", tmp_path, t) == (
        f"{tmp_path / 'state' / 'stable.version'}: not a version number (remove the file to forget the channel's "
        "history)"
    )


def test_channel_url_must_name_a_channel_file(site: Site, tmp_path: Path) -> None:
    line = refused(f"{site.url}stable.qcow2", tmp_path, trust(site, tmp_path))
    assert line == f"root=qcow2:channel:{site.url}stable.qcow2: expected the URL of a NAME.json channel file"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (f"rd.qcow2.sha256={'0' * 64}", "rd.qcow2.sha256: not with root=qcow2:channel:<URL>"),
        ("rd.qcow2.verify=none", "rd.qcow2.verify: not with root=qcow2:channel:<URL>"),
        (f"rd.qcow2.sha256.base.qcow2={'0' * 64}", "rd.qcow2.sha256.base.qcow2: not with root=qcow2:channel:<URL>"),
        ("rd.qcow2.mirror=http://m/x.qcow2", "rd.qcow2.mirror: not with root=qcow2:channel:<URL>"),
        ("rd.qcow2.channel.min-version=x", "rd.qcow2.channel.min-version=x: expected a whole number"),
    ],
)
def test_command_line_refusals(extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.")):
        parse_cmdline(f"root=qcow2:channel:http://h/stable.json {extra}")


def test_command_line_round_trip() -> None:
    from bootkit.boot.cmdline import join_args

    cfg = config("root=qcow2:channel:http://[fe80::1%25eth0]:8080/c/stable.json rd.qcow2.mode=stream "
                 "rd.qcow2.channel.min-version=4")  # fmt: skip
    assert (cfg.channel, cfg.channel_min_version, cfg.url) == (True, 4, "http://[fe80::1%25eth0]:8080/c/stable.json")
    assert parse_cmdline(join_args(cfg.to_args())) == cfg
    with pytest.raises(ConfigError, match=r"^rd\.qcow2\.channel\.min-version is only used with root=qcow2:channel:"):
        parse_cmdline("root=qcow2:http://h/x.qcow2 rd.qcow2.channel.min-version=2")
    with pytest.raises(ConfigError, match=r"^root=qcow2:channel:ftp://h/s\.json: expected an http"):
        parse_cmdline("root=qcow2:channel:ftp://h/s.json")


def test_publish_between_the_two_reads(site: Site, tmp_path: Path) -> None:
    """publish replaces the signature, then the channel file: a machine that read the old file and the new
    signature reads both again once and follows the new version; a mismatch that stays is refused."""
    from faultserver import Fault, fault_server

    old = (site.docroot / "stable.json").read_bytes()
    channel = stable(site)
    new = Channel(channel.name, 2, channel.not_before, channel.expires, channel.image, channel.size, channel.pin,
                  channel.backing).dumps()  # fmt: skip
    new_sig = sign(site.key, new, tmp_path)
    with fault_server() as (url, state):
        state.files["/stable.json"] = old
        state.files["/stable.json.sig"] = new_sig
        state.add_faults("/stable.json", Fault(), Fault(replace=new))
        cfg, followed = follow(config(f"root=qcow2:channel:{url}/stable.json"), Stages(), trust(site, tmp_path))
        assert followed.version == 2 and cfg.sha256 == channel.pin.sha256
        assert len(state.requests_for("/stable.json")) == 2
    with fault_server() as (url, state):
        state.files["/stable.json"] = old
        state.files["/stable.json.sig"] = new_sig
        with pytest.raises(ChannelRefused, match="the signature does not verify"):
            follow(config(f"root=qcow2:channel:{url}/stable.json"), Stages(), trust(site, tmp_path / "b"))
        assert len(state.requests_for("/stable.json")) == 2  # read again once, not more
