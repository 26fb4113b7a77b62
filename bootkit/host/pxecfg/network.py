"""Reading the network keys of a boot: VLAN, bond and how the top interface gets its address (``ip``).

dracut reads these options (``modules.d/35network-legacy/parse-vlan.sh``, ``parse-bond.sh``, ``ifup.sh``;
systemd's ``systemd-network-generator`` in the systemd flavour)::

    vlan=<vlanname>:<phydevice>
    bond=<bondname>[:<bondslaves>[:<options>[:<mtu>]]]
    ip=<interface>:{dhcp|dhcp6|auto6}

``pxe-config`` writes them from the ``vlan``, ``bond`` and ``ip`` keys (per entry and per machine; ``ip`` also
at the top), in dracut's own syntax, and puts ``ip=`` on the top interface: the VLAN when there is one (over
the bond, when both are given), else the bond, else no interface (``ip=dhcp``: every NIC, dracut's default).
With neither VLAN nor bond and ``ip = "lease"`` (the default), the boot loader's lease is handed over instead
(:func:`~.cmdline.network_choices`); on a VLAN or bond the lease becomes DHCP on the top interface.

Everything here ends up in files dracut's shell code *sources* (``/tmp/bond.<name>.info`` holds
``bondname=$bondname`` unquoted, and ifup writes ``$value`` of each bond option into
``/sys/class/net/<bond>/bonding/<key>``), so the values are refused unless they are plain words: interface
names of at most 15 characters (``IFNAMSIZ``) of ``[A-Za-z0-9_.-]``, bond options ``key=value`` with a
lower-case key and a value of ``[A-Za-z0-9_.;-]``. Each refusal is a :class:`~.values.BadValue` naming what
is wrong; the table reader adds the key. The typed values (:class:`~.model.NetSpec`) are in :mod:`.model`.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from bootkit.boot.urlhost import BadHost, split_authority
from bootkit.host.pxecfg.model import Bond, NetSpec, Vlan
from bootkit.host.pxecfg.values import BadValue

#: Linux IFNAMSIZ is 16 with the terminating NUL
MAX_IFNAME = 15
_IFNAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
#: the VLAN id is read from the VLAN's name, by dracut (ifup.sh get_vid) and systemd-network-generator alike
_VLAN_NAME = re.compile(r"^(?:vlan|.+\.)([1-9][0-9]{0,3})$")
_BOND_OPTION = re.compile(r"^[a-z_]+=[A-Za-z0-9_.;-]+$")
MAX_VLAN_ID = 4094


def ifname(value: str, what: str = "interface name") -> str:
    """A Linux interface name dracut's shell code can carry: 1-15 characters of ``[A-Za-z0-9_.-]``."""
    if not _IFNAME.match(value) or value in (".", ".."):
        raise BadValue(f"{what} {value!r}: use letters, digits, '_', '.' and '-'")
    if len(value) > MAX_IFNAME:
        raise BadValue(f"{what} {value!r} is {len(value)} characters long; Linux allows {MAX_IFNAME}")
    return value


def vlan(value: str) -> Vlan:
    """``<vlanname>:<phydevice>``; the name carries the VLAN id: ``vlan100`` or ``<anything>.100``."""
    name, sep, phys = value.partition(":")
    if not sep or not name or not phys or ":" in phys:
        raise BadValue(f"{value!r} is not <vlanname>:<phydevice> (e.g. 'eth0.100:eth0')")
    ifname(name, "VLAN name")
    ifname(phys, "VLAN device")
    m = _VLAN_NAME.match(name)
    if m is None or int(m.group(1)) > MAX_VLAN_ID:
        raise BadValue(
            f"VLAN name {name!r} does not carry a VLAN id 1-{MAX_VLAN_ID}: dracut and systemd read it from "
            "the name, 'vlan<id>' or '<device>.<id>'"
        )
    if name == phys:
        raise BadValue(f"{value!r}: the VLAN and its device must differ")
    return Vlan(name, phys, int(m.group(1)))


def bond(value: str) -> Bond:
    """``<bondname>[:<bondslaves>[:<options>[:<mtu>]]]``: slaves comma-separated, options ``key=value``
    comma-separated (``arp_ip_target`` values joined by ';', as dracut wants)."""
    fields = value.split(":")
    if len(fields) > 4:
        raise BadValue(f"{value!r} has {len(fields)} ':'-separated fields; bond= takes at most 4 "
                       "(<bondname>:<slaves>:<options>:<mtu>)")  # fmt: skip
    name = ifname(fields[0], "bond name")
    slaves: tuple[str, ...] = ()
    if len(fields) > 1:
        slaves = tuple(fields[1].split(","))
        for s in slaves:
            ifname(s, "bond slave")
        if len(set(slaves)) != len(slaves):
            raise BadValue(f"bond slaves {fields[1]!r} name an interface twice")
        if name in slaves:
            raise BadValue(f"bond {name!r} cannot be its own slave")
    options: tuple[str, ...] = ()
    if len(fields) > 2 and (fields[2] or len(fields) == 3):
        options = tuple(fields[2].split(","))
        for o in options:
            if not _BOND_OPTION.match(o):
                raise BadValue(f"bond option {o!r} is not key=value (key: a-z and '_'; value: letters, digits, "
                               "'_', '.', ';', '-')")  # fmt: skip
    mtu = None
    if len(fields) > 3:
        if not re.fullmatch(r"[1-9][0-9]{1,4}", fields[3]) or not 68 <= int(fields[3]) <= 65535:
            raise BadValue(f"bond MTU {fields[3]!r} is not a number from 68 to 65535")
        mtu = int(fields[3])
    return Bond(value, name, slaves, options, mtu)


def combine(network: NetSpec) -> NetSpec:
    """Check that the VLAN, the bond and the address method of one boot fit together."""
    if network.vlan is not None and network.bond is not None and network.vlan.phys != network.bond.name:
        raise BadValue(
            f"the VLAN {network.vlan.name!r} is on {network.vlan.phys!r}, not on the bond {network.bond.name!r}: "
            "a bond nothing uses cannot carry the boot"
        )
    if network.vlan is not None and network.bond is not None and network.vlan.name in network.bond.slaves:
        raise BadValue(f"the VLAN {network.vlan.name!r} cannot also be a slave of its own bond")
    return network


def literal_version(url: str) -> int | None:
    """4 or 6 when ``url``'s host is an IP address (``http://[2001:db8::1]/``), None for a host name (whatever
    DNS answers) or a URL the URL checks refuse."""
    try:
        host = split_authority(urlsplit(url).netloc).name
    except BadHost:
        return None
    try:
        return ipaddress.ip_address(host.partition("%")[0]).version
    except ValueError:
        return None


def reachable(network: NetSpec, url: str) -> None:
    """An IPv6-only network (``dhcp6``, ``auto6``) cannot fetch from an IPv4 address."""
    if network.method.ipv6_only and literal_version(url) == 4:
        raise BadValue(f"ip = {network.method.value!r} configures IPv6 only, but {url} names an IPv4 address")
