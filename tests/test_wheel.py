"""A wheel install works with no source tree.

``pip wheel`` builds bootkit from a copy of the checkout, ``pip install`` puts it into a fresh virtualenv
outside the checkout, and the installed ``bootkit`` command, run from yet another directory, builds an
initramfs (dracut must find bootkit's module in the installed package) and a PXE configuration (templates
from ``grub/`` and ``bootkit/host/pxecfg/templates/``). Also: what the wheel holds, and where an installed
bootkit keeps its cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from boot_fixtures import debian_kernel, need  # noqa: F401 - fixtures
from pxecfg_fixtures import GOLDEN
from testtools import require_tools

from bootkit import __version__
from bootkit.host import kernelpkg, pkgdata
from bootkit.host.cli import COMMANDS
from bootkit.host.kernelpkg import Kernel

Completed = subprocess.CompletedProcess[str]

REPO = Path(__file__).resolve().parent.parent
MODULE = REPO / "dracut-module" / "90bootkit"
GRUB = REPO / "grub"


def git_files(*pathspecs: str) -> list[str]:
    """Files of the checkout as git sees them: tracked and new ones, not the ignored (caches, builds, venvs)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *pathspecs],
                         cwd=REPO, capture_output=True, check=True).stdout.decode()  # fmt: skip
    # a tracked file deleted in the work tree is still listed: it is not part of the source any more
    return sorted({n for n in out.split("\0") if n and os.path.lexists(REPO / n)})


def copy_source(dest: Path) -> Path:
    """The checkout's source files (symlinks kept) in ``dest``.

    The wheel is built from them alone: setuptools builds in the source directory, and a ``build/lib`` left
    by an earlier build (say, a template since moved) would go into the wheel as well.
    """
    for name in git_files():
        src, dst = REPO / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tools("git")
    src = copy_source(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("dist")
    # no build isolation: setuptools (>= 77, a dev dependency) is in this virtualenv, nothing to download
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(src)], capture_output=True, text=True, cwd=src, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (whl,) = out.glob("bootkit-*.whl")
    return whl


def clean_env(**changes: str | None) -> dict[str, str]:
    """This process's environment without what could lead an interpreter back to the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(REPO)))
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@dataclass(frozen=True)
class Installed:
    """bootkit installed from the wheel into a fresh virtualenv; commands run in a directory of their own."""

    venv: Path
    elsewhere: Path

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Completed:
        """``ARGS[0]`` from the virtualenv's bin/ with the rest as arguments."""
        return subprocess.run([str(self.venv / "bin" / args[0]), *args[1:]], cwd=self.elsewhere,
                              env=env if env is not None else clean_env(), capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    top = tmp_path_factory.mktemp("installed")
    assert not top.is_relative_to(REPO)
    venv, elsewhere = top / "venv", top / "work"
    elsewhere.mkdir()
    # the interpreter the project's virtualenv was made from (Debian's python3, as scripts/setup.sh does)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True, env=clean_env(), timeout=120)
    # the dependencies (jinja2, requests, zstandard) come from the package index; pip's cache makes it quick
    proc = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], capture_output=True, text=True,
                          cwd=elsewhere, env=clean_env(), timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return Installed(venv, elsewhere)


def test_wheel_holds_the_data_and_no_test_code(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = {i.filename for i in z.infolist() if not i.is_dir()}
    for f in MODULE.iterdir():
        assert f"bootkit/_data/dracut-module/90bootkit/{f.name}" in names, f
    for f in GRUB.iterdir():
        assert f"bootkit/_data/grub/{f.name}" in names, f
    assert "bootkit/_data/grub/grub.cfg.j2" in names
    for name in ("boot.ipxe.j2", "dnsmasq.conf.j2"):
        assert f"bootkit/host/pxecfg/templates/{name}" in names
    # every module of the package (the package list is found, not written down: a new subpackage goes in)
    for name in git_files("bootkit/*.py"):
        assert name in names, name
    # nothing but the package and its metadata: no tests/, qemu-tests/, bench/, scripts/
    assert {n.split("/")[0] for n in names} == {"bootkit", f"bootkit-{__version__}.dist-info"}
    # the package never reaches for the test harness (the README, in METADATA, may talk about it)
    with zipfile.ZipFile(wheel) as z:
        package = {n: z.read(n) for n in names if n.startswith("bootkit/")}
    assert not [n for n, text in package.items() if b"qemu-tests" in text or b"bkharness" in text]


def test_installed_package_is_not_the_checkout(installed: Installed) -> None:
    code = "import bootkit.host.pkgdata as p; print(p.package_dir()); print(p.source_checkout())"
    proc = installed.run("python", "-c", code)
    assert proc.returncode == 0, proc.stderr
    package, checkout = proc.stdout.splitlines()
    assert Path(package).is_relative_to(installed.venv) and checkout == "None"
    proc = installed.run("bootkit", "--version")
    assert (proc.returncode, proc.stdout) == (0, f"bootkit {__version__}\n")
    # every subcommand's module imports from the installed package
    for command in COMMANDS:
        proc = installed.run("bootkit", command, "--help")
        assert (proc.returncode, proc.stderr) == (0, ""), command


def test_installed_package_caches_in_the_user_cache_dir(installed: Installed, tmp_path: Path) -> None:
    code = "from bootkit.host.kernelpkg import cache_dir; print(cache_dir())"
    cases: list[tuple[dict[str, str | None], Path]] = [
        ({"BOOTKIT_CACHE": str(tmp_path / "explicit")}, tmp_path / "explicit"),
        ({"BOOTKIT_CACHE": None, "XDG_CACHE_HOME": str(tmp_path / "xdg")}, tmp_path / "xdg" / "bootkit"),
        # a relative XDG_CACHE_HOME is invalid (XDG base directory spec): ignored
        ({"BOOTKIT_CACHE": None, "XDG_CACHE_HOME": "rel", "HOME": str(tmp_path)}, tmp_path / ".cache" / "bootkit"),
        ({"BOOTKIT_CACHE": None, "XDG_CACHE_HOME": None, "HOME": str(tmp_path)}, tmp_path / ".cache" / "bootkit"),
    ]
    for changes, expected in cases:
        proc = installed.run("python", "-c", code, env=clean_env(**changes))
        assert (proc.returncode, proc.stdout) == (0, f"{expected}\n"), (changes, proc.stderr)


def test_checkout_caches_in_its_cache_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    from bkharness import paths

    monkeypatch.delenv("BOOTKIT_CACHE", raising=False)
    assert pkgdata.source_checkout() == REPO  # the project's virtualenv runs bootkit from the checkout
    assert kernelpkg.cache_dir() == REPO / "cache"
    assert paths.cache_dir() == REPO / "cache"
    monkeypatch.setenv("BOOTKIT_CACHE", "/somewhere")
    assert kernelpkg.cache_dir() == paths.cache_dir() == Path("/somewhere")


def test_module_copy_sets_the_execute_bits(tmp_path: Path) -> None:
    # an installer may drop the modes of package data; dracut's inst_script would then install a
    # non-executable /sbin/qcow2root
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "hook.sh").write_text("#!/bin/sh\n")
    (src / "sub" / "unit.service").write_text("[Unit]\n")
    (src / "hook.sh").chmod(0o600)
    (src / "sub" / "unit.service").chmod(0o600)
    written = pkgdata.copy_tree(src, tmp_path / "dest")
    assert [(p.relative_to(tmp_path / "dest").as_posix(), p.stat().st_mode & 0o777) for p in written] == [
        ("hook.sh", 0o755),
        ("sub/unit.service", 0o644),
    ]


