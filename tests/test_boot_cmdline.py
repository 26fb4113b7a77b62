"""The kernel command-line parser: every rd.qcow2 option, bad values, unknown options."""

from __future__ import annotations

import pytest

from bootkit.boot.cmdline import (
    KNOWN_OPTIONS,
    BootConfig,
    Overlay,
    RootSpec,
    parse_cmdline,
    split_cmdline,
)
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
    assert cfg == BootConfig(url=URL)
    assert (cfg.verify, cfg.mode, cfg.root, cfg.overlay) == ("sidecar", "ram", RootSpec("auto"), Overlay("tmpfs"))
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
    assert cfg.overlay == Overlay("tmpfs", "512m")
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
    [("tmpfs", Overlay("tmpfs")), ("none", Overlay("none")), ("tmpfs:size=25%", Overlay("tmpfs", "25%")),
     ("tmpfs:size=2G", Overlay("tmpfs", "2G")), ("tmpfs:size=1048576", Overlay("tmpfs", "1048576"))],
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
        ("rd.qcow2.mode=disk", "rd.qcow2.mode=disk: expected one of ram|lazy"),
        ("rd.qcow2.mode=lazy rd.qcow2.verify=pinned", "needs rd.qcow2.manifest-sha256"),
        (f"rd.qcow2.manifest={URL}.manifest", "only used with rd.qcow2.mode=lazy"),
        ("rd.qcow2.mode=lazy rd.qcow2.manifest=ftp://x/y", "rd.qcow2.manifest=ftp://x/y: expected an http"),
        ("rd.qcow2.root=0", "rd.qcow2.root=0: expected a partition number, LABEL=, UUID= or PARTUUID="),
        ("rd.qcow2.root=sda2", "rd.qcow2.root=sda2: expected a partition number"),
        ("rd.qcow2.root=LABEL=", "rd.qcow2.root=LABEL=: expected"),
        ("rd.qcow2.overlay=disk", "rd.qcow2.overlay=disk: expected tmpfs, tmpfs:size="),
        ("rd.qcow2.overlay=tmpfs:size=lots", "rd.qcow2.overlay=tmpfs:size=lots: expected"),
        ("rd.qcow2.overlay=tmpfs:size=0", "expected tmpfs"),
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
    ],
)
def test_bad_values(extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(extra)
    assert message in str(e.value)


@pytest.mark.parametrize("root", ["root=qcow2:", "root=qcow2:ftp://h/x.qcow2", "root=qcow2:http://h/dir/",
                                  "root=qcow2:/local/disk.qcow2"])  # fmt: skip
def test_bad_url(root: str) -> None:
    with pytest.raises(ConfigError, match=r"^root=.*: expected an http:// or https:// URL of a file"):
        parse(root=root)


def test_unknown_options_are_reported_not_ignored() -> None:
    with pytest.raises(ConfigError) as e:
        parse(f"rd.qcow2.sha265={H1} rd.qcow2.Mode=ram")
    msg = str(e.value)
    assert msg.startswith("unknown options rd.qcow2.sha265, rd.qcow2.Mode ")
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
