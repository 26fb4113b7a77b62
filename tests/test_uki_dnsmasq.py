"""``[dhcp] http_boot``: dnsmasq hands UEFI HTTP Boot clients the URL of a UKI (no TFTP).

The generated file is checked by dnsmasq itself (``dnsmasq --test``); qemu-tests/test_secureboot.py runs it
for real in a server guest with OVMF's HTTP Boot as the client.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pxecfg_fixtures import run_cli
from testtools import require_tools

from bootkit.host.pxecfg.check import targets
from bootkit.host.pxecfg.load import load_file
from bootkit.run import run

DESCRIPTION = """\
base_url = "http://192.168.50.1/boot/"
docroot = "www"

[[entry]]
name = "node"
kernel = "vmlinuz"
initrd = "initrd.img"
image = "disk.qcow2"
sha256 = "sidecar"

[dhcp]
{dhcp}
"""

FULL = """\
mode = "full"
range_start = "192.168.50.100"
range_end = "192.168.50.150"
"""

HTTP_BOOT_LINES = """\
dhcp-vendorclass=set:httpclient,HTTPClient
dhcp-match=set:efi64-http,option:client-arch,16
dhcp-option-force=tag:httpclient,60,HTTPClient
dhcp-boot=tag:httpclient,tag:efi64-http,{url}
"""


@pytest.fixture
def www(tmp_path: Path) -> Path:
    d = tmp_path / "www"
    d.mkdir()
    for name in ("vmlinuz", "initrd.img", "disk.qcow2"):
        (d / name).write_bytes(b"x")
    return d


def write(tmp_path: Path, dhcp: str) -> Path:
    toml = tmp_path / "site.toml"
    toml.write_text(DESCRIPTION.format(dhcp=dhcp))
    return toml


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ('"uki.efi"', "http://192.168.50.1/boot/uki.efi"),
        ('"http://10.1.2.3:8080/efi/site.efi"', "http://10.1.2.3:8080/efi/site.efi"),
    ],
)
def test_http_boot_clients_get_the_uki_url_and_option_60_back(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, www: Path, value: str, url: str
) -> None:
    require_tools("dnsmasq")
    toml = write(tmp_path, FULL + f"http_boot = {value}\n")
    status, _, err = run_cli(capsys, "pxe-config", str(toml), "--out", str(tmp_path / "out"), "--no-grub-images")
    assert status == 0, err
    conf = tmp_path / "out" / "dnsmasq.conf"
    assert HTTP_BOOT_LINES.format(url=url) in conf.read_text()
    run(["dnsmasq", "--test", f"--conf-file={conf}"], capture=True)
    # the UKI may not exist yet when the description is read (build-uki reads the same description); when it
    # is served, pxe-config --check asks for it like every other file
    assert url in {t.artifact.url for t in targets(load_file(toml))}


def test_without_http_boot_nothing_about_it_is_written(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, www: Path
) -> None:
    toml = write(tmp_path, FULL)
    assert run_cli(capsys, "pxe-config", str(toml), "--out", str(tmp_path / "out"), "--no-grub-images")[0] == 0
    assert "HTTPClient" not in (tmp_path / "out" / "dnsmasq.conf").read_text()


def test_http_boot_flag_in_flags_mode(capsys: pytest.CaptureFixture[str], tmp_path: Path, www: Path) -> None:
    out = tmp_path / "out"
    status, _, err = run_cli(
        capsys, "pxe-config", "--out", str(out), "--no-grub-images",
        "--base-url", "http://192.168.50.1/", "--docroot", str(www),
        "--kernel", "vmlinuz", "--initrd", "initrd.img", "--image", "disk.qcow2", "--sha256", "sidecar",
        "--dhcp-mode", "full", "--dhcp-range-start", "192.168.50.100", "--dhcp-range-end", "192.168.50.150",
        "--dhcp-http-boot", "uki.efi",
    )  # fmt: skip
    assert status == 0, err
    assert "dhcp-boot=tag:httpclient,tag:efi64-http,http://192.168.50.1/uki.efi\n" in (out / "dnsmasq.conf").read_text()


@pytest.mark.parametrize(
    ("dhcp", "message"),
    [
        ('mode = "proxy"\nsubnet = "192.168.50.0"\nhttp_boot = "uki.efi"\n',
         "dhcp.http_boot: needs mode = 'full': in proxy mode dnsmasq answers PXE clients only, and UEFI HTTP Boot "
         "clients are not PXE clients"),
        (FULL + 'http_boot = "http://192.168.50.1/a,b.efi"\n',
         "dhcp.http_boot: 'http://192.168.50.1/a,b.efi': a comma would end dnsmasq's dhcp-boot file name"),
        (FULL + f'http_boot = "{"x" * 120}.efi"\n',
         "dhcp.http_boot: 'http://192.168.50.1/boot/" + "x" * 120 + ".efi' is 149 bytes; the DHCP boot file field "
         "holds 127"),
        (FULL + 'http_boot = "ftp://192.168.50.1/uki.efi"\n',
         "dhcp.http_boot: 'ftp://192.168.50.1/uki.efi' is not an http:// or https:// URL"),
        (FULL + 'http_boot = "http://192.168.50.1/uki.efi\\nenable-tftp"\n',
         "dhcp.http_boot: 'http://192.168.50.1/uki.efi\\nenable-tftp' contains characters a kernel command line or "
         "bootloader script cannot carry"),
    ],
    ids=["proxy", "comma", "too-long", "not-http", "newline"],
)  # fmt: skip
def test_bad_http_boot_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, www: Path, dhcp: str, message: str
) -> None:
    toml = write(tmp_path, dhcp)
    out = tmp_path / "out"
    status, _, err = run_cli(capsys, "pxe-config", str(toml), "--out", str(out), "--no-grub-images")
    assert (status, err) == (2, f"error: {toml}: {message}\n")
    assert not out.exists()
