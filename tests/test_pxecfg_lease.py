"""The lease handed over (docs/pxe.md, "The lease"): the ``ip`` and ``hostname`` keys, what each loader's
configuration expands at boot, and GRUB's quoting of the words that hold its variables."""

from __future__ import annotations

import re
import subprocess
import textwrap
from pathlib import Path

import pytest
from pxecfg_fixtures import GOLDEN, run_cli
from testtools import require_tools

from bootkit.boot.cmdline import BootConfig, split_cmdline
from bootkit.boot.loaderargs import Arg, Loader, LoaderVar
from bootkit.host.pxecfg.cmdline import Network, boot_config, kernel_cmdline, network_choices
from bootkit.host.pxecfg.load import load_file
from bootkit.host.pxecfg.model import IpConfig
from bootkit.host.pxecfg.render import grub_word, render_all

HEAD = """\
[[entry]]
name = "a"
kernel = "http://10.0.0.1/vmlinuz"
initrd = "http://10.0.0.1/initrd.img"
image = "http://10.0.0.1/disk.qcow2"
sha256 = "sidecar"
"""

#: every ``${...}`` the iPXE script may expand: numbers-only settings of the lease (ipv4 and hex typed),
#: the menu's own choice, and the ``${ip}`` its DHCP retry loop tests
IPXE_EXPANSIONS = {"${netX/ip}", "${netX/gateway}", "${netX/netmask}", "${netX/mac}", "${dns}", "${ip}", "${target}"}
GRUB_EXPANSIONS = {"${net_default_mac}", "${grub_platform}"}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pxe.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_scripts_expand_numeric_lease_values_only() -> None:
    """A string a DHCP server chose (host name, domain, file name) never reaches a kernel line: iPXE expands
    variables before it splits the line, so one with spaces would add kernel arguments."""
    config = load_file(GOLDEN / "representative.toml")
    files = render_all(config, "/tftp")
    ipxe = files[next(p for p in files if p.name == "boot.ipxe")]
    assert set(re.findall(r"\$\{[^}]*\}", ipxe)) == IPXE_EXPANSIONS
    for path, text in files.items():
        if path.name.startswith("grub.cfg"):
            assert set(re.findall(r"\$\{[^}]*\}", text)) <= GRUB_EXPANSIONS, path
    # and nothing expands without braces (iPXE and GRUB both take $name)
    assert all(not re.search(r"\$[^{]", text) for text in files.values())


def test_ip_precedence_machine_then_entry_then_top(tmp_path: Path) -> None:
    text = (
        'ip = "dhcp"\n' + HEAD + '[[entry]]\nname = "b"\nkernel = "http://10.0.0.1/vmlinuz"\n'
        'initrd = "http://10.0.0.1/initrd.img"\nimage = "http://10.0.0.1/b.qcow2"\nsha256 = "sidecar"\nip = "lease"\n'
        '[[machine]]\nmac = "52:54:00:00:00:01"\nip = "lease"\n'
        '[[machine]]\nmac = "52:54:00:00:00:02"\nip = "dhcp"\n'
    )
    config = load_file(_write(tmp_path, text))
    a, b = config.entries
    plain, lease_machine, dhcp_machine = None, *config.machines
    assert (a.net.ip, b.net.ip) == (IpConfig.dhcp, IpConfig.lease)
    assert network_choices(a, plain, Loader.ipxe) == (Network.autoconf, None)
    assert network_choices(b, plain, Loader.ipxe) == (Network.lease, Network.boot_nic_dhcp)
    assert network_choices(a, lease_machine, Loader.ipxe) == (Network.lease, Network.boot_nic_dhcp)
    assert network_choices(b, dhcp_machine, Loader.grub) == (Network.autoconf, None)
    assert network_choices(b, plain, Loader.grub) == (Network.boot_nic_dhcp, Network.autoconf)


