"""The boot description as typed values: what ``pxe-config`` reads (TOML or flags) once, then passes down.

Everything here is frozen and already validated by :mod:`bootkit.host.pxecfg.load`: URLs are absolute, hashes
are 64 lower-case hex digits, MAC addresses are lower-case with colons, entry names exist. Closed sets are
``StrEnum`` with the behaviour that depends on them (``Firmware.bios.grub_platform``), so the renderers and
templates never branch on strings. What goes on the kernel command line (the mode, the root, the overlay) is
typed by the command-line contract, :mod:`bootkit.boot.cmdline`, which owns those types.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from bootkit.boot.cacheopts import CacheFormat
from bootkit.boot.cmdline import Mode as Mode
from bootkit.boot.cmdline import Overlay as Overlay
from bootkit.boot.cmdline import OverlayKind as OverlayKind
from bootkit.boot.cmdline import RootSpec as RootSpec
from bootkit.boot.loaderargs import Arg


class Bootloader(enum.StrEnum):
    """A bootloader whose configuration ``pxe-config`` writes."""

    ipxe = "ipxe"
    grub = "grub"


class PxeLoader(enum.StrEnum):
    """What a firmware PXE ROM loads first (``[dhcp] loader``)."""

    ipxe = "ipxe"
    grub = "grub"
    #: UEFI clients: Debian's signed shim, then Debian's signed network GRUB (Secure Boot; pxecfg/shim.py);
    #: BIOS clients, which have no Secure Boot: GRUB as with ``grub``
    shim = "shim"

    @property
    def bootloader(self) -> Bootloader:
        """The bootloader whose configuration this chain reads."""
        return Bootloader.ipxe if self is PxeLoader.ipxe else Bootloader.grub


class Firmware(enum.StrEnum):
    """The two x86-64 firmware families a PXE client can run, and what each needs."""

    bios = "bios"
    uefi = "uefi"

    def grub_platform(self) -> str:
        """GRUB's platform directory under /usr/lib/grub (and under boot/grub in the TFTP tree)."""
        return {"bios": "i386-pc", "uefi": "x86_64-efi"}[self]

    def grub_image(self) -> str:
        """The netboot image ``grub-mknetdir`` writes for this firmware."""
        return {"bios": "core.0", "uefi": "core.efi"}[self]

    def ipxe_binary(self) -> str:
        """The iPXE build a firmware PXE ROM chain-loads (Debian package ``ipxe``, /usr/lib/ipxe)."""
        return {"bios": "undionly.kpxe", "uefi": "ipxe.efi"}[self]

    def client_arches(self) -> tuple[int, ...]:
        """DHCP option 93 (client system architecture, RFC 4578 / IANA) values of this firmware on x86-64."""
        # 7 is "EFI BC" and 9 "EFI x86-64": firmware in the field sends either for x86-64 UEFI
        return {"bios": (0,), "uefi": (7, 9)}[self]

    def pxe_csas(self) -> tuple[str, ...]:
        """dnsmasq's names for the same architectures in ``pxe-service`` (proxy DHCP)."""
        return {"bios": ("x86PC",), "uefi": ("BC_EFI", "X86-64_EFI")}[self]


class DhcpMode(enum.StrEnum):
    """``proxy``: an existing DHCP server hands out addresses, dnsmasq adds boot information only;
    ``full``: dnsmasq is the DHCP server."""

    proxy = "proxy"
    full = "full"


@dataclass(frozen=True)
class Artifact:
    """A file the boot fetches over HTTP; ``path`` is the same file on this machine, when known."""

    url: str
    path: Path | None = None

    @property
    def name(self) -> str:
        """The file name at the end of the URL's path (``initrd.img``)."""
        return PurePosixPath(unquote(urlsplit(self.url).path)).name


# -- the network of a boot (parsed by .network) -------------------------------------------------------------


