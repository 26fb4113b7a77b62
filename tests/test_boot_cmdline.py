"""The kernel command-line parser: every rd.qcow2 option, bad values, unknown options."""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootkit.boot.cacheopts import CacheFormat
from bootkit.boot.cmdline import (
    DEFAULT_FILL_RATE,
    KNOWN_OPTIONS,
    BootConfig,
    Mode,
    Overlay,
    OverlayKind,
    RootSpec,
    Verify,
    contract_info,
    join_args,
    parse_cmdline,
    split_cmdline,
)
from bootkit.boot.loaderargs import DHCP_NETWORK, Arg, Loader, LoaderVar
from bootkit.errors import ConfigError

URL = "http://10.0.2.2:8080/images/disk.qcow2"
H1 = "ab" * 32
H2 = "CD" * 32


def parse(extra: str = "", root: str = f"root=qcow2:{URL}") -> BootConfig:
    cfg = parse_cmdline(f"BOOT_IMAGE=/vmlinuz console=ttyS0 {root} ip=dhcp rd.neednet=1 {extra}")
    assert cfg is not None
    return cfg


def test_defaults() -> None:
    cfg = parse()
    # ip= and rd.neednet= are dracut's: kept as written, for the contract's round trip
    assert cfg == BootConfig(url=URL, network=DHCP_NETWORK)
    assert (cfg.verify, cfg.mode, cfg.root, cfg.overlay) == ("sidecar", "ram", RootSpec("auto"), Overlay())
    assert (cfg.retries, cfg.timeout, cfg.minmem_mib) == (3, 30.0, 128)
    assert (cfg.insecure, cfg.debug, cfg.rw) == (False, False, False)


def test_no_qcow2_root_is_not_ours() -> None:
    assert parse_cmdline("root=/dev/sda1 ro quiet") is None
    assert parse_cmdline("console=ttyS0") is None
    # the last root= wins, as for the kernel
    assert parse_cmdline(f"root=qcow2:{URL} root=/dev/sda1") is None
    assert parse_cmdline(f"root=/dev/sda1 root=qcow2:{URL}") is not None


def test_every_option() -> None:
    cfg = parse(
        f"rd.qcow2.sha256={H2} rd.qcow2.verify=pinned rd.qcow2.mode=ram rd.qcow2.root=PARTUUID=ABC-1 "
        "rd.qcow2.overlay=tmpfs:size=512m rd.qcow2.snapshot=golden rd.qcow2.retries=7 rd.qcow2.timeout=2.5 "
        "rd.qcow2.minmem=300 rd.qcow2.cacert=/etc/ssl/lab.pem rd.qcow2.insecure rd.qcow2.debug "
        f"rd.qcow2.sha256.base.qcow2={H1} rootfstype=ext4 rootflags=noatime,discard rw"
    )
    assert cfg.sha256 == H2.lower()
    assert cfg.verify == "pinned"
    assert cfg.root == RootSpec("partuuid", "abc-1")
    assert cfg.overlay == Overlay(OverlayKind.tmpfs, "512m")
    assert cfg.snapshot == "golden"
    assert (cfg.retries, cfg.timeout, cfg.minmem_mib) == (7, 2.5, 300)
    assert cfg.cacert == "/etc/ssl/lab.pem"
    assert cfg.insecure and cfg.debug and cfg.rw
    assert cfg.backing_sha256 == {"base.qcow2": H1}
    assert (cfg.rootfstype, cfg.rootflags) == ("ext4", "noatime,discard")


def test_lazy_with_manifest() -> None:
    cfg = parse(f"rd.qcow2.mode=lazy rd.qcow2.manifest={URL}.manifest rd.qcow2.manifest-sha256={H1}")
    assert (cfg.mode, cfg.verify, cfg.manifest, cfg.manifest_sha256) == ("lazy", "pinned", URL + ".manifest", H1)
    assert parse("rd.qcow2.mode=lazy").verify == "sidecar"
    assert parse("rd.qcow2.mode=lazy rd.qcow2.verify=none").verify == "none"