def test_data_is_read_from_a_zipped_package(wheel: Path, tmp_path: Path) -> None:
    # a pure-Python wheel is importable as a zip: the module's files come out of it through importlib.resources
    code = (
        "import sys; from pathlib import Path; from bootkit.host import initrd; "
        "print(initrd.module_dir()); initrd.install_module(Path(sys.argv[1]))"
    )
    env = clean_env(PYTHONPATH=str(wheel))
    proc = subprocess.run([sys.executable, "-s", "-c", code, str(tmp_path / "m")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(str(wheel))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(p.name for p in MODULE.iterdir())
    assert os.access(tmp_path / "m" / "qcow2root.sh", os.X_OK)


def lsinitrd(image: Path) -> dict[str, str]:
    """Path -> mode string of every entry in the image."""
    need("lsinitrd")
    out = subprocess.run(["lsinitrd", str(image)], capture_output=True, check=True).stdout.decode(errors="replace")
    # the path is the last field, or for a symlink the one before "-> target"
    return {line.split(" -> ")[0].split()[-1]: line.split()[0] for line in out.splitlines()
            if line[:1] in "-dl" and len(line.split()) >= 9}  # fmt: skip


def test_build_initrd_from_the_wheel(installed: Installed, debian_kernel: Kernel) -> None:  # noqa: F811
    need("dracut")
    out = installed.elsewhere / "out" / "initrd.img"
    # default options (every NIC driver, shell init); the kernel is the one in the test session's cache
    env = clean_env(BOOTKIT_CACHE=str(kernelpkg.cache_dir()))
    proc = installed.run("bootkit", "build-initrd", "-o", "out/initrd.img", env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{out}: ") and ", kernel " in proc.stdout
    assert "cannot boot" not in proc.stderr  # every bootkit runtime module was found in site-packages
    entries = lsinitrd(out)
    for path in ("usr/lib/bootkit/bootkit-boot", "usr/lib/bootkit/bootkit/boot/main.py",
                 "usr/lib/bootkit/bootkit/qcow2/image.py", "usr/lib/bootkit/zstandard/__init__.py",
                 "usr/lib/dracut/hooks/cmdline/90-parse-qcow2.sh", "usr/lib/dracut/hooks/pre-mount/10-qcow2-failed.sh",
                 "usr/sbin/qcow2root"):  # fmt: skip
        assert path in entries, path
    # netroot runs it: it must be executable whatever the installed package's modes
    assert entries["usr/sbin/qcow2root"].startswith("-rwx")
    assert not [p for p in entries if "bootkit/host" in p or "jinja2" in p]
    assert any(p.endswith("/e1000e.ko") or p.endswith("/e1000e.ko.xz") for p in entries)


def test_pxe_config_from_the_wheel(installed: Installed) -> None:
    shutil.copy(GOLDEN / "representative.toml", installed.elsewhere)
    proc = installed.run("bootkit", "pxe-config", "representative.toml", "--out", "pxe", "--no-grub-images")
    assert proc.returncode == 0, proc.stderr
    out, expected_dir = installed.elsewhere / "pxe", GOLDEN / "representative"
    produced = {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*") if p.is_file()
                and p.suffix not in (".kpxe", ".efi")}  # fmt: skip
    expected = {p.relative_to(expected_dir).as_posix(): p.read_text() for p in expected_dir.rglob("*") if p.is_file()}
    # the iPXE script, dnsmasq.conf and grub.cfg (from grub/grub.cfg.j2) with its per-machine files
    assert "tftp/boot/grub/grub.cfg" in produced and "tftp/boot.ipxe" in produced
    assert produced == expected
