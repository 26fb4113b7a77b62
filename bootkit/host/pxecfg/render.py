"""Render the iPXE script, GRUB configurations and dnsmasq configuration of a :class:`Config`.

The templates do no computing: this module prepares every string they print (command lines, GRUB device
paths, labels) as typed view objects, and the Jinja2 environment is strict (``StrictUndefined``), so a
missing value fails the render instead of printing ''. They are package data: the iPXE and dnsmasq ones in
``bootkit/host/pxecfg/templates/``, GRUB's in the repository's ``grub/`` folder, which the package holds
as ``bootkit/_data/grub`` (:mod:`bootkit.host.pkgdata`).

What runs where (docs/pxe.md, "The boot chain"):

* iPXE runs one script for every machine: DHCP (retried), then a jump to the machine's own menu by MAC
  address, else the default menu. The same script works chain-loaded from BIOS (``undionly.kpxe``) and
  UEFI (``ipxe.efi``) PXE ROMs, because each kernel line names its initrd (``initrd=NAME``).
* GRUB reads ``grub.cfg-01-<mac>`` before ``grub.cfg`` from its network prefix (GRUB >= 2.04,
  ``feature_net_search_cfg``), so each machine with overrides gets its own complete file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlsplit

import jinja2

from bootkit.boot.loaderargs import Arg, Loader, LoaderVar
from bootkit.errors import ConfigError
from bootkit.host.pxecfg import shim
from bootkit.host.pxecfg.cmdline import Network, kernel_words, network_choices
from bootkit.host.pxecfg.model import Artifact, Bootloader, Config, DhcpMode, Entry, Firmware, Machine, PxeLoader
from bootkit.host.pxecfg.network import literal_version

#: paths of the generated text files, relative to the output directory
IPXE_SCRIPT = PurePosixPath("tftp/boot.ipxe")
GRUB_DIR = PurePosixPath("tftp/boot/grub")
DNSMASQ_CONF = PurePosixPath("dnsmasq.conf")

#: the script's path inside the TFTP root: what dnsmasq hands to iPXE clients
IPXE_SCRIPT_TFTP = IPXE_SCRIPT.relative_to("tftp")

_GRUB_BARE = re.compile(r"^[A-Za-z0-9_.,:/=+@%-]+$")


@dataclass(frozen=True)
class BootView:
    """One entry as one menu boots it: everything the templates print, ready-made."""

    label: str
    entry: Entry
    initrd_name: str
    ipxe_args: str
    grub_kernel: str
    grub_initrd: str
    grub_args: str
    #: the line each loader switches to when it lacks a value of the first one (None: no switch):
    #: iPXE without a netmask in its lease (or a router in its IPv6 one), GRUB without a boot interface
    #: (docs/pxe.md, "The lease")
    ipxe_fallback_args: str | None = None
    grub_fallback_args: str | None = None
    #: the iPXE settings (``${netX/netmask}``) that must be set for ``ipxe_args``, else the fallback
    ipxe_checks: tuple[str, ...] = ()
    #: what the lease is, for the script's comment
    ipxe_lease: str = "lease"


@dataclass(frozen=True)
class MenuView:
    """The menu one machine sees (``machine`` None: every machine without overrides)."""

    label: str
    machine: Machine | None
    default_label: str
    default_id: str
    #: False: boot the default entry at once (timeout 0)
    show_menu: bool
    timeout: int
    timeout_ms: int
    boots: tuple[BootView, ...]


@dataclass(frozen=True)
class DnsmasqBoot:
    """One boot-file rule of the dnsmasq configuration."""

    comment: str
    #: tags of the ``dhcp-boot`` line (full DHCP)
    tags: str
    #: tags and client system architectures of the ``pxe-service`` lines (proxy DHCP)
    pxe_tags: str | None
    csas: tuple[str, ...]
    file: str


def environment() -> jinja2.Environment:
    return jinja2.Environment(
        # names are unique across the two folders: boot.ipxe.j2, dnsmasq.conf.j2 | grub.cfg.j2
        loader=jinja2.ChoiceLoader([
            jinja2.PackageLoader("bootkit.host.pxecfg", "templates"),
            jinja2.PackageLoader("bootkit", "_data/grub"),
        ]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def grub_path(artifact: Artifact) -> str:
    """``http://10.0.2.2:8080/k/vmlinuz`` -> ``(http,10.0.2.2:8080)/k/vmlinuz`` (GRUB's HTTP device syntax)."""
    parts = urlsplit(artifact.url)
    if parts.scheme != "http" or parts.query or parts.fragment:
        raise ConfigError(f"{artifact.url}: GRUB fetches plain http:// URLs without a query only")
    return f"(http,{parts.netloc}){parts.path or '/'}"