@pytest.mark.parametrize(
    ("value", "spec"),
    [
        ("2", RootSpec("number", "2")),
        ("LABEL=root fs", RootSpec("label", "root fs")),
        ("UUID=0D7A-11F3", RootSpec("uuid", "0d7a-11f3")),
        ("uuid=0d7a-11f3", RootSpec("uuid", "0d7a-11f3")),
        ("PARTUUID=4f68bce3-e8cd-4db1-96e7-fbcaf984b709", RootSpec("partuuid", "4f68bce3-e8cd-4db1-96e7-fbcaf984b709")),
    ],
)
def test_root_selection(value: str, spec: RootSpec) -> None:
    assert parse(f'"rd.qcow2.root={value}"').root == spec


@pytest.mark.parametrize(
    ("value", "overlay"),
    [("tmpfs", Overlay()), ("none", Overlay(OverlayKind.none)), ("tmpfs:size=25%", Overlay(size="25%")),
     ("tmpfs:size=2G", Overlay(size="2G")), ("tmpfs:size=1048576", Overlay(size="1048576"))],
)  # fmt: skip
def test_overlay(value: str, overlay: Overlay) -> None:
    assert parse(f"rd.qcow2.overlay={value}").overlay == overlay


def test_flags_take_0_and_1() -> None:
    assert parse("rd.qcow2.debug=1 rd.qcow2.insecure=0").debug is True
    assert parse("rd.qcow2.debug=1 rd.qcow2.insecure=0").insecure is False
    assert parse("rd.qcow2.debug rd.qcow2.debug=0").debug is False  # the last one wins


def test_ro_rw_last_wins() -> None:
    assert parse("rw ro").rw is False
    assert parse("ro rw").rw is True


