"""A generic reader of TOML tables against declared settings: type checks, parsers, unknown keys, and where.

A :class:`Table` hands out each key once, checked against its :class:`~.settings.Setting` (the TOML type its
``kind`` names, then the setting's own ``parse``); :meth:`Table.finish` reports the first key nobody took.
Every message names where the value came from: ``FILE: entry.a.mode`` for TOML, ``--mode`` for flags
(:class:`Origin`). Knows nothing about boot entries: the rules of each table are in :mod:`.load`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bootkit.errors import ConfigError
from bootkit.host.pxecfg.settings import Setting
from bootkit.host.pxecfg.values import BadValue


class Origin:
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


def toml_type(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


class Table:
    """One TOML table being read: keys are taken by name, type-checked and parsed; leftovers are unknown keys."""

    def __init__(self, data: Any, path: tuple[str, ...], settings: tuple[Setting, ...], origin: Origin) -> None:
        self.path = path
        self.origin = origin
        if not isinstance(data, Mapping):
            raise ConfigError(f"{origin.where(path)}: expected a table, got {toml_type(data)}")
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

    def raw(self, key: str) -> Any:
        """The value of a ``str``, ``int`` or ``list`` setting, type-checked but not parsed; None when absent."""
        value = self._take(key)
        if value is None:
            return None
        kind = self._known[key].kind
        if kind == "str":
            if not isinstance(value, str):
                raise self.error(key, f"expected a string, got {toml_type(value)}")
            if not value:
                raise self.error(key, "must not be empty")
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.error(key, f"expected an integer, got {toml_type(value)}")
        elif kind == "list":
            if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.error(key, f"expected an array of strings, got {toml_type(value)}")
            value = tuple(value)
        else:
            raise AssertionError(f"{key}: a {kind} is read with table() or tables()")
        return value

    def get(self, key: str, default: Any = None) -> Any:
        """The parsed value of ``key``, or ``default`` (as given, not parsed) when it is absent."""
        value = self.raw(key)
        if value is None:
            return default
        return self.check(key, self._known[key].parse, value)

    def required(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise self.error(key, "missing (required)")
        return value

    def check(self, key: str, parse: Any, *values: Any) -> Any:
        """``parse(*values)``, its :class:`BadValue` reported as this table's ``key``."""
        if parse is None:
            return values[0]
        try:
            return parse(*values)
        except BadValue as e:
            raise self.error(key, str(e)) from None

    def table(self, key: str) -> Table | None:
        value = self._take(key)
        if value is None:
            return None
        return Table(value, (*self.path, key), self._known[key].settings, self.origin)

    def tables(self, key: str) -> list[Table]:
        value = self._take(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, f"expected an array of tables ([[{key}]]), got {toml_type(value)}")
        settings = self._known[key].settings
        return [Table(v, (*self.path, f"{key}[{i}]"), settings, self.origin) for i, v in enumerate(value)]

    def finish(self) -> None:
        """Raise for the first key nobody took."""
        for key in self._data:
            known = ", ".join(sorted(self._known))
            raise self.error(key, f"unknown key (known here: {known})")