def grub_quote(arg: str) -> str:
    """Quote one literal argument for GRUB's script parser; the kernel receives it unquoted."""
    if _GRUB_BARE.match(arg):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"


def grub_word(word: Arg) -> str:
    """One argument for GRUB's script parser: literal ones in single quotes, ones with GRUB variables in double
    quotes, inside which ``$``, ``"`` and ``\\`` of the literal text are escaped (GRUB expands ``$`` there)."""
    if word.literal:
        return grub_quote(word.render(None))
    out = []
    for part in word.parts:
        if isinstance(part, LoaderVar):  # before str: a LoaderVar is a str too
            out.append(part.render(Loader.grub))
        else:
            out.append(re.sub(r'([$"\\])', r"\\\1", part))
    return '"' + "".join(out) + '"'


def _boot_view(entry: Entry, machine: Machine | None, menu_label: str, *, with_grub: bool) -> BootView:
    initrd_name = entry.initrd_name

    def ipxe(network: Network) -> str:
        words = kernel_words(entry, machine, network=network, initrd_name=initrd_name)
        return " ".join(w.render(Loader.ipxe) for w in words)

    def grub(network: Network) -> str:
        return " ".join(grub_word(w) for w in kernel_words(entry, machine, network=network))

    ipxe_first, ipxe_fallback = network_choices(entry, machine, Loader.ipxe)
    grub_first, grub_fallback = network_choices(entry, machine, Loader.grub)
    grub_kernel = grub_initrd = ""
    if with_grub:
        grub_kernel, grub_initrd = grub_path(entry.kernel), grub_path(entry.initrd)
    return BootView(
        label=f"{menu_label}-{entry.name}",
        entry=entry,
        initrd_name=initrd_name,
        ipxe_args=ipxe(ipxe_first),
        grub_kernel=grub_kernel,
        grub_initrd=grub_initrd,
        grub_args=grub(grub_first),
        ipxe_fallback_args=None if ipxe_fallback is None else ipxe(ipxe_fallback),
        grub_fallback_args=None if grub_fallback is None else grub(grub_fallback),
        ipxe_checks=tuple(v.render(Loader.ipxe) for v in ipxe_first.loader_checks),
        ipxe_lease="IPv6 configuration" if ipxe_first is Network.lease6 else "lease",
    )


def menus(config: Config) -> tuple[MenuView, ...]:
    """The default menu first, then one per machine with overrides."""
    profiles: list[tuple[str, Machine | None, str, int]] = [("default", None, config.default, config.timeout)]
    profiles += [(f"mac-{m.label}", m, m.default, m.timeout) for m in config.machines]
    result = []
    for label, machine, default, timeout in profiles:
        boots = tuple(
            _boot_view(e, machine, label, with_grub=Bootloader.grub in config.bootloaders) for e in config.entries
        )
        result.append(
            MenuView(
                label=label,
                machine=machine,
                default_label=f"{label}-{default}",
                default_id=default,
                show_menu=timeout > 0,
                timeout=timeout,
                timeout_ms=timeout * 1000,
                boots=boots,
            )
        )
    return tuple(result)