def test_https_url() -> None:
    assert parse(root="root=qcow2:https://images.lab/x/disk.qcow2").url == "https://images.lab/x/disk.qcow2"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("rd.qcow2.sha256=abc", "rd.qcow2.sha256=abc: expected 64 hexadecimal digits"),
        (f"rd.qcow2.sha256={H1}x", "expected 64 hexadecimal digits"),
        ("rd.qcow2.verify=maybe", "rd.qcow2.verify=maybe: expected one of pinned|sidecar|none"),
        ("rd.qcow2.verify=pinned", "rd.qcow2.verify=pinned needs rd.qcow2.sha256"),
        (f"rd.qcow2.sha256={H1} rd.qcow2.verify=sidecar", "a hash is pinned but rd.qcow2.verify=sidecar"),
        ("rd.qcow2.mode=disk", "rd.qcow2.mode=disk: expected one of ram|lazy|stream"),
        ("rd.qcow2.mode=lazy rd.qcow2.verify=pinned", "needs rd.qcow2.manifest-sha256"),
        (f"rd.qcow2.manifest={URL}.manifest", "only used with rd.qcow2.mode=lazy"),
        ("rd.qcow2.mode=lazy rd.qcow2.manifest=ftp://x/y", "rd.qcow2.manifest=ftp://x/y: expected an http"),
        ("rd.qcow2.root=0", "rd.qcow2.root=0: expected a partition number, LABEL=, UUID= or PARTUUID="),
        ("rd.qcow2.root=sda2", "rd.qcow2.root=sda2: expected a partition number"),
        ("rd.qcow2.root=\u00b2", "expected a partition number"),  # str.isdigit() says yes, int() raised
        ("rd.qcow2.overlay=tmpfs:size=\u0661\u0662m", "expected tmpfs"),
        ("rd.qcow2.root=LABEL=", "rd.qcow2.root=LABEL=: expected"),
        ("rd.qcow2.overlay=disk", "rd.qcow2.overlay=disk: expected tmpfs, tmpfs:size="),
        ("rd.qcow2.overlay=tmpfs:size=lots", "rd.qcow2.overlay=tmpfs:size=lots: expected"),
        ("rd.qcow2.overlay=tmpfs:size=0", "expected tmpfs"),
        ("rd.qcow2.overlay=tmpfs:size=00k", "expected tmpfs"),
        ("rd.qcow2.retries=-1", "rd.qcow2.retries=-1: must be at least 0"),
        ("rd.qcow2.retries=many", "rd.qcow2.retries=many: expected a whole number"),
        ("rd.qcow2.timeout=0", "rd.qcow2.timeout=0: must be a positive number of seconds"),
        ("rd.qcow2.timeout=nan", "must be a positive number"),
        ("rd.qcow2.timeout=soon", "expected a number of seconds"),
        ("rd.qcow2.minmem=1G", "rd.qcow2.minmem=1G: expected a whole number"),
        ("rd.qcow2.cacert=lab.pem", "rd.qcow2.cacert=lab.pem: expected an absolute path"),
        ("rd.qcow2.insecure=maybe", "rd.qcow2.insecure=maybe: expected no value, or 0/1"),
        ("rd.qcow2.snapshot", "rd.qcow2.snapshot: needs a value"),
        ("rd.qcow2.sha256.base.qcow2=xyz", "expected 64 hexadecimal digits"),
        ("rd.qcow2.sha256.../etc=" + H1, "expected rd.qcow2.sha256.<file name>=<sha256>"),
        # mirrors: only with a pin (an unpinned mirror could serve any image), URLs by the root= rules
        (
            "rd.qcow2.mirror=http://m/disk.qcow2",
            "rd.qcow2.mirror needs a pinned hash (rd.qcow2.sha256=, with "
            "rd.qcow2.mode=lazy rd.qcow2.manifest-sha256=), not rd.qcow2.verify=sidecar: an unpinned mirror could serve"
            " any image",
        ),
        ("rd.qcow2.verify=none rd.qcow2.mirror=http://m/disk.qcow2", "not rd.qcow2.verify=none"),
        (f"rd.qcow2.sha256={H1} rd.qcow2.mirror=ftp://m/disk.qcow2", "rd.qcow2.mirror=ftp://m/disk.qcow2: expected"),
        (f"rd.qcow2.sha256={H1} rd.qcow2.mirror=http://[fe80::1/x", "rd.qcow2.mirror=http://[fe80::1/x: "),
        (f"rd.qcow2.sha256={H1} rd.qcow2.mirror", "rd.qcow2.mirror: needs a value"),
        (f"rd.qcow2.sha256={H1} rd.qcow2.mirror={URL}", f"rd.qcow2.mirror={URL}: given twice (or the same as root=)"),
        (f"rd.qcow2.sha256={H1} rd.qcow2.mirror=http://m/d rd.qcow2.mirror=http://m/d", "given twice"),
        (
            f"rd.qcow2.sha256={H1} rd.qcow2.mirror=http://m/d rd.qcow2.manifest={URL}.manifest",
            "rd.qcow2.manifest in ram mode needs rd.qcow2.manifest-sha256=<hex>",
        ),
    ],
)
def test_bad_values(extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(extra)
    assert message in str(e.value)


def test_mirrors_repeat_in_order() -> None:
    mirrors = ("http://[2001:db8::2]:8080/images/disk.qcow2", "https://cache.lab/disk.qcow2")
    words = " ".join(f"rd.qcow2.mirror={m}" for m in mirrors)
    cfg = parse(f"rd.qcow2.sha256={H1} {words}")
    assert cfg.mirrors == mirrors and cfg.verify is Verify.pinned
    lazy = parse(f"rd.qcow2.mode=lazy rd.qcow2.manifest-sha256={H1} {words}")
    assert lazy.mirrors == mirrors
    # ram mode takes a pinned manifest with mirrors: it checks the bytes kept when moving to another mirror
    ram = parse(f"rd.qcow2.sha256={H1} rd.qcow2.manifest-sha256={H2} {words}")
    assert ram.manifest_sha256 == H2.lower() and ram.mode is Mode.ram
    assert parse_cmdline(join_args(ram.to_args())) == ram
    assert "rd.qcow2.mirror" in KNOWN_OPTIONS


@pytest.mark.parametrize("root", ["root=qcow2:", "root=qcow2:ftp://h/x.qcow2", "root=qcow2:http://h/dir/",
                                  "root=qcow2:/local/disk.qcow2"])  # fmt: skip
def test_bad_url(root: str) -> None:
    with pytest.raises(ConfigError, match=r"^root=.*: expected an http:// or https:// URL of a file"):
        parse(root=root)


@pytest.mark.parametrize(
    "url",
    [
        "http://[2001:db8::1]:8080/img.qcow2",
        "http://[2001:db8::1]/img.qcow2",
        "https://[::1]:8443/dir/img.qcow2",
        "http://[::ffff:10.0.2.2]/img.qcow2",
        "http://[fe80::1%25eth0]/img.qcow2",
        "http://[fe80::5054:ff:fe12:3456%25enp0s3]:8080/img.qcow2",
    ],
)
def test_ipv6_literal_urls(url: str) -> None:
    cfg = parse(f"rd.qcow2.mode=lazy rd.qcow2.manifest={url}.manifest", root=f"root=qcow2:{url}")
    assert (cfg.url, cfg.manifest) == (url, url + ".manifest")
    assert BootConfig.parse(join_args(cfg.to_args())) == cfg


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://[2001:db8::1/img.qcow2", "malformed IPv6 literal '[2001:db8::1'"),
        ("http://2001:db8::1]/img.qcow2", "bracket outside an IPv6 literal"),
        ("http://[2001:db8::1]]/img.qcow2", "malformed IPv6 literal"),
        ("http://[[2001:db8::1]]/img.qcow2", "malformed IPv6 literal"),
        ("http://[2001:db8::1]8080/img.qcow2", "malformed IPv6 literal '[2001:db8::1]8080'"),
        ("http://h[::1]/img.qcow2", "bracket outside an IPv6 literal"),
        ("http://2001:db8::1/img.qcow2", "an IPv6 address must be in brackets"),
        ("http://[2001:db8::g]/img.qcow2", "'2001:db8::g' is not an IPv6 address"),
        ("http://[10.0.2.2]/img.qcow2", "'10.0.2.2' is not an IPv6 address"),
        ("http://[]/img.qcow2", "'' is not an IPv6 address"),
        ("http://[2001:db8::1]:0/img.qcow2", "port 0: expected a number from 1 to 65535"),
        ("http://[2001:db8::1]:65536/img.qcow2", "port 65536"),
        ("http://h:port/img.qcow2", "port port"),
        # the zone id must be %-encoded (RFC 6874): a bare % is not a URL character
        ("http://[fe80::1%eth0]/img.qcow2", "zone id in [fe80::1%eth0]: write it as %25"),
        ("http://[fe80::1%25]/img.qcow2", "zone id in [fe80::1%25]"),
        ("http://[fe80::1%25eth/0]/img.qcow2", "malformed IPv6 literal"),
    ],
)
def test_malformed_ipv6_urls(url: str, message: str) -> None:
    """One line naming the option and saying what is wrong, for root= and for rd.qcow2.manifest= alike."""
    with pytest.raises(ConfigError) as e:
        parse(root=f"root=qcow2:{url}")
    assert str(e.value).startswith(f"root={url}: ") and message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse(f"rd.qcow2.mode=lazy rd.qcow2.manifest={url}")
    assert str(e.value).startswith(f"rd.qcow2.manifest={url}: ") and message in str(e.value)


