"""A Debian kernel for netboot images, without installing it on the host.

``apt-get download`` fetches the current bookworm ``linux-image-6.1.*-amd64-unsigned`` package into a cache
directory, ``dpkg-deb -x`` unpacks it, and ``depmod -b`` writes the ``modules.dep*`` files the package does
not ship. The result is a tree dracut accepts as ``--kmoddir``: it checks that the directory is
``…/lib/modules/<kver>`` (docs/initramfs.md, "A kernel without installing it").

The signed flavour (:attr:`Flavour.signed`) takes Debian's ``linux-image-6.1.*-amd64`` instead: the same
kernel and modules, with the ``vmlinuz`` carrying Debian's Authenticode signature, which shim and Debian's
signed GRUB check under Secure Boot (docs/secure-boot.md, "Debian's signed chain"). Its signature is checked
with ``sbverify --list`` once, when the package is unpacked. The unsigned package stays the default: it is what
every cached tree and test already use, and a machine without Secure Boot gains nothing from the signature.

Cache layout (under :func:`cache_dir`)::

    kernel/<package>_<version>.deb
    kernel/<kver>/vmlinuz
    kernel/<kver>/lib/modules/<kver>/...      (depmod'ed)
    kernel/<kver>/.complete                   (written last: the tree is usable)
    kernel/signed/...                         (the same for the signed package)

Host side only.
"""

from __future__ import annotations

import enum
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


class KernelPackageError(BootkitError):
    """The kernel package could not be found, downloaded or unpacked."""


class Flavour(enum.StrEnum):
    """Which Debian package of the plain (not cloud, not rt) x86-64 kernel: both hold the vmlinuz and modules."""

    #: ``linux-image-<kver>-unsigned``: the kernel as built
    unsigned = "unsigned"
    #: ``linux-image-<kver>``: the same, the vmlinuz signed by Debian's Secure Boot key (shim trusts it)
    signed = "signed"

    def package(self, kver: str) -> str:
        return f"linux-image-{kver}-unsigned" if self is Flavour.unsigned else f"linux-image-{kver}"

    @property
    def package_re(self) -> re.Pattern[str]:
        suffix = "-unsigned" if self is Flavour.unsigned else ""
        return re.compile(rf"^linux-image-(6\.1\.\d+-\d+-amd64){suffix}$")

    @property
    def apt_search(self) -> str:
        """The ``apt-cache search --names-only`` expression of this flavour's packages."""
        suffix = "-unsigned" if self is Flavour.unsigned else ""
        return rf"^linux-image-6\.1\.[0-9.-]*-amd64{suffix}$"

    def cache_subdir(self, cache: Path) -> Path:
        """Where this flavour's packages and trees live: unsigned ones where they always did."""
        base = cache / "kernel"
        return base if self is Flavour.unsigned else base / "signed"


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


def cached_kernels(cache: Path | None = None, flavour: Flavour = Flavour.unsigned) -> list[Kernel]:
    """Unpacked kernels of ``flavour`` already in the cache, newest ABI first."""
    base = flavour.cache_subdir(cache or cache_dir())
    found = [_kernel_from_tree(d, d.name) for d in base.glob("6.1.*") if (d / ".complete").exists()]
    return sorted(found, key=lambda k: _abi_key(k.kver), reverse=True)


def _abi_key(kver: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", kver))


def latest_package(flavour: Flavour = Flavour.unsigned) -> str:
    """The newest ``linux-image-6.1.0-N-amd64[-unsigned]`` apt can download (it must have a candidate)."""
    out = run(["apt-cache", "search", "--names-only", flavour.apt_search], capture=True).stdout.decode()
    names = [line.split(" ", 1)[0] for line in out.splitlines()]
    names = [n for n in names if flavour.package_re.match(n)]
    for name in sorted(names, key=lambda n: _abi_key(n), reverse=True):
        policy = run(["apt-cache", "policy", name], capture=True).stdout.decode()
        if re.search(r"Candidate: (?!\(none\))", policy):
            return name
    raise KernelPackageError(
        f"no {flavour.package('6.1.*-amd64')} package known to apt: run 'apt-get update' "
        "(Debian bookworm main must be in the apt sources)"
    )


def signature_signers(image: Path) -> tuple[str, ...]:
    """The subjects of the certificates that signed the EFI ``image`` (``sbverify --list``); () when unsigned.

    Only lists: whether a signer is trusted is for the firmware and shim to decide. Needs ``sbsigntool``.
    """
    if shutil.which("sbverify") is None:
        raise KernelPackageError("sbverify not found: install the Debian package 'sbsigntool'")
    # sbverify exits 1 for an image without signature table ("No signature table present"): that is an answer
    out = run(["sbverify", "--list", image], capture=True, check=False).stdout.decode(errors="replace")
    return tuple(m.group(1).strip() for m in re.finditer(r"^\s*-\s*subject:\s*(.+)$", out, re.MULTILINE))


def check_signed(vmlinuz: Path) -> tuple[str, ...]:
    """The signers of a kernel that must be signed; :class:`KernelPackageError` naming the file when it is not."""
    signers = signature_signers(vmlinuz)
    if not signers:
        raise KernelPackageError(
            f"{vmlinuz}: no Authenticode signature (sbverify --list): shim and Debian's signed GRUB would refuse it"
        )
    return signers


def ensure_kernel(
    kver: str | None = None, *, cache: Path | None = None, flavour: Flavour = Flavour.unsigned
) -> Kernel:
    """Return an unpacked, depmod'ed kernel, downloading it first if the cache does not have it.

    ``kver`` (e.g. ``6.1.0-56-amd64``) pins the version; without it a cached kernel is reused if there is
    one, else the newest package apt knows is fetched. ``flavour`` picks the unsigned or the signed package;
    a signed kernel's signature is checked when it is unpacked. Idempotent; a cache hit runs no command.
    """
    base = flavour.cache_subdir(cache or cache_dir())
    if kver is None:
        have = cached_kernels(cache, flavour)
        if have:
            return have[0]
        package = latest_package(flavour)
        m = flavour.package_re.match(package)
        assert m is not None
        kver = m.group(1)
    else:
        package = flavour.package(kver)
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
        if flavour is Flavour.signed:
            signers = check_signed(vmlinuz)
            log.info("kernel: vmlinuz-%s signed by %s", kver, "; ".join(signers))
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
