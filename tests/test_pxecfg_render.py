"""pxe-config output: golden files, the real syntax checkers (grub-script-check, dnsmasq --test), and the
kernel command line being the same in iPXE and GRUB and accepted by the initramfs parser."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from pxecfg_fixtures import GOLDEN, run_cli
from testtools import require_tools

from bootkit.boot.cmdline import parse_cmdline
from bootkit.host.pxecfg.cmdline import Network, kernel_cmdline
from bootkit.host.pxecfg.load import load_file
from bootkit.host.pxecfg.render import grub_quote, render_all

#: BOOTKIT_UPDATE_GOLDEN=1 rewrites the expected files from the current output (then review the diff)
UPDATE = os.environ.get("BOOTKIT_UPDATE_GOLDEN") == "1"
CASES = ["representative", "full-grub", "ipv6"]
#: the descriptions with GRUB configurations (GRUB's HTTP device names no IPv6 literal: ipv6 is iPXE only)
GRUB_CASES = ["representative", "full-grub"]


def _generate(capsys: pytest.CaptureFixture[str], name: str, out: Path) -> dict[str, str]:
    status, _, err = run_cli(capsys, "pxe-config", str(GOLDEN / f"{name}.toml"), "--out", str(out), "--no-grub-images")
    assert status == 0, err
    return {
        p.relative_to(out).as_posix(): p.read_text()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.suffix not in (".kpxe", ".efi")
    }


@pytest.mark.parametrize("name", CASES)
def test_output_matches_golden_files(capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str) -> None:
    produced = _generate(capsys, name, tmp_path / "out")
    expected_dir = GOLDEN / name
    if UPDATE:
        for relative, text in produced.items():
            (expected_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            (expected_dir / relative).write_text(text)
    expected = {p.relative_to(expected_dir).as_posix(): p.read_text() for p in expected_dir.rglob("*") if p.is_file()}
    assert sorted(produced) == sorted(expected)
    for relative in expected:
        assert produced[relative] == expected[relative], f"{relative} differs from {expected_dir / relative}"


def test_golden_layout_is_the_documented_one(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    produced = _generate(capsys, "representative", tmp_path / "out")
    assert sorted(produced) == [
        "dnsmasq.conf",
        "tftp/boot.ipxe",
        "tftp/boot/grub/grub.cfg",
        "tftp/boot/grub/grub.cfg-01-52-54-00-00-01-00",
        "tftp/boot/grub/grub.cfg-01-52-54-00-12-34-56",
        "tftp/boot/grub/grub.cfg-01-52-54-00-ab-cd-ef",
    ]


@pytest.mark.parametrize("name", GRUB_CASES)
def test_grub_script_check_accepts_every_grub_cfg(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str
) -> None:
    require_tools("grub-script-check")
    out = tmp_path / "out"
    produced = _generate(capsys, name, out)
    grub_files = [out / p for p in produced if "/grub/grub.cfg" in p]
    assert grub_files
    for path in grub_files:
        proc = subprocess.run(["grub-script-check", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path}: {proc.stdout}{proc.stderr}"


def test_grub_script_check_would_catch_a_broken_file(tmp_path: Path) -> None:
    # the check above means something: grub-script-check rejects an unterminated menuentry
    require_tools("grub-script-check")
    broken = tmp_path / "grub.cfg"
    broken.write_text("menuentry 'x' {\n    linux /vmlinuz\n")
    assert subprocess.run(["grub-script-check", str(broken)], capture_output=True).returncode != 0


@pytest.mark.parametrize("name", CASES)
def test_dnsmasq_test_accepts_the_configuration(capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str) -> None:
    require_tools("dnsmasq")
    out = tmp_path / "out"
    _generate(capsys, name, out)
    proc = subprocess.run(
        ["dnsmasq", "--test", f"--conf-file={out / 'dnsmasq.conf'}"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "syntax check OK" in proc.stderr


def test_dnsmasq_test_would_catch_a_bad_option(tmp_path: Path) -> None:
    require_tools("dnsmasq")
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text("port=0\npxe-service=tag:ipxe,x86PC\n")
    proc = subprocess.run(["dnsmasq", "--test", f"--conf-file={conf}"], capture_output=True, timeout=60)
    assert proc.returncode != 0


def _ipxe_kernel_lines(script: str) -> dict[str, str]:
    """label -> kernel arguments of each section of an iPXE script that has a kernel line (a boot's own
    label, and ``dhcp--<label>`` for its fallback)."""
    result = {}
    for section in re.split(r"^:", script, flags=re.M)[1:]:
        label, _, body = section.partition("\n")
        m = re.search(r"^kernel (\S+) (.*) \|\| goto failed$", body, re.M)
        if m and not label.startswith("initrd--"):
            result[label] = m.group(2)
    return result


def _grub_kernel_lines(cfg: str) -> dict[str, str]:
    """entry id -> arguments of its first ``linux`` line (GRUB booted from a NIC: the boot NIC's line)."""
    return {m.group(1): m.group(2) for m in re.finditer(r"--id (\S+) \{\n(?:.*\n)*?\s*linux \S+ (.*)$", cfg, re.M)}


def test_kernel_command_line_is_the_same_in_ipxe_and_grub(tmp_path: Path) -> None:
    """GRUB's line is iPXE's DHCP-on-the-boot-NIC fallback (or iPXE's only line with ip = "dhcp"), with the
    MAC in GRUB's variable."""
    config = load_file(GOLDEN / "representative.toml")
    files = render_all(config, "/tftp")
    ipxe = _ipxe_kernel_lines(files[next(p for p in files if p.name == "boot.ipxe")])
    for machine_file, menu in (("grub.cfg", "default"), ("grub.cfg-01-52-54-00-12-34-56", "mac-525400123456")):
        grub = _grub_kernel_lines(files[next(p for p in files if p.name == machine_file)])
        assert sorted(grub) == ["debian", "lazy", "rescue"]
        for entry_name, grub_args in grub.items():
            label = f"{menu}-{entry_name}"
            ipxe_args = ipxe.get(f"dhcp--{label}", ipxe[label])
            initrd_arg, _, rest = ipxe_args.partition(" ")
            assert initrd_arg == f"initrd={config.entry(entry_name).initrd.name}"
            # GRUB quotes what its parser would otherwise take apart; the kernel gets the same words
            assert rest.replace("${netX/mac}", "${net_default_mac}") == grub_args.replace("'", "").replace('"', "")
    # the entry with ip = "dhcp" has one line, the others hand the lease over first
    assert "dhcp--default-rescue" not in ipxe
    assert "ip=${netX/ip}::${netX/gateway}:${netX/netmask}::bootnet:none:${dns}" in ipxe["default-debian"]


def test_every_generated_command_line_is_accepted_by_the_initramfs_parser() -> None:
    config = load_file(GOLDEN / "representative.toml")
    parsed = {e.name: parse_cmdline(kernel_cmdline(e)) for e in config.entries}
    debian, rescue, lazy = parsed["debian"], parsed["rescue"], parsed["lazy"]
    assert debian is not None and rescue is not None and lazy is not None
    assert debian.url == "http://192.0.2.10:8080/netboot/images/debian-12.qcow2"
    assert debian.sha256 == "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    assert (debian.verify, debian.mode, str(debian.root), str(debian.overlay)) == (
        "pinned", "ram", "LABEL=root", "tmpfs:size=2G"
    )
    assert (rescue.verify, str(rescue.root), str(rescue.overlay), rescue.snapshot) == (
        "sidecar", "2", "none", "golden-2024"
    )
    assert (lazy.mode, lazy.verify, lazy.sha256) == ("lazy", "pinned", None)
    assert lazy.manifest == "http://192.0.2.10:8080/netboot/images/debian-12.qcow2.manifest"
    assert lazy.manifest_sha256 == "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"


