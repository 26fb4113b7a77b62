"""Kernel arguments a boot loader fills in from its lease: the loaders, the lease values they know, and the
network arguments ``pxe-config`` hands over.

iPXE and GRUB expand their variables in the command line before they split it into words, so only values a
loader formats as numbers (addresses, prefix lengths, the MAC) may come from DHCP (:class:`LoaderVar`): a
string a DHCP server chose could hold spaces and add kernel arguments. An :class:`Arg` is one argument made of
literal text and such values; :meth:`Arg.render` writes it in one loader's syntax, :meth:`Arg.substitute` is
what the loader does at boot. The parser of the whole line (:mod:`bootkit.boot.cmdline`) keeps the network
arguments as :class:`Arg` values, so that a line can be checked before any loader fills it in
(:data:`WIDEST_LEASE`).

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple, Union

from bootkit.errors import ConfigError
from bootkit.record import Choice, record


class Loader(Choice):
    """A boot loader that writes the command line and fills in :class:`LoaderVar` values at boot."""

    ipxe = "ipxe"
    grub = "grub"


class LoaderVar(Choice):
    """A value of the lease the boot loader was handed, which it substitutes into the command line.

    ``render(loader)`` is the loader's syntax for it; not every loader knows every value (GRUB has no
    variable for the gateway or netmask), which is an error at render time, not a silently empty value.
    Only values a loader formats as numbers are here (addresses, the MAC): a string a DHCP server chose
    (host name, domain, file name) could hold spaces, and the loader expands it before it splits the line.
    """

    ip = "ip"
    gateway = "gateway"
    netmask = "netmask"
    mac = "mac"
    #: the first DNS server of the lease
    dns = "dns"
    #: IPv6: the address (DHCPv6 over SLAAC over link-local: iPXE's settings order), the prefix length of the
    #: router advertisement's prefix and the router (a link-local address)
    ip6 = "ip6"
    len6 = "len6"
    gateway6 = "gateway6"

    def render(self, loader: Loader) -> str:
        text = _LOADER_SYNTAX[loader].get(self)
        if text is None:
            raise ConfigError(f"{loader.value} has no variable for the lease's {self.value}")
        return text


# iPXE: settings of the interface it booted through (``netX``, the last one opened, which is the one whose
# DHCP succeeded); every one is ipv4- or hex-typed, so iPXE prints dotted quads and colon-separated hex only.
# An unset one (a lease without router or DNS) expands to nothing. IPv6 (iPXE built with NET_PROTO_IPV6, as
# Debian's is): ``ip6``, ``len6`` and ``gateway6`` are ipv6- and int-typed settings of the IPv6 scope, which
# ``netX`` finds in its child blocks: ``netX.dhcpv6`` (the DHCPv6 address), ``netX.ndp.<n>`` (SLAAC address,
# prefix length and router of a router advertisement) and ``netX.link`` (fe80::, length 64); the highest order
# wins (DHCPv6, then SLAAC, then link-local: iPXE's ``enum ipv6_settings_order``). ``dns6`` is not used: two
# settings of that name live in two scopes (NDP's RDNSS and DHCPv6). GRUB: the variables its ``net_bootp`` sets
# for the default interface (2.06 has no gateway, netmask or DNS variable). Braced, so that a following
# letter cannot extend the name.
_LOADER_SYNTAX: Dict[Loader, Dict[LoaderVar, str]] = {
    Loader.ipxe: {
        **{v: "${netX/" + v.value + "}" for v in (LoaderVar.ip, LoaderVar.gateway, LoaderVar.netmask, LoaderVar.mac)},
        LoaderVar.dns: "${dns}",
        **{v: "${netX/" + v.value + "}" for v in (LoaderVar.ip6, LoaderVar.len6, LoaderVar.gateway6)},
    },
    Loader.grub: {LoaderVar.ip: "${net_default_ip}", LoaderVar.mac: "${net_default_mac}"},
}

#: the widest value each loader variable can take: what a line is checked with before any loader fills it in
WIDEST_LEASE: Dict[LoaderVar, str] = {
    LoaderVar.ip: "255.255.255.255",
    LoaderVar.gateway: "255.255.255.255",
    LoaderVar.netmask: "255.255.255.255",
    LoaderVar.mac: "ff:ff:ff:ff:ff:ff",
    LoaderVar.dns: "255.255.255.255",
    LoaderVar.ip6: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    LoaderVar.len6: "128",
    LoaderVar.gateway6: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
}


@record
class Arg:
    """One kernel argument whose text may hold values the boot loader fills in (:class:`LoaderVar`)."""

    parts: Tuple[Union[str, LoaderVar], ...]

    @classmethod
    def of(cls, *parts: Union[str, LoaderVar]) -> Arg:
        """Literal text and loader values, adjacent literals merged (so equal words compare equal)."""
        merged: List[Union[str, LoaderVar]] = []
        for p in parts:
            last = merged[-1] if merged else None
            if isinstance(p, LoaderVar):
                merged.append(p)
            elif last is not None and not isinstance(last, LoaderVar):
                merged[-1] = last + p
            elif p:
                merged.append(p)
        return cls(tuple(merged))

    @property
    def key(self) -> str:
        """The option name: the literal text before the first ``=``."""
        head = self.parts[0] if self.parts and not isinstance(self.parts[0], LoaderVar) else ""
        return head.partition("=")[0]

    @property
    def literal(self) -> bool:
        """True when no part is filled in by the boot loader."""
        return not any(isinstance(p, LoaderVar) for p in self.parts)

    def render(self, loader: Optional[Loader]) -> str:
        """The argument as ``loader`` writes it; without a loader, only a literal argument can be written."""
        out = []
        for p in self.parts:
            if isinstance(p, LoaderVar):
                if loader is None:
                    raise ConfigError(f"{self.key}=: the {p.value} is filled in by the boot loader: name one")
                out.append(p.render(loader))
            else:
                out.append(p)
        return "".join(out)

    def substitute(self, values: Mapping[LoaderVar, str]) -> Arg:
        """The argument after the boot loader filled in ``values``."""
        return Arg.of(*(values[p] if isinstance(p, LoaderVar) else p for p in self.parts))


#: what ``pxe-config`` writes with ``ip = "dhcp"``: DHCP in the initramfs, on every interface
DHCP_NETWORK: Tuple[Arg, ...] = (Arg.of("ip=dhcp"), Arg.of("rd.neednet=1"))
#: the name the boot interface gets in the initramfs (``ifname=``): dracut's and systemd-network-generator's
#: ``ip=`` then configure that one interface only. Not ``ethN``: dracut refuses to rename into the kernel's
#: namespace.
BOOT_IFNAME = "bootnet"


# Both use dracut's full ``ip=`` form, which dracut and systemd-network-generator read alike:
#   ip=<client-IP>:[<peer>]:<gateway-IP>:<netmask>:<client_hostname>:<interface>:<autoconf>[:<dns1>]
# and pin the interface by MAC with ``ifname=``, which both know (systemd-network-generator ignores BOOTIF=).


def lease_network(hostname: Optional[str] = None) -> Tuple[Arg, ...]:
    """The boot loader's lease handed over: a static address on the interface it booted from (by MAC), with
    its gateway and first DNS server (either may be empty: dracut and networkd accept empty fields)."""
    return (
        Arg.of(f"ifname={BOOT_IFNAME}:", LoaderVar.mac),
        Arg.of(
            "ip=", LoaderVar.ip, "::", LoaderVar.gateway, ":", LoaderVar.netmask,
            f":{hostname or ''}:{BOOT_IFNAME}:none:", LoaderVar.dns,
        ),
        Arg.of("rd.neednet=1"),
    )  # fmt: skip


def lease6_network(hostname: Optional[str] = None) -> Tuple[Arg, ...]:
    """The boot loader's IPv6 configuration handed over: a static address, prefix length and router on the
    interface it booted from (by MAC). IPv6 addresses go in brackets, the prefix length in the netmask field
    (dracut's net-lib.sh ip_to_var and ifup.sh do_static, systemd-network-generator alike). The router is
    never empty: iPXE's script hands over only when it has one (``isset``)."""
    return (
        Arg.of(f"ifname={BOOT_IFNAME}:", LoaderVar.mac),
        Arg.of(
            "ip=[", LoaderVar.ip6, "]::[", LoaderVar.gateway6, "]:", LoaderVar.len6,
            f":{hostname or ''}:{BOOT_IFNAME}:none",
        ),
        Arg.of("rd.neednet=1"),
    )  # fmt: skip


def boot_nic_dhcp_network(hostname: Optional[str] = None, autoconf: str = "dhcp") -> Tuple[Arg, ...]:
    """DHCP (or ``autoconf``: ``auto6``, ``dhcp6``) in the initramfs on the interface the boot loader booted
    from (by MAC), and on no other."""
    return (
        Arg.of(f"ifname={BOOT_IFNAME}:", LoaderVar.mac),
        Arg.of(f"ip=::::{hostname or ''}:{BOOT_IFNAME}:{autoconf}"),
        Arg.of("rd.neednet=1"),
    )
