"""Read a boot description from a TOML file or from command-line flags into a :class:`Config`.

Every setting is declared once in :mod:`bootkit.host.pxecfg.settings` (TOML key, flag, help text); the TOML
reader and the flags-only mode share them and one validator, so both report a bad value the same way, naming the key and
the file (``pxe.toml: entry.debian.sha256: ...``) or the flag (``--sha256: ...``). Unknown keys, missing
files and contradictory settings are :class:`ConfigError` (exit status 2).

Paths in the description are resolved against ``base_url`` (the HTTP directory the boot fetches from) and,
when ``docroot`` names the local directory served there, against ``docroot`` too: that is how bootkit finds
the local image to hash (``sha256 = "compute"``) and checks that files exist.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from bootkit.errors import ConfigError
from bootkit.host.pxecfg.cmdline import MAX_CMDLINE, kernel_cmdline
from bootkit.host.pxecfg.model import (
    Artifact,
    Bootloader,
    Config,
    Dhcp,
    DhcpMode,
    Entry,
    Machine,
    Mode,
    Overlay,
)
from bootkit.host.pxecfg.settings import (
    DEFAULT_TIMEOUT,
    DHCP_SETTINGS,
    ENTRY_SETTINGS,
    FLAG_SETTINGS,
    FLAGS_ENTRY_NAME,
    GRUB_SETTINGS,
    MACHINE_SETTINGS,
    TOP_SETTINGS,
    Setting,
    flag_dest,
)
from bootkit.log import human_size, log

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# characters that are literal for the kernel, iPXE (which expands ${...}) and GRUB (once quoted)
_ARG = re.compile(r"^[A-Za-z0-9_.,:/=+@%?&~!*()\[\]-]+$")
_ROOT = re.compile(r"^(?:[1-9][0-9]*|(?:LABEL|UUID|PARTUUID)=[A-Za-z0-9_.:-]+)$")
_SIZE = re.compile(r"^(?:[0-9]+[kKmMgG]?|[0-9]{1,3}%)$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(?:([:-])[0-9a-fA-F]{2})(?:\1[0-9a-fA-F]{2}){4}$")
_TITLE_FORBIDDEN = set("$'\"\\`")
_LEASE = re.compile(r"^(?:[0-9]+[smhdw]?|infinite)$")


# -- where a setting came from ------------------------------------------------------------------------------


class _Origin:
    """Names a setting in messages: ``FILE: dhcp.mode`` for TOML, ``--dhcp-mode`` for flags."""

    def __init__(self, file: Path | None) -> None:
        self.file = file

    @property
    def source(self) -> str:
        return self.file.name if self.file is not None else "command line"

    def where(self, path: tuple[str, ...]) -> str:
        if self.file is not None:
            return f"{self.file}: {'.'.join(path)}"
        table, key = path[0], path[-1]
        if len(path) == 1 or table.startswith("entry"):
            return "--" + key.replace("_", "-")
        return f"--{table}-{key.replace('_', '-')}"


class _Table:
    """One TOML table being read: keys are taken by name and type-checked; leftovers are unknown keys."""

    def __init__(self, data: Any, path: tuple[str, ...], settings: tuple[Setting, ...], origin: _Origin) -> None:
        self.path = path
        self.origin = origin
        if not isinstance(data, Mapping):
            raise ConfigError(f"{origin.where(path)}: expected a table, got {_toml_type(data)}")
        self._data: dict[str, Any] = dict(data)
        self._known = {s.key: s for s in settings}

    def where(self, key: str) -> str:
        return self.origin.where((*self.path, key))

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self._data

    def _take(self, key: str) -> Any:
        assert key in self._known, key
        return self._data.pop(key, None)

    def get_str(self, key: str, default: str | None = None) -> str | None:
        value = self._take(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_toml_type(value)}")
        if not value:
            raise self.error(key, "must not be empty")
        return value

    def required_str(self, key: str) -> str:
        value = self.get_str(key)
        if value is None:
            raise self.error(key, "missing (required)")
        return value

    def get_int(self, key: str, default: int | None = None) -> int | None:
        value = self._take(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_toml_type(value)}")
        return value

    def get_strs(self, key: str) -> tuple[str, ...] | None:
        value = self._take(key)
        if value is None:
            return None
        if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"expected an array of strings, got {_toml_type(value)}")
        return tuple(value)

    def table(self, key: str, settings: tuple[Setting, ...]) -> _Table | None:
        value = self._take(key)
        if value is None:
            return None
        return _Table(value, (*self.path, key), settings, self.origin)

    def tables(self, key: str, settings: tuple[Setting, ...]) -> list[_Table]:
        value = self._take(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, f"expected an array of tables ([[{key}]]), got {_toml_type(value)}")
        return [_Table(v, (*self.path, f"{key}[{i}]"), settings, self.origin) for i, v in enumerate(value)]

    def finish(self) -> None:
        """Raise for the first key nobody took."""
        for key in self._data:
            known = ", ".join(sorted(self._known))
            raise self.error(key, f"unknown key (known here: {known})")


def _toml_type(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


# -- resolving URLs and files ---------------------------------------------------------------------------------


@dataclass
class _Context:
    origin: _Origin
    base_url: str | None
    docroot: Path | None
    bootloaders: frozenset[Bootloader]
    hashes: dict[Path, str] = field(default_factory=dict)

    def sha256_of(self, path: Path) -> str:
        """SHA-256 of a local file, streamed; each file is hashed once per description."""
        if path not in self.hashes:
            size = path.stat().st_size
            log.info("pxe-config: hashing %s (%s)", path, human_size(size))
            start = time.monotonic()
            with path.open("rb") as f:
                self.hashes[path] = hashlib.file_digest(f, "sha256").hexdigest()
            elapsed = max(time.monotonic() - start, 1e-6)
            log.info("pxe-config: sha256 %s in %.1f s (%s/s)", self.hashes[path], elapsed, human_size(size / elapsed))
        return self.hashes[path]


def _check_url(t: _Table, key: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise t.error(key, f"{url!r} is not an http:// or https:// URL")
    if parts.path in ("", "/") or parts.path.endswith("/"):
        raise t.error(key, f"{url!r} names a directory, not a file")
    if not _ARG.match(url):
        raise t.error(key, f"{url!r} contains characters a kernel command line or bootloader script cannot carry")


def _artifact(t: _Table, key: str, value: str, ctx: _Context, *, http_only: bool) -> Artifact:
    """A URL as given, or a path made into a URL under base_url (and a file under docroot)."""
    if "://" in value:
        _check_url(t, key, value)
        path = None
        if ctx.docroot is not None and ctx.base_url is not None and value.startswith(ctx.base_url):
            path = ctx.docroot / value[len(ctx.base_url) :]
            if not path.is_file():
                path = None  # served from elsewhere (another location block): nothing local to check
        artifact = Artifact(value, path)
    else:
        if ctx.base_url is None:
            raise t.error(key, f"{value!r} is a path, but base_url is not set (the URL it is served at)")
        relative = value
        if ctx.docroot is not None and os.path.isabs(value):
            try:
                relative = Path(value).resolve().relative_to(ctx.docroot).as_posix()
            except ValueError:
                raise t.error(key, f"{value} is not under docroot {ctx.docroot}") from None
        if os.path.isabs(relative) or ".." in Path(relative).parts:
            raise t.error(key, f"{value!r}: give a path relative to base_url (and docroot), or a URL")
        url = ctx.base_url + quote(relative)
        _check_url(t, key, url)
        path = None
        if ctx.docroot is not None:
            path = ctx.docroot / relative
            if not path.is_file():
                raise t.error(key, f"{path}: no such file")
        artifact = Artifact(url, path)
    if http_only and Bootloader.grub in ctx.bootloaders:
        parts = urlsplit(artifact.url)
        if parts.scheme != "http" or parts.query or parts.fragment:
            raise t.error(
                key,
                f"{artifact.url}: GRUB's http module fetches plain http:// URLs without a query only "
                "(or leave grub out of bootloaders)",
            )
    return artifact


def _hash(t: _Table, key: str, value: str, artifact: Artifact, ctx: _Context) -> str:
    if value == "compute":
        if artifact.path is None:
            raise t.error(
                key,
                f"'compute' needs {artifact.url} as a local file: set docroot to the directory served at "
                "base_url, or give the 64 hex digits",
            )
        return ctx.sha256_of(artifact.path)
    if not _HEX64.match(value):
        raise t.error(key, f"{value!r} is not 64 hex digits (nor 'compute')")
    return value.lower()


def _args(t: _Table, key: str, values: Iterable[str]) -> tuple[str, ...]:
    for v in values:
        if not _ARG.match(v):
            raise t.error(key, f"{v!r}: kernel arguments here are single words of [A-Za-z0-9_.,:/=+@%?&~!*()[]-]")
    return tuple(values)


def _choice(t: _Table, key: str, enum_type: Any, default: Any) -> Any:
    value = t.get_str(key)
    if value is None:
        return default
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(m.value for m in enum_type)
        raise t.error(key, f"{value!r} is not one of: {choices}") from None


def _ip(t: _Table, key: str, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise t.error(key, f"{value!r} is not an IPv4 address") from None


# -- the tables ----------------------------------------------------------------------------------------------


def _entry(t: _Table, index: int, ctx: _Context, default_console: tuple[str, ...]) -> Entry:
    name = t.get_str("name", FLAGS_ENTRY_NAME if ctx.origin.file is None else None)
    if name is None:
        raise t.error("name", "missing (required)")
    if not _NAME.match(name):
        raise t.error("name", f"{name!r}: use letters, digits, '_', '.' and '-' (it becomes a menu label)")
    t.path = ("entry", name)
    title = t.get_str("title", name)
    assert title is not None
    if any(c in _TITLE_FORBIDDEN or not c.isprintable() for c in title):
        raise t.error("title", f"{title!r}: quotes, '$', '\\' and control characters cannot be shown safely")

    kernel = _artifact(t, "kernel", t.required_str("kernel"), ctx, http_only=True)
    initrd = _artifact(t, "initrd", t.required_str("initrd"), ctx, http_only=True)
    image = _artifact(t, "image", t.required_str("image"), ctx, http_only=False)
    mode: Mode = _choice(t, "mode", Mode, Mode.ram)
    root = t.get_str("root", "auto")
    assert root is not None
    if root != "auto" and not _ROOT.match(root):
        raise t.error("root", f"{root!r} is not auto, a partition number, LABEL=.., UUID=.. or PARTUUID=..")
    overlay: Overlay = _choice(t, "overlay", Overlay, Overlay.tmpfs)
    overlay_size = t.get_str("overlay_size")
    if overlay_size is not None:
        if overlay is not Overlay.tmpfs:
            raise t.error("overlay_size", f"contradicts overlay = {overlay.value!r}: only a tmpfs overlay has a size")
        if not _SIZE.match(overlay_size) or overlay_size.rstrip("%kKmMgG").strip("0") == "":
            raise t.error("overlay_size", f"{overlay_size!r} is not a size like 512m, 2G or 25%")

    # What pins the image's bytes (the initramfs parser, bootkit/boot/cmdline.py, has the same rules):
    # ram mode hashes the whole download (a pinned sha256, or the .sha256 sidecar next to the image);
    # lazy mode checks each chunk it reads against a manifest whose own hash is pinned, or uses the sidecar.
    manifest = None
    manifest_sha256 = None
    manifest_value = t.get_str("manifest")
    manifest_hash_spec = t.get_str("manifest_sha256")
    if manifest_value is not None:
        if mode is not Mode.lazy:
            raise t.error("manifest", f"contradicts mode = {mode.value!r}: a manifest verifies lazy reads only")
        manifest = _artifact(t, "manifest", manifest_value, ctx, http_only=False)
        manifest_sha256 = _hash(t, "manifest_sha256", manifest_hash_spec or "compute", manifest, ctx)
    elif manifest_hash_spec is not None:
        raise t.error("manifest_sha256", "given without manifest")
    sha256_spec = t.get_str("sha256", "compute" if mode is Mode.ram else None)
    sha256 = None
    if sha256_spec == "sidecar":
        if manifest is not None:
            raise t.error("sha256", "'sidecar' contradicts manifest: the manifest's pinned hash verifies lazy reads")
    elif sha256_spec is not None:
        if mode is Mode.lazy and manifest is None:
            raise t.error(
                "sha256",
                "a pinned image hash cannot be checked in lazy mode (the image is never read whole): "
                "set manifest (and manifest_sha256), or sha256 = 'sidecar'",
            )
        sha256 = _hash(t, "sha256", sha256_spec, image, ctx)

    snapshot = t.get_str("snapshot")
    if snapshot is not None and not _NAME.match(snapshot):
        raise t.error("snapshot", f"{snapshot!r}: snapshot names here use letters, digits, '_', '.' and '-'")
    console = t.get_strs("console")
    console = _args(t, "console", default_console if console is None else console)
    args = _args(t, "args", t.get_strs("args") or ())
    t.finish()
    return Entry(
        name=name,
        title=title,
        kernel=kernel,
        initrd=initrd,
        image=image,
        sha256=sha256,
        mode=mode,
        root=None if root == "auto" else root,
        overlay=overlay,
        overlay_size=overlay_size,
        manifest=manifest,
        manifest_sha256=manifest_sha256,
        snapshot=snapshot,
        console=console,
        args=args,
    )


def _machine(t: _Table, entries: dict[str, Entry], default: str, timeout: int) -> Machine:
    mac = t.required_str("mac")
    if not _MAC.match(mac):
        raise t.error("mac", f"{mac!r} is not a MAC address like 52:54:00:12:34:56")
    mac = mac.lower().replace("-", ":")
    t.path = ("machine", mac)
    name = t.get_str("name")
    if name is not None and not name.isprintable():
        raise t.error("name", "control characters")
    machine_default = t.get_str("default", default)
    assert machine_default is not None
    if machine_default not in entries:
        raise t.error("default", f"no entry named {machine_default!r} (entries: {', '.join(entries)})")
    machine_timeout = t.get_int("timeout", timeout)
    assert machine_timeout is not None
    if machine_timeout < 0:
        raise t.error("timeout", "must be >= 0")
    args = _args(t, "args", t.get_strs("args") or ())
    t.finish()
    return Machine(mac=mac, default=machine_default, timeout=machine_timeout, args=args, name=name)


def _dhcp(t: _Table, bootloaders: frozenset[Bootloader]) -> Dhcp:
    mode: DhcpMode = _choice(t, "mode", DhcpMode, DhcpMode.proxy)
    loader: Bootloader = _choice(t, "loader", Bootloader, Bootloader.ipxe)
    if loader not in bootloaders:
        raise t.error("loader", f"{loader.value!r} is not among the configured bootloaders")
    subnet = _ip(t, "subnet", t.get_str("subnet"))
    range_start = _ip(t, "range_start", t.get_str("range_start"))
    range_end = _ip(t, "range_end", t.get_str("range_end"))
    netmask = _ip(t, "netmask", t.get_str("netmask"))
    lease_time = t.get_str("lease_time")
    router = _ip(t, "router", t.get_str("router"))
    dns = tuple(_ip(t, "dns", d) or "" for d in t.get_strs("dns") or ())
    full_only = {"range_start": range_start, "range_end": range_end, "netmask": netmask,
                 "lease_time": lease_time, "router": router, "dns": dns or None}
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
        if lease_time is not None and not _LEASE.match(lease_time):
            raise t.error("lease_time", f"{lease_time!r} is not a dnsmasq lease time like 45m, 12h or infinite")
    interface = t.get_str("interface")
    if interface is not None and not _NAME.match(interface):
        raise t.error("interface", f"{interface!r} is not an interface name")
    tftp_root = t.get_str("tftp_root")
    if tftp_root is not None and (not os.path.isabs(tftp_root) or any(c.isspace() for c in tftp_root)):
        raise t.error("tftp_root", f"{tftp_root!r}: give an absolute path without spaces")
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
    )


def _check_cmdline_length(origin: _Origin, index: int, entry: Entry, machine: Machine | None) -> None:
    """The longest line a bootloader passes (iPXE's, with ``initrd=NAME``) must fit the kernel's buffer."""
    length = len(kernel_cmdline(entry, machine, initrd_name=entry.initrd_name))
    if length >= MAX_CMDLINE:
        where = origin.where(("entry", entry.name, "args") if machine is None else ("machine", machine.mac, "args"))
        raise ConfigError(
            f"{where}: the kernel command line of entry {entry.name!r} would be {length} bytes; "
            f"the kernel keeps {MAX_CMDLINE - 1}"
        )


def _config(top: _Table, base_dir: Path) -> Config:
    origin = top.origin
    base_url = top.get_str("base_url")
    if base_url is not None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise top.error("base_url", f"{base_url!r} is not an http:// or https:// directory URL")
        if not base_url.endswith("/"):
            base_url += "/"
    docroot = None
    docroot_value = top.get_str("docroot")
    if docroot_value is not None:
        docroot = (base_dir / docroot_value).resolve()
        if not docroot.is_dir():
            raise top.error("docroot", f"{docroot}: no such directory")
        if base_url is None:
            raise top.error("docroot", "given without base_url (the URL it is served at)")
    bootloaders_value = top.get_strs("bootloaders")
    bootloaders = frozenset(Bootloader)
    if bootloaders_value is not None:
        try:
            bootloaders = frozenset(Bootloader(b) for b in bootloaders_value)
        except ValueError:
            raise top.error("bootloaders", f"{list(bootloaders_value)} names one not in: ipxe, grub") from None
        if not bootloaders:
            raise top.error("bootloaders", "must name at least one of: ipxe, grub")
    console = _args(top, "console", top.get_strs("console") or ())
    timeout = top.get_int("timeout", DEFAULT_TIMEOUT)
    assert timeout is not None
    if timeout < 0:
        raise top.error("timeout", "must be >= 0")
    ctx = _Context(origin=origin, base_url=base_url, docroot=docroot, bootloaders=bootloaders)

    entry_tables = top.tables("entry", ENTRY_SETTINGS)
    if not entry_tables:
        raise top.error("entry", "missing: describe at least one [[entry]]")
    entries: dict[str, Entry] = {}
    for i, t in enumerate(entry_tables):
        entry = _entry(t, i, ctx, console)
        if entry.name in entries:
            raise ConfigError(f"{origin.where((f'entry[{i}]', 'name'))}: {entry.name!r} is used by another entry too")
        entries[entry.name] = entry
    default = top.get_str("default", next(iter(entries)))
    assert default is not None
    if default not in entries:
        raise top.error("default", f"no entry named {default!r} (entries: {', '.join(entries)})")

    machines: dict[str, Machine] = {}
    for t in top.tables("machine", MACHINE_SETTINGS):
        machine = _machine(t, entries, default, timeout)
        if machine.mac in machines:
            raise t.error("mac", f"{machine.mac} is described twice")
        machines[machine.mac] = machine

    for i, entry in enumerate(entries.values()):
        _check_cmdline_length(origin, i, entry, None)
        for machine in machines.values():
            _check_cmdline_length(origin, i, entry, machine)

    dhcp_table = top.table("dhcp", DHCP_SETTINGS)
    dhcp = None if dhcp_table is None else _dhcp(dhcp_table, bootloaders)
    serial_speed = None
    grub_table = top.table("grub", GRUB_SETTINGS)
    if grub_table is not None:
        serial_speed = grub_table.get_int("serial_speed")
        if serial_speed is not None and serial_speed <= 0:
            raise grub_table.error("serial_speed", "must be > 0")
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
    origin = _Origin(path)
    return _config(_Table(data, (), TOP_SETTINGS, origin), path.parent)


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
    return _config(_Table(data, (), TOP_SETTINGS, _Origin(None)), cwd)