def test_unknown_options_are_reported_not_ignored() -> None:
    with pytest.raises(ConfigError) as e:
        parse(f"rd.qcow2.sha265={H1} rd.qcow2.Mode=ram")
    msg = str(e.value)
    assert msg.startswith(
        "unknown options rd.qcow2.sha265 (did you mean rd.qcow2.sha256?), rd.qcow2.Mode (did you mean rd.qcow2.mode?) "
    )
    for known in KNOWN_OPTIONS:
        assert known in msg
    # even when root= is not ours: a typo must not go unnoticed
    with pytest.raises(ConfigError, match=r"unknown option rd\.qcow2\.moed"):
        parse_cmdline("root=/dev/sda1 rd.qcow2.moed=lazy")


def test_quoted_words() -> None:
    assert split_cmdline('a "rd.qcow2.root=LABEL=my root" b') == ["a", "rd.qcow2.root=LABEL=my root", "b"]
    assert split_cmdline('a "unbalanced b') == ["a", '"unbalanced', "b"]


def test_config_is_frozen() -> None:
    cfg = parse()
    with pytest.raises(AttributeError):
        cfg.url = "http://elsewhere/x"  # type: ignore[misc]


# -- near misses (issue 12 §3): options that look like ours are never ignored -----------------------------


@pytest.mark.parametrize(
    ("word", "nearest"),
    [
        (f"rd.qcow2sha256={H1}", "rd.qcow2.sha256"),
        (f"rd.qcow.sha256={H1}", "rd.qcow2.sha256"),
        ("rd.qcow2-mode=lazy", "rd.qcow2.mode"),
        ("rd.qcow2.manifest_sha256=x", "rd.qcow2.manifest-sha256"),
        ("RD.QCOW2.debug", "rd.qcow2.debug"),
    ],
)
def test_near_miss_options_are_rejected_with_the_nearest_name(word: str, nearest: str) -> None:
    key = word.partition("=")[0]
    with pytest.raises(ConfigError) as e:
        parse(word)
    assert str(e.value).startswith(f"unknown option {key} (did you mean {nearest}?) (known: ")
    # also when root= is not ours: the sidecar fallback must not hide the typo on the next boot either
    with pytest.raises(ConfigError, match=r"^unknown option "):
        parse_cmdline(f"root=/dev/sda1 {word}")


