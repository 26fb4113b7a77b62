"""bootkit's ifup in front of network-legacy's, on the host with real interfaces in a network namespace.

For the lease exactly as ``pxe-config`` hands it over, ``bootkit-ifup.sh`` configures the boot NIC itself
(address, route, DNS, network-legacy's state files) with ``ip`` and iputils' ``arping``, then runs the
netroot handler; every other call and every other form of the command line goes to network-legacy's ifup.
Each case runs in ``unshare --net --mount`` with a veth pair: ``bootnet`` (the boot NIC, with the handed-over
MAC) and its peer in another namespace, which holds the gateway's address and so answers the gateway ARP.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parent.parent / "dracut-module" / "90bootkit"
MAC = "52:54:00:12:34:56"
LEASE = f"root=qcow2:http://10.0.2.2/disk.qcow2 ifname=bootnet:{MAC} rd.neednet=1"

#: the namespace: a fresh sysfs (its /sys/class/net lists this namespace's interfaces) and /run, the veth
#: pair with the gateway's end in a namespace of its own (the kernel ignores an ARP request that comes from
#: one of its own addresses)
SETUP = f"""
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /run
ip link set lo up
ip netns add gw
ip link add bootnet address {MAC} type veth peer name peer0 netns gw
ip -n gw addr add 10.0.2.2/24 dev peer0
ip -n gw link set peer0 up
"""

#: stands in for network-legacy's ifup and for dracut's netroot: each says it ran, and with what
FULL = '#!/bin/sh\necho "FULL IFUP $*"\nip -o -4 addr show dev bootnet\n'
NETROOT = '#!/bin/sh\necho "NETROOT $*"\nip -o -4 addr show dev bootnet\nip -4 route show default\n'
QCOW2ROOT = '#!/bin/sh\necho "QCOW2ROOT $*"\n'


#: runs bootkit-ifup.sh in a fresh namespace: (extra kernel arguments, *ifup's arguments, **options)
RunIfup = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_ifup(tmp_path: Path) -> RunIfup:
    if os.geteuid() != 0:
        pytest.skip("needs root: network and mount namespaces")
    for tool in ("unshare", "ip", "arping"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")

    def run(words: str, *args: str, cmdline_d: dict[str, str] | None = None, base: str = LEASE,
            set_up: bool = False, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        d = tmp_path / "case"
        if d.exists():
            shutil.rmtree(d)
        for sub in ("state", "etc", "cmdline.d"):
            (d / sub).mkdir(parents=True)
        (d / "cmdline").write_text(f"{base} {words}\n")
        if set_up:
            (d / "state" / "net.bootnet.did-setup").touch()
        for name, text in (cmdline_d or {}).items():
            (d / "cmdline.d" / name).write_text(text)
        (d / "hooks" / "netroot").mkdir(parents=True)
        for name, text in (("ifup", FULL), ("netroot", NETROOT), ("qcow2root", QCOW2ROOT)):
            (d / name).write_text(text)
            (d / name).chmod(0o755)
        env = {
            "PATH": os.environ["PATH"],
            "BOOTKIT_PROC_CMDLINE": str(d / "cmdline"),
            "BOOTKIT_CMDLINE_D": str(d / "cmdline.d"),
            "BOOTKIT_STATE": str(d / "state"),
            "BOOTKIT_ETC": str(d / "etc"),
            "BOOTKIT_PROC_HOSTNAME": str(d / "hostname"),
            "BOOTKIT_IFUP": str(d / "ifup"),
            "BOOTKIT_NETROOT": str(d / "netroot"),
            "BOOTKIT_QCOW2ROOT": str(d / "qcow2root"),
            "BOOTKIT_HOOKDIR": str(d / "hooks"),
            **(env or {}),
        }
        script = SETUP + f'exec sh {MODULE / "bootkit-ifup.sh"} "$@"'
        return subprocess.run(["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", script,
                               "ifup", *args], env=env, capture_output=True, text=True, timeout=90)

    return run


def test_the_lease_is_configured_without_network_legacy(run_ifup: RunIfup, tmp_path: Path) -> None:
    proc = run_ifup("ip=10.0.2.15::10.0.2.2:255.255.255.0:node7:bootnet:none:10.0.2.3:10.0.2.4", "bootnet")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "FULL IFUP" not in proc.stdout
    assert lines[0] == "NETROOT bootnet"
    assert "inet 10.0.2.15/24 brd 10.0.2.255 scope global bootnet" in lines[1]
    assert lines[2].startswith("default via 10.0.2.2 dev bootnet")
    d = tmp_path / "case"
    assert (d / "etc" / "resolv.conf").read_text() == "nameserver 10.0.2.3\nnameserver 10.0.2.4\n"
    assert (d / "hostname").read_text() == "node7\n"
    state = sorted(p.name for p in (d / "state").iterdir())
    assert state == sorted([
        "net.bootnet.did-setup", f"net.{MAC}.did-setup", "net.bootnet.up", f"net.{MAC}.up", "net.bootnet.gw",
        "net.bootnet.override", "net.bootnet.resolv.conf", "net.bootnet.hostname",
    ])  # fmt: skip
    assert (d / "state" / "net.bootnet.override").read_text().splitlines() == [
        "ip=10.0.2.15", "gw=10.0.2.2", "mask=255.255.255.0", "hostname=node7", "dns1=10.0.2.3", "dns2=10.0.2.4",
    ]  # fmt: skip


def test_a_prefix_length_and_no_dns(run_ifup: RunIfup, tmp_path: Path) -> None:
    proc = run_ifup("ip=10.0.7.20::10.0.2.2:16::bootnet:none", "bootnet")
    assert proc.returncode == 0, proc.stderr
    assert "inet 10.0.7.20/16" in proc.stdout
    assert not (tmp_path / "case" / "etc" / "resolv.conf").exists()


def test_what_ipxe_writes_when_dhcp_gave_no_gateway_and_no_dns(run_ifup: RunIfup, tmp_path: Path) -> None:
    """iPXE expands an unset ${netX/gateway} and ${dns} to nothing: empty fields, a trailing colon."""
    proc = run_ifup("ip=10.0.2.15:::255.255.255.0::bootnet:none:", "bootnet")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "NETROOT bootnet" and "inet 10.0.2.15/24" in lines[1]
    assert len(lines) == 2  # no default route
    assert not (tmp_path / "case" / "state" / "net.bootnet.gw").exists()


@pytest.mark.parametrize(
    ("words", "args"),
    [
        ("ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none", ("eth0",)),  # another interface
        ("ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none", ("-m", "bootnet")),
        ("ip=:::::bootnet:dhcp", ("bootnet",)),  # DHCP (GRUB's fallback)
        ("ip=dhcp", ("bootnet",)),
        ("ip=[fec0::15]::[fec0::2]:64::bootnet:none", ("bootnet",)),  # IPv6: network-legacy's DAD wait
        ("ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none vlan=bootnet.5:bootnet", ("bootnet",)),
        ("ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none bond=bond0:bootnet", ("bootnet",)),
        ("ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none rd.net.timeout.carrier=30", ("bootnet",)),
        ("ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none rd.route=10.9.0.0/16:10.0.2.9", ("bootnet",)),
        ("ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none nameserver=10.0.2.3", ("bootnet",)),
        ("ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none ip=10.0.3.15:::255.255.255.0::eth1:none", ("bootnet",)),
        ("ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none ifname=eth1:52:54:00:12:34:57", ("bootnet",)),
        ("ip=10.0.2.15:10.0.2.9:10.0.2.2:255.255.255.0::bootnet:none", ("bootnet",)),  # a peer address
        ("ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:on", ("bootnet",)),
        ("ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none:10.0.2.3:10.0.2.4:x", ("bootnet",)),
        ("ip=10.0.2.1500::10.0.2.2:255.255.255.0::bootnet:none", ("bootnet",)),  # not the form of a number
        ("ip=10.0.2.15::10.0.2.2:33::bootnet:none", ("bootnet",)),
        ("ip=10.0.2.15::10.0.2.2:255.255.255.0:$(reboot):bootnet:none", ("bootnet",)),  # a hostile host name
        ('ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none "x y"', ("bootnet",)),  # quotes: dracut's splitting
        ("ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none ifname=bootnet:52:54:00:12:34:57", ("bootnet",)),
    ],
)
def test_everything_else_goes_to_network_legacy(run_ifup: RunIfup, words: str, args: tuple[str, ...]) -> None:
    proc = run_ifup(words, *args)
    assert proc.stdout.splitlines() == [f"FULL IFUP {' '.join(args)}"], proc.stderr


def test_a_mac_that_is_not_the_nics_goes_to_network_legacy(run_ifup: RunIfup) -> None:
    """ifname= names another MAC than the NIC called bootnet has (the name was given by something else)."""
    proc = run_ifup("ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none", "bootnet",
                    base=LEASE.replace(MAC, "52:54:00:12:34:57"))
    assert proc.stdout.splitlines() == ["FULL IFUP bootnet"], proc.stderr


def test_a_users_cmdline_d_file_goes_to_network_legacy(run_ifup: RunIfup) -> None:
    words = "ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none"
    proc = run_ifup(words, "bootnet", cmdline_d={"90bootkit-neednet.conf": "rd.neednet=1\n"})
    assert proc.stdout.startswith("NETROOT bootnet"), proc.stderr
    proc = run_ifup(words, "bootnet", cmdline_d={"50-site.conf": "rd.route=10.9.0.0/16:10.0.2.9\n"})
    assert proc.stdout.splitlines() == ["FULL IFUP bootnet"], proc.stderr


def test_an_interface_that_was_set_up_is_left_alone(run_ifup: RunIfup) -> None:
    """network-legacy's rule: an interface that was set up is not set up again."""
    proc = run_ifup("ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none", "bootnet", set_up=True)
    assert (proc.returncode, proc.stdout) == (0, ""), proc.stderr


