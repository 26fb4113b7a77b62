"""The kernel command line of a bootkit netboot: ``root=qcow2:<URL>`` and every ``rd.qcow2.*`` option.

Parsed once into a frozen :class:`BootConfig`; every value is checked here, so that a typo fails the boot
in the cmdline hook, before the network comes up, with one line naming the option. Unknown ``rd.qcow2.*``
options are errors too: a mistyped ``rd.qcow2.sha256`` must not silently turn pinning off. The README
section "Booting from a QCOW2 image" documents each option; keep the two in step.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from bootkit.errors import ConfigError

PREFIX = "rd.qcow2."

VERIFY_MODES = ("pinned", "sidecar", "none")
MODES = ("ram", "lazy")

DEFAULT_RETRIES = 3
DEFAULT_TIMEOUT = 30.0
DEFAULT_MINMEM_MIB = 128

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_TMPFS_SIZE = re.compile(r"^(\d+[kKmMgG]?|\d{1,3}%)$")
_BACKING_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")

#: options that take no value (a bare ``rd.qcow2.debug`` means on; ``=0``/``=1`` work as well)
_FLAGS = ("insecure", "debug")
_VALUED = (
    "sha256",
    "verify",
    "mode",
    "root",
    "overlay",
    "manifest",
    "manifest-sha256",
    "snapshot",
    "retries",
    "timeout",
    "minmem",
    "cacert",
)
KNOWN_OPTIONS: Tuple[str, ...] = (*(PREFIX + o for o in _VALUED + _FLAGS), PREFIX + "sha256.<file>")


@dataclass(frozen=True)
class RootSpec:
    """Which partition or filesystem holds the root: ``kind`` is auto, number, label, uuid or partuuid."""

    kind: str = "auto"
    value: str = ""

    def __str__(self) -> str:
        return {"auto": "auto", "number": self.value}.get(self.kind, f"{self.kind.upper()}={self.value}")


@dataclass(frozen=True)
class Overlay:
    """The writable layer over the read-only root: ``tmpfs`` (with an optional size) or ``none``."""

    kind: str = "tmpfs"
    #: tmpfs ``size=`` (``512m``, ``25%``); None: the tmpfs default (half the RAM)
    size: Optional[str] = None

    def __str__(self) -> str:
        return self.kind + (f":size={self.size}" if self.size else "")


@dataclass(frozen=True)
class BootConfig:
    """Everything the boot code was asked for on the kernel command line."""

    url: str
    sha256: Optional[str] = None
    verify: str = "sidecar"
    mode: str = "ram"
    root: RootSpec = field(default_factory=RootSpec)
    overlay: Overlay = field(default_factory=Overlay)
    manifest: Optional[str] = None
    manifest_sha256: Optional[str] = None
    snapshot: Optional[str] = None
    retries: int = DEFAULT_RETRIES
    timeout: float = DEFAULT_TIMEOUT
    minmem_mib: int = DEFAULT_MINMEM_MIB
    cacert: Optional[str] = None
    insecure: bool = False
    debug: bool = False
    #: pinned hashes of backing files, by file name (``rd.qcow2.sha256.<file>=``)
    backing_sha256: Dict[str, str] = field(default_factory=dict)
    rootfstype: Optional[str] = None
    rootflags: Optional[str] = None
    #: ``rw`` on the command line: the new root is mounted read-write (dracut's default is ``ro``)
    rw: bool = False


def split_cmdline(text: str) -> List[str]:
    """Split a kernel command line into words; double quotes group, as the kernel does."""
    try:
        return shlex.split(text)
    except ValueError:
        # an unbalanced quote: the kernel takes the rest of the line; so does a plain split
        return text.split()


def _hex64(option: str, value: str) -> str:
    if not _HEX64.match(value):
        raise ConfigError(f"{option}={value}: expected 64 hexadecimal digits (a SHA-256)")
    return value.lower()


def _choice(option: str, value: str, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{option}={value}: expected one of {'|'.join(choices)}")
    return value


def _int(option: str, value: str, minimum: int) -> int:
    try:
        n = int(value, 10)
    except ValueError:
        raise ConfigError(f"{option}={value}: expected a whole number") from None
    if n < minimum:
        raise ConfigError(f"{option}={value}: must be at least {minimum}")
    return n


def _flag(option: str, value: Optional[str]) -> bool:
    if value is None or value.lower() in ("1", "yes", "true", "on"):
        return True
    if value.lower() in ("0", "no", "false", "off"):
        return False
    raise ConfigError(f"{option}={value}: expected no value, or 0/1")


def _url(option: str, value: str) -> str:
    if not re.match(r"^https?://[^/\s]+/\S*[^/]$", value):
        raise ConfigError(f"{option}={value}: expected an http:// or https:// URL of a file")
    return value


def parse_root(option: str, value: str) -> RootSpec:
    """``N`` | ``LABEL=..`` | ``UUID=..`` | ``PARTUUID=..``."""
    if value.isdigit() and int(value) > 0:
        return RootSpec("number", str(int(value)))
    key, sep, rest = value.partition("=")
    if sep and rest and key.upper() in ("LABEL", "UUID", "PARTUUID"):
        if key.upper() == "LABEL":
            return RootSpec("label", rest)
        return RootSpec(key.lower(), rest.lower())
    raise ConfigError(f"{option}={value}: expected a partition number, LABEL=, UUID= or PARTUUID=")


def parse_overlay(option: str, value: str) -> Overlay:
    """``tmpfs`` | ``tmpfs:size=<N[kmg]|P%>`` | ``none``."""
    if value == "none":
        return Overlay("none")
    if value == "tmpfs":
        return Overlay("tmpfs")
    if value.startswith("tmpfs:size="):
        size = value[len("tmpfs:size=") :]
        if _TMPFS_SIZE.match(size) and size.rstrip("%kKmMgG") not in ("0",):
            return Overlay("tmpfs", size)
    raise ConfigError(f"{option}={value}: expected tmpfs, tmpfs:size=<N[k|m|g]|P%> or none")


def parse_cmdline(text: str) -> Optional[BootConfig]:
    """The boot configuration, or None when ``root=`` does not name a QCOW2 image.

    Raises :class:`ConfigError` naming the first bad or unknown option.
    """
    url: Optional[str] = None
    values: Dict[str, object] = {}
    backing: Dict[str, str] = {}
    unknown: List[str] = []
    rw = False
    for word in split_cmdline(text):
        key, sep, value = word.partition("=")
        val: Optional[str] = value if sep else None
        if key == "root":
            # the last root= wins, as for the kernel and dracut
            url = _url("root", value[len("qcow2:") :]) if value.startswith("qcow2:") else None
        elif key == "rootfstype" and val:
            values["rootfstype"] = val
        elif key == "rootflags" and val:
            values["rootflags"] = val
        elif word == "rw":
            rw = True
        elif word == "ro":
            rw = False
        elif key.startswith(PREFIX):
            name = key[len(PREFIX) :]
            if name.startswith("sha256."):
                fname = name[len("sha256.") :]
                if not _BACKING_NAME.match(fname) or val is None:
                    raise ConfigError(f"{word}: expected {PREFIX}sha256.<file name>=<sha256>")
                backing[fname] = _hex64(key, val)
            elif name in _FLAGS:
                values[name] = _flag(key, val)
            elif name in _VALUED:
                if not val:
                    raise ConfigError(f"{key}: needs a value ({key}=...)")
                values[name] = _parse_value(key, name, val)
            else:
                unknown.append(key)
    if unknown:
        raise ConfigError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(known: {', '.join(KNOWN_OPTIONS)})"
        )
    if url is None:
        return None
    return _build(url, values, backing, rw)


def _parse_value(option: str, name: str, value: str) -> object:
    if name in ("sha256", "manifest-sha256"):
        return _hex64(option, value)
    if name == "verify":
        return _choice(option, value, VERIFY_MODES)
    if name == "mode":
        return _choice(option, value, MODES)
    if name == "root":
        return parse_root(option, value)
    if name == "overlay":
        return parse_overlay(option, value)
    if name == "manifest":
        return _url(option, value)
    if name == "retries":
        return _int(option, value, 0)
    if name == "minmem":
        return _int(option, value, 0)
    if name == "timeout":
        try:
            seconds = float(value)
        except ValueError:
            raise ConfigError(f"{option}={value}: expected a number of seconds") from None
        if not seconds > 0 or seconds != seconds or seconds == float("inf"):
            raise ConfigError(f"{option}={value}: must be a positive number of seconds")
        return seconds
    if name == "cacert":
        if not value.startswith("/"):
            raise ConfigError(f"{option}={value}: expected an absolute path in the initramfs")
        return value
    if name == "snapshot":
        return value
    raise AssertionError(name)


def _build(url: str, values: Dict[str, object], backing: Dict[str, str], rw: bool) -> BootConfig:
    sha256 = values.get("sha256")
    mode = values.get("mode", "ram")
    verify = values.get("verify")
    if verify is None:
        verify = "pinned" if sha256 or values.get("manifest-sha256") else "sidecar"
    if mode != "lazy" and (values.get("manifest") or values.get("manifest-sha256")):
        raise ConfigError(f"{PREFIX}manifest and {PREFIX}manifest-sha256 are only used with {PREFIX}mode=lazy")
    if verify == "pinned" and mode == "ram" and not sha256:
        raise ConfigError(f"{PREFIX}verify=pinned needs {PREFIX}sha256=<hex>")
    if verify == "pinned" and mode == "lazy" and not values.get("manifest-sha256"):
        raise ConfigError(
            f"{PREFIX}verify=pinned with {PREFIX}mode=lazy needs {PREFIX}manifest-sha256=<hex> "
            "(lazy mode checks every chunk against the manifest, whose hash is pinned)"
        )
    if verify != "pinned" and (sha256 or values.get("manifest-sha256")):
        raise ConfigError(f"a hash is pinned but {PREFIX}verify={verify}: drop one of them")
    return BootConfig(
        url=url,
        sha256=sha256,  # type: ignore[arg-type]
        verify=verify,  # type: ignore[arg-type]
        mode=mode,  # type: ignore[arg-type]
        root=values.get("root", RootSpec()),  # type: ignore[arg-type]
        overlay=values.get("overlay", Overlay()),  # type: ignore[arg-type]
        manifest=values.get("manifest"),  # type: ignore[arg-type]
        manifest_sha256=values.get("manifest-sha256"),  # type: ignore[arg-type]
        snapshot=values.get("snapshot"),  # type: ignore[arg-type]
        retries=values.get("retries", DEFAULT_RETRIES),  # type: ignore[arg-type]
        timeout=values.get("timeout", DEFAULT_TIMEOUT),  # type: ignore[arg-type]
        minmem_mib=values.get("minmem", DEFAULT_MINMEM_MIB),  # type: ignore[arg-type]
        cacert=values.get("cacert"),  # type: ignore[arg-type]
        insecure=bool(values.get("insecure", False)),
        debug=bool(values.get("debug", False)),
        backing_sha256=backing,
        rootfstype=values.get("rootfstype"),  # type: ignore[arg-type]
        rootflags=values.get("rootflags"),  # type: ignore[arg-type]
        rw=rw,
    )