def test_an_unrelated_option_gets_no_suggestion() -> None:
    with pytest.raises(ConfigError) as e:
        parse("rd.qcowzzzzzzzzzzzzzzz=1")
    assert str(e.value).startswith("unknown option rd.qcowzzzzzzzzzzzzzzz (known: ")


def test_other_rd_options_are_not_ours() -> None:
    assert parse("rd.debug rd.luks=0 rd.qcox2.sha256=1 qcow2.sha256=1").url == URL


# -- the contract: parse(to_args(c)) == c -------------------------------------------------------------------

# What a kernel command line can carry: printable, no quotes or backslashes (join_args refuses those)
_TEXT = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="\"'\\"), min_size=1)
_SPACED = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters="\"'\\"), min_size=1
).filter(lambda s: s.strip() == s)
_HEX = st.text("0123456789abcdef", min_size=64, max_size=64)
_HOSTS = st.one_of(
    st.text(string.ascii_lowercase + string.digits + ".-", min_size=1, max_size=20),
    st.ip_addresses(v=4).map(str),
    # IPv6 literals in brackets (RFC 3986), link-local ones with a zone id written %25<interface> (RFC 6874)
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.builds(
        lambda a, zone: f"[{a}%25{zone}]",
        st.ip_addresses(network="fe80::/10").map(str),
        st.text(string.ascii_letters + string.digits + "._~-", min_size=1, max_size=15),
    ),
)
_URLS = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}/{path}",
    st.sampled_from(["http", "https"]),
    _HOSTS,
    st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}")),
    st.text(string.ascii_letters + string.digits + "/._-%?=&", max_size=30).map(lambda p: p + "x"),
)
_ROOTS = st.one_of(
    st.just(RootSpec()),
    st.integers(1, 128).map(lambda n: RootSpec("number", str(n))),
    _SPACED.map(lambda label: RootSpec("label", label)),
    st.tuples(st.sampled_from(["uuid", "partuuid"]), _TEXT.map(str.lower)).map(lambda kv: RootSpec(*kv)),
)
_SIZES = st.one_of(
    st.none(),
    st.tuples(st.integers(1, 1 << 40), st.sampled_from(["", "k", "M", "g"])).map(lambda t: f"{t[0]}{t[1]}"),
    st.integers(1, 100).map(lambda p: f"{p}%"),
)
_OVERLAYS = st.one_of(st.just(Overlay(OverlayKind.none)), _SIZES.map(lambda size: Overlay(OverlayKind.tmpfs, size)))
_NETWORK = st.lists(
    st.one_of(
        st.just(Arg.of("ip=dhcp")),
        st.just(Arg.of("rd.neednet=1")),
        st.just(Arg.of("ip=", LoaderVar.ip, "::", LoaderVar.gateway, ":", LoaderVar.netmask)),
        st.just(Arg.of("ip=", LoaderVar.ip, ":::255.255.255.0")),
    ),
    max_size=3,
).map(tuple)


