"""pxe-config's network keys: ``ip`` (lease, dhcp, dhcp6, auto6), ``vlan`` and ``bond``, per entry and per machine.

What they write (dracut's ``vlan=``, ``bond=`` and ``ip=<top interface>:<method>``; the lease only on the native
interface), that the initramfs parser reads it back, that systemd's own generator makes the VLAN and bond of
it, and that hostile or malformed values are refused with one line naming the key. The lease handover itself
is tested in test_pxecfg_lease.py.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest
from pxecfg_fixtures import run_cli

from bootkit.boot.cmdline import BootConfig, split_cmdline
from bootkit.boot.loaderargs import Loader
from bootkit.host.pxecfg.cmdline import Network, boot_config, kernel_args, kernel_cmdline, network_choices
from bootkit.host.pxecfg.load import load_file
from bootkit.host.pxecfg.model import IpConfig
from bootkit.host.pxecfg.render import render_all

HEAD = """\
bootloaders = ["ipxe"]

[[entry]]
name = "a"
kernel = "http://10.0.0.1/vmlinuz"
initrd = "http://10.0.0.1/initrd.img"
image = "http://10.0.0.1/disk.qcow2"
sha256 = "sidecar"
"""

V6_HEAD = HEAD.replace("10.0.0.1", "[2001:db8::1]:8080")

MACHINE = '\n[[machine]]\nmac = "52:54:00:12:34:56"\n'


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pxe.toml"
    path.write_text(textwrap.dedent(text))
    return path


def _network_args(path: Path, machine: bool = False) -> list[str]:
    """The network words of the line iPXE passes first."""
    config = load_file(path)
    entry, on = config.entries[0], config.machines[0] if machine else None
    network = network_choices(entry, on, Loader.ipxe)[0]
    args = kernel_args(entry, on, network=network, loader=Loader.ipxe)
    return [a for a in args if a.split("=", 1)[0] in ("ip", "vlan", "bond", "rd.neednet", "ifname")]


# -- what is written --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        # the default, the lease handed over on the native interface (test_pxecfg_lease.py)
        ("", ["ifname=bootnet:${netX/mac}", "ip=${netX/ip}::${netX/gateway}:${netX/netmask}::bootnet:none:${dns}",
              "rd.neednet=1"]),
        ('ip = "dhcp"\n', ["ip=dhcp", "rd.neednet=1"]),
        ('vlan = "eth0.100:eth0"\n', ["vlan=eth0.100:eth0", "ip=eth0.100:dhcp", "rd.neednet=1"]),
        ('bond = "bond0:eth0,eth1:mode=active-backup,miimon=100"\n',
         ["bond=bond0:eth0,eth1:mode=active-backup,miimon=100", "ip=bond0:dhcp", "rd.neednet=1"]),
        # the VLAN on the bond: ip= goes on the VLAN, the top interface
        ('vlan = "vlan100:bond0"\nbond = "bond0:eth0,eth1"\n',
         ["vlan=vlan100:bond0", "bond=bond0:eth0,eth1", "ip=vlan100:dhcp", "rd.neednet=1"]),
        ('bond = "bond0:eth0,eth1::9000"\n', ["bond=bond0:eth0,eth1::9000", "ip=bond0:dhcp", "rd.neednet=1"]),
        ('bond = "bond0"\n', ["bond=bond0", "ip=bond0:dhcp", "rd.neednet=1"]),
        ('bond = "bond0:eth0,eth1:mode=active-backup,arp_ip_target=10.0.0.1;10.0.0.2"\n',
         ["bond=bond0:eth0,eth1:mode=active-backup,arp_ip_target=10.0.0.1;10.0.0.2", "ip=bond0:dhcp",
          "rd.neednet=1"]),
    ],
)  # fmt: skip
def test_vlan_and_bond_become_dracut_options_with_ip_on_the_top_interface(
    tmp_path: Path, keys: str, expected: list[str]
) -> None:
    assert _network_args(_write(tmp_path, HEAD + keys)) == expected


@pytest.mark.parametrize("method", ["dhcp6", "auto6"])
def test_ipv6_methods(tmp_path: Path, method: str) -> None:
    assert _network_args(_write(tmp_path, V6_HEAD + f'ip = "{method}"\n')) == [f"ip={method}", "rd.neednet=1"]
    with_vlan = _write(tmp_path, V6_HEAD + f'ip = "{method}"\nvlan = "eth0.7:eth0"\n')
    assert _network_args(with_vlan) == ["vlan=eth0.7:eth0", f"ip=eth0.7:{method}", "rd.neednet=1"]


def test_precedence_machine_over_entry_over_top(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = 'ip = "auto6"\n' + V6_HEAD + 'vlan = "eth0.100:eth0"\n' + MACHINE + 'ip = "dhcp6"\nvlan = "vlan5:eth1"\n'
    path = _write(tmp_path, text)
    config = load_file(path)
    assert config.entries[0].net.ip is IpConfig.auto6  # from the top
    assert _network_args(path) == ["vlan=eth0.100:eth0", "ip=eth0.100:auto6", "rd.neednet=1"]
    assert _network_args(path, machine=True) == ["vlan=vlan5:eth1", "ip=vlan5:dhcp6", "rd.neednet=1"]
    # a machine's bond joins the entry's VLAN only if the VLAN is on it: here it is not
    path = _write(tmp_path, text.replace('vlan = "vlan5:eth1"', 'bond = "bond0:eth0,eth1"'))
    status, _, err = run_cli(capsys, "pxe-config", str(path), "--out", str(tmp_path / "out"))
    assert status == 2
    assert err.startswith(f"error: {path}: machine.52:54:00:12:34:56.bond: the VLAN 'eth0.100' is on 'eth0', "
                          "not on the bond 'bond0'"), err  # fmt: skip


def test_the_initramfs_parses_back_the_network_of_every_entry_and_machine(tmp_path: Path) -> None:
    text = V6_HEAD + 'ip = "dhcp6"\nvlan = "vlan100:bond0"\nbond = "bond0:eth0,eth1:mode=802.3ad:1500"\n'
    text += MACHINE + 'ip = "auto6"\nbond = "bond0:eth2,eth3"\n'
    config = load_file(_write(tmp_path, text))
    entry = config.entries[0]
    for machine in (None, config.machines[0]):
        line = kernel_cmdline(entry, machine, initrd_name=entry.initrd_name)
        parsed = BootConfig.parse(line)
        assert parsed == boot_config(entry, machine)
        assert parsed is not None and parsed.url == "http://[2001:db8::1]:8080/disk.qcow2"
    words = split_cmdline(kernel_cmdline(entry, config.machines[0]))
    assert "bond=bond0:eth2,eth3" in words and "ip=vlan100:auto6" in words and "vlan=vlan100:bond0" in words


def test_systemd_network_generator_makes_the_vlan_and_bond(tmp_path: Path) -> None:
    """The words pxe-config writes, read by systemd's own parser of dracut's options (the systemd flavour)."""
    generator = Path("/usr/lib/systemd/systemd-network-generator")
    if not generator.exists():
        pytest.skip(f"{generator} missing (package systemd)")
    text = V6_HEAD + 'ip = "dhcp6"\nvlan = "bond0.100:bond0"\nbond = "bond0:eth0,eth1:mode=active-backup:1400"\n'
    entry = load_file(_write(tmp_path, text)).entries[0]
    root = tmp_path / "root"
    root.mkdir()
    args = [a for a in kernel_args(entry) if a.startswith(("ip=", "vlan=", "bond="))]
    subprocess.run([generator, f"--root={root}", "--", *args], check=True)
    out = root / "run" / "systemd" / "network"
    vlan = (out / "90-bond0.100.netdev").read_text()
    assert "Kind=vlan" in vlan and "Name=bond0.100" in vlan and "Id=100" in vlan
    bond = (out / "90-bond0.netdev").read_text()
    assert "Kind=bond" in bond and "MTUBytes=1400" in bond
    assert "VLAN=bond0.100" in (out / "90-bond0.network").read_text()
    for slave in ("eth0", "eth1"):
        assert "Bond=bond0" in (out / f"90-{slave}.network").read_text()
    assert "DHCP=ipv6" in (out / "90-bond0.100.network").read_text()


# -- refused, with one line naming the key ----------------------------------------------------------------------

REFUSED = [
    ('vlan = "eth0.100"\n', "entry.a.vlan", "is not <vlanname>:<phydevice>"),
    ('vlan = "eth0.100:eth0:x"\n', "entry.a.vlan", "is not <vlanname>:<phydevice>"),
    ('vlan = ":eth0"\n', "entry.a.vlan", "is not <vlanname>:<phydevice>"),
    ('vlan = "eth0 .100:eth0"\n', "entry.a.vlan", "VLAN name 'eth0 .100': use letters"),
    ('vlan = "eth0.100:$(reboot)"\n', "entry.a.vlan", "VLAN device '$(reboot)': use letters"),
    ('vlan = "verylongname0.100:eth0"\n', "entry.a.vlan", "is 17 characters long; Linux allows 15"),
    ('vlan = "mgmt:eth0"\n', "entry.a.vlan", "does not carry a VLAN id"),
    ('vlan = "eth0.4095:eth0"\n', "entry.a.vlan", "does not carry a VLAN id 1-4094"),
    ('vlan = "eth0.0100:eth0"\n', "entry.a.vlan", "does not carry a VLAN id"),
    ('bond = "bond0:eth0,eth1:mode=x:1500:9"\n', "entry.a.bond", "bond= takes at most 4"),
    ('bond = "bond0:eth0,eth0"\n', "entry.a.bond", "name an interface twice"),
    ('bond = "bond0:bond0,eth1"\n', "entry.a.bond", "cannot be its own slave"),
    ('bond = "bond0:eth0,,eth1"\n', "entry.a.bond", "bond slave '': use letters"),
    ('bond = "bond0:eth0:mode=$x"\n', "entry.a.bond", "bond option 'mode=$x' is not key=value"),
    ('bond = "bond0:eth0:../../x=1"\n', "entry.a.bond", "bond option '../../x=1' is not key=value"),
    ('bond = "bond0:eth0:mode=1 x=2"\n', "entry.a.bond", "bond option 'mode=1 x=2'"),
    ('bond = "bond0:eth0::huge"\n', "entry.a.bond", "bond MTU 'huge' is not a number"),
    ('bond = "bond0:eth0::70000"\n', "entry.a.bond", "bond MTU '70000'"),
    ('bond = "bond0123456789ab"\n', "entry.a.bond", "is 16 characters long"),
    ('vlan = "vlan7:eth0"\nbond = "bond0:eth0,eth1"\n', "entry.a.vlan", "is on 'eth0', not on the bond 'bond0'"),
    ('vlan = "vlan7:bond0"\nbond = "bond0:vlan7,eth1"\n', "entry.a.vlan", "cannot also be a slave of its own bond"),
    ('ip = "static"\n', "entry.a.ip", "'static' is not one of: lease, dhcp, dhcp6, auto6"),
    ('ip = "dhcp6"\n', "entry.a.ip", "configures IPv6 only, but http://10.0.0.1/disk.qcow2 names an IPv4 address"),
    (MACHINE + 'ip = "auto6"\n', "machine.52:54:00:12:34:56.ip", "configures IPv6 only"),
    (MACHINE + 'vlan = "a b:eth0"\n', "machine.52:54:00:12:34:56.vlan", "VLAN name 'a b'"),
    # the same rules for vlan= and bond= given as extra arguments: dracut sources "bondname=a&reboot"
    ('args = ["bond=a&reboot"]\n', "entry.a.args", "bond=a&reboot: bond name 'a&reboot': use letters"),
    (MACHINE + 'args = ["vlan=eth0.5:eth0:x"]\n', "machine.52:54:00:12:34:56.args",
     "vlan=eth0.5:eth0:x: 'eth0.5:eth0:x' is not <vlanname>:<phydevice>"),
]


@pytest.mark.parametrize(("keys", "where", "message"), REFUSED)
def test_malformed_and_hostile_values_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, keys: str, where: str, message: str
) -> None:
    path = _write(tmp_path, HEAD + keys)
    status, _, err = run_cli(capsys, "pxe-config", str(path), "--out", str(tmp_path / "out"))
    assert status == 2, err
    assert err.startswith(f"error: {path}: {where}: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_top_level_ip_that_cannot_reach_an_entry_names_the_entry_image(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = _write(tmp_path, 'ip = "auto6"\n' + HEAD)
    status, _, err = run_cli(capsys, "pxe-config", str(path), "--out", str(tmp_path / "out"))
    assert status == 2
    assert err.startswith(f"error: {path}: entry.a.image: ip = 'auto6' configures IPv6 only"), err


def test_grub_refuses_an_ipv6_literal_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = _write(tmp_path, V6_HEAD.replace('bootloaders = ["ipxe"]', 'bootloaders = ["ipxe", "grub"]'))
    status, _, err = run_cli(capsys, "pxe-config", str(path), "--out", str(tmp_path / "out"), "--no-grub-images")
    assert status == 2
    assert err == (f"error: {path}: entry.a.kernel: http://[2001:db8::1]:8080/vmlinuz: GRUB 2.06 cannot fetch "
                   "from an IPv6 literal host; use a host name, or leave grub out of bootloaders (iPXE fetches "
                   "from IPv6 literals)\n")  # fmt: skip


def test_flags_mode_has_the_keys(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, _, err = run_cli(
        capsys, "pxe-config", "--bootloaders", "ipxe", "--kernel", "http://[2001:db8::1]/vmlinuz",
        "--initrd", "http://[2001:db8::1]/initrd.img", "--image", "http://[2001:db8::1]/disk.qcow2",
        "--sha256", "sidecar", "--ip", "auto6", "--vlan", "eth0.42:eth0", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert status == 0, err
    script = (tmp_path / "out" / "tftp" / "boot.ipxe").read_text()
    assert " vlan=eth0.42:eth0 ip=eth0.42:auto6 rd.neednet=1" in script
    status, _, err = run_cli(capsys, "pxe-config", "--bootloaders", "ipxe", "--kernel", "http://h/vmlinuz",
                             "--initrd", "http://h/initrd.img", "--image", "http://h/disk.qcow2", "--sha256", "sidecar",
                             "--bond", "bond0:eth0;reboot", "--out", str(tmp_path / "out2"))  # fmt: skip
    assert status == 2
    assert err.startswith("error: --bond: bond slave 'eth0;reboot'"), err


# -- the lease and the network keys together ------------------------------------------------------------------

#: a host name, not a literal, so that GRUB (IPv4 literals and names only) and an IPv6-only method both apply
NAMED_HEAD = HEAD.replace('bootloaders = ["ipxe"]', 'bootloaders = ["ipxe", "grub"]').replace("10.0.0.1", "boot.lan")


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        ('vlan = "eth0.100:eth0"\n', ["vlan=eth0.100:eth0", "ip=eth0.100:dhcp", "rd.neednet=1"]),
        ('ip = "lease"\nbond = "bond0:eth0,eth1"\n', ["bond=bond0:eth0,eth1", "ip=bond0:dhcp", "rd.neednet=1"]),
        ('ip = "dhcp6"\n', ["ip=dhcp6", "rd.neednet=1"]),
        ('ip = "auto6"\n', ["ip=auto6", "rd.neednet=1"]),
        ('ip = "dhcp"\n', ["ip=dhcp", "rd.neednet=1"]),
    ],
)
def test_vlan_bond_and_ipv6_write_the_same_line_in_both_loaders_without_lease_or_fallback(
    tmp_path: Path, keys: str, words: list[str]
) -> None:
    """The lease belongs to the native interface: on a VLAN or bond, or with an IPv6 method, neither loader
    hands it over (no static address, no ifname= pinning) and neither script switches lines at boot."""
    config = load_file(_write(tmp_path, NAMED_HEAD + keys))
    entry = config.entries[0]
    for loader in Loader:
        assert network_choices(entry, None, loader) == (Network.autoconf, None)
    assert _network_args(_write(tmp_path, NAMED_HEAD + keys)) == words
    files = render_all(config, "/tftp")
    ipxe = files[next(p for p in files if p.name == "boot.ipxe")]
    grub = files[next(p for p in files if p.name == "grub.cfg")]
    for text in (ipxe, grub):
        assert " ".join(words) in text
        assert "bootnet" not in text and "netX" not in text and "net_default_mac" not in text


def test_machine_keys_switch_between_lease_and_vlan(tmp_path: Path) -> None:
    """A machine's ip wins over its entry's, key by key: ``ip = "lease"`` on a machine of an auto6 entry hands the
    lease over; a machine's vlan on a lease entry makes it DHCP on the VLAN."""
    text = NAMED_HEAD + 'ip = "auto6"\n' + MACHINE + 'ip = "lease"\n'
    text += '\n[[machine]]\nmac = "52:54:00:12:34:57"\nvlan = "vlan7:eth1"\nhostname = "node-7"\n'
    config = load_file(_write(tmp_path, text))
    entry, lease_machine, vlan_machine = config.entries[0], *config.machines
    assert network_choices(entry, None, Loader.ipxe) == (Network.autoconf, None)
    assert network_choices(entry, lease_machine, Loader.ipxe) == (Network.lease, Network.boot_nic_dhcp)
    assert network_choices(entry, lease_machine, Loader.grub) == (Network.boot_nic_dhcp, Network.autoconf)
    # the VLAN machine keeps the entry's auto6, on the VLAN, with its host name in dracut's full ip= form
    assert network_choices(entry, vlan_machine, Loader.grub) == (Network.autoconf, None)
    words = split_cmdline(kernel_cmdline(entry, vlan_machine))
    assert "vlan=vlan7:eth1" in words and "ip=::::node-7:vlan7:auto6" in words and "ifname" not in " ".join(words)


@pytest.mark.parametrize(
    ("keys", "name", "expected"),
    [
        ('vlan = "eth0.100:eth0"\n', "90-eth0.100.network", "DHCP=ipv4"),
        ('ip = "dhcp6"\n', "91-default.network", "DHCP=ipv6"),
        ('ip = "auto6"\n', "91-default.network", "DHCP=no"),
    ],
)
def test_systemd_network_generator_reads_the_host_name_form(
    tmp_path: Path, keys: str, name: str, expected: str
) -> None:
    """With a machine's host name, ip= takes dracut's full form (``ip=::::<host>:<top>:<method>``): systemd's
    generator reads the method, the interface and the host name from it."""
    generator = Path("/usr/lib/systemd/systemd-network-generator")
    if not generator.exists():
        pytest.skip(f"{generator} missing (package systemd)")
    config = load_file(_write(tmp_path, NAMED_HEAD + keys + MACHINE + 'hostname = "node-7"\n'))
    args = [a for a in kernel_args(config.entries[0], config.machines[0]) if a.startswith(("ip=", "vlan="))]
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run([generator, f"--root={root}", "--", *args], check=True)
    network = (root / "run" / "systemd" / "network" / name).read_text()
    assert expected in network and "Hostname=node-7" in network