class IpConfig(enum.StrEnum):
    """How the initramfs gets its address (the ``ip`` key; docs/pxe.md, "The network of the initramfs").

    ``lease`` (the default): the boot loader hands over the lease it booted with (iPXE: address, netmask,
    gateway, DNS; GRUB, which has no variables for all of them: DHCP on the boot interface only). The lease
    belongs to the native interface the loader used: on a VLAN or a bond the initramfs runs DHCP on the top
    interface instead. ``dhcp``: DHCP in the initramfs (``ip=dhcp``: on every interface without VLAN or bond).
    ``dhcp6``, ``auto6``: DHCPv6 or SLAAC (router advertisements) in the initramfs, IPv6 only.
    """

    lease = "lease"
    dhcp = "dhcp"
    dhcp6 = "dhcp6"
    auto6 = "auto6"

    @property
    def ipv6_only(self) -> bool:
        return self in (IpConfig.dhcp6, IpConfig.auto6)

    @property
    def autoconf(self) -> str:
        """dracut's ``<autoconf>`` value of ``ip=`` when the initramfs configures the address itself (a lease
        that cannot be handed over becomes DHCP)."""
        return "dhcp" if self is IpConfig.lease else self.value


@dataclass(frozen=True)
class Vlan:
    """``vlan=<name>:<phys>``: the VLAN interface ``name`` (id ``vid``) on ``phys``."""

    name: str
    phys: str
    vid: int

    def __str__(self) -> str:
        return f"{self.name}:{self.phys}"


@dataclass(frozen=True)
class Bond:
    """``bond=<name>[:<slaves>[:<options>[:<mtu>]]]`` as given (``text``), and its parts."""

    text: str
    name: str
    slaves: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    mtu: int | None = None

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class NetSpec:
    """What one level (top, entry, machine) says about the network of the initramfs; None: not said here."""

    ip: IpConfig | None = None
    vlan: Vlan | None = None
    bond: Bond | None = None

    def over(self, base: NetSpec) -> NetSpec:
        """This level's settings, the others from ``base`` (a machine over its entry, an entry over the top)."""
        return NetSpec(
            ip=self.ip if self.ip is not None else base.ip,
            vlan=self.vlan if self.vlan is not None else base.vlan,
            bond=self.bond if self.bond is not None else base.bond,
        )

    @property
    def method(self) -> IpConfig:
        return self.ip or IpConfig.lease

    @property
    def hands_over(self) -> bool:
        """True when the boot loader's lease applies: ``ip`` is ``lease`` on the native interface. On a VLAN or
        a bond the loader's address (got untagged, on one NIC) does not, and dhcp6/auto6 ask for IPv6."""
        return self.method is IpConfig.lease and self.vlan is None and self.bond is None

    @property
    def interface(self) -> str | None:
        """The interface ``ip=`` configures: the VLAN, else the bond, else None (every NIC)."""
        if self.vlan is not None:
            return self.vlan.name
        if self.bond is not None:
            return self.bond.name
        return None

    def args(self, hostname: str | None = None) -> tuple[Arg, ...]:
        """dracut's options for the initramfs configuring this network itself, in the order dracut's hooks read
        them (vlan, bond, ip): ``ip=`` on the top interface, in the full form when a host name is given."""
        out = []
        if self.vlan is not None:
            out.append(Arg.of(f"vlan={self.vlan}"))
        if self.bond is not None:
            out.append(Arg.of(f"bond={self.bond}"))
        top, autoconf = self.interface, self.method.autoconf
        if hostname is not None:
            out.append(Arg.of(f"ip=::::{hostname}:{top or ''}:{autoconf}"))
        else:
            out.append(Arg.of(f"ip={top}:{autoconf}" if top else f"ip={autoconf}"))
        out.append(Arg.of("rd.neednet=1"))
        return tuple(out)


