"""The kernel command line of a boot entry: built here and nowhere else.

The iPXE script and every GRUB configuration print what :func:`kernel_words` returns, so the two bootloaders
always hand the kernel the same options. The ``rd.qcow2.*`` part is the command-line contract with bootkit's
initramfs, owned by :mod:`bootkit.boot.cmdline`: an entry becomes a :class:`~bootkit.boot.cmdline.BootConfig`
(:func:`boot_config`) whose ``to_args()`` writes exactly what the initramfs parses back.

The network part depends on the keys and the boot loader (docs/pxe.md, "The network of the initramfs"): each
loader's configuration holds a first line and, where the loader may lack what the first one needs, a fallback
it picks at boot (:func:`network_choices`).
"""

from __future__ import annotations

import enum
from typing import Any

from bootkit.boot.cmdline import BootConfig, OverlayKind, Verify, join_args
from bootkit.boot.loaderargs import (
    WIDEST_LEASE,
    Arg,
    Loader,
    LoaderVar,
    boot_nic_dhcp_network,
    lease6_network,
    lease_network,
)
from bootkit.host.pxecfg.model import Entry, Machine, NetSpec
from bootkit.host.pxecfg.network import literal_version

#: x86 COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h): longer lines are cut by the kernel
MAX_CMDLINE = 2048


class Network(enum.Enum):
    """What a kernel line asks dracut for."""

    #: the loader's lease as a static address on the boot interface (iPXE)
    lease = "lease"
    #: the loader's IPv6 address, prefix length and router as a static address on the boot interface (iPXE)
    lease6 = "lease6"
    #: DHCP in the initramfs on the boot interface only, pinned by the MAC the loader booted from
    boot_nic_dhcp = "boot-nic-dhcp"
    #: SLAAC (router advertisements; DHCPv6 where they ask for it) on the boot interface only
    boot_nic_auto6 = "boot-nic-auto6"

    @property
    def loader_checks(self) -> tuple[LoaderVar, ...]:
        """The loader values that must be set for this line to be written (else the fallback): a lease without
        a netmask, or an IPv6 configuration without a router (iPXE's link-local address alone), is no lease."""
        return {Network.lease: (LoaderVar.netmask,), Network.lease6: (LoaderVar.gateway6,)}.get(self, ())
    #: the initramfs configures the network the keys describe (:meth:`NetSpec.args`): ``ip=dhcp`` on every
    #: interface, or DHCP, DHCPv6 or SLAAC (dracut's ``<autoconf>``) on the VLAN or bond
    autoconf = "autoconf"


def net_spec(entry: Entry, machine: Machine | None = None) -> NetSpec:
    """The network keys that apply when ``machine`` boots ``entry``: the machine's over the entry's (which hold
    the top level's ``ip``)."""
    return entry.net if machine is None else machine.net.over(entry.net)


def network_choices(entry: Entry, machine: Machine | None, loader: Loader) -> tuple[Network, Network | None]:
    """The network of ``loader``'s kernel line for ``entry`` on ``machine``, and the fallback the loader's
    configuration switches to at boot when it lacks a value (None: no fallback).

    With the lease (``ip = "lease"``, no VLAN, no bond), iPXE hands it over, or DHCP on the boot interface when
    the lease has no netmask; with an image at an IPv6 address, iPXE's IPv6 configuration, or SLAAC on the boot
    interface when iPXE has no router; GRUB 2.06 has variables for the address and MAC only, not the netmask or
    gateway: DHCP on the boot interface, or on every interface when it did not boot from the network (no
    ``net_default_mac``). Otherwise both write the keys' own network: ``ip=dhcp``, or the VLAN, the bond, IPv6.
    """
    if not net_spec(entry, machine).hands_over:
        return Network.autoconf, None
    if loader is Loader.ipxe:
        if literal_version(entry.image.url) == 6:
            return Network.lease6, Network.boot_nic_auto6
        return Network.lease, Network.boot_nic_dhcp
    return Network.boot_nic_dhcp, Network.autoconf


