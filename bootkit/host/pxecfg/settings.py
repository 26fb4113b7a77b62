"""Every setting of a boot description, declared once: TOML key, command-line flag, help text.

The TOML reader (:mod:`bootkit.host.pxecfg.load`) accepts exactly these keys, the flags-only mode of
``bootkit pxe-config`` offers them as flags (``--overlay-size``, ``--dhcp-mode``), and the README's key table
is checked against them by a test. Plain data: the CLI imports this module at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    """One setting: its TOML key, the flag of the flags-only mode, and the help text both share."""

    key: str
    help: str
    kind: str = "str"  # "str", "int" or "list" (a TOML array of strings; a repeatable flag)
    metavar: str = "VALUE"
    #: extra flag spellings (``--image-url`` for ``image``)
    aliases: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


TOP_SETTINGS = (
    Setting("base_url", "HTTP URL of the directory kernels, initrds and images are fetched from", metavar="URL"),
    Setting("docroot", "local directory served at base_url (to hash images and check files)", metavar="DIR"),
    Setting("default", "name of the entry booted when the menu times out", metavar="NAME"),
    Setting("timeout", "menu timeout in seconds; 0 boots the default entry at once (default 5)", "int", "SECONDS"),
    Setting("console", "kernel console= values for entries that set none (repeatable)", "list", "CONSOLE"),
    Setting("bootloaders", "bootloaders to configure: ipxe, grub (default both; the flag repeats)", "list", "NAME"),
    Setting("entry", "boot entries (array of tables)", "tables"),
    Setting("machine", "per-machine overrides (array of tables)", "tables"),
    Setting("dhcp", "dnsmasq configuration (table); without it no dnsmasq.conf is written", "table"),
    Setting("grub", "GRUB options (table)", "table"),
)

ENTRY_SETTINGS = (
    Setting("name", "entry name: menu id, iPXE label, GRUB id (default 'qcow2' in flags mode)", metavar="NAME"),
    Setting("title", "menu title (default: the name)", metavar="TEXT"),
    Setting("kernel", "kernel: URL, or path relative to base_url (and docroot)", metavar="FILE|URL"),
    Setting("initrd", "initramfs built by bootkit: URL, or path relative to base_url", metavar="FILE|URL"),
    Setting("image", "QCOW2 image: URL, or path relative to base_url", metavar="FILE|URL", aliases=("--image-url",)),
    Setting(
        "sha256",
        "image SHA-256: 64 hex digits, 'compute' (hash the local file; the default in ram mode) or "
        "'sidecar' (the initramfs checks <image URL>.sha256)",
        metavar="HEX|compute|sidecar",
    ),
    Setting("mode", "ram: download the whole image first (default); lazy: read ranges on demand", metavar="MODE"),
    Setting(
        "root", "root filesystem: auto (default), partition number, LABEL=.., UUID=.., PARTUUID=..", metavar="ROOT"
    ),
    Setting("overlay", "writable layer: tmpfs (default) or none", metavar="KIND"),
    Setting("overlay_size", "tmpfs overlay size (2G, 25%%)", metavar="SIZE"),
    Setting("manifest", "lazy mode: per-cluster hash manifest, URL or path relative to base_url", metavar="FILE|URL"),
    Setting("manifest_sha256", "SHA-256 of the manifest: 64 hex digits or 'compute' (default)", metavar="HEX"),
    Setting("snapshot", "internal QCOW2 snapshot to boot", metavar="NAME"),
    Setting("console", "kernel console= value (repeatable)", "list", "CONSOLE"),
    Setting("args", "extra kernel argument (repeatable)", "list", "ARG"),
)

MACHINE_SETTINGS = (
    Setting("mac", "MAC address the machine boots from", metavar="MAC"),
    Setting("name", "a human name for the machine (comment only)", metavar="NAME"),
    Setting("default", "entry this machine boots by default", metavar="NAME"),
    Setting("timeout", "menu timeout for this machine", "int", "SECONDS"),
    Setting("args", "extra kernel arguments for this machine, after the entry's", "list", "ARG"),
)

DHCP_SETTINGS = (
    Setting(
        "mode", "proxy: next to an existing DHCP server (default); full: dnsmasq hands out addresses", metavar="MODE"
    ),
    Setting("loader", "what firmware PXE clients load first: ipxe (default) or grub", metavar="LOADER"),
    Setting("subnet", "proxy mode: address of the network to answer on (192.168.1.0)", metavar="ADDR"),
    Setting("range_start", "full mode: first address of the pool", metavar="ADDR"),
    Setting("range_end", "full mode: last address of the pool", metavar="ADDR"),
    Setting("netmask", "full mode: netmask of the pool", metavar="MASK"),
    Setting("lease_time", "full mode: lease time (default 1h)", metavar="TIME"),
    Setting("router", "full mode: default gateway handed out", metavar="ADDR"),
    Setting("dns", "full mode: DNS server handed out (repeatable)", "list", "ADDR"),
    Setting("interface", "network interface dnsmasq serves", metavar="IFACE"),
    Setting("tftp_root", "TFTP root on the server (default: OUT/tftp, absolute)", metavar="DIR"),
)

GRUB_SETTINGS = (
    Setting("serial_speed", "GRUB on BIOS also uses serial port 0 at this speed", "int", "BAUD"),
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
