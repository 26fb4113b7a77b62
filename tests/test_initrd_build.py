"""``bootkit build-initrd``: what goes into the initramfs, its size, and the errors for a missing toolchain.

The images are the session's (tests/boot_fixtures.py), the same ones tests/test_boot_qemu.py boots.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
from boot_fixtures import debian_kernel, initrd_shell, initrd_systemd, need, sh  # noqa: F401 - fixtures

from bootkit.boot.channel import TRUST_FILE
from bootkit.boot.ed25519 import fingerprint, parse_public_key
from bootkit.host import pkgdata
from bootkit.host.initrd import InitrdOptions, InitrdResult, build_initrd, collect_python_files
from bootkit.host.kernelpkg import Kernel, ensure_kernel
from bootkit.host.pxecfg.initramfs import read_member

MB = 1000 * 1000
REPO = Path(__file__).resolve().parent.parent
#: the dracut module as the repository keeps it
MODULE = REPO / "dracut-module" / "90bootkit"

#: NIC drivers a default build must hold, with their buses: the virtual NICs of QEMU/KVM, VMware, Hyper-V and
#: Xen, and a sample of what dracut's kernel-network-modules covers (PCI, and USB NICs behind USB hosts)
DEFAULT_NIC_MODULES = (
    "virtio_net", "virtio_pci", "virtio_mmio", "e1000", "e1000e", "vmxnet3", "hv_netvsc", "hv_vmbus",
    "xen-netfront", "igb", "r8169", "ixgbe", "tg3", "bnx2", "r8152", "cdc_ether", "ax88179_178a",
)  # fmt: skip
#: the buses bootkit's own module adds to every build, trimmed or not
BUS_MODULES = ("virtio_pci", "virtio_mmio", "hv_vmbus", "pci-hyperv", "xhci-pci", "ehci-pci", "ohci-pci",
               "uhci-hcd")  # fmt: skip


def bootkit_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bootkit", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)  # fmt: skip


def contents(image: Path) -> list[str]:
    need("lsinitrd")
    out = subprocess.run(["lsinitrd", str(image)], capture_output=True, check=True).stdout.decode(errors="replace")
    # the path is the last field, or for a symlink the one before "-> target"
    return [line.split(" -> ")[0].split()[-1] for line in out.splitlines()
            if line[:1] in "-dlrwxs" and len(line.split()) >= 9]


def _module_name(path: str) -> str:
    """``kernel/drivers/net/xen-netfront.ko[.xz]`` -> ``xen_netfront`` (modprobe's spelling: - and _ are one)."""
    return path.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_")


def module_closure(kmoddir: Path, names: tuple[str, ...]) -> set[str]:
    """The modules.dep paths of ``names`` and of every module each one needs, however deep."""
    deps: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for line in (kmoddir / "modules.dep").read_text().splitlines():
        path, _, needs = line.partition(":")
        deps[path] = needs.split()
        paths[_module_name(path)] = path
    missing = [n for n in names if _module_name(n) not in paths]
    assert not missing, f"{kmoddir}/modules.dep has no {missing}"
    todo = [paths[_module_name(n)] for n in names]
    found: set[str] = set()
    while todo:
        path = todo.pop()
        if path not in found:
            found.add(path)
            todo += deps[path]
    return found


def kernel_modules(image: Path, kver: str) -> set[str]:
    """The modules in an initramfs, as modules.dep names them (``kernel/...``)."""
    prefix = f"lib/modules/{kver}/"
    return {n.split(prefix, 1)[1] for n in contents(image) if prefix in n and ".ko" in n}


def missing_modules(result: InitrdResult, names: tuple[str, ...]) -> list[str]:
    return sorted(module_closure(result.kmoddir, names) - kernel_modules(result.output, result.kver))


def _build_default(factory: pytest.TempPathFactory, kernel: Kernel, systemd: bool) -> InitrdResult:
    need("dracut")
    out = factory.mktemp("initrd") / ("default-systemd.img" if systemd else "default-shell.img")
    return build_initrd(InitrdOptions(output=out, kver=kernel.kver, kmoddir=kernel.kmoddir, systemd=systemd))


@pytest.fixture(scope="module")
def default_shell(tmp_path_factory: pytest.TempPathFactory, debian_kernel: Kernel) -> InitrdResult:  # noqa: F811
    """``bootkit build-initrd`` with its defaults: every NIC driver, shell flavour."""
    return _build_default(tmp_path_factory, debian_kernel, systemd=False)


@pytest.fixture(scope="module")
def default_systemd(tmp_path_factory: pytest.TempPathFactory, debian_kernel: Kernel) -> InitrdResult:  # noqa: F811
    """``bootkit build-initrd --systemd`` with its defaults: every NIC driver."""
    return _build_default(tmp_path_factory, debian_kernel, systemd=True)


def test_module_is_shellcheck_clean() -> None:
    need("shellcheck")
    scripts = sorted(str(p) for p in MODULE.iterdir() if p.suffix == ".sh")
    # everything else in the module is a unit file: the test command shellchecks the whole directory
    assert {p.suffix for p in MODULE.iterdir()} == {".sh", ".service"}
    assert len(scripts) >= 5
    proc = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_module_files_are_executable() -> None:
    for name in ("module-setup.sh", "parse-qcow2.sh", "qcow2root.sh", "bootkit-generator.sh", "qcow2-failed.sh"):
        assert os.access(MODULE / name, os.X_OK), name


def test_python_files_are_the_runtime_only() -> None:
    files = collect_python_files()
    assert files.missing == []
    stdlib = {str(f) for f in files.stdlib}
    boot = {f.relative_to(pkgdata.package_dir().parent).as_posix() for f in files.bootkit}
    for needed in ("bootkit/boot/main.py", "bootkit/nbd/kernel.py", "bootkit/qcow2/image.py",
                   "bootkit/fetch/download.py", "bootkit/fetch/http1.py", "bootkit/errors.py",
                   "bootkit/boot/efiboot.py"):  # fmt: skip
        assert needed in boot
    assert not [f for f in boot if f.startswith(("bootkit/host/cli", "bootkit/host/pxecfg")) or "initrd" in f]
    assert not [f for f in stdlib if "jinja2" in f or "requests" in f or "site-packages" in f]
    # pathlib: the UEFI boot-NIC helper's, which runs as a process of its own (preload.OWN_PROCESS); ssl: imported
    # at boot only for HTTPS, but always in the image
    for needed in ("ssl.py", "json/__init__.py", "encodings/idna.py", "pathlib.py"):
        assert any(f.endswith("/python3.11/" + needed) for f in stdlib), needed
    assert any("lib-dynload/_ssl." in f for f in stdlib)
    # bootkit speaks HTTP itself (bootkit.fetch.http1): http.client and its email package stay out
    assert not any(f.endswith(("/http/client.py", "/email/parser.py")) for f in stdlib)
    assert not any(f.endswith("/tkinter/__init__.py") or "/unittest/" in f for f in stdlib)
    assert (files.zstandard / "__init__.py").exists()


#: what dracut's vlan= and bond= need from the kernel (8021q pulls garp, mrp, stp, llc)
NETWORK_STACK_MODULES = ("8021q", "bonding")


def test_trimmed_shell_initramfs(initrd_shell: InitrdResult) -> None:  # noqa: F811
    names = contents(initrd_shell.output)
    joined = "\n".join(names)
    for ko in ("nbd", "overlay", "ext4", "xfs", "btrfs", "vfat", "squashfs", "erofs", "virtio_net", "virtio_pci"):
        assert f"/{ko}.ko" in joined, ko
    assert "/e1000.ko" not in joined and "/e1000e.ko" not in joined
    # virtio_net's transport and the other buses come from bootkit's module even when the drivers are trimmed
    assert missing_modules(initrd_shell, ("virtio_net", *BUS_MODULES)) == []
    # vlan= and bond= (pxe-config's vlan and bond keys) even though --drivers shadows kernel-network-modules
    assert missing_modules(initrd_shell, NETWORK_STACK_MODULES) == []
    for path in ("usr/bin/python3.11", "usr/lib/bootkit/bootkit-boot", "usr/lib/bootkit/bootkit/boot/main.py",
                 "usr/lib/bootkit/zstandard/__init__.py", "usr/sbin/qcow2root", "usr/sbin/dhclient",
                 "usr/lib/bootkit/bootkit-start", "usr/sbin/ifup", "usr/lib/bootkit/ifup", "usr/bin/flock",
                 "/libdeflate.so.0", "/libzstd.so.1", "usr/lib/bootkit/bootkit-halt", "usr/sbin/poweroff",
                 "usr/sbin/reboot", "usr/sbin/halt"):  # fmt: skip
        assert any(n.endswith(path) or n == path for n in names), path
    assert not [n for n in names if "jinja2" in n or "requests" in n or "bootkit/host/cli" in n]
    assert not any("systemd-networkd" in n for n in names)  # the shell flavour names network-legacy
    assert initrd_shell.size <= 30 * MB, initrd_shell.size


def test_trimmed_systemd_initramfs(initrd_systemd: InitrdResult) -> None:  # noqa: F811
    names = contents(initrd_systemd.output)
    for path in ("bootkit-root.service", "system-generators/bootkit-generator", "systemd-networkd",
                 "system-generators/bootkit-top-generator", "system-generators/bootkit-lease-generator",
                 "usr/lib/bootkit/bootkit/boot/main.py"):  # fmt: skip
        assert any(n.endswith(path) for n in names), path
    assert not any(n.endswith("sbin/qcow2root") for n in names)
    assert missing_modules(initrd_systemd, NETWORK_STACK_MODULES) == []
    assert initrd_systemd.size <= 30 * MB, initrd_systemd.size


def test_default_shell_initramfs_has_every_nic_and_its_bus(default_shell: InitrdResult) -> None:
    """The default build boots a VM with any common virtual NIC: each driver with every module it needs
    (modules.dep of the kernel built for) and the bus it sits on (virtio_net without virtio_pci: no eth0)."""
    assert default_shell.drivers is None
    assert missing_modules(default_shell, (*DEFAULT_NIC_MODULES, *BUS_MODULES)) == []
    assert any(n.endswith("usr/sbin/poweroff") for n in contents(default_shell.output))


def test_default_systemd_initramfs_has_every_nic_and_its_bus(default_systemd: InitrdResult) -> None:
    assert default_systemd.drivers is None
    assert missing_modules(default_systemd, (*DEFAULT_NIC_MODULES, *BUS_MODULES)) == []
    # systemd's own poweroff is there: bootkit's stand-in is for the shell flavour only
    assert not any(n.endswith("bootkit/bootkit-halt") for n in contents(default_systemd.output))


def test_kernel_cache_is_idempotent(debian_kernel: Kernel) -> None:  # noqa: F811
    again = ensure_kernel(debian_kernel.kver)
    assert again == debian_kernel
    assert again.vmlinuz.exists()
    assert (again.kmoddir / "modules.dep").exists()
    assert again.kmoddir.parts[-3:] == ("lib", "modules", again.kver)


def test_cli_builds_and_prints_the_size(tmp_path: Path, debian_kernel: Kernel) -> None:  # noqa: F811
    need("dracut", "openssl")
    out = tmp_path / "cli.img"
    # two channel keys (rotation), as openssl writes a public key and as a base64 line
    keys = []
    for name in ("a", "b"):
        sh("openssl", "genpkey", "-algorithm", "ed25519", "-out", tmp_path / f"{name}.key")
        sh("openssl", "pkey", "-in", tmp_path / f"{name}.key", "-pubout", "-out", tmp_path / f"{name}.pub")
        keys.append(parse_public_key((tmp_path / f"{name}.pub").read_text(), name))
    (tmp_path / "b.b64").write_text(base64.b64encode(keys[1]).decode() + "\n")
    proc = bootkit_cli("build-initrd", "-o", str(out), "--kver", debian_kernel.kver, "--kmoddir",
                       str(debian_kernel.kmoddir), "--drivers", "virtio_net", "--dracut-arg=--no-compress",
                       "--trust-key", str(tmp_path / "a.pub"), "--trust-key", str(tmp_path / "b.b64"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    size = out.stat().st_size
    assert proc.stdout.startswith(f"{out}: ")
    assert f"({size} bytes), kernel {debian_kernel.kver}" in proc.stdout
    assert f"trusted from keys {fingerprint(keys[0])}, {fingerprint(keys[1])}\n" in proc.stdout
    with out.open("rb") as f:
        installed = read_member(f.read, TRUST_FILE, what="initramfs")
    assert installed == "".join(f"{base64.b64encode(k).decode()}\n" for k in keys).encode()


def test_cli_errors(tmp_path: Path, debian_kernel: Kernel) -> None:  # noqa: F811
    proc = bootkit_cli("build-initrd", "-o", str(tmp_path / "x.img"), "--drivers", "nosuch_nic",
                       "--kmoddir", str(debian_kernel.kmoddir))  # fmt: skip
    assert (proc.returncode, proc.stderr.strip()) == (2, f"error: --drivers: no kernel module 'nosuch_nic' in "
                                                         f"{debian_kernel.kmoddir}")  # fmt: skip
    proc = bootkit_cli("build-initrd", "-o", str(tmp_path / "x.img"), "--kmoddir", str(tmp_path))
    assert proc.returncode == 2
    expected = f"error: --kmoddir {tmp_path}: must be a directory named .../lib/modules/{tmp_path.name}"
    assert proc.stderr.strip() == expected
    proc = bootkit_cli("build-initrd", "-o", str(tmp_path / "x.img"), "--systemd", "--no-systemd")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
    # no dracut on PATH: one line naming the package
    env = dict(os.environ, PATH=str(tmp_path))
    proc = bootkit_cli("build-initrd", "-o", str(tmp_path / "x.img"), env=env)
    assert (proc.returncode, proc.stderr) == (1, "error: dracut not found: install the Debian package 'dracut-core'\n")
    assert not (tmp_path / "x.img").exists()
