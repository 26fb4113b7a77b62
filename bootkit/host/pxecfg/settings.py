"""Every setting of a boot description, declared once: TOML key, command-line flag, help text, parser.

The TOML reader (:mod:`bootkit.host.pxecfg.table`, driven by :mod:`bootkit.host.pxecfg.load`) accepts exactly
these keys and reads each value with the parse function its setting declares (as mkosi's ``ConfigSetting``
does), the flags-only mode of ``bootkit pxe-config`` offers them as flags (``--overlay-size``,
``--dhcp-mode``), and the README's key table is checked against them by a test. Light: the CLI imports this
module at start-up (the parsers need only the standard library).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bootkit.boot.cacheopts import CacheFormat
from bootkit.host.pxecfg import network as net
from bootkit.host.pxecfg import values as v
from bootkit.host.pxecfg.model import DhcpMode, IpConfig, Mode, OverlayKind, PxeLoader


@dataclass(frozen=True)
class Setting:
    """One setting: its TOML key, the flag of the flags-only mode, the help text both share, and its parser."""

    key: str
    help: str
    kind: str = "str"  # "str", "int", "list" (a TOML array of strings; a repeatable flag), "table", "tables"
    metavar: str = "VALUE"
    #: extra flag spellings (``--image-url`` for ``image``)
    aliases: tuple[str, ...] = ()
    #: turns the type-checked value into the typed one, or raises :class:`~.values.BadValue`; None: as given.
    #: Settings resolved against other settings (files under docroot, hashes) are read by the table's rules.
    parse: Callable[[Any], Any] | None = None
    #: the settings of a table or of each table of an array
    settings: tuple[Setting, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


#: the network of the initramfs (docs/pxe.md, "The network of the initramfs"): per entry and per machine (the
#: machine's over the entry's), ``ip`` at the top too
NETWORK_SETTINGS = (
    Setting("ip", "how the initramfs gets its address: lease (default: the boot loader's lease, boot interface "
            "only; DHCP on a VLAN or bond), dhcp (in the initramfs), dhcp6 or auto6 (IPv6 only: DHCPv6, router "
            "advertisements)", metavar="METHOD", parse=v.choice(IpConfig)),
    Setting("vlan", "boot over a VLAN, dracut's vlan= syntax: <vlanname>:<phydevice> (eth0.100:eth0)",
            metavar="NAME:DEV", parse=net.vlan),
    Setting("bond", "boot over a bond, dracut's bond= syntax: <bondname>[:<slaves>[:<options>[:<mtu>]]]",
            metavar="SPEC", parse=net.bond),
)

ENTRY_SETTINGS = (
    Setting("name", "entry name: menu id, iPXE label, GRUB id (default 'qcow2' in flags mode)", metavar="NAME",
            parse=v.name),
    Setting("title", "menu title (default: the name)", metavar="TEXT", parse=v.title),
    Setting("kernel", "kernel: URL, or path relative to base_url (and docroot)", metavar="FILE|URL"),
    Setting("initrd", "initramfs built by bootkit: URL, or path relative to base_url", metavar="FILE|URL"),
    Setting("image", "QCOW2 image: URL, or path relative to base_url", metavar="FILE|URL", aliases=("--image-url",)),
    Setting("channel", "instead of image: a signed channel file (bootkit publish --sign), URL or path relative "
            "to base_url; machines boot the image it names, with its hashes (root=qcow2:channel:)",
            metavar="FILE|URL"),
    Setting("channel_min_version", "with channel: the lowest channel version machines boot "
            "(rd.qcow2.channel.min-version)", "int", "N", parse=v.non_negative),
    Setting(
        "sha256",
        "image SHA-256: 64 hex digits, 'compute' (hash the local file; the default in ram mode) or "
        "'sidecar' (the initramfs checks <image URL>.sha256)",
        metavar="HEX|compute|sidecar",
    ),
    Setting("mode", "ram: download the whole image first (default); lazy: read ranges on demand; stream: read "
            "ranges on demand and fill the whole image into RAM behind the boot", metavar="MODE",
            parse=v.choice(Mode)),
    Setting(
        "root", "root filesystem: auto (default), partition number, LABEL=.., UUID=.., PARTUUID=..", metavar="ROOT",
        parse=v.root,
    ),
    Setting("overlay", "writable layer: tmpfs (default) or none", metavar="KIND", parse=v.choice(OverlayKind)),
    Setting("overlay_size", "tmpfs overlay size (2G, 25%%)", metavar="SIZE", parse=v.overlay_size),
    Setting("manifest", "lazy and stream mode: per-chunk hash manifest, URL or path relative to base_url",
            metavar="FILE|URL"),
    Setting("manifest_sha256", "SHA-256 of the manifest: 64 hex digits or 'compute' (default)", metavar="HEX"),
    Setting("snapshot", "internal QCOW2 snapshot to boot", metavar="NAME", parse=v.snapshot),
    Setting(
        "mirrors", "absolute URL of the same image on another server, tried after image (repeatable; needs a pinned "
        "sha256, or manifest in lazy mode)", "list", "URL", parse=v.mirror_urls,
    ),
    Setting("console", "kernel console= value (repeatable)", "list", "CONSOLE", parse=v.kernel_args),
    Setting("args", "extra kernel argument (repeatable)", "list", "ARG", parse=v.kernel_args),
    Setting("report", "URL machines POST their boot report to (rd.qcow2.report=; bootkit fleet collect)",
            metavar="URL", parse=v.report_url),
    Setting("cache", "lazy and stream mode: local cache device (rd.qcow2.cache=): PARTLABEL=bootkit-cache, LABEL=.., "
            "UUID=.., /dev/disk/by-..", metavar="DEVICE", parse=v.cache_device),
    Setting("cache_format", "auto: the initramfs formats a bootkit cache partition that has no filesystem yet; off "
            "(default)", metavar="auto|off", parse=v.choice(CacheFormat)),
    *NETWORK_SETTINGS,
)

MACHINE_SETTINGS = (
    Setting("mac", "MAC address the machine boots from", metavar="MAC", parse=v.mac),
    Setting("name", "a human name for the machine (comment only)", metavar="NAME", parse=v.printable),
    Setting("default", "entry this machine boots by default", metavar="NAME"),
    Setting("timeout", "menu timeout for this machine", "int", "SECONDS", parse=v.non_negative),
    Setting("args", "extra kernel arguments for this machine, after the entry's", "list", "ARG",
            parse=v.kernel_args),
    *NETWORK_SETTINGS,
    Setting("hostname", "host name the initramfs sets (letters, digits, '-'; never taken from DHCP)",
            metavar="NAME", parse=v.hostname),
    Setting("cache", "this machine's local cache device over its entries' (lazy and stream entries; "
            "rd.qcow2.cache=)", metavar="DEVICE", parse=v.cache_device),
    Setting("cache_format", "this machine's cache_format over its entries'", metavar="auto|off",
            parse=v.choice(CacheFormat)),
)

DHCP_SETTINGS = (
    Setting(
        "mode", "proxy: next to an existing DHCP server (default); full: dnsmasq hands out addresses", metavar="MODE",
        parse=v.choice(DhcpMode),
    ),
    Setting("loader", "what firmware PXE clients load first: ipxe (default), grub, or shim (UEFI: Debian's signed "
            "shim and network GRUB, for Secure Boot; BIOS: grub)", metavar="LOADER", parse=v.choice(PxeLoader)),
    Setting("subnet", "proxy mode: address of the network to answer on (192.168.1.0)", metavar="ADDR",
            parse=v.ipv4),
    Setting("range_start", "full mode: first address of the pool", metavar="ADDR", parse=v.ipv4),
    Setting("range_end", "full mode: last address of the pool", metavar="ADDR", parse=v.ipv4),
    Setting("netmask", "full mode: netmask of the pool", metavar="MASK", parse=v.ipv4),
    Setting("lease_time", "full mode: lease time (default 1h)", metavar="TIME", parse=v.lease_time),
    Setting("router", "full mode: default gateway handed out", metavar="ADDR", parse=v.ipv4),
    Setting("dns", "full mode: DNS server handed out (repeatable)", "list", "ADDR", parse=v.ipv4_list),
    Setting("interface", "network interface dnsmasq serves", metavar="IFACE", parse=v.interface),
    Setting("tftp_root", "TFTP root on the server (default: OUT/tftp, absolute)", metavar="DIR",
            parse=v.server_path),
    Setting("http_boot", "full mode: the UKI (bootkit build-uki) UEFI HTTP Boot clients fetch, no TFTP: URL, or "
            "path relative to base_url", metavar="FILE|URL"),
)

GRUB_SETTINGS = (
    Setting("serial_speed", "GRUB on BIOS also uses serial port 0 at this speed", "int", "BAUD", parse=v.positive),
)

TOP_SETTINGS = (
    Setting("base_url", "HTTP URL of the directory kernels, initrds and images are fetched from", metavar="URL",
            parse=v.base_url),
    Setting("docroot", "local directory served at base_url (to hash images and check files)", metavar="DIR"),
    Setting("default", "name of the entry booted when the menu times out", metavar="NAME"),
    Setting("timeout", "menu timeout in seconds; 0 boots the default entry at once (default 5)", "int", "SECONDS",
            parse=v.non_negative),
    Setting("console", "kernel console= values for entries that set none (repeatable)", "list", "CONSOLE",
            parse=v.kernel_args),
    Setting("report", "report URL for entries that set none (bootkit fleet collect's POST /report URL)",
            metavar="URL", parse=v.report_url),
    Setting("cache", "cache device for entries that set none (lazy and stream entries)", metavar="DEVICE",
            parse=v.cache_device),
    Setting("cache_format", "cache_format for entries that set none", metavar="auto|off", parse=v.choice(CacheFormat)),
    Setting("bootloaders", "bootloaders to configure: ipxe, grub (default both; the flag repeats)", "list", "NAME",
            parse=v.bootloaders),
    NETWORK_SETTINGS[0],
    Setting("entry", "boot entries (array of tables)", "tables", settings=ENTRY_SETTINGS),
    Setting("machine", "per-machine overrides (array of tables)", "tables", settings=MACHINE_SETTINGS),
    Setting("dhcp", "dnsmasq configuration (table); without it no dnsmasq.conf is written", "table",
            settings=DHCP_SETTINGS),
    Setting("grub", "GRUB options (table)", "table", settings=GRUB_SETTINGS),
)

DEFAULT_TIMEOUT = 5
FLAGS_ENTRY_NAME = "qcow2"


#: settings the flags-only mode offers: (table, setting); table None is the top level
FLAG_SETTINGS: tuple[tuple[str | None, Setting], ...] = (
    *((None, s) for s in TOP_SETTINGS if s.key in ("base_url", "docroot", "timeout", "bootloaders")),
    *(("entry", s) for s in ENTRY_SETTINGS),
    *(("dhcp", s) for s in DHCP_SETTINGS),
    *(("grub", s) for s in GRUB_SETTINGS),
)


def flag_dest(table: str | None, setting: Setting) -> str:
    """The argparse ``dest`` of a flags-mode setting."""
    return setting.key if table in (None, "entry") else f"{table}_{setting.key}"


def flag_name(table: str | None, setting: Setting) -> str:
    """``--sha256``, ``--dhcp-mode``: entry and top-level settings are unprefixed."""
    return setting.flag if table in (None, "entry") else f"--{table}-{setting.key.replace('_', '-')}"
