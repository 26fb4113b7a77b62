"""Read a boot description from a TOML file or from command-line flags into a :class:`Config`.

Every setting is declared once in :mod:`bootkit.host.pxecfg.settings` (TOML key, flag, help text, parser);
the generic reader in :mod:`bootkit.host.pxecfg.table` type-checks and parses each value, and this module holds
the rules of each table that tie settings together (a manifest only in lazy mode, an address range only with
full DHCP). The TOML reader and the flags-only mode share all of it, so both report a bad value the same way,
naming the key and the file (``pxe.toml: entry.debian.sha256: ...``) or the flag (``--sha256: ...``). Unknown
keys, missing files and contradictory settings are :class:`ConfigError` (exit status 2).

Files are resolved against ``base_url`` and ``docroot`` by :mod:`bootkit.host.pxecfg.resolve`. Every kernel
command line is finally parsed by the initramfs's own parser (:mod:`bootkit.boot.cmdline`), so an argument
the initramfs would refuse (``args = ["rd.qcow2.sha265=..."]``) fails here, not at boot.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bootkit.boot.cacheopts import CacheFormat
from bootkit.boot.cmdline import BootConfig
from bootkit.boot.loaderargs import Loader
from bootkit.errors import ConfigError
from bootkit.host.pxecfg import network as net
from bootkit.host.pxecfg import resolve
from bootkit.host.pxecfg import values as parse
from bootkit.host.pxecfg.cmdline import MAX_CMDLINE, kernel_cmdline, network_choices
from bootkit.host.pxecfg.model import (
    Artifact,
    Bootloader,
    Config,
    Dhcp,
    DhcpMode,
    Entry,
    Machine,
    Mode,
    NetSpec,
    OverlayKind,
    PxeLoader,
)
from bootkit.host.pxecfg.resolve import Context
from bootkit.host.pxecfg.settings import (
    DEFAULT_TIMEOUT,
    FLAG_SETTINGS,
    FLAGS_ENTRY_NAME,
    TOP_SETTINGS,
    flag_dest,
)
from bootkit.host.pxecfg.table import Origin, Table

# -- the tables ----------------------------------------------------------------------------------------------


def _net_spec(t: Table) -> NetSpec:
    """The ``ip``, ``vlan`` and ``bond`` keys of one table (each None when absent)."""
    return NetSpec(ip=t.get("ip"), vlan=t.get("vlan"), bond=t.get("bond"))


def _check_net_spec(t: Table, own: NetSpec, spec: NetSpec, urls: tuple[str, ...]) -> None:
    """``spec`` (``own`` over what the level below gave) must fit together and reach ``urls``; an error is
    reported as the key of this table that made it so."""
    t.check("vlan" if own.vlan is not None else "bond", net.combine, spec)
    for url in urls:
        t.check("ip" if own.ip is not None else "image", net.reachable, spec, url)


def _entry(
    t: Table,
    ctx: Context,
    default_console: tuple[str, ...],
    top: NetSpec,
    default_report: str | None = None,
    default_cache: tuple[str | None, CacheFormat | None] = (None, None),
) -> Entry:
    name = t.get("name", FLAGS_ENTRY_NAME if ctx.origin.file is None else None)
    if name is None:
        raise t.error("name", "missing (required)")
    t.path = ("entry", name)
    title = t.get("title", name)

    kernel = resolve.artifact(t, "kernel", t.required("kernel"), ctx, http_only=True)
    initrd = resolve.artifact(t, "initrd", t.required("initrd"), ctx, http_only=True)
    mode: Mode = t.get("mode", Mode.ram)
    channel_value = t.get("channel")
    if channel_value is not None:
        return _channel_entry(t, ctx, channel_value, name, title, kernel, initrd, mode, default_console, top,
                              default_report)  # fmt: skip
    if t.get("channel_min_version") is not None:
        raise t.error("channel_min_version", "given without channel")
    image = resolve.artifact(t, "image", t.required("image"), ctx, http_only=False)
    root = t.get("root", parse.root("auto"))
    overlay_kind: OverlayKind = t.get("overlay", OverlayKind.tmpfs)
    overlay = t.check("overlay_size", parse.overlay, overlay_kind, t.get("overlay_size"))

    # What pins the image's bytes (the rules of the command-line contract, bootkit/boot/cmdline.py, which
    # parses every generated line below): ram mode hashes the whole download (a pinned sha256, or the .sha256
    # sidecar next to the image); lazy and stream mode check each chunk they read against a manifest whose own
    # hash is pinned, or uses the sidecar.
    manifest = None
    manifest_sha256 = None
    manifest_value = t.get("manifest")
    manifest_hash_spec = t.get("manifest_sha256")
    mirrors: tuple[str, ...] = t.get("mirrors", ())
    if manifest_value is not None:
        # with mirrors, ram mode uses a manifest to keep what it has when a download moves to another mirror
        if not mode.reads_ranges and not mirrors:
            raise t.error(
                "manifest", f"contradicts mode = {mode.value!r}: a manifest verifies lazy and stream reads only"
            )
        manifest = resolve.artifact(t, "manifest", manifest_value, ctx, http_only=False)
        manifest_sha256 = resolve.sha256(t, "manifest_sha256", manifest_hash_spec or "compute", manifest, ctx)
    elif manifest_hash_spec is not None:
        raise t.error("manifest_sha256", "given without manifest")
    sha256_spec = t.get("sha256", "compute" if mode is Mode.ram else None)
    sha256 = None
    if sha256_spec == "sidecar":
        if manifest is not None:
            raise t.error("sha256", "'sidecar' contradicts manifest: the manifest's pinned hash verifies lazy reads")
    elif sha256_spec is not None:
        if mode.reads_ranges and manifest is None:
            raise t.error(
                "sha256",
                f"a pinned image hash cannot be checked in {mode.value} mode (chunks are used before the whole "
                "image could be hashed): "
                "set manifest (and manifest_sha256), or sha256 = 'sidecar'",
            )
        sha256 = resolve.sha256(t, "sha256", sha256_spec, image, ctx)
    if mirrors and sha256 is None and (mode is Mode.ram or manifest_sha256 is None):
        raise t.error(
            "mirrors",
            "need a pinned hash (sha256, or manifest in lazy mode): an unpinned mirror could serve any image",
        )

    snapshot = t.get("snapshot")
    console = t.get("console", default_console)
    args = t.get("args", ())
    report = t.get("report", default_report)
    own_cache, own_format = t.get("cache"), t.get("cache_format")
    cache = own_cache or default_cache[0]
    cache_format: CacheFormat = own_format or default_cache[1] or CacheFormat.off
    if own_cache is not None and not mode.reads_ranges:
        raise t.error("cache", f"contradicts mode = {mode.value!r}: the cache holds chunks of lazy and stream reads")
    if not mode.reads_ranges:  # a cache set at the top level applies to the lazy and stream entries only
        cache, cache_format = None, CacheFormat.off
    if cache is None and own_format is not None:
        raise t.error("cache_format", "given without cache (the device)")
    own = _net_spec(t)
    spec = own.over(top)
    _check_net_spec(t, own, spec, _fetched_by_initramfs(image, manifest))
    t.finish()
    return Entry(
        name=name,
        title=title,
        kernel=kernel,
        initrd=initrd,
        image=image,
        sha256=sha256,
        mode=mode,
        root=root,
        overlay=overlay,
        manifest=manifest,
        manifest_sha256=manifest_sha256,
        snapshot=snapshot,
        mirrors=mirrors,
        console=console,
        args=args,
        report=report,
        cache=cache,
        cache_format=cache_format,
        net=spec,
    )


def _channel_entry(
    t: Table, ctx: Context, value: str, name: str, title: str, kernel: Artifact, initrd: Artifact, mode: Mode,
    default_console: tuple[str, ...], top: NetSpec, default_report: str | None,
) -> Entry:
    """An entry that boots what a signed channel names: the channel pins the image, so nothing else may."""
    for key in ("image", "sha256", "manifest", "manifest_sha256", "mirrors"):
        if t.get(key) is not None:
            raise t.error(key, "contradicts channel: the signed channel names the image and pins its hashes")
    channel = resolve.artifact(t, "channel", value, ctx, http_only=False)
    if not channel.url.endswith(".json"):
        raise t.error("channel", f"{channel.url}: expected a NAME.json channel file (bootkit publish --sign)")
    overlay_kind: OverlayKind = t.get("overlay", OverlayKind.tmpfs)
    own = _net_spec(t)
    spec = own.over(top)
    _check_net_spec(t, own, spec, (channel.url,))
    entry = Entry(
        name=name,
        title=title,
        kernel=kernel,
        initrd=initrd,
        image=channel,
        sha256=None,
        mode=mode,
        root=t.get("root", parse.root("auto")),
        overlay=t.check("overlay_size", parse.overlay, overlay_kind, t.get("overlay_size")),
        snapshot=t.get("snapshot"),
        console=t.get("console", default_console),
        args=t.get("args", ()),
        report=t.get("report", default_report),
        net=spec,
        channel=True,
        channel_min_version=t.get("channel_min_version", 0),
    )
    t.finish()
    return entry


def _fetched_by_initramfs(image: Artifact, manifest: Artifact | None) -> tuple[str, ...]:
    return (image.url,) if manifest is None else (image.url, manifest.url)


def _machine(t: Table, entries: dict[str, Entry], default: str, timeout: int) -> Machine:
    mac = t.required("mac")
    t.path = ("machine", mac)
    name = t.get("name")
    machine_default = t.get("default", default)
    if machine_default not in entries:
        raise t.error("default", f"no entry named {machine_default!r} (entries: {', '.join(entries)})")
    machine_timeout = t.get("timeout", timeout)
    args = t.get("args", ())
    spec = _net_spec(t)
    for entry in entries.values():
        _check_net_spec(t, spec, spec.over(entry.net), _fetched_by_initramfs(entry.image, entry.manifest))
    hostname = t.get("hostname")
    cache = t.get("cache")
    cache_format = t.get("cache_format")
    t.finish()
    return Machine(
        mac=mac, default=machine_default, timeout=machine_timeout, args=args, name=name, net=spec, hostname=hostname,
        cache=cache, cache_format=cache_format,
    )  # fmt: skip


#: the BOOTP header's file field, where dnsmasq's dhcp-boot puts the boot file (RFC 2131: 128 bytes, NUL-ended)
MAX_BOOT_FILE = 127


def _http_boot(t: Table, mode: DhcpMode, ctx: Context) -> Artifact | None:
    """The UKI URL handed to UEFI HTTP Boot clients (docs/secure-boot.md)."""
    value = t.get("http_boot")
    if value is None:
        return None
    if mode is not DhcpMode.full:
        raise t.error("http_boot", "needs mode = 'full': in proxy mode dnsmasq answers PXE clients only, and "
                      "UEFI HTTP Boot clients are not PXE clients")  # fmt: skip
    if ctx.docroot is not None and "://" not in value and not (ctx.docroot / value).is_file():
        # the UKI is built from this same description (build-uki --toml), so it may not exist yet
        ctx = dataclasses.replace(ctx, docroot=None)
    artifact = resolve.artifact(t, "http_boot", value, ctx, http_only=False)
    if "," in artifact.url:
        raise t.error("http_boot", f"{artifact.url!r}: a comma would end dnsmasq's dhcp-boot file name")
    if len(artifact.url) > MAX_BOOT_FILE:
        raise t.error("http_boot", f"{artifact.url!r} is {len(artifact.url)} bytes; the DHCP boot file field "
                      f"holds {MAX_BOOT_FILE}")  # fmt: skip
    return artifact


def _dhcp(t: Table, bootloaders: frozenset[Bootloader], ctx: Context) -> Dhcp:
    mode: DhcpMode = t.get("mode", DhcpMode.proxy)
    loader: PxeLoader = t.get("loader", PxeLoader.ipxe)
    if loader.bootloader not in bootloaders:
        raise t.error("loader", f"{loader.value!r} is not among the configured bootloaders")
    if loader is PxeLoader.shim:
        from bootkit.host.pxecfg import shim

        t.check("loader", shim.check_sources, shim.DEBIAN)
    subnet = t.get("subnet")
    range_start = t.get("range_start")
    range_end = t.get("range_end")
    netmask = t.get("netmask")
    lease_time = t.raw("lease_time")  # parsed below: in proxy mode any value is a contradiction first
    router = t.get("router")
    dns = t.get("dns", ())
    full_only = {"range_start": range_start, "range_end": range_end, "netmask": netmask,
                 "lease_time": lease_time, "router": router, "dns": dns or None}  # fmt: skip
    if mode is DhcpMode.proxy:
        for key, value in full_only.items():
            if value is not None:
                raise t.error(key, "contradicts mode = 'proxy': the existing DHCP server hands out addresses")
        if subnet is None:
            raise t.error("subnet", "missing: proxy mode needs the network address to answer on")
    else:
        if subnet is not None:
            raise t.error("subnet", "contradicts mode = 'full': give range_start and range_end instead")
        if range_start is None:
            raise t.error("range_start", "missing: full mode needs an address pool")
        if range_end is None:
            raise t.error("range_end", "missing: full mode needs an address pool")
        if ipaddress.IPv4Address(range_end) < ipaddress.IPv4Address(range_start):
            raise t.error("range_end", f"{range_end} is below range_start {range_start}")
        if lease_time is not None:
            lease_time = t.check("lease_time", parse.lease_time, lease_time)
    interface = t.get("interface")
    tftp_root = t.get("tftp_root")
    http_boot = _http_boot(t, mode, ctx)
    t.finish()
    return Dhcp(
        mode=mode,
        loader=loader,
        subnet=subnet,
        range_start=range_start,
        range_end=range_end,
        netmask=netmask,
        lease_time=lease_time or "1h",
        router=router,
        dns=dns,
        interface=interface,
        tftp_root=tftp_root,
        http_boot=http_boot,
    )


def _check_cmdline(origin: Origin, entry: Entry, machine: Machine | None, bootloaders: frozenset[Bootloader]) -> None:
    """Every line a bootloader may pass (iPXE's with ``initrd=NAME``; each network it may pick at boot, with the
    widest values it can fill in) must fit the kernel's buffer, and the initramfs must accept it as booting
    this entry's image."""
    where = origin.where(("entry", entry.name, "args") if machine is None else ("machine", machine.mac, "args"))
    for loader in Loader:
        if Bootloader(loader.value) not in bootloaders:
            continue
        for network in network_choices(entry, machine, loader):
            if network is None:
                continue
            line = kernel_cmdline(entry, machine, network=network, initrd_name=entry.initrd_name)
            if len(line) >= MAX_CMDLINE:
                raise ConfigError(
                    f"{where}: the kernel command line of entry {entry.name!r} would be {len(line)} bytes; "
                    f"the kernel keeps {MAX_CMDLINE - 1}"
                )
            try:
                parsed = BootConfig.parse(line)
            except ConfigError as e:
                raise ConfigError(
                    f"{where}: the initramfs would refuse the command line of entry {entry.name!r}: {e}"
                ) from None
            if parsed is None or parsed.url != entry.image.url:
                raise ConfigError(
                    f"{where}: a root= argument replaces root=qcow2:{entry.image.url} of entry {entry.name!r}"
                )
            _check_vlan_bond_args(where, parsed)


