"""pxe-config input: errors name the key and the file (exit 2), flags-only mode, hash pinning, per-MAC
overrides, and the GRUB netboot tree."""

from __future__ import annotations

import hashlib
import os
import textwrap
from pathlib import Path

import pytest
from pxecfg_fixtures import run_cli
from testtools import require_tools

from bootkit.host.pxecfg.cmdline import kernel_args
from bootkit.host.pxecfg.load import load_file
from bootkit.host.pxecfg.model import Mode

KERNEL_LINE_PREFIX = "kernel http://"


@pytest.fixture
def docroot(tmp_path: Path) -> Path:
    """An HTTP document root with a kernel, an initrd, a 3 MiB image and a manifest."""
    root = tmp_path / "www"
    (root / "images").mkdir(parents=True)
    (root / "vmlinuz").write_bytes(b"kernel\n")
    (root / "initrd.img").write_bytes(b"initrd\n")
    (root / "images" / "disk.qcow2").write_bytes(os.urandom(3 << 20))
    (root / "images" / "disk.manifest").write_bytes(b"manifest\n")
    return root


ENTRY = """\
base_url = "http://10.0.0.1:8080/"
docroot = "www"

[[entry]]
name = "a"
kernel = "vmlinuz"
initrd = "initrd.img"
image = "images/disk.qcow2"
"""