def render_ipxe(config: Config) -> str:
    """The iPXE script (``boot.ipxe``)."""
    all_menus = menus(config)
    return environment().get_template("boot.ipxe.j2").render(
        source=config.source, menus=all_menus, default_menu=all_menus[0], machine_menus=all_menus[1:],
        # an IPv6-only network has no ${ip}: IPv6 configuration is enough to go on when an image needs it
        ipv6=any(literal_version(u) == 6 for e in config.entries for u in (e.kernel.url, e.image.url)),
    )


def render_grub(config: Config) -> dict[PurePosixPath, str]:
    """``grub.cfg`` and one ``grub.cfg-01-<mac>`` per machine, keyed by output path."""
    template = environment().get_template("grub.cfg.j2")
    result = {}
    for menu in menus(config):
        name = "grub.cfg" if menu.machine is None else f"grub.cfg-01-{menu.machine.hexhyp}"
        result[GRUB_DIR / name] = template.render(
            source=config.source, menu=menu, serial_speed=config.grub_serial_speed
        )
    return result


def dnsmasq_boots(config: Config) -> tuple[DnsmasqBoot, ...]:
    """Which boot file each kind of client gets, in the order dnsmasq should see the rules."""
    assert config.dhcp is not None
    rules = []
    if config.dhcp.loader is PxeLoader.ipxe:
        rules.append(
            DnsmasqBoot(
                "clients already running iPXE get the boot script",
                "tag:ipxe",
                "tag:ipxe",
                Firmware.bios.pxe_csas() + Firmware.uefi.pxe_csas(),
                str(IPXE_SCRIPT_TFTP),
            )
        )
        for fw in Firmware:
            rules.append(
                DnsmasqBoot(
                    f"{fw.name.upper()} firmware PXE chain-loads iPXE",
                    f"tag:!ipxe,tag:{fw.value}",
                    "tag:!ipxe",
                    fw.pxe_csas(),
                    fw.ipxe_binary(),
                )
            )
    else:
        for fw in Firmware:
            if fw is Firmware.uefi and config.dhcp.loader is PxeLoader.shim:
                rules.append(
                    DnsmasqBoot(
                        "UEFI clients load Debian's signed shim, which loads the signed GRUB (grubx64.efi, next to "
                        "it), which reads grub/grub.cfg (Secure Boot)",
                        f"tag:{fw.value}",
                        None,
                        fw.pxe_csas(),
                        shim.SHIM_NAME,
                    )
                )
                continue
            rules.append(
                DnsmasqBoot(
                    f"{fw.name.upper()} clients load GRUB (built by grub-mknetdir), which reads boot/grub/grub.cfg",
                    f"tag:{fw.value}",
                    None,
                    fw.pxe_csas(),
                    f"boot/grub/{fw.grub_platform()}/{fw.grub_image()}",
                )
            )
    return tuple(rules)


def render_dnsmasq(config: Config, tftp_root: str) -> str:
    """The dnsmasq configuration; ``tftp_root`` is used when the description does not set one."""
    dhcp = config.dhcp
    assert dhcp is not None
    return environment().get_template("dnsmasq.conf.j2").render(
        source=config.source,
        dhcp=dhcp,
        proxy=dhcp.mode is DhcpMode.proxy,
        dns=",".join(dhcp.dns),
        tftp_root=dhcp.tftp_root or tftp_root,
        arches=[(fw.value, arch) for fw in Firmware for arch in fw.client_arches()],
        boots=dnsmasq_boots(config),
        http_boot=None if dhcp.http_boot is None else dhcp.http_boot.url,
    )


def render_all(config: Config, tftp_root: str) -> dict[PurePosixPath, str]:
    """Every text file of the output, keyed by its path relative to the output directory."""
    files: dict[PurePosixPath, str] = {}
    if Bootloader.ipxe in config.bootloaders:
        files[IPXE_SCRIPT] = render_ipxe(config)
    if Bootloader.grub in config.bootloaders:
        files.update(render_grub(config))
    if config.dhcp is not None:
        files[DNSMASQ_CONF] = render_dnsmasq(config, tftp_root)
        if config.dhcp.loader is PxeLoader.shim:
            files[shim.CONFIG] = shim.render(config)
    return files