def test_hostname_goes_into_dracuts_ip_hostname_field(tmp_path: Path) -> None:
    config = load_file(_write(tmp_path, HEAD + '[[machine]]\nmac = "52:54:00:00:00:01"\nhostname = "node-7"\n'))
    entry, machine = config.entries[0], config.machines[0]
    words = {n: split_cmdline(kernel_cmdline(entry, machine, network=n)) for n in Network}
    assert "ip=255.255.255.255::255.255.255.255:255.255.255.255:node-7:bootnet:none:255.255.255.255" in words[
        Network.lease
    ]
    assert "ip=::::node-7:bootnet:dhcp" in words[Network.boot_nic_dhcp]
    assert "ip=::::node-7::dhcp" in words[Network.autoconf]
    # without a host name, ip = "dhcp" writes what pxe-config always wrote
    assert "ip=dhcp" in split_cmdline(kernel_cmdline(entry, None, network=Network.autoconf))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('hostname = "evil host"', "machine.52:54:00:00:00:01.hostname: 'evil host': a host name here is one label"),
        ('hostname = "root=qcow2:http://evil/"', "hostname: 'root=qcow2:http://evil/': a host name here"),
        ('hostname = "$(reboot)"', "hostname: '$(reboot)': a host name here"),
        ('hostname = "a;b"', "hostname: 'a;b': a host name here"),
        ('hostname = "-a"', "hostname: '-a': a host name here"),
        ('hostname = "a.example.org"', "hostname: 'a.example.org': a host name here"),
        ('hostname = "node\\n"', "hostname: 'node\\n': a host name here"),
        (f'hostname = "{"a" * 64}"', "at most 63"),
        ('ip = "static"', "machine.52:54:00:00:00:01.ip: "),
    ],
)
def test_hostile_machine_values_are_refused_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, message: str
) -> None:
    path = _write(tmp_path, HEAD + f'[[machine]]\nmac = "52:54:00:00:00:01"\n{text}\n')
    status, _, err = run_cli(capsys, "pxe-config", str(path), "--out", str(tmp_path / "out"), "--no-grub-images")
    assert status == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_top_level_and_entry_ip_are_checked(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for text, where in (('ip = "auto"\n' + HEAD, ": ip: "), (HEAD + 'ip = "none"\n', "entry.a.ip: ")):
        path = _write(tmp_path, text)
        status, _, err = run_cli(capsys, "pxe-config", str(path), "--out", str(tmp_path / "out"), "--no-grub-images")
        assert status == 2 and where in err and "lease" in err and len(err.strip().splitlines()) == 1, err


def test_flags_mode_has_ip(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    status, _, err = run_cli(
        capsys, "pxe-config", "--kernel", "http://10.0.0.1/vmlinuz", "--initrd", "http://10.0.0.1/initrd.img",
        "--image-url", "http://10.0.0.1/disk.qcow2", "--sha256", "sidecar", "--ip", "dhcp", "--out", str(out),
        "--no-grub-images",
    )  # fmt: skip
    assert status == 0, err
    script = (out / "tftp" / "boot.ipxe").read_text()
    assert " ip=dhcp rd.neednet=1 " in script and "netX/ip" not in script


def test_grub_word_quotes_variables_in_double_quotes_and_escapes_the_rest() -> None:
    assert grub_word(Arg.of("ifname=bootnet:", LoaderVar.mac)) == '"ifname=bootnet:${net_default_mac}"'
    # literal text inside double quotes: GRUB would expand $ and end the word at "
    assert grub_word(Arg.of('a$b"c\\', LoaderVar.ip)) == '"a\\$b\\"c\\\\${net_default_ip}"'
    assert grub_word(Arg.of("x=http://h/a?b=1&c=2")) == "'x=http://h/a?b=1&c=2'"
    with pytest.raises(Exception, match="grub has no variable for the lease's gateway"):
        grub_word(Arg.of("ip=", LoaderVar.gateway))


def test_grub_configurations_pass_grub_script_check(tmp_path: Path) -> None:
    require_tools("grub-script-check")
    files = render_all(load_file(GOLDEN / "representative.toml"), "/tftp")
    for path, text in files.items():
        if path.name.startswith("grub.cfg"):
            cfg = tmp_path / path.name
            cfg.write_text(text)
            proc = subprocess.run(["grub-script-check", str(cfg)], capture_output=True, text=True)
            assert proc.returncode == 0, (path, proc.stdout, proc.stderr)


NETWORK_GENERATOR = Path("/usr/lib/systemd/systemd-network-generator")


def _networkd_files(tmp_path: Path, words: list[str]) -> dict[str, str]:
    """What systemd-network-generator (the systemd initramfs's reader of ip= and ifname=) makes of ``words``."""
    if not NETWORK_GENERATOR.exists():
        pytest.skip(f"{NETWORK_GENERATOR} missing (package systemd)")
    root = tmp_path / "root"
    root.mkdir()
    env = {"SYSTEMD_PROC_CMDLINE": " ".join(words), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([str(NETWORK_GENERATOR), f"--root={root}"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return {p.name: p.read_text() for p in (root / "run/systemd/network").iterdir()}


@pytest.mark.parametrize("gateway_and_dns", [True, False])
def test_networkd_configures_the_boot_nic_from_the_handed_over_lease(tmp_path: Path, gateway_and_dns: bool) -> None:
    """iPXE expands an unset setting to nothing: a lease without router or DNS leaves empty fields, which
    systemd-network-generator accepts as it accepts full ones (dracut's ip= parser skips empty fields too)."""
    config = load_file(GOLDEN / "representative.toml")
    lease = {LoaderVar.ip: "192.0.2.7", LoaderVar.gateway: "192.0.2.1", LoaderVar.netmask: "255.255.255.0",
             LoaderVar.mac: "52:54:00:12:34:56", LoaderVar.dns: "192.0.2.53"}  # fmt: skip
    if not gateway_and_dns:
        lease |= {LoaderVar.gateway: "", LoaderVar.dns: ""}
    node1 = config.machines[0]
    cfg = boot_config(config.entry("debian"), node1, Network.lease).substitute(lease)
    assert BootConfig.parse(" ".join(cfg.to_args())) == cfg
    files = _networkd_files(tmp_path, [a.render(None) for a in cfg.network])
    assert sorted(files) == ["90-bootnet.link", "90-bootnet.network"]
    assert "MACAddress=52:54:00:12:34:56" in files["90-bootnet.link"] and "Name=bootnet" in files["90-bootnet.link"]
    network = files["90-bootnet.network"]
    assert "Name=bootnet" in network and "DHCP=no" in network and "Address=192.0.2.7/24" in network
    assert "Hostname=node1" in network
    assert ("Gateway=192.0.2.1" in network, "DNS=192.0.2.53" in network) == (gateway_and_dns, gateway_and_dns)


def test_networkd_runs_dhcp_on_the_boot_nic_only(tmp_path: Path) -> None:
    config = load_file(GOLDEN / "representative.toml")
    cfg = boot_config(config.entry("debian"), None, Network.boot_nic_dhcp).substitute(
        {LoaderVar.mac: "52:54:00:12:34:56"}
    )
    files = _networkd_files(tmp_path, [a.render(None) for a in cfg.network])
    # one .network matching the renamed boot NIC: no 91-default.network matching every link
    assert sorted(files) == ["90-bootnet.link", "90-bootnet.network"]
    assert "DHCP=ipv4" in files["90-bootnet.network"]