def _check_vlan_bond_args(where: str, parsed: BootConfig) -> None:
    """vlan= and bond= given in args reach the same sourced files in dracut as the keys' values: same rules."""
    for arg in parsed.network:
        if arg.key not in ("vlan", "bond"):
            continue
        word = arg.render(None)
        read = net.vlan if arg.key == "vlan" else net.bond
        try:
            read(word.partition("=")[2])
        except parse.BadValue as e:
            raise ConfigError(f"{where}: {word}: {e}") from None


def _config(top: Table, base_dir: Path) -> Config:
    origin = top.origin
    base_url = top.get("base_url")
    docroot = None
    docroot_value = top.get("docroot")
    if docroot_value is not None:
        docroot = (base_dir / docroot_value).resolve()
        if not docroot.is_dir():
            raise top.error("docroot", f"{docroot}: no such directory")
        if base_url is None:
            raise top.error("docroot", "given without base_url (the URL it is served at)")
    bootloaders = top.get("bootloaders", frozenset(Bootloader))
    console = top.get("console", ())
    report = top.get("report")
    timeout = top.get("timeout", DEFAULT_TIMEOUT)
    top_net = NetSpec(ip=top.get("ip"))
    ctx = Context(origin=origin, base_url=base_url, docroot=docroot, bootloaders=bootloaders)

    entry_tables = top.tables("entry")
    if not entry_tables:
        raise top.error("entry", "missing: describe at least one [[entry]]")
    entries: dict[str, Entry] = {}
    default_cache = (top.get("cache"), top.get("cache_format"))
    for i, t in enumerate(entry_tables):
        entry = _entry(t, ctx, console, top_net, report, default_cache)
        if entry.name in entries:
            raise ConfigError(f"{origin.where((f'entry[{i}]', 'name'))}: {entry.name!r} is used by another entry too")
        entries[entry.name] = entry
    default = top.get("default", next(iter(entries)))
    if default not in entries:
        raise top.error("default", f"no entry named {default!r} (entries: {', '.join(entries)})")

    machines: dict[str, Machine] = {}
    for t in top.tables("machine"):
        machine = _machine(t, entries, default, timeout)
        if machine.mac in machines:
            raise t.error("mac", f"{machine.mac} is described twice")
        machines[machine.mac] = machine

    for entry in entries.values():
        _check_cmdline(origin, entry, None, bootloaders)
        for machine in machines.values():
            _check_cmdline(origin, entry, machine, bootloaders)

    dhcp_table = top.table("dhcp")
    dhcp = None if dhcp_table is None else _dhcp(dhcp_table, bootloaders, ctx)
    if dhcp is not None and dhcp.loader is PxeLoader.shim:
        from bootkit.host.pxecfg import shim

        # the signed GRUB reads kernel and initramfs over TFTP (pxe-config copies them) and refuses an unsigned
        # kernel at boot: say so now
        for t, entry in zip(entry_tables, entries.values(), strict=True):
            t.check("kernel", shim.check_kernel, entry.kernel)
            t.check("initrd", shim.check_local, entry.initrd)
    serial_speed = None
    grub_table = top.table("grub")
    if grub_table is not None:
        serial_speed = grub_table.get("serial_speed")
        grub_table.finish()
    top.finish()
    return Config(
        source=origin.source,
        entries=tuple(entries.values()),
        default=default,
        timeout=timeout,
        machines=tuple(machines.values()),
        bootloaders=bootloaders,
        dhcp=dhcp,
        grub_serial_speed=serial_speed,
    )


