"""``bootkit build-initrd``: an initramfs that boots a root filesystem from a QCOW2 image over HTTP.

dracut builds it with bootkit's module (``dracut-module/90bootkit``, package data of the installed
bootkit: :mod:`bootkit.host.pkgdata`), without copying anything into the system's dracut directory and
isolated from the host's dracut configuration (docs/initramfs.md):

* ``dracutbasedir`` points at a temporary symlink farm of ``/usr/lib/dracut`` whose ``modules.d`` also holds
  a copy of our module, and, when the NIC drivers are trimmed, our own ``90kernel-network-modules`` shadowing the
  stock one (which installs every NIC driver with ``--no-hostonly``); either way the buses NICs sit on
  (virtio, Hyper-V's VMBus, USB host controllers) come from our module's ``installkernel``;
* ``--conf /dev/null --confdir <empty>``: dracut-network's ``11-ifcfg.conf`` and the like stay out;
* the network handler is named (network-legacy or systemd-networkd): left alone, dracut on Debian 12 picks
  systemd-networkd even for a shell initramfs.

Python goes in with just the standard library files the runtime imports: this module runs the host's
``python3`` on :func:`bootkit.boot.preload.preload` and lists ``sys.modules``; the dracut module installs the
files and resolves the C extensions' libraries itself (dracut does not follow files it did not install).

Host side only.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath

from bootkit.boot.cmdline import CONTRACT_FILE, contract_info
from bootkit.errors import BootkitError, UsageError
from bootkit.host import pkgdata
from bootkit.log import human_size, log
from bootkit.run import run

DRACUT_DIR = Path("/usr/lib/dracut")
#: the interpreter that goes into the initramfs (Debian's; the venv's python is the same binary)
PYTHON = "/usr/bin/python3"

#: dracut modules of each flavour; the network handler is always named (see the module docstring)
SHELL_MODULES = ("base", "bash", "udev-rules", "network-legacy", "bootkit")
SYSTEMD_MODULES = (
    "base",
    "bash",
    "systemd",
    "systemd-initrd",
    "dracut-systemd",
    "udev-rules",
    "systemd-networkd",
    "bootkit",
)


class InitrdError(BootkitError):
    """The initramfs could not be built."""


@dataclass(frozen=True)
class InitrdOptions:
    """What ``bootkit build-initrd`` was asked for."""

    output: Path
    kver: str | None = None
    kmoddir: Path | None = None
    systemd: bool = False
    #: NIC drivers to include; None = every network driver (real clients have all kinds of NICs)
    drivers: tuple[str, ...] | None = None
    dracut_args: tuple[str, ...] = ()
    #: ``--trust-key``: raw Ed25519 public keys whose signed channels the initramfs boots (root=qcow2:channel:)
    trust_keys: tuple[bytes, ...] = ()
    #: the kernel signed by Debian (shim's chain under Secure Boot): the signed package, or a check of the vmlinuz
    signed_kernel: bool = False


@dataclass(frozen=True)
class InitrdResult:
    output: Path
    size: int
    kver: str
    kmoddir: Path
    #: the kernel image matching the modules, when bootkit fetched the kernel package itself
    vmlinuz: Path | None
    systemd: bool
    drivers: tuple[str, ...] | None
    #: bootkit runtime modules that could not be imported (the image cannot boot while this is not empty)
    missing_modules: tuple[str, ...]
    #: the Ed25519 keys installed for signed channels (``--trust-key``)
    trust_keys: tuple[bytes, ...] = ()


def module_dir() -> Traversable:
    """bootkit's dracut module: the package's copy of ``dracut-module/90bootkit``."""
    return pkgdata.data("dracut-module", "90bootkit")


def install_module(dest: Path) -> Path:
    """A copy of the dracut module at ``dest``, a real directory whatever holds the package.

    A copy, not a symlink to the package: dracut's ``inst_script`` keeps the mode of the file it installs
    (``/sbin/qcow2root`` and the systemd generator must be executable), and an installer may not keep the
    execute bits of package data; :func:`bootkit.host.pkgdata.copy_tree` sets them.
    """
    source = module_dir()
    if not source.joinpath("module-setup.sh").is_file():
        raise InitrdError(f"bootkit's dracut module is missing from the package ({source}): reinstall bootkit")
    pkgdata.copy_tree(source, dest)
    return dest


def check_tools() -> None:
    """One clear line naming the package to install when a build dependency is missing."""
    if shutil.which("dracut") is None or not (DRACUT_DIR / "modules.d").is_dir():
        raise InitrdError("dracut not found: install the Debian package 'dracut-core'")
    if not (DRACUT_DIR / "modules.d" / "35network-legacy").is_dir():
        raise InitrdError("dracut's network modules not found: install the Debian package 'dracut-network'")
    if not os.access(PYTHON, os.X_OK):
        raise InitrdError(f"{PYTHON} not found: install the Debian package 'python3'")
    if shutil.which("dhclient") is None:
        raise InitrdError("dhclient not found (network-legacy needs it): install 'isc-dhcp-client'")


def resolve_kernel(
    kver: str | None, kmoddir: Path | None, *, signed: bool = False
) -> tuple[str, Path, Path | None]:
    """(kver, kmoddir, vmlinuz or None) for the options; fetches the Debian kernel when none is named.

    ``signed``: fetch Debian's signed kernel package, or check that the given kernel's vmlinuz is signed.
    """
    from bootkit.host import kernelpkg

    if kmoddir is not None:
        kmoddir = kmoddir.resolve()
        kver = kver or kmoddir.name
        if kmoddir.name != kver or kmoddir.parent.name != "modules" or kmoddir.parent.parent.name != "lib":
            # dracut itself refuses it (docs/initramfs.md, "A kernel without installing it"): say so first
            raise UsageError(f"--kmoddir {kmoddir}: must be a directory named .../lib/modules/{kver}")
        vmlinuz: Path | None = kmoddir.parent.parent.parent / "vmlinuz"
    elif kver is not None and (Path("/lib/modules") / kver / "kernel").is_dir():
        kmoddir, vmlinuz = Path("/lib/modules") / kver, Path(f"/boot/vmlinuz-{kver}")
    else:
        flavour = kernelpkg.Flavour.signed if signed else kernelpkg.Flavour.unsigned
        kernel = kernelpkg.ensure_kernel(kver, flavour=flavour)
        kver, kmoddir, vmlinuz = kernel.kver, kernel.kmoddir, kernel.vmlinuz
    if not (kmoddir / "kernel").is_dir():
        raise InitrdError(
            f"no kernel modules in {kmoddir}: install the Debian package 'linux-image-{kver}' "
            "or pass --kmoddir"
        )
    if not (kmoddir / "modules.dep").exists():
        raise InitrdError(f"{kmoddir}: no modules.dep: run 'depmod -b <root> {kver}' first")
    if vmlinuz is not None and not vmlinuz.exists():
        vmlinuz = None
    if signed:
        if vmlinuz is None:
            raise InitrdError(f"--signed-kernel: no vmlinuz next to {kmoddir} to check the signature of")
        kernelpkg.check_signed(vmlinuz)
    return kver, kmoddir, vmlinuz


# Runs in the target interpreter: import what the initramfs runtime imports, report the files behind it.
_COLLECT = textwrap.dedent(
    """
    import json, sys
    sys.path[:0] = json.loads(sys.argv[1])
    import importlib
    from bootkit.boot.preload import OWN_PROCESS, preload
    missing = preload(strict=False)
    for name in OWN_PROCESS:
        importlib.import_module(name)
    files = sorted({m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)})
    stdlib = sys.prefix + "/lib/python%d.%d" % sys.version_info[:2]
    print(json.dumps({"missing": missing, "files": files, "stdlib": stdlib}))
    """
)


@dataclass(frozen=True)
class _PythonFiles:
    stdlib: list[Path]
    bootkit: list[Path]
    zstandard: Path
    missing: list[str]


def collect_python_files() -> _PythonFiles:
    """The stdlib, bootkit and zstandard files that the runtime imports, asked from the target interpreter."""
    try:
        import zstandard
    except ImportError as e:
        raise InitrdError("zstandard not importable: pip install zstandard (a bootkit dependency)") from e
    zstd_dir = Path(zstandard.__file__).resolve().parent
    # the sys.path entry this bootkit is imported from: a source checkout or site-packages
    package = pkgdata.package_dir()
    paths = [str(package.parent), str(zstd_dir.parent)]
    # -s -E: neither the user's site directory nor PYTHONPATH may decide what goes into the image
    proc = run([PYTHON, "-s", "-E", "-c", _COLLECT, json.dumps(paths)], capture=True)
    report = json.loads(proc.stdout)
    stdlib_dir = Path(report["stdlib"])
    stdlib: list[Path] = []
    bootkit: list[Path] = []
    for name in report["files"]:
        f = Path(name)
        if f.is_relative_to(package):
            bootkit.append(f)
        elif f.is_relative_to(stdlib_dir) and not {"site-packages", "dist-packages"} & set(f.parts):
            stdlib.append(f)
    # codecs are looked up by name at run time (an HTTP header, a hostname): all of the pure-Python ones
    stdlib += sorted((stdlib_dir / "encodings").glob("*.py"))
    with_pyc: set[Path] = set()
    for f in stdlib:
        with_pyc.add(f)
        if f.suffix == ".py":
            pyc = f.parent / "__pycache__" / f"{f.stem}.{sys.implementation.cache_tag}.pyc"
            if pyc.exists():
                with_pyc.add(pyc)
    missing = [m for m in report["missing"] if m.startswith("bootkit")]
    return _PythonFiles(sorted(with_pyc), sorted(set(bootkit)), zstd_dir, missing)


def _stage_python(stage: Path) -> list[str]:
    files = collect_python_files()
    (stage / "stdlib.list").write_text("".join(f"{f}\n" for f in files.stdlib))
    site = stage / "site"
    package_parent = pkgdata.package_dir().parent
    for f in files.bootkit:
        dest = site / f.relative_to(package_parent)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
    # what this initramfs understands on the kernel command line, for `pxe-config --check`
    contract = site / PurePosixPath(CONTRACT_FILE).relative_to("usr/lib/bootkit")
    contract.write_text(json.dumps(contract_info(), indent=1) + "\n")
    zdest = site / "zstandard"
    zdest.mkdir(parents=True)
    shutil.copy2(files.zstandard / "__init__.py", zdest)
    for so in files.zstandard.glob("backend_c*.so"):
        shutil.copy2(so, zdest)
    # compile once here, not at every boot under an emulated CPU
    run([PYTHON, "-s", "-E", "-m", "compileall", "-q", "-j", "0", site])
    return files.missing


def read_trust_key(path: Path) -> bytes:
    """``--trust-key FILE``: the raw key of a PEM ``PUBLIC KEY`` file or a file holding the base64 raw key."""
    from bootkit.boot.ed25519 import BadKey, parse_public_key

    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--trust-key {path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        return parse_public_key(text, f"--trust-key {path}")
    except BadKey as e:
        raise UsageError(str(e)) from None


def install_trust_keys(site: Path, keys: tuple[bytes, ...]) -> Path:
    """Write ``keys`` where the initramfs reads them (``bootkit.boot.channel.TRUST_FILE``), one a line."""
    from bootkit.boot.channel import TRUST_FILE
    from bootkit.boot.ed25519 import key_text

    path = site / PurePosixPath(TRUST_FILE).relative_to("usr/lib/bootkit")
    path.write_text("".join(f"{key_text(k)}\n" for k in dict.fromkeys(keys)))
    return path


def link_dracut_tree(work: Path) -> Path:
    """``work/dracutbase``: a symlink farm of dracut's own tree, to be given as ``dracutbasedir``, in which
    modules can be added or shadowed (:func:`shadow_module`) without touching /usr/lib/dracut."""
    base = work / "dracutbase"
    mods = base / "modules.d"
    mods.mkdir(parents=True)
    for f in DRACUT_DIR.iterdir():
        if f.name != "modules.d":
            (base / f.name).symlink_to(f)
    for m in (DRACUT_DIR / "modules.d").iterdir():
        (mods / m.name).symlink_to(m)
    return base


def shadow_module(base: Path, directory: Path) -> None:
    """Make ``directory`` the dracut module of its name in the farm ``base`` (replacing the stock one)."""
    link = base / "modules.d" / directory.name
    link.unlink()
    link.symlink_to(directory)


def _dracutbase(work: Path, drivers: tuple[str, ...] | None) -> Path:
    """The symlink farm dracut uses as ``dracutbasedir`` (docs/initramfs.md)."""
    base = link_dracut_tree(work)
    mods = base / "modules.d"
    install_module(mods / "90bootkit")
    if drivers is not None:
        own = work / "modules" / "90kernel-network-modules"
        own.mkdir(parents=True)
        # the buses they sit on (virtio_pci for virtio_net, ...) come with bootkit's own module, as in a default build
        names = list(dict.fromkeys(drivers))
        (own / "module-setup.sh").write_text(
            "#!/bin/bash\n"
            "# bootkit build-initrd --drivers: only the named NIC drivers (shadows the stock module)\n"
            "check() { return 255; }\n"
            "depends() { return 0; }\n"
            f"installkernel() {{ hostonly='' instmods {' '.join(names)} af_packet; }}\n"
            "install() { return 0; }\n"
        )
        shadow_module(base, own)
    return base


def dracut_command(opts: InitrdOptions, kver: str, kmoddir: Path, confdir: Path, output: Path) -> list[str]:
    modules = SYSTEMD_MODULES if opts.systemd else SHELL_MODULES
    return [
        "dracut",
        "--conf", "/dev/null",
        "--confdir", str(confdir),
        "--no-hostonly",
        "--no-early-microcode",
        "--kver", kver,
        "--kmoddir", str(kmoddir),
        "--modules", " ".join(modules),
        "--zstd",
        "--force",
        *opts.dracut_args,
        str(output),
    ]  # fmt: skip


def build_initrd(opts: InitrdOptions) -> InitrdResult:
    """Build the initramfs described by ``opts``; see the module docstring."""
    check_tools()
    if opts.drivers is not None and not opts.drivers:
        raise UsageError("--drivers: name at least one network driver (e.g. virtio_net)")
    kver, kmoddir, vmlinuz = resolve_kernel(opts.kver, opts.kmoddir, signed=opts.signed_kernel)
    if opts.drivers is not None:
        for drv in opts.drivers:
            found = run(["modinfo", "-k", kver, "-b", kmoddir.parent.parent.parent, "-F", "filename", drv],
                        check=False, capture=True)
            if found.returncode != 0:
                raise UsageError(f"--drivers: no kernel module '{drv}' in {kmoddir}")
    output = opts.output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bootkit-initrd.") as tmp:
        work = Path(tmp)
        stage = work / "stage"
        stage.mkdir()
        missing = _stage_python(stage)
        if opts.trust_keys:
            install_trust_keys(stage / "site", opts.trust_keys)
        if missing:
            log.warning("build-initrd: bootkit modules not available yet, the image cannot boot: %s",
                        ", ".join(missing))
        confdir = work / "emptyconf"
        confdir.mkdir()
        env = dict(os.environ, dracutbasedir=str(_dracutbase(work, opts.drivers)), BOOTKIT_STAGE=str(stage))
        # dracut writes next to the output and renames: a failed build leaves no half image behind
        partial = output.with_name(f".{output.name}.partial")
        log.info("build-initrd: dracut for kernel %s (%s, %s)", kver,
                 "systemd" if opts.systemd else "shell init",
                 "all NIC drivers" if opts.drivers is None else "NIC drivers " + ",".join(opts.drivers))
        try:
            run(dracut_command(opts, kver, kmoddir, confdir, partial), env=env, timeout=1800)
        except BootkitError as e:
            partial.unlink(missing_ok=True)
            raise InitrdError(f"dracut failed: {e}") from e
        os.replace(partial, output)
    size = output.stat().st_size
    return InitrdResult(
        output=output,
        size=size,
        kver=kver,
        kmoddir=kmoddir,
        vmlinuz=vmlinuz,
        systemd=opts.systemd,
        drivers=opts.drivers,
        missing_modules=tuple(missing),
        trust_keys=tuple(dict.fromkeys(opts.trust_keys)),
    )


def describe(result: InitrdResult) -> str:
    """The one result line ``bootkit build-initrd`` prints."""
    return (
        f"{result.output}: {human_size(result.size)} ({result.size} bytes), kernel {result.kver}"
        + (f", vmlinuz {result.vmlinuz}" if result.vmlinuz else "")
    )

