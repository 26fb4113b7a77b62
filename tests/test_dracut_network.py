"""The network helpers of bootkit's dracut module, run on the host: the arping wrapper that skips
network-legacy's duplicate-address check for the lease the boot loader handed over, and the boot code's
address report (bootkit/boot/netinfo.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bootkit.boot.netinfo import address_lines

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "dracut-module" / "90bootkit"
LEASE_LINE = (
    "root=qcow2:http://10.0.2.2/disk.qcow2 ifname=bootnet:52:54:00:12:34:56 "
    "ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none:10.0.2.3 rd.neednet=1"
)
#: the wrapper's exit status when it handed the call to iputils' arping, which is not at its initramfs
#: path on the host: the shell's "command not found"
DELEGATED = 127


def _arping(tmp_path: Path, cmdline: str, *args: str) -> int:
    proc_cmdline = tmp_path / "cmdline"
    proc_cmdline.write_text(cmdline + "\n")
    proc = subprocess.run(
        ["sh", str(MODULE / "bootkit-arping.sh"), *args],
        env={"PATH": "/usr/bin:/bin", "BOOTKIT_PROC_CMDLINE": str(proc_cmdline)},
        capture_output=True,
        timeout=30,
    )
    return proc.returncode


def test_duplicate_check_of_the_handed_over_address_passes_at_once(tmp_path: Path) -> None:
    # exactly how network-legacy's ifup calls it for a static address (dracut 059, ifup.sh do_static)
    assert _arping(tmp_path, LEASE_LINE, "-f", "-q", "-D", "-c", "2", "-I", "bootnet", "10.0.2.15") == 0


@pytest.mark.parametrize(
    ("cmdline", "args"),
    [
        # another address than the handed-over one
        (LEASE_LINE, ("-f", "-q", "-D", "-c", "2", "-I", "bootnet", "10.0.2.99")),
        # a prefix of it
        (LEASE_LINE, ("-f", "-q", "-D", "-c", "2", "-I", "bootnet", "10.0.2.1")),
        # no -D: resolving the gateway (net-lib.sh setup_net)
        (LEASE_LINE, ("-q", "-f", "-w", "60", "-I", "bootnet", "10.0.2.15")),
        # a static address the user wrote for another interface, and DHCP on the boot NIC
        ("ip=10.0.2.15::10.0.2.2:255.255.255.0::eth1:none", ("-f", "-q", "-D", "-c", "2", "-I", "eth1", "10.0.2.15")),
        ("ifname=bootnet:52:54:00:12:34:56 ip=:::::bootnet:dhcp", ("-D", "-I", "bootnet", "10.0.2.15")),
        # a glob in the address matches nothing but itself
        (LEASE_LINE, ("-D", "-I", "bootnet", "*")),
    ],
)
def test_every_other_call_runs_the_real_arping(tmp_path: Path, cmdline: str, args: tuple[str, ...]) -> None:
    assert _arping(tmp_path, cmdline, *args) == DELEGATED


#: prints the address report of bootkit/boot/netinfo.py as the boot code does (its console format)
NETINFO = (
    "import sys; sys.path.insert(0, sys.argv[1]); from bootkit.boot.stages import setup_console; "
    "from bootkit.boot.netinfo import print_addresses; setup_console(False); print_addresses()"
)


def _netinfo(*prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-c", NETINFO, str(ROOT)], capture_output=True, text=True,
                          timeout=30)


def test_address_report_format() -> None:
    proc = _netinfo()
    assert proc.returncode == 0
    for line in proc.stderr.splitlines():
        assert re.fullmatch(r"bootkit: address: [A-Za-z0-9._?-]+ [0-9a-f:./]+ (static|dynamic)", line), line


def test_address_report_of_hostile_names() -> None:
    """What ``ip -o addr show`` prints is the kernel's, but a name is printed with [A-Za-z0-9._-] only."""
    text = (
        "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"
        "2: bo$(x)`y`    inet 10.0.2.15/24 brd 10.0.2.255 scope global bootnet\\       valid_lft forever\n"
        "2: bootnet    inet6 fe80::1/64 scope link \\       valid_lft forever preferred_lft forever\n"
        "3: eth1    inet 192.0.2.7/24 scope global dynamic eth1\\       valid_lft 86395sec preferred_lft 86395sec\n"
        "garbage\n"
    )
    assert address_lines(text) == [
        "address: bo??x??y? 10.0.2.15/24 static",
        "address: eth1 192.0.2.7/24 dynamic",
    ]


