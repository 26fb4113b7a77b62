"""iPXE's IPv6 configuration handed over (docs/pxe.md, "The lease"): with ``ip = "lease"`` and an image at
an IPv6 address, the iPXE line carries ``ip=[${netX/ip6}]::[${netX/gateway6}]:${netX/len6}:...`` for the boot
interface, and SLAAC on the boot interface when iPXE has no router. Both initramfs readers of ``ip=`` accept
what iPXE writes: systemd-network-generator and dracut's net-lib.sh (``ip_to_var``)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from pxecfg_fixtures import GOLDEN
from test_pxecfg_lease import IPXE_EXPANSIONS, _networkd_files

from bootkit.boot.cmdline import BootConfig
from bootkit.boot.loaderargs import WIDEST_LEASE, Loader, LoaderVar
from bootkit.host.pxecfg.cmdline import Network, boot_config, kernel_cmdline, network_choices
from bootkit.host.pxecfg.load import load_file
from bootkit.host.pxecfg.model import Config
from bootkit.host.pxecfg.network import literal_version
from bootkit.host.pxecfg.render import render_all

MODULE = Path(__file__).resolve().parent.parent / "dracut-module" / "90bootkit"
NET_LIB = Path("/usr/lib/dracut/modules.d/40network/net-lib.sh")
DRACUT_LIB = Path("/usr/lib/dracut/modules.d/99base/dracut-lib.sh")

#: what iPXE 1.0.0+git-20190125 (Debian's ipxe-qemu) reports on QEMU's IPv6 user network for MAC
#: 52:54:00:12:34:56 after ``ifconf``: the SLAAC address in libslirp's fec0::/64 and the router's link-local one
IPXE_V6 = {LoaderVar.ip6: "fec0::5054:ff:fe12:3456", LoaderVar.len6: "64", LoaderVar.gateway6: "fe80::2",
           LoaderVar.mac: "52:54:00:12:34:56"}  # fmt: skip
IPXE_V6_EXPANSIONS = {"${netX/ip6}", "${netX/len6}", "${netX/gateway6}"}


def _config() -> Config:
    return load_file(GOLDEN / "ipv6.toml")


def test_ipv6_image_hands_over_the_ipv6_configuration_with_slaac_fallback() -> None:
    config = _config()
    assert network_choices(config.entry("debian"), None, Loader.ipxe) == (Network.lease6, Network.boot_nic_auto6)
    # ip = "auto6" is the user's choice: no handover, no fallback
    assert network_choices(config.entry("slaac"), None, Loader.ipxe) == (Network.autoconf, None)
    assert literal_version("http://[2001:db8::10]:8080/x") == 6 and literal_version("http://10.0.0.1/x") == 4
    assert literal_version("http://boot.example/x") is None


def test_ipv6_script_expands_numeric_settings_only_and_checks_the_router() -> None:
    """ip6 and gateway6 are ipv6-typed, len6 an int: iPXE prints hex, colons and digits only."""
    files = render_all(_config(), "/tftp")
    ipxe = files[next(p for p in files if p.name == "boot.ipxe")]
    assert set(re.findall(r"\$\{[^}]*\}", ipxe)) <= IPXE_EXPANSIONS | IPXE_V6_EXPANSIONS
    # every handover is guarded by the router check, so the line never holds an empty '[]'
    for label in ("default-debian", "mac-525400123456-debian"):
        assert f"isset ${{netX/gateway6}} || goto dhcp--{label}\n" in ipxe
    # an IPv6-only network has no ${ip}: the DHCP loop goes on with the IPv6 configuration
    assert "isset ${netX/gateway6} && goto start ||\ndhcp && goto start ||" in ipxe


def test_ipv4_configurations_keep_their_script_head() -> None:
    files = render_all(load_file(GOLDEN / "representative.toml"), "/tftp")
    ipxe = files[next(p for p in files if p.name == "boot.ipxe")]
    assert "gateway6" not in ipxe


def test_networkd_configures_the_static_ipv6_address_and_router(tmp_path: Path) -> None:
    config = _config()
    node = config.machines[0]
    cfg = boot_config(config.entry("debian"), node, Network.lease6).substitute(IPXE_V6)
    assert BootConfig.parse(" ".join(cfg.to_args())) == cfg
    words = [a.render(None) for a in cfg.network]
    assert words[1] == "ip=[fec0::5054:ff:fe12:3456]::[fe80::2]:64:node6:bootnet:none"
    files = _networkd_files(tmp_path, words)
    assert sorted(files) == ["90-bootnet.link", "90-bootnet.network"]
    assert "MACAddress=52:54:00:12:34:56" in files["90-bootnet.link"]
    network = files["90-bootnet.network"]
    assert "DHCP=no" in network and "Address=fec0::5054:ff:fe12:3456/64" in network
    assert "Gateway=fe80::2" in network and "Hostname=node6" in network


def test_networkd_runs_slaac_on_the_boot_nic_only_as_the_fallback(tmp_path: Path) -> None:
    config = _config()
    cfg = boot_config(config.entry("debian"), None, Network.boot_nic_auto6).substitute(IPXE_V6)
    files = _networkd_files(tmp_path, [a.render(None) for a in cfg.network])
    # one .network matching the renamed boot NIC, no DHCPv4: router advertisements (networkd's default)
    assert sorted(files) == ["90-bootnet.link", "90-bootnet.network"]
    assert "DHCP=no" in files["90-bootnet.network"] and "Address=" not in files["90-bootnet.network"]


def _dracut_ip_to_var(value: str) -> dict[str, str]:
    """dracut's own parser of one ``ip=`` value (net-lib.sh ``ip_to_var``, used by network-legacy's
    parse-ip-opts.sh and ifup.sh)."""
    if not NET_LIB.exists() or not DRACUT_LIB.exists():
        pytest.skip(f"{NET_LIB} missing (package dracut-network)")
    script = (
        # dracut-lib.sh sources /lib/dracut-dev-lib.sh unless wait_for_dev exists: not needed by ip_to_var
        f'wait_for_dev() {{ :; }}; . {DRACUT_LIB}; . {NET_LIB}; ip_to_var "$1"; '
        'printf "%s\\n" "ip=$ip" "srv=$srv" "gw=$gw" "mask=$mask" "hostname=$hostname" "dev=$dev" '
        '"autoconf=$autoconf"'
    )
    proc = subprocess.run(["sh", "-c", script, "sh", value], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


@pytest.mark.parametrize("values", [IPXE_V6, WIDEST_LEASE])
def test_dracut_reads_the_ipv6_handover_as_a_static_address(values: dict[LoaderVar, str]) -> None:
    config = _config()
    cfg = boot_config(config.entry("debian"), config.machines[0], Network.lease6).substitute(values)
    ip = next(a.render(None) for a in cfg.network if a.key == "ip")
    got = _dracut_ip_to_var(ip.removeprefix("ip="))
    assert got == {
        "ip": values[LoaderVar.ip6], "srv": "", "gw": values[LoaderVar.gateway6], "mask": values[LoaderVar.len6],
        "hostname": "node6", "dev": "bootnet", "autoconf": "none",
    }  # fmt: skip


def test_the_widest_ipv6_line_fits_the_kernel_limit() -> None:
    config = _config()
    line = kernel_cmdline(config.entry("debian"), config.machines[0], network=Network.lease6)
    assert "ip=[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]::[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:128:" in line


def _lease_generator(tmp_path: Path, cmdline: str) -> dict[str, str]:
    proc_cmdline = tmp_path / "cmdline"
    proc_cmdline.write_text(cmdline + "\n")
    out = tmp_path / "network"
    proc = subprocess.run(
        ["sh", str(MODULE / "bootkit-lease-generator.sh")],
        env={"PATH": "/usr/bin:/bin", "BOOTKIT_PROC_CMDLINE": str(proc_cmdline), "BOOTKIT_NETWORK_DIR": str(out)},
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return {p.relative_to(out).as_posix(): p.read_text() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "cmdline",
    [
        "ifname=bootnet:52:54:00:12:34:56 ip=[fec0::5054:ff:fe12:3456]::[fe80::2]:64::bootnet:none rd.neednet=1",
        # the IPv4 lease pxe-config writes, with and without a host name and DNS servers
        "root=qcow2:http://10.0.2.2/d.qcow2 ifname=bootnet:52:54:00:12:34:56 "
        "ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none rd.neednet=1",
        "ifname=bootnet:52:54:00:12:34:56 ip=10.0.2.15::10.0.2.2:255.255.255.0:node1:bootnet:none:10.0.2.3:10.0.2.4",
    ],
)
def test_lease_generator_stops_router_solicitation_on_the_handed_over_interface(tmp_path: Path, cmdline: str) -> None:
    files = _lease_generator(tmp_path, cmdline)
    assert list(files) == ["90-bootnet.network.d/50-bootkit-lease.conf"]
    assert "[Network]\nIPv6AcceptRA=no\n" in files["90-bootnet.network.d/50-bootkit-lease.conf"]


@pytest.mark.parametrize(
    "cmdline",
    [
        "ip=auto6",
        "ifname=bootnet:52:54:00:12:34:56 ip=::::node6:bootnet:auto6",  # the fallback: SLAAC wanted
        "ip=dhcp",
        "ip=bootnet:dhcp",  # GRUB's fallback: DHCP on the boot NIC
        "ip=[fec0::5]::[fe80::2]:64::eth0:none",  # not bootkit's boot interface
        "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:none",
        "ip=[fec0::5]::[fe80::2]:64::bootnet:dhcp6",
        "'ip=[fec0::5]::[fe80::2]:64::bootnet:none'",  # quotes: not split the way the kernel splits
        # an IPv4 lease, but the image is at an IPv6 address: router advertisements may be what reaches it
        "root=qcow2:http://[fd00::1]:8080/d.qcow2 ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none",
        # a second ip= of the user's: not the line pxe-config wrote
        "ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none ip=eth1:dhcp6",
    ],
)
def test_lease_generator_leaves_every_other_line_alone(tmp_path: Path, cmdline: str) -> None:
    assert _lease_generator(tmp_path, cmdline) == {}
