"""bootkit's own files as the host side finds them, however bootkit is installed.

The data files are resources of the ``bootkit`` package (``importlib.resources``): a wheel (``pip install``,
``pipx install``), an editable install and a source checkout all have them at the same place.
``bootkit/_data/`` holds the repository's top-level data folders: ``_data/dracut-module`` (dracut-module/,
the dracut module) and ``_data/grub`` (grub/, GRUB's configuration template). In the checkout these are
symlinks to the folders; building a wheel or sdist copies the files behind them.

Host side only.
"""

from __future__ import annotations

import stat
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from bootkit.errors import BootkitError


def data(*parts: str) -> Traversable:
    """A data file or folder of the package, e.g. ``data("dracut-module", "90bootkit")``."""
    return files("bootkit").joinpath("_data", *parts)


def package_dir() -> Path:
    """The directory bootkit is imported from; its parent is the ``sys.path`` entry that finds it."""
    root = files("bootkit")
    # a regular package on a filesystem is a pathlib.Path; anything else (a zip) has no files to copy
    if not isinstance(root, Path):
        raise BootkitError(f"bootkit is imported from {root}, not from a directory: install it with pip")
    return root.resolve()


def source_checkout() -> Path | None:
    """The top of the bootkit source checkout bootkit runs from (editable install, ``PYTHONPATH``), else None."""
    root = files("bootkit")
    if not isinstance(root, Path):
        return None
    top = root.resolve().parent
    # site-packages has neither: these are the checkout's own
    if (top / "pyproject.toml").is_file() and (top / "dracut-module").is_dir():
        return top
    return None


def copy_tree(source: Traversable, dest: Path) -> list[Path]:
    """Copy the folder ``source`` into the new directory ``dest``, shell scripts (``*.sh``) executable.

    Makes a real directory of a resource folder whatever the package's storage, with the modes set here:
    an installer may not keep the execute bits of package data.
    """
    dest.mkdir(parents=True)
    written = []
    for item in sorted(source.iterdir(), key=lambda t: t.name):
        target = dest / item.name
        if item.is_dir():
            written += copy_tree(item, target)
            continue
        target.write_bytes(item.read_bytes())
        mode = 0o644 | (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH if item.name.endswith(".sh") else 0)
        target.chmod(mode)
        written.append(target)
    return written