def test_command_line_order_and_options() -> None:
    config = load_file(GOLDEN / "representative.toml")
    node1 = config.machines[0]
    line = kernel_cmdline(config.entry("lazy"), node1, network=Network.lease, initrd_name="bootkit-initrd.img")
    assert line.split() == [
        "initrd=bootkit-initrd.img",
        "root=qcow2:http://192.0.2.10:8080/netboot/images/debian-12.qcow2",
        "rd.qcow2.mode=lazy",
        "rd.qcow2.overlay=tmpfs",
        "rw",
        "rd.qcow2.manifest=http://192.0.2.10:8080/netboot/images/debian-12.qcow2.manifest",
        "rd.qcow2.manifest-sha256=2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
        # the top level's cache device, the entry's cache_format
        "rd.qcow2.cache=PARTLABEL=bootkit-cache",
        "rd.qcow2.cache.format=auto",
        # the widest values a loader fills in; the host name from the description
        "ifname=bootnet:ff:ff:ff:ff:ff:ff",
        "ip=255.255.255.255::255.255.255.255:255.255.255.255:node1:bootnet:none:255.255.255.255",
        "rd.neednet=1",
        "console=tty0",
        "console=ttyS0,115200",
        "quiet",
        "systemd.hostname=node1",
    ]


def test_grub_quote_leaves_plain_words_and_quotes_the_rest() -> None:
    assert grub_quote("root=qcow2:http://h:8080/a.qcow2") == "root=qcow2:http://h:8080/a.qcow2"
    assert grub_quote("x=http://h/a?b=1&c=2") == "'x=http://h/a?b=1&c=2'"
    assert grub_quote("a(b)") == "'a(b)'"


def test_shipped_example_renders_and_passes_the_checkers(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    require_tools("grub-script-check", "dnsmasq")
    example = Path(__file__).resolve().parent.parent / "examples" / "pxe.toml"
    out = tmp_path / "out"
    status, _, err = run_cli(capsys, "pxe-config", str(example), "--out", str(out), "--no-grub-images")
    assert status == 0, err
    for cfg in (out / "tftp" / "boot" / "grub").glob("grub.cfg*"):
        assert subprocess.run(["grub-script-check", str(cfg)], capture_output=True).returncode == 0, cfg
    proc = subprocess.run(["dnsmasq", "--test", f"--conf-file={out / 'dnsmasq.conf'}"], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