@dataclass(frozen=True)
class Entry:
    """One boot menu entry: a kernel, an initramfs and the QCOW2 image it boots."""

    name: str
    title: str
    kernel: Artifact
    initrd: Artifact
    image: Artifact
    #: pinned SHA-256 of the whole image (ram mode); None: the manifest pins lazy reads, or, without one,
    #: the initramfs verifies against the ``<image URL>.sha256`` sidecar
    sha256: str | None
    mode: Mode = Mode.ram
    #: partition number, label, UUID or PARTUUID of the root; kind ``auto``: found automatically
    root: RootSpec = field(default_factory=RootSpec)
    #: the writable layer and the size of a tmpfs one (``2G``, ``25%``; None: the kernel's tmpfs default)
    overlay: Overlay = field(default_factory=Overlay)
    #: per-cluster hash manifest for verified lazy mode, and its pinned SHA-256
    manifest: Artifact | None = None
    manifest_sha256: str | None = None
    #: internal QCOW2 snapshot to boot instead of the active state
    snapshot: str | None = None
    #: absolute URLs of the same image on other servers (``rd.qcow2.mirror=``); only with a pinned hash
    mirrors: tuple[str, ...] = ()
    console: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    #: where the machine POSTs its boot report (``rd.qcow2.report=``); None: no report
    report: str | None = None
    #: lazy and stream mode: the local cache device (``rd.qcow2.cache=``) and whether the initramfs may format a
    #: bootkit cache partition (``rd.qcow2.cache.format=``); a machine's own keys win
    cache: str | None = None
    cache_format: CacheFormat = CacheFormat.off
    #: address method (``ip``), VLAN and bond of this entry, the top level's ``ip`` filled in; a machine's own
    #: keys win over them
    net: NetSpec = field(default_factory=NetSpec)
    #: ``image`` is a signed channel file (``root=qcow2:channel:``), which names the image and pins its hashes
    channel: bool = False
    #: the lowest channel version machines boot (``rd.qcow2.channel.min-version``; 0: any)
    channel_min_version: int = 0

    @property
    def initrd_name(self) -> str:
        """The name iPXE registers the initrd under (``initrd --name``), and the kernel's ``initrd=NAME``."""
        name = self.initrd.name
        return name if re.match(r"^[A-Za-z0-9_.,:=+@%-]+$", name) else "initrd"


@dataclass(frozen=True)
class Machine:
    """Overrides for one machine, recognised by the MAC address it boots from."""

    #: lower case, colon separated: ``52:54:00:12:34:56``
    mac: str
    default: str
    timeout: int
    args: tuple[str, ...] = ()
    #: a human name, written as a comment next to the machine's section
    name: str | None = None
    #: address method (``ip``), VLAN and bond this machine sets over every entry's
    net: NetSpec = field(default_factory=NetSpec)
    #: the host name the initramfs sets (``ip=``'s hostname field): from here, never from DHCP
    hostname: str | None = None
    #: this machine's cache device and format rule over every lazy and stream entry's (None: the entry's)
    cache: str | None = None
    cache_format: CacheFormat | None = None

    @property
    def hexhyp(self) -> str:
        """``52-54-00-12-34-56``: the form of iPXE's ``${mac:hexhyp}`` and of GRUB's per-MAC file names."""
        return self.mac.replace(":", "-")

    @property
    def label(self) -> str:
        """``525400123456``: usable in iPXE labels and GRUB ids."""
        return self.mac.replace(":", "")


@dataclass(frozen=True)
class Dhcp:
    """What the generated dnsmasq configuration does."""

    mode: DhcpMode
    #: the bootloader a firmware PXE ROM gets first (clients already running iPXE always get boot.ipxe)
    loader: PxeLoader
    #: proxy mode: the network (address) dnsmasq answers on, e.g. ``192.168.1.0``
    subnet: str | None = None
    #: full mode: the address pool, netmask, lease time, router and DNS servers handed out
    range_start: str | None = None
    range_end: str | None = None
    netmask: str | None = None
    lease_time: str = "1h"
    router: str | None = None
    dns: tuple[str, ...] = ()
    interface: str | None = None
    #: where the TFTP tree lives on the server; None: ``OUT/tftp`` (absolute) at write time
    tftp_root: str | None = None
    #: what UEFI HTTP Boot clients (vendor class ``HTTPClient``) get as their boot file: a UKI's URL
    http_boot: Artifact | None = None


@dataclass(frozen=True)
class Config:
    """A whole description: every entry, the menu, per-machine overrides and the DHCP side."""

    #: where it came from, for messages and the generated files' headers (``pxe.toml``, ``command line``)
    source: str
    entries: tuple[Entry, ...]
    default: str
    #: menu timeout in seconds; 0 boots the default entry without showing the menu
    timeout: int
    machines: tuple[Machine, ...] = ()
    bootloaders: frozenset[Bootloader] = frozenset(Bootloader)
    dhcp: Dhcp | None = None
    #: GRUB on BIOS also uses serial port 0 at this speed (UEFI firmware mirrors its console itself)
    grub_serial_speed: int | None = None

    def entry(self, name: str) -> Entry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)