@st.composite
def boot_configs(draw: st.DrawFn) -> BootConfig:
    """Every valid configuration: the hashes and modes are drawn together, as the contract ties them."""
    mode = draw(st.sampled_from(Mode))
    url = draw(_URLS)
    sha256 = manifest = manifest_sha256 = None
    mirrors: tuple[str, ...] = ()
    if mode is Mode.ram:
        verify = draw(st.sampled_from(Verify))
        if verify is Verify.pinned:
            sha256 = draw(_HEX)
            mirrors = tuple(draw(st.lists(_URLS.filter(lambda u: u != url), max_size=3, unique=True)))
            if mirrors:  # a manifest lets a download resume on another mirror
                manifest_sha256 = draw(st.none() | _HEX)
                manifest = draw(st.none() | _URLS) if manifest_sha256 else None
    else:
        verify = draw(st.sampled_from(Verify))
        manifest = draw(st.none() | _URLS)
        if verify is Verify.pinned:
            manifest_sha256 = draw(_HEX)
            sha256 = draw(st.none() | _HEX)
            mirrors = tuple(draw(st.lists(_URLS.filter(lambda u: u != url), max_size=3, unique=True)))
    return BootConfig(
        url=url,
        sha256=sha256,
        verify=verify,
        mode=mode,
        root=draw(_ROOTS),
        overlay=draw(_OVERLAYS),
        manifest=manifest,
        manifest_sha256=manifest_sha256,
        snapshot=draw(st.none() | _SPACED),
        retries=draw(st.integers(0, 1000)),
        timeout=draw(st.floats(min_value=1e-3, max_value=1e6)),
        minmem_mib=draw(st.integers(0, 1 << 20)),
        fill_rate=draw(st.integers(0, 1 << 40)) if mode is Mode.stream else DEFAULT_FILL_RATE,
        cacert=draw(st.none() | _TEXT.map(lambda p: "/" + p)),
        insecure=draw(st.booleans()),
        debug=draw(st.booleans()),
        backing_sha256=draw(st.dictionaries(st.text(string.ascii_letters + string.digits + "._+-", min_size=1), _HEX)),
        rootfstype=draw(st.none() | _TEXT),
        rootflags=draw(st.none() | _TEXT),
        rw=draw(st.booleans()),
        network=draw(_NETWORK),
        mirrors=mirrors,
        **draw(_cache_options(mode, verify)),
    )


@st.composite
def _cache_options(draw: st.DrawFn, mode: Mode, verify: Verify) -> dict[str, Any]:
    """rd.qcow2.cache*: only in lazy and stream mode with a manifest."""
    if mode is Mode.ram or verify is Verify.none or not draw(st.booleans()):
        return {}
    name = st.text(string.ascii_letters + string.digits + "._:+@-", min_size=1, max_size=64)
    device = draw(
        name.map(lambda n: "LABEL=" + n) | name.map(lambda n: "PARTLABEL=" + n)
        | st.sampled_from(["/dev/vdb", "/dev/disk/by-id/virtio-cache", "UUID=0b6e4c8e-5f0b-4b8e-9b1e-3f1c2d4e5f60"])
    )  # fmt: skip
    return {
        "cache": device,
        "cache_format": draw(st.sampled_from(CacheFormat)),
        "cache_max": draw(st.none() | st.sampled_from(["20G", "512M", "50%", "100%", "1048576"])),
    }


