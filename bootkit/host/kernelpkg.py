"""A Debian kernel for netboot images, without installing it on the host.

``apt-get download`` fetches the current bookworm ``linux-image-6.1.*-amd64-unsigned`` package into a cache
directory, ``dpkg-deb -x`` unpacks it, and ``depmod -b`` writes the ``modules.dep*`` files the package does
not ship. The result is a tree dracut accepts as ``--kmoddir``: it checks that the directory is
``…/lib/modules/<kver>`` (see ../shared/reference/dracut-notes.md §2).

Cache layout (under :func:`cache_dir`)::

    kernel/<package>_<version>.deb
    kernel/<kver>/vmlinuz
    kernel/<kver>/lib/modules/<kver>/...      (depmod'ed)
    kernel/<kver>/.complete                   (written last: the tree is usable)

Host side only.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bootkit.errors import BootkitError
from bootkit.host import pkgdata
from bootkit.log import log
from bootkit.run import run

#: package name pattern of the plain (not cloud, not rt) x86-64 kernel, unsigned so the vmlinuz is in the .deb
_PACKAGE_RE = re.compile(r"^linux-image-(6\.1\.\d+-\d+-amd64)-unsigned$")


class KernelPackageError(BootkitError):
    """The kernel package could not be found, downloaded or unpacked."""


@dataclass(frozen=True)
class Kernel:
    """An unpacked kernel: what ``-kernel`` and ``dracut --kver/--kmoddir`` need."""

    kver: str
    vmlinuz: Path
    kmoddir: Path


def cache_dir() -> Path:
    """Where bootkit keeps what it downloads, first match wins:

    * ``$BOOTKIT_CACHE``;
    * ``cache/`` at the top of the source checkout bootkit runs from (editable install; gitignored);
    * ``$XDG_CACHE_HOME/bootkit``, by default ``~/.cache/bootkit`` (an installed package: never inside
      site-packages).
    """
    env = os.environ.get("BOOTKIT_CACHE")
    if env:
        return Path(env)
    checkout = pkgdata.source_checkout()
    if checkout is not None:
        return checkout / "cache"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # the XDG base directory spec: a relative path is invalid and to be ignored
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "bootkit"


def _kernel_from_tree(root: Path, kver: str) -> Kernel:
    return Kernel(kver=kver, vmlinuz=root / "vmlinuz", kmoddir=root / "lib" / "modules" / kver)


def cached_kernels(cache: Path | None = None) -> list[Kernel]:
    """Unpacked kernels already in the cache, newest ABI first."""
    base = (cache or cache_dir()) / "kernel"
    found = [_kernel_from_tree(d, d.name) for d in base.glob("6.1.*") if (d / ".complete").exists()]
    return sorted(found, key=lambda k: _abi_key(k.kver), reverse=True)


def _abi_key(kver: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", kver))


def latest_package() -> str:
    """The newest ``linux-image-6.1.0-N-amd64-unsigned`` apt can download (it must have a candidate)."""
    out = run(
        ["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.[0-9.-]*-amd64-unsigned$"],
        capture=True,
    ).stdout.decode()
    names = [line.split(" ", 1)[0] for line in out.splitlines()]
    names = [n for n in names if _PACKAGE_RE.match(n)]
    for name in sorted(names, key=lambda n: _abi_key(n), reverse=True):
        policy = run(["apt-cache", "policy", name], capture=True).stdout.decode()
        if re.search(r"Candidate: (?!\(none\))", policy):
            return name
    raise KernelPackageError(
        "no linux-image-6.1.*-amd64-unsigned package known to apt: run 'apt-get update' "
        "(Debian bookworm main must be in the apt sources)"
    )


def ensure_kernel(kver: str | None = None, *, cache: Path | None = None) -> Kernel:
    """Return an unpacked, depmod'ed kernel, downloading it first if the cache does not have it.

    ``kver`` (e.g. ``6.1.0-56-amd64``) pins the version; without it a cached kernel is reused if there is
    one, else the newest package apt knows is fetched. Idempotent; a cache hit runs no command.
    """
    base = (cache or cache_dir()) / "kernel"
    if kver is None:
        have = cached_kernels(cache)
        if have:
            return have[0]
        package = latest_package()
        m = _PACKAGE_RE.match(package)
        assert m is not None
        kver = m.group(1)
    else:
        package = f"linux-image-{kver}-unsigned"
    tree = base / kver
    if (tree / ".complete").exists():
        return _kernel_from_tree(tree, kver)
    for tool, pkg in (("apt-get", "apt"), ("dpkg-deb", "dpkg"), ("depmod", "kmod")):
        if shutil.which(tool) is None:
            raise KernelPackageError(f"{tool} not found: install the Debian package '{pkg}'")
    base.mkdir(parents=True, exist_ok=True)
    debs = sorted(base.glob(f"{package}_*.deb"))
    if not debs:
        log.info("kernel: downloading %s", package)
        # apt-get download writes into the current directory; as root it drops privileges to _apt, which
        # must be able to write there, so download into a fresh world-writable temp dir and move the file.
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            os.chmod(tmp, 0o777)
            run(["apt-get", "download", "-q", package], cwd=tmp)
            for deb in Path(tmp).glob("*.deb"):
                shutil.move(str(deb), base / deb.name)
        debs = sorted(base.glob(f"{package}_*.deb"))
        if not debs:
            raise KernelPackageError(f"apt-get download {package} produced no .deb")
    deb = debs[-1]
    log.info("kernel: unpacking %s", deb.name)
    work = Path(tempfile.mkdtemp(prefix=f".{kver}.", dir=base))
    try:
        unpacked = work / "deb"
        run(["dpkg-deb", "-x", deb, unpacked])
        modules = unpacked / "lib" / "modules" / kver
        vmlinuz = unpacked / "boot" / f"vmlinuz-{kver}"
        if not modules.is_dir() or not vmlinuz.exists():
            raise KernelPackageError(f"{deb}: no lib/modules/{kver} or boot/vmlinuz-{kver} inside")
        out = work / "tree"
        (out / "lib" / "modules").mkdir(parents=True)
        modules.rename(out / "lib" / "modules" / kver)
        vmlinuz.rename(out / "vmlinuz")
        system_map = unpacked / "boot" / f"System.map-{kver}"
        depmod: list[str | os.PathLike[str]] = ["depmod", "-b", out]
        if system_map.exists():
            depmod += ["-F", system_map]
        run([*depmod, kver])
        (out / ".complete").write_text(deb.name + "\n")
        if tree.exists():
            shutil.rmtree(tree)
        out.rename(tree)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("kernel: %s ready in %s", kver, tree)
    return _kernel_from_tree(tree, kver)