def _bootif_generator(tmp_path: Path, cmdline: str) -> dict[str, str]:
    proc_cmdline = tmp_path / "cmdline"
    proc_cmdline.write_text(cmdline + "\n")
    out = tmp_path / "network"
    proc = subprocess.run(
        ["sh", str(MODULE / "bootkit-bootif-generator.sh")],
        env={"PATH": "/usr/bin:/bin", "BOOTKIT_PROC_CMDLINE": str(proc_cmdline), "BOOTKIT_NETWORK_DIR": str(out)},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    return {p.name: p.read_text() for p in sorted(out.iterdir())} if out.exists() else {}


def test_plain_dhcp_with_bootif_configures_the_boot_interface_only(tmp_path: Path) -> None:
    files = _bootif_generator(tmp_path, "root=qcow2:http://h/d.qcow2 ip=dhcp rd.neednet=1 BOOTIF=01-52-54-00-AB-cd-ef")
    assert list(files) == ["10-bootkit-bootif.network", "11-bootkit-other.network"]
    assert "MACAddress=52:54:00:AB:cd:ef\n" in files["10-bootkit-bootif.network"]
    assert "DHCP=ipv4" in files["10-bootkit-bootif.network"]
    assert "Unmanaged=yes" in files["11-bootkit-other.network"]
    # networkd takes the first file that matches: both sort before systemd-network-generator's
    assert sorted([*files, "91-default.network", "90-bootnet.network"])[:2] == list(files)


@pytest.mark.parametrize(
    "cmdline",
    [
        "ip=dhcp",  # no BOOTIF: every interface, as the user asked
        "BOOTIF=01-52-54-00-12-34-56",  # no ip=dhcp
        "ip=dhcp BOOTIF=01-52-54-00-12-34-56 ifname=bootnet:52:54:00:12:34:56",  # the line names the interface
        "ip=dhcp ip=eth1:dhcp BOOTIF=01-52-54-00-12-34-56",  # an interface named explicitly
        "ip=10.0.0.5:::255.255.255.0::eth0:none BOOTIF=01-52-54-00-12-34-56",
        "ip=dhcp BOOTIF=01-52-54-00-12-34",  # malformed MAC addresses
        "ip=dhcp BOOTIF=01-52-54-00-12-34-5g",
        "ip=dhcp BOOTIF=06-52-54-00-12-34-56",
        "ip=dhcp BOOTIF=01-52-54-00-12-34-56-78",
        "ip=dhcp BOOTIF=01-52-54-00-12-34-*",  # a glob matches nothing but itself
        "ip=dhcp BOOTIF=01-52-54-00-12-34-56x",
        'ip=dhcp "BOOTIF=01-52-54-00-12-34-56"',  # quotes: not split the way the kernel splits, leave it
    ],
)
def test_bootif_generator_leaves_every_other_line_alone(tmp_path: Path, cmdline: str) -> None:
    (tmp_path / "01-52-54-00-12-34-56").touch()  # what an unquoted glob would match in the working directory
    assert _bootif_generator(tmp_path, cmdline) == {}


def test_address_report_lists_ipv4_and_ipv6_but_not_link_local() -> None:
    """In a network namespace of its own: a static IPv4 and a static site-local IPv6 address (QEMU's user
    network hands out fec0::/64, scope site) are reported as static, an address with a lifetime as dynamic,
    link-local ones not at all."""
    setup = (
        "ip link set lo up && ip link add bootnet type veth peer name peer0 && ip link set peer0 up && "
        "ip link set bootnet up && ip addr add 10.0.2.15/24 dev bootnet && "
        "ip addr add fec0::5054:ff:fe12:3456/64 dev bootnet && "
        "ip addr add 2001:db8::7/64 dev peer0 valid_lft 600 preferred_lft 600"
    )
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace: {probe.stderr.decode(errors='replace').strip()}")
    proc = _netinfo("unshare", "-n", "sh", "-c", f'{setup} && exec "$@"', "sh")
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stderr.splitlines()) == [
        "bootkit: address: bootnet 10.0.2.15/24 static",
        "bootkit: address: bootnet fec0::5054:ff:fe12:3456/64 static",
        "bootkit: address: peer0 2001:db8::7/64 dynamic",
    ]
