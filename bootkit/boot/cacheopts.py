"""The local cache options of the kernel command line: ``rd.qcow2.cache=``, ``rd.qcow2.cache.format=``,
``rd.qcow2.cache.max=`` (their values; ``bootkit.boot.cmdline`` owns the option names and the contract).

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import enum
import re

from bootkit.errors import ConfigError

#: the GPT partition type GUID of a bootkit cache partition (``bootkit cache prepare`` writes it; only a
#: partition with this type or with PARTLABEL :data:`CACHE_PARTLABEL` is ever formatted by the initramfs)
CACHE_TYPE_GUID = "d0fe918d-7024-433e-9128-ffb0ea634af5"
#: the GPT partition name (PARTLABEL) and ext4 label of a bootkit cache partition
CACHE_PARTLABEL = "bootkit-cache"

# a label or UUID ends up in a /dev/disk/by-*/ path: one name, no slash, nothing a shell or udev escapes
_NAME = re.compile(r"^[A-Za-z0-9._:+@-]{1,64}$")
_DEV = re.compile(r"^/dev/[A-Za-z0-9._:+@-]+(/[A-Za-z0-9._:+@-]+)*$")
_MAX = re.compile(r"^([0-9]+)([kKmMgGtT]?)$")
_PERCENT = re.compile(r"^([0-9]{1,3})%$")
_BY = {"LABEL": "by-label", "PARTLABEL": "by-partlabel", "UUID": "by-uuid", "PARTUUID": "by-partuuid"}


class CacheFormat(str, enum.Enum):
    """``rd.qcow2.cache.format=``: ``auto`` formats a bootkit cache partition that has no filesystem yet;
    ``off`` (the default) never formats anything."""

    auto = "auto"
    off = "off"

    def __str__(self) -> str:
        return str(self.value)


def parse_cache_device(option: str, value: str) -> str:
    """``LABEL=x``, ``PARTLABEL=x``, ``UUID=x``, ``PARTUUID=x`` or a ``/dev/...`` path (``/dev/disk/by-id/...``,
    ``/dev/vdb1``); returned as written (UUIDs lower-cased)."""
    key, sep, rest = value.partition("=")
    if sep and key.upper() in _BY:
        if not _NAME.match(rest):
            raise ConfigError(f"{option}={value}: {key.upper()}= takes one name of letters, digits and ._:+@-")
        return f"{key.upper()}={rest.lower() if 'UUID' in key.upper() else rest}"
    if _DEV.match(value) and "/../" not in value + "/" and "/./" not in value + "/":
        return value
    raise ConfigError(f"{option}={value}: expected LABEL=, PARTLABEL=, UUID=, PARTUUID= or a /dev/ path")


def device_path(spec: str) -> str:
    """Where udev puts the device a :func:`parse_cache_device` value names."""
    key, sep, rest = spec.partition("=")
    if sep and key in _BY:
        return f"/dev/disk/{_BY[key]}/{rest}"
    return spec


def parse_cache_format(option: str, value: str) -> CacheFormat:
    try:
        return CacheFormat(value)
    except ValueError:
        raise ConfigError(f"{option}={value}: expected auto or off") from None


def parse_cache_max(option: str, value: str) -> str:
    """``20G``, ``512M``, ``1073741824`` (bytes, binary suffixes) or ``50%`` (of the cache filesystem)."""
    m = _PERCENT.match(value)
    if m and 1 <= int(m.group(1)) <= 100:
        return value
    m = _MAX.match(value)
    if m and int(m.group(1)) > 0:
        return value
    raise ConfigError(f"{option}={value}: expected a size (20G, 512M) or a share of the filesystem (1% to 100%)")


def cache_max_bytes(value: str, fs_bytes: int) -> int:
    """The byte budget a :func:`parse_cache_max` value gives on a filesystem of ``fs_bytes``."""
    m = _PERCENT.match(value)
    if m:
        return fs_bytes * int(m.group(1)) // 100
    m = _MAX.match(value)
    assert m, value
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]