def _cache_options(entry: Entry, machine: Machine | None) -> dict[str, Any]:
    """``rd.qcow2.cache=`` and ``rd.qcow2.cache.format=``: the machine's over the entry's, lazy and stream only."""
    cache, cache_format = entry.cache, entry.cache_format
    if machine is not None and machine.cache is not None:
        cache = machine.cache
    if machine is not None and machine.cache_format is not None:
        cache_format = machine.cache_format
    if cache is None or not entry.mode.reads_ranges:
        return {}
    return {"cache": cache, "cache_format": cache_format}


def boot_config(entry: Entry, machine: Machine | None = None, network: Network = Network.autoconf) -> BootConfig:
    """What the initramfs is asked for when ``machine`` (None: any machine) boots ``entry`` with ``network``."""
    hostname = machine.hostname if machine is not None else None
    return BootConfig(
        url=entry.image.url,
        sha256=entry.sha256,
        # lazy mode with a manifest: rd.qcow2.manifest-sha256 pins it; without a hash, the .sha256 sidecar
        verify=Verify.pinned if entry.sha256 is not None or entry.manifest_sha256 is not None or entry.channel
        else Verify.sidecar,
        mode=entry.mode,
        root=entry.root,
        overlay=entry.overlay,
        manifest=None if entry.manifest is None else entry.manifest.url,
        manifest_sha256=entry.manifest_sha256,
        snapshot=entry.snapshot,
        mirrors=entry.mirrors,
        report=entry.report,
        channel=entry.channel,
        channel_min_version=entry.channel_min_version,
        **_cache_options(entry, machine),
        # With a tmpfs overlay the root is writable, so say so: without rw, dracut mounts it read-only and
        # systemd leaves a root that has no fstab entry as it found it.
        rw=entry.overlay.kind is OverlayKind.tmpfs,
        network={
            Network.lease: lease_network(hostname),
            Network.lease6: lease6_network(hostname),
            Network.boot_nic_dhcp: boot_nic_dhcp_network(hostname),
            Network.boot_nic_auto6: boot_nic_dhcp_network(hostname, "auto6"),
            Network.autoconf: net_spec(entry, machine).args(hostname),
        }[network],
    )


def kernel_words(
    entry: Entry, machine: Machine | None = None, *, network: Network = Network.autoconf, initrd_name: str | None = None
) -> tuple[Arg, ...]:
    """The kernel arguments of ``entry`` as ``machine`` boots it with ``network``, before a loader renders
    them: the network words hold values the loader fills in.

    ``initrd_name`` adds ``initrd=NAME`` first: iPXE on UEFI hands initrds to the kernel's EFI stub by that
    name (docs/pxe.md, "iPXE facts"); GRUB passes initrds itself and leaves it out.
    """
    args: list[str] = []
    if initrd_name is not None:
        args.append(f"initrd={initrd_name}")
    words = [Arg.of(a) for a in args]
    words += boot_config(entry, machine, network).to_words()
    tail = [*(f"console={c}" for c in entry.console), *entry.args, *(machine.args if machine is not None else ())]
    words += [Arg.of(a) for a in tail]
    return tuple(words)


def kernel_args(
    entry: Entry,
    machine: Machine | None = None,
    *,
    network: Network = Network.autoconf,
    loader: Loader | None = None,
    initrd_name: str | None = None,
) -> tuple[str, ...]:
    """:func:`kernel_words` in ``loader``'s syntax, one string per argument."""
    return tuple(w.render(loader) for w in kernel_words(entry, machine, network=network, initrd_name=initrd_name))


def kernel_cmdline(
    entry: Entry, machine: Machine | None = None, *, network: Network = Network.autoconf, initrd_name: str | None = None
) -> str:
    """The line as the kernel sees it, with the widest values a loader can fill in."""
    words = kernel_words(entry, machine, network=network, initrd_name=initrd_name)
    return join_args(tuple(w.substitute(WIDEST_LEASE).render(None) for w in words))
