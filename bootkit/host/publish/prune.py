"""``bootkit publish --prune N``: remove old versions of NAME that nothing boots any more.

A version (``NAME-<hash>.qcow2`` with its ``.sha256``, ``.manifest`` and ``.manifest.sha256``; kernels and
initramfs files of NAME likewise) is removed only when all of these hold:

- it is not among the newest N versions (newest by the time publish placed it);
- no ``[[entry]]`` of the TOML description references it (``image``, ``kernel``, ``initrd``, ``manifest``, or
  a ``rd.qcow2.sha256.<file>`` pin in ``args``);
- it has been unreferenced for the grace period (``--grace``, default one day): a machine booted in lazy mode
  before the entry changed still reads ranges of it. The time a version was first seen unreferenced is kept
  in ``DOCROOT/.bootkit-publish.json`` (every publish with ``--toml`` updates it, with or without ``--prune``);
- no kept image has it as its backing file, directly or down the chain.

The state file is bootkit's own (JSON, replaced atomically); a version it does not know counts as published at
its file's modification time and as unreferenced from now.
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path
from typing import Any

from bootkit.host.publish import backing, docroot
from bootkit.host.publish.docroot import PublishError
from bootkit.log import log

STATE = ".bootkit-publish.json"
DEFAULT_GRACE = 86400.0
#: what belongs to each kind of published file
FAMILIES = {
    ".qcow2": (".sha256", ".manifest", ".manifest.sha256"),
    ".vmlinuz": (),
    ".initrd": (),
}


def load_state(root: Path) -> dict[str, dict[str, float]]:
    path = root / STATE
    if not path.exists():
        return {"published": {}, "unreferenced_since": {}}
    try:
        data = json.loads(path.read_text())
        state = {key: {str(k): float(v) for k, v in data.get(key, {}).items()}
                 for key in ("published", "unreferenced_since")}
    except (ValueError, TypeError, AttributeError) as e:
        raise PublishError(f"{path}: not bootkit publish's state file ({e}): move it away to start afresh") from None
    return state


def save_state(root: Path, state: dict[str, dict[str, float]]) -> None:
    docroot.atomic_replace(root / STATE, (json.dumps(state, indent=1, sort_keys=True) + "\n").encode())


def record_published(root: Path, names: list[str], now: float | None = None) -> None:
    """Note when files were published (the newest-N order)."""
    state = load_state(root)
    stamp = time.time() if now is None else now
    for name in names:
        state["published"].setdefault(name, stamp)
        state["unreferenced_since"].pop(name, None)
    save_state(root, state)


def referenced_files(toml: Path) -> set[str]:
    """File names the description's entries reference (plain names under base_url, the docroot's)."""
    data: dict[str, Any] = tomllib.loads(toml.read_text())
    base_url = data.get("base_url") if isinstance(data.get("base_url"), str) else None
    names: set[str] = set()
    for entry in data.get("entry", []):
        if not isinstance(entry, dict):
            continue
        for key in ("image", "kernel", "initrd", "manifest"):
            value = entry.get(key)
            if isinstance(value, str):
                if base_url and value.startswith(base_url):
                    value = value[len(base_url):]
                names.add(value.rsplit("/", 1)[-1])
        for arg in entry.get("args", []):
            if isinstance(arg, str) and arg.startswith("rd.qcow2.sha256.") and "=" in arg:
                names.add(arg[len("rd.qcow2.sha256."):].split("=", 1)[0])
    # a pinned manifest references its image
    return names | {n[: -len(".manifest")] for n in names if n.endswith(".manifest")}


def observe(root: Path, name: str, toml: Path, now: float | None = None) -> tuple[dict[str, list[Path]], set[str],
                                                                                     dict[str, dict[str, float]]]:
    """Update the unreferenced-since clock of NAME's versions; returns (versions by suffix, referenced, state)."""
    stamp = time.time() if now is None else now
    referenced = referenced_files(toml)
    state = load_state(root)
    versions: dict[str, list[Path]] = {}
    for suffix in FAMILIES:
        pattern = docroot.version_pattern(name, suffix)
        found = [p for p in root.iterdir() if pattern.fullmatch(p.name) and p.is_file()]
        for p in found:
            state["published"].setdefault(p.name, p.stat().st_mtime)
            if p.name in referenced:
                state["unreferenced_since"].pop(p.name, None)
            else:
                state["unreferenced_since"].setdefault(p.name, stamp)
        versions[suffix] = sorted(found, key=lambda p: (state["published"][p.name], p.name), reverse=True)
    save_state(root, state)
    return versions, referenced, state


def prune(root: Path, name: str, toml: Path, *, keep: int, grace: float, now: float | None = None) -> list[Path]:
    """Remove what the rules above allow; returns the removed files."""
    stamp = time.time() if now is None else now
    versions, referenced, state = observe(root, name, toml, stamp)
    removed: list[Path] = []
    for suffix, companions in FAMILIES.items():
        kept: set[str] = set()
        for i, p in enumerate(versions[suffix]):
            since = state["unreferenced_since"].get(p.name)
            if i < keep or p.name in referenced or since is None or stamp - since < grace:
                kept.add(p.name)
        if suffix == ".qcow2":
            kept |= _bases_of(root, kept)
        for p in versions[suffix]:
            if p.name in kept:
                continue
            for extra in (p, *(p.with_name(p.name + c) for c in companions)):
                if extra.exists():
                    extra.unlink()
                    removed.append(extra)
            state["published"].pop(p.name, None)
            state["unreferenced_since"].pop(p.name, None)
            log.info("publish: pruned %s", p.name)
    save_state(root, state)
    return removed


def _bases_of(root: Path, kept: set[str]) -> set[str]:
    """Every backing file of the kept images, down their chains (any NAME: a base may be published under
    another one)."""
    out: set[str] = set()
    todo = list(kept)
    while todo:
        path = root / todo.pop()
        base, _fmt = backing.backing_name(path)
        if base is not None and base not in out and "/" not in base:
            out.add(base)
            if (root / base).is_file():
                todo.append(base)
    return out