def _write(tmp_path: Path, text: str, name: str = "pxe.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# -- errors: exit status 2, one line naming file and key ---------------------------------------------------

ERRORS = [
    # (TOML appended to or replacing ENTRY, key named in the message, words of the message)
    (ENTRY + 'colour = "blue"\n', "entry.a.colour", "unknown key"),
    ("bogus = 1\n" + ENTRY, "bogus", "unknown key"),
    (ENTRY.replace('"vmlinuz"', '"vmlinuz-missing"'), "entry.a.kernel", "no such file"),
    (ENTRY + 'manifest = "images/disk.manifest"\n', "entry.a.manifest", "contradicts mode = 'ram'"),
    (ENTRY + 'overlay = "none"\noverlay_size = "1G"\n', "entry.a.overlay_size", "contradicts overlay = 'none'"),
    (ENTRY + 'mode = "lazy"\nsha256 = "compute"\n', "entry.a.sha256", "cannot be checked in lazy mode"),
    (ENTRY + 'sha256 = "abc"\n', "entry.a.sha256", "not 64 hex digits"),
    (ENTRY + 'mode = "fast"\n', "entry.a.mode", "not one of: ram, lazy"),
    (ENTRY + 'root = "/dev/sda2"\n', "entry.a.root", "not auto, a partition number"),
    (ENTRY + 'args = ["a b"]\n', "entry.a.args", "single words"),
    (ENTRY + 'args = "quiet"\n', "entry.a.args", "expected an array of strings"),
    (ENTRY + 'manifest_sha256 = "compute"\n', "entry.a.manifest_sha256", "given without manifest"),
    (ENTRY + 'sha256 = "sidecar"\nmirrors = ["http://m/d.qcow2"]\n', "entry.a.mirrors", "an unpinned mirror"),
    (ENTRY + 'mode = "lazy"\nmirrors = ["http://m/d.qcow2"]\n', "entry.a.mirrors", "need a pinned hash"),
    (ENTRY + 'mirrors = ["ftp://m/d.qcow2"]\n', "entry.a.mirrors", "not an http:// or https:// URL of a file"),
    (ENTRY + 'mirrors = ["http://m/d", "http://m/d"]\n', "entry.a.mirrors", "named twice"),
    (ENTRY + 'cache = "PARTLABEL=bootkit-cache"\n', "entry.a.cache", "contradicts mode = 'ram'"),
    (ENTRY + 'mode = "lazy"\ncache_format = "auto"\n', "entry.a.cache_format", "given without cache"),
    (ENTRY + 'mode = "lazy"\ncache = "/dev/../etc/passwd"\n', "entry.a.cache", "expected LABEL=, PARTLABEL="),
    (ENTRY + 'mode = "lazy"\ncache = "LABEL=a b"\n', "entry.a.cache", "takes one name"),
    (ENTRY + 'mode = "lazy"\ncache = "LABEL=c"\ncache_format = "yes"\n', "entry.a.cache_format",
     "not one of: auto, off"),
    (ENTRY.replace('docroot = "www"\n', ""), "entry.a.sha256", "'compute' needs"),
    (ENTRY.replace('base_url = "http://10.0.0.1:8080/"\n', "").replace('docroot = "www"\n', ""),
     "entry.a.kernel", "base_url is not set"),
    (ENTRY.replace('"vmlinuz"', '"https://10.0.0.1/vmlinuz"'), "entry.a.kernel", "GRUB's http module"),
    ('timeout = "5"\n' + ENTRY, "timeout", "expected an integer"),
    ('default = "b"\n' + ENTRY, "default", "no entry named 'b'"),
    ('docroot = "nowhere"\n' + ENTRY.replace('docroot = "www"\n', ""), "docroot", "no such directory"),
    (ENTRY + ENTRY.split("\n\n", 1)[1], "entry[1].name", "used by another entry"),
    (ENTRY + '[[machine]]\nmac = "52:54:00:12:34"\n', "machine[0].mac", "not a MAC address"),
    (ENTRY + '[[machine]]\nmac = "52:54:00:12:34:56"\ndefault = "zzz"\n', "machine.52:54:00:12:34:56.default",
     "no entry named 'zzz'"),
    (ENTRY + '[[machine]]\nmac = "52:54:00:12:34:56"\n[[machine]]\nmac = "52-54-00-12-34-56"\n',
     "machine.52:54:00:12:34:56.mac", "described twice"),
    (ENTRY + '[dhcp]\nsubnet = "10.0.0.0"\nrange_start = "10.0.0.5"\n', "dhcp.range_start",
     "contradicts mode = 'proxy'"),
    (ENTRY + '[dhcp]\nmode = "full"\nrange_start = "10.0.0.5"\n', "dhcp.range_end", "missing"),
    (ENTRY + '[dhcp]\nsubnet = "10.0.0.300"\n', "dhcp.subnet", "not an IPv4 address"),
    ('bootloaders = ["ipxe"]\n' + ENTRY + '[dhcp]\nsubnet = "10.0.0.0"\nloader = "grub"\n', "dhcp.loader",
     "not among the configured bootloaders"),
    (ENTRY + '[grub]\nserial = 1\n', "grub.serial", "unknown key"),
    (ENTRY + f'args = [{", ".join(chr(34) + "x" * 99 + chr(34) for _ in range(20))}]\n', "entry.a.args",
     "would be 2"),
    (ENTRY + f'[[machine]]\nmac = "52:54:00:12:34:56"\nargs = ["{"y" * 1900}"]\n',
     "machine.52:54:00:12:34:56.args", "the kernel keeps 2047"),
]


@pytest.mark.parametrize(("text", "key", "words"), ERRORS, ids=[e[1] + ":" + e[2] for e in ERRORS])
def test_errors_name_key_and_file_with_exit_status_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, docroot: Path, text: str, key: str, words: str
) -> None:
    path = _write(tmp_path, text)
    status, _, err = run_cli(capsys, "pxe-config", str(path), "--out", str(tmp_path / "out"))
    assert status == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"error: {path}: {key}: "), err
    assert words in lines[-1]
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_invalid_toml_and_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = _write(tmp_path, "[[entry]\n")
    status, _, err = run_cli(capsys, "pxe-config", str(bad), "--out", str(tmp_path / "o"))
    assert status == 2 and err.startswith(f"error: {bad}: invalid TOML")
    status, _, err = run_cli(capsys, "pxe-config", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o"))
    assert (status, err) == (2, f"error: {tmp_path / 'nope.toml'}: no such file\n")


# -- hash pinning -------------------------------------------------------------------------------------------


def test_local_image_is_hashed_and_pinned(tmp_path: Path, docroot: Path) -> None:
    config = load_file(_write(tmp_path, ENTRY))
    entry = config.entries[0]
    expected = hashlib.sha256((docroot / "images" / "disk.qcow2").read_bytes()).hexdigest()
    assert entry.sha256 == expected
    assert entry.image.url == "http://10.0.0.1:8080/images/disk.qcow2"
    assert entry.image.path == docroot / "images" / "disk.qcow2"


def test_image_url_under_base_url_is_found_in_docroot_and_hashed(tmp_path: Path, docroot: Path) -> None:
    config = load_file(_write(tmp_path, ENTRY.replace('"images/disk.qcow2"', '"http://10.0.0.1:8080/images/disk.qcow2"')))
    expected = hashlib.sha256((docroot / "images" / "disk.qcow2").read_bytes()).hexdigest()
    assert config.entries[0].sha256 == expected


def test_manifest_hash_is_computed_in_lazy_mode(tmp_path: Path, docroot: Path) -> None:
    config = load_file(_write(tmp_path, ENTRY + 'mode = "lazy"\nmanifest = "images/disk.manifest"\n'))
    entry = config.entries[0]
    assert entry.mode is Mode.lazy
    assert entry.sha256 is None
    assert entry.manifest_sha256 == hashlib.sha256(b"manifest\n").hexdigest()


def test_mirrors_reach_the_kernel_command_line(tmp_path: Path, docroot: Path) -> None:
    mirrors = 'mirrors = ["http://10.0.0.2/images/disk.qcow2", "http://[2001:db8::3]:8080/disk.qcow2"]\n'
    config = load_file(_write(tmp_path, ENTRY + mirrors))
    entry = config.entries[0]
    assert entry.mirrors == ("http://10.0.0.2/images/disk.qcow2", "http://[2001:db8::3]:8080/disk.qcow2")
    args = kernel_args(entry)
    assert [a for a in args if a.startswith("rd.qcow2.mirror=")] == [
        "rd.qcow2.mirror=http://10.0.0.2/images/disk.qcow2",
        "rd.qcow2.mirror=http://[2001:db8::3]:8080/disk.qcow2",
    ]
    lazy = load_file(_write(tmp_path, ENTRY + mirrors + 'mode = "lazy"\nmanifest = "images/disk.manifest"\n'))
    assert lazy.entries[0].mirrors == entry.mirrors and lazy.entries[0].manifest_sha256 is not None
    # ram mode takes a manifest with mirrors: a download that moves to another mirror keeps what it checked
    ram = load_file(_write(tmp_path, ENTRY + mirrors + 'manifest = "images/disk.manifest"\n'))
    assert "rd.qcow2.manifest-sha256=" + hashlib.sha256(b"manifest\n").hexdigest() in kernel_args(ram.entries[0])


def test_pinned_hash_is_normalised_and_sidecar_pins_nothing(tmp_path: Path, docroot: Path) -> None:
    pinned = load_file(_write(tmp_path, ENTRY + f'sha256 = "{"AB" * 32}"\n'))
    assert pinned.entries[0].sha256 == "ab" * 32
    sidecar = load_file(_write(tmp_path, ENTRY + 'sha256 = "sidecar"\n'))
    assert sidecar.entries[0].sha256 is None


# -- per-MAC overrides --------------------------------------------------------------------------------------


def test_per_mac_overrides(capsys: pytest.CaptureFixture[str], tmp_path: Path, docroot: Path) -> None:
    text = ENTRY + textwrap.dedent("""\
        [[entry]]
        name = "b"
        kernel = "vmlinuz"
        initrd = "initrd.img"
        image = "images/disk.qcow2"

        [[machine]]
        mac = "52-54-00-AA-BB-CC"
        default = "b"
        timeout = 0
        args = ["systemd.hostname=n1"]
        """)
    out = tmp_path / "out"
    status, _, err = run_cli(capsys, "pxe-config", str(_write(tmp_path, text)), "--out", str(out), "--no-grub-images")
    assert status == 0, err
    script = (out / "tftp" / "boot.ipxe").read_text()
    assert "iseq ${netX/mac} 52:54:00:aa:bb:cc && goto mac-525400aabbcc ||" in script
    assert ":mac-525400aabbcc\ngoto mac-525400aabbcc-b\n" in script
    kernel_lines = [line for line in script.splitlines() if line.startswith(KERNEL_LINE_PREFIX)]
    # 2 entries x (default menu + the machine's menu) x (the lease handed over + DHCP on the boot NIC)
    assert len(kernel_lines) == 8
    assert [("systemd.hostname=n1" in line) for line in kernel_lines] == [False] * 4 + [True] * 4

    grub_dir = out / "tftp" / "boot" / "grub"
    machine_cfg = (grub_dir / "grub.cfg-01-52-54-00-aa-bb-cc").read_text()
    assert "set default=b\nset timeout=0\n" in machine_cfg
    assert machine_cfg.count("systemd.hostname=n1") == 4  # 2 entries x (boot NIC line + no-NIC fallback)
    default_cfg = (grub_dir / "grub.cfg").read_text()
    assert "set default=a\nset timeout=5\n" in default_cfg
    assert "systemd.hostname" not in default_cfg


# -- flags-only mode ----------------------------------------------------------------------------------------


def test_flags_only_single_image(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, docroot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(docroot)
    out = tmp_path / "out"
    status, _, err = run_cli(
        capsys,
        "pxe-config",
        "--base-url", "http://10.0.0.1:8080",
        "--kernel", "vmlinuz",
        "--initrd", str(docroot / "initrd.img"),  # an absolute path under the docroot works too
        "--image-url", "images/disk.qcow2",
        "--console", "ttyS0,115200",
        "--args", "quiet",
        "--timeout", "0",
        "--out", str(out),
        "--no-grub-images",
    )  # fmt: skip
    assert status == 0, err
    digest = hashlib.sha256((docroot / "images" / "disk.qcow2").read_bytes()).hexdigest()
    script = (out / "tftp" / "boot.ipxe").read_text()
    assert (
        "kernel http://10.0.0.1:8080/vmlinuz initrd=initrd.img root=qcow2:http://10.0.0.1:8080/images/disk.qcow2 "
        f"rd.qcow2.sha256={digest} rd.qcow2.overlay=tmpfs rw ifname=bootnet:${{netX/mac}} "
        "ip=${netX/ip}::${netX/gateway}:${netX/netmask}::bootnet:none:${dns} rd.neednet=1 console=ttyS0,115200 quiet "
        "|| goto failed"
    ) in script
    assert "initrd --name initrd.img http://10.0.0.1:8080/initrd.img || goto failed" in script
    assert "menuentry 'qcow2' --id qcow2 {" in (out / "tftp" / "boot" / "grub" / "grub.cfg").read_text()
    assert not (out / "dnsmasq.conf").exists()  # no --dhcp-* flag: no DHCP side


def test_flags_only_with_dhcp_and_absolute_urls(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    require_tools("dnsmasq")
    out = tmp_path / "out"
    status, _, err = run_cli(
        capsys,
        "pxe-config",
        "--kernel", "http://10.0.0.1/vmlinuz",
        "--initrd", "http://10.0.0.1/initrd.img",
        "--image", "http://10.0.0.1/disk.qcow2",
        "--sha256", "sidecar",
        "--dhcp-mode", "full",
        "--dhcp-range-start", "10.0.0.100",
        "--dhcp-range-end", "10.0.0.150",
        "--out", str(out),
        "--no-grub-images",
    )  # fmt: skip
    assert status == 0, err
    conf = (out / "dnsmasq.conf").read_text()
    assert "dhcp-range=10.0.0.100,10.0.0.150,1h\n" in conf
    assert f"tftp-root={out / 'tftp'}\n" in conf
    assert "dhcp-boot=tag:!ipxe,tag:bios,undionly.kpxe\n" in conf


def test_flags_errors_name_the_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, _, err = run_cli(
        capsys, "pxe-config", "--kernel", "http://h/k", "--initrd", "http://h/i", "--image", "http://h/d.qcow2",
        "--sha256", "nope", "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert status == 2
    assert err.startswith("error: --sha256: 'nope' is not 64 hex digits")
    status, _, err = run_cli(capsys, "pxe-config", "--kernel", "http://h/k", "--out", str(tmp_path / "o"))
    assert (status, err) == (2, "error: --initrd: missing (required)\n")


def test_config_file_and_flags_together_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = _write(tmp_path, ENTRY)
    status, _, err = run_cli(capsys, "pxe-config", str(path), "--mode", "lazy", "--out", str(tmp_path / "o"))
    assert status == 2
    assert err.startswith("error: --mode: describe the boot in")


# -- GRUB netboot tree ---------------------------------------------------------------------------------------


def test_grub_mknetdir_builds_bios_and_uefi_images(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, docroot: Path
) -> None:
    require_tools("grub-mknetdir")
    for platform, package in (("i386-pc", "grub-pc-bin"), ("x86_64-efi", "grub-efi-amd64-bin")):
        if not (Path("/usr/lib/grub") / platform / "moddep.lst").exists():
            pytest.skip(f"GRUB {platform} not installed (package {package})")
    out = tmp_path / "out"
    text = ENTRY + '[dhcp]\nsubnet = "10.0.0.0"\nloader = "grub"\n'
    status, _, err = run_cli(capsys, "pxe-config", str(_write(tmp_path, text)), "--out", str(out))
    assert status == 0, err
    grub = out / "tftp" / "boot" / "grub"
    core0 = grub / "i386-pc" / "core.0"
    core_efi = grub / "x86_64-efi" / "core.efi"
    assert core0.stat().st_size > 10_000
    assert core_efi.read_bytes()[:2] == b"MZ"  # a PE/COFF image
    assert (grub / "x86_64-efi" / "http.mod").exists() and (grub / "i386-pc" / "http.mod").exists()
    conf = (out / "dnsmasq.conf").read_text()
    assert 'pxe-service=x86PC,"bootkit",boot/grub/i386-pc/core.0\n' in conf
    assert 'pxe-service=X86-64_EFI,"bootkit",boot/grub/x86_64-efi/core.efi\n' in conf


# -- documentation -------------------------------------------------------------------------------------------


def test_readme_documents_every_key() -> None:
    from bootkit.host.pxecfg.settings import (
        DHCP_SETTINGS,
        ENTRY_SETTINGS,
        GRUB_SETTINGS,
        MACHINE_SETTINGS,
        TOP_SETTINGS,
    )

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## PXE configuration (`bootkit pxe-config`)", 1)[1].split("\n## ", 1)[0]
    for settings in (TOP_SETTINGS, ENTRY_SETTINGS, MACHINE_SETTINGS, DHCP_SETTINGS, GRUB_SETTINGS):
        for setting in settings:
            assert f"`{setting.key}`" in section or f"[[{setting.key}]]" in section or f"[{setting.key}]" in section, (
                setting.key
            )


def test_rerun_removes_per_mac_grub_files_of_machines_no_longer_described(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, docroot: Path
) -> None:
    out = tmp_path / "out"
    with_machine = _write(tmp_path, ENTRY + '[[machine]]\nmac = "52:54:00:12:34:56"\n')
    assert run_cli(capsys, "pxe-config", str(with_machine), "--out", str(out), "--no-grub-images")[0] == 0
    per_mac = out / "tftp" / "boot" / "grub" / "grub.cfg-01-52-54-00-12-34-56"
    assert per_mac.exists()
    without = _write(tmp_path, ENTRY)
    assert run_cli(capsys, "pxe-config", str(without), "--out", str(out), "--no-grub-images")[0] == 0
    assert not per_mac.exists()
    assert (out / "tftp" / "boot" / "grub" / "grub.cfg").exists()
