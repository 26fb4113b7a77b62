"""Writing one ``[[entry]]`` of a ``pxe-config`` TOML description, keeping the rest of the file as it was.

tomlkit edits the document in place, so comments, key order, quoting and the other tables survive; bootkit
has no TOML writer of its own, and a textual edit of someone's hand-written file would be a TOML parser in
disguise. Every edit is checked afterwards with ``tomllib`` (the reader ``pxe-config`` itself uses): the
document must read back exactly as before except for the keys publish owns in that one entry, else nothing
is written.

Keys publish owns in the entry: ``image``, ``sha256``, ``mode``, ``manifest`` and ``manifest_sha256`` (lazy
mode; removed in ram mode), ``kernel`` and ``initrd`` (when the image came with them), and in ``args`` the
``rd.qcow2.sha256.<file>`` pins of the backing chain (other arguments are kept, in order); with ``publish
--sign``, ``channel`` (and then none of ``image``, the hashes or the pins).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Any

import tomlkit
from tomlkit.items import AoT, Table

from bootkit.host.publish.docroot import PublishError

PIN_PREFIX = "rd.qcow2.sha256."
OWNED = ("image", "sha256", "mode", "manifest", "manifest_sha256", "kernel", "initrd", "channel")


@dataclass(frozen=True)
class EntryUpdate:
    """What the entry should say after publishing."""

    name: str
    #: key -> value for the owned keys; None removes the key
    values: dict[str, str | None]
    #: the backing chain's pins (``rd.qcow2.sha256.<file>=<hex>``), replacing the entry's earlier pins
    pins: tuple[str, ...]


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def line(self) -> str:
        if self.old is None:
            return f"{self.key} = {self.new!r} (new)"
        if self.new is None:
            return f"{self.key} removed (was {self.old!r})"
        return f"{self.key} = {self.new!r} (was {self.old!r})"


def new_document(base_url: str, docroot: str) -> str:
    """The text of a new description: ``base_url`` and ``docroot``, entries follow."""
    doc = tomlkit.document()
    doc.add(tomlkit.comment("boot description for bootkit pxe-config; entries written by bootkit publish"))
    doc["base_url"] = base_url
    doc["docroot"] = docroot
    return tomlkit.dumps(doc)


def update_entry(text: str, update: EntryUpdate, where: str) -> tuple[str, list[Change]]:
    """The document ``text`` with ``update`` applied, and what changed; ``where`` names the file in errors."""
    try:
        before = tomllib.loads(text)
        doc = tomlkit.parse(text)
    except (tomllib.TOMLDecodeError, tomlkit.exceptions.ParseError) as e:
        raise PublishError(f"{where}: invalid TOML: {e}") from None
    entries = doc.get("entry")
    if entries is None:
        entries = tomlkit.aot()
        doc.append("entry", entries)
    if not isinstance(entries, AoT):
        raise PublishError(f"{where}: 'entry' is not an array of tables ([[entry]])")
    matches = [t for t in entries if t.get("name") == update.name]
    if len(matches) > 1:
        raise PublishError(f"{where}: {len(matches)} [[entry]] tables named {update.name!r}")
    if matches:
        table: Table = matches[0]
        index = [t.get("name") for t in entries].index(update.name)
    else:
        table = tomlkit.table()
        table["name"] = update.name
        entries.append(table)
        index = len(entries) - 1
    changes: list[Change] = []
    for key, value in update.values.items():
        old = table.get(key)
        old_plain = None if old is None else _plain(old)
        if value is None:
            if key in table:
                del table[key]
                changes.append(Change(key, old_plain, None))
        elif old_plain != value:
            table[key] = value
            changes.append(Change(key, old_plain, value))
    if not isinstance(_plain(table.get("args", [])), list):
        raise PublishError(f"{where}: entry.{update.name}.args: not an array of strings")
    old_args = [str(a) for a in table.get("args", [])]
    kept = [a for a in old_args if not a.startswith(PIN_PREFIX)]
    new_args = kept + list(update.pins)
    if new_args != old_args:
        if not new_args:
            del table["args"]
        elif "args" in table:
            array = table["args"]
            array.clear()
            array.extend(new_args)
        else:
            table["args"] = new_args
        changes.append(Change("args", old_args or None, new_args or None))
    out = tomlkit.dumps(doc)
    _verify(before, out, update, index, new_args, where)
    return out, changes


def _plain(value: Any) -> Any:
    unwrap = getattr(value, "unwrap", None)
    return unwrap() if unwrap is not None else value


def _verify(before: dict[str, Any], out: str, update: EntryUpdate, index: int, args: list[str],
            where: str) -> None:
    """The written document reads back as ``before`` with exactly the owned keys of one entry changed."""
    after = tomllib.loads(out)
    expected = dict(before)
    entries = [dict(e) for e in before.get("entry", [])]
    if index == len(entries):
        entries.append({"name": update.name})
    entry = entries[index]
    for key, value in update.values.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    if args:
        entry["args"] = args
    else:
        entry.pop("args", None)
    expected["entry"] = entries
    if after != expected:
        raise PublishError(f"{where}: the edited description would not read back as intended; entry"
                           f" {update.name!r} left unchanged (edit it by hand)")