def test_bootkits_root_runs_its_handler_as_netroot_would(run_ifup: RunIfup, tmp_path: Path) -> None:
    """root=qcow2: and no netroot hooks: the handler runs directly with netroot's arguments, and the
    interface is recorded as netroot's save_netinfo records it (first in /tmp/net.ifaces)."""
    words = "ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none"
    env = {"netroot": "qcow2:http://10.0.2.2/disk.qcow2", "NEWROOT": str(tmp_path / "sysroot")}
    proc = run_ifup(words, "bootnet", env=env)
    assert proc.stdout.splitlines() == [f"QCOW2ROOT bootnet qcow2:http://10.0.2.2/disk.qcow2 {tmp_path}/sysroot"], \
        proc.stderr
    assert (tmp_path / "case" / "state" / "net.ifaces").read_text() == "bootnet\n"


def test_netroot_hooks_or_another_root_go_through_netroot(run_ifup: RunIfup, tmp_path: Path) -> None:
    words = "ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none"
    proc = run_ifup(words, "bootnet", env={"netroot": "nbd:10.0.2.2:10809"})
    assert proc.stdout.startswith("NETROOT bootnet"), proc.stderr
    hooks = tmp_path / "hook-case"
    (hooks / "netroot").mkdir(parents=True)
    (hooks / "netroot" / "50-site.sh").write_text("true\n")
    proc = run_ifup(words, "bootnet", env={"netroot": "qcow2:http://10.0.2.2/disk.qcow2",
                                           "BOOTKIT_HOOKDIR": str(hooks)})
    assert proc.stdout.startswith("NETROOT bootnet"), proc.stderr


def test_a_gateway_off_the_subnet_leaves_the_interface_to_network_legacy_as_it_was(run_ifup: RunIfup) -> None:
    """The route cannot be set (the gateway is not on the lease's subnet): the address is taken off again
    before network-legacy's ifup runs, which refuses an interface that already has it."""
    proc = run_ifup("ip=192.168.7.20::10.0.2.2:16::bootnet:none", "bootnet")
    assert proc.stdout.splitlines() == ["FULL IFUP bootnet"], proc.stderr