# -- public entry points -------------------------------------------------------------------------------------


def load_file(path: Path) -> Config:
    """Read and validate a TOML description; relative ``docroot`` is relative to the file's directory."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    return _config(Table(data, (), TOP_SETTINGS, Origin(path)), path.parent)


def from_flags(values: Mapping[str, Any], cwd: Path | None = None) -> Config:
    """Build a one-entry description from flags-mode values (keyed by :func:`flag_dest`).

    ``docroot`` defaults to the current directory when ``base_url`` is given, so local ``--kernel``,
    ``--initrd`` and ``--image`` files are found and the image can be hashed. A ``dhcp`` table exists (and
    dnsmasq.conf is written) when any ``--dhcp-*`` flag is given.
    """
    cwd = cwd or Path.cwd()
    data: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {"entry": {}, "dhcp": {}, "grub": {}}
    for table, setting in FLAG_SETTINGS:
        value = values.get(flag_dest(table, setting))
        if value is None or value == []:
            continue
        (data if table is None else tables[table])[setting.key] = value
    if "base_url" in data and "docroot" not in data:
        data["docroot"] = str(cwd)
    data["entry"] = [tables["entry"]]
    if tables["dhcp"]:
        data["dhcp"] = tables["dhcp"]
    if tables["grub"]:
        data["grub"] = tables["grub"]
    return _config(Table(data, (), TOP_SETTINGS, Origin(None)), cwd)