def _loader_fills_in(line: str, loader: Loader, values: dict[LoaderVar, str]) -> str:
    """What the boot loader does at boot: replace its variables by the lease's values."""
    for var, value in values.items():
        try:
            line = line.replace(var.render(loader), value)
        except ConfigError:
            pass
    return line


_LEASE = {LoaderVar.ip: "192.0.2.7", LoaderVar.gateway: "192.0.2.1", LoaderVar.netmask: "255.255.255.0",
          LoaderVar.mac: "52:54:00:12:34:56", LoaderVar.dns: "192.0.2.53"}  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(boot_configs())
def test_round_trip(cfg: BootConfig) -> None:
    literal = cfg.substitute(_LEASE)
    assert BootConfig.parse(join_args(literal.to_args())) == literal
    # with the network filled in by a boot loader: rendered in its syntax, substituted at boot, parsed back
    line = join_args(cfg.to_args(Loader.ipxe))
    assert BootConfig.parse(_loader_fills_in(line, Loader.ipxe, _LEASE)) == literal


def test_round_trip_would_catch_a_dropped_option() -> None:
    cfg = BootConfig(url=URL, snapshot="golden", retries=9)
    args = cfg.to_args()
    assert BootConfig.parse(join_args(args)) == cfg
    assert BootConfig.parse(join_args(tuple(a for a in args if "retries" not in a))) != cfg


def test_loader_values_render_per_loader() -> None:
    ip = Arg.of("ip=", LoaderVar.ip, "::", LoaderVar.gateway, ":", LoaderVar.netmask)
    cfg = BootConfig(url=URL, network=(ip, Arg.of("rd.neednet=1")))
    assert cfg.to_args(Loader.ipxe)[-2:] == ("ip=${netX/ip}::${netX/gateway}:${netX/netmask}", "rd.neednet=1")
    with pytest.raises(ConfigError, match=r"^grub has no variable for the lease's gateway$"):
        cfg.to_args(Loader.grub)
    with pytest.raises(ConfigError, match="filled in by the boot loader"):
        cfg.to_args()
    assert BootConfig(url=URL, network=(Arg.of("ip=", LoaderVar.ip, ":::"),)).to_args(Loader.grub)[-1] == (
        "ip=${net_default_ip}:::"
    )


def test_default_writing_is_what_pxe_config_always_wrote() -> None:
    cfg = BootConfig(url=URL, rw=True, network=DHCP_NETWORK)
    assert join_args(cfg.to_args()) == (
        f"root=qcow2:{URL} rd.qcow2.verify=sidecar rd.qcow2.overlay=tmpfs rw ip=dhcp rd.neednet=1"
    )


def test_join_args_quotes_spaces_and_refuses_what_cannot_be_carried() -> None:
    assert join_args(("a", "rd.qcow2.root=LABEL=my root")) == 'a "rd.qcow2.root=LABEL=my root"'
    for bad in ('x="y"', "it's", "a\\b", "a\tb"):
        with pytest.raises(ConfigError, match="cannot be carried"):
            join_args((bad,))


def test_enums_print_as_their_words() -> None:
    assert (str(Mode.lazy), f"{Verify.none}", f"{OverlayKind.tmpfs:>6}") == ("lazy", "none", " tmpfs")
    assert Mode.lazy == "lazy" and json.dumps({"v": Verify.pinned}) == '{"v": "pinned"}'


def test_contract_info_lists_every_option_and_is_json() -> None:
    info = json.loads(json.dumps(contract_info()))
    assert info["version"] >= 1
    assert info["options"] == list(KNOWN_OPTIONS)
    assert "rd.qcow2.sha256" in info["options"] and "rd.qcow2.sha256.<file>" in info["options"]
