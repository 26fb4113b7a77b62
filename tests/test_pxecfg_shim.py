"""pxe-config's ``[dhcp] loader = "shim"``: Debian's signed chain laid out in the TFTP tree (pxecfg/shim.py).

Real files only: Debian's installed shim-signed and grub-efi-amd64-signed, the kernel packages from bootkit's
kernel cache (signed and unsigned flavour of the same build), sbverify, dnsmasq --test. The boot itself is
qemu-tests/test_shim.py.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from pxecfg_fixtures import run_cli
from testtools import require_tools

from bootkit.errors import ConfigError
from bootkit.host import kernelpkg
from bootkit.host.pxecfg import shim
from bootkit.host.pxecfg.load import load_file
from bootkit.run import run

DESCRIPTION = """\
base_url = "http://10.0.2.2:8080/"
docroot = "www"
timeout = 0
default = "b"

[[entry]]
name = "a"
kernel = "vmlinuz"
initrd = "initrd.img"
image = "disk.qcow2"

[[entry]]
name = "b"
kernel = "vmlinuz"
initrd = "initrd.img"
image = "disk.qcow2"
{extra}
[[machine]]
mac = "52:54:00:12:34:56"
name = "node1"
default = "a"

[[machine]]
mac = "52:54:00:ab:cd:ef"

[dhcp]
subnet = "10.0.2.0"
loader = "shim"
"""


@pytest.fixture(scope="module")
def kernels() -> tuple[kernelpkg.Kernel, kernelpkg.Kernel]:
    """(signed, unsigned) Debian kernel of the same build, from the kernel cache (downloaded if missing)."""
    require_tools("sbverify", "apt-get", "dpkg-deb")
    for path, _, package in shim.DEBIAN.packages():
        if not path.is_file():
            pytest.skip(f"{path} missing (package {package}; scripts/setup.sh installs it)")
    unsigned = kernelpkg.ensure_kernel()
    return kernelpkg.ensure_kernel(unsigned.kver, flavour=kernelpkg.Flavour.signed), unsigned


def _site(tmp_path: Path, vmlinuz: Path, extra: str = "") -> Path:
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    for name, data in (("initrd.img", b"initramfs\n"), ("disk.qcow2", b"disk\n")):
        (www / name).write_bytes(data)
    if (www / "vmlinuz").exists():
        (www / "vmlinuz").unlink()
    os.link(vmlinuz, www / "vmlinuz")
    toml = tmp_path / "pxe.toml"
    toml.write_text(DESCRIPTION.format(extra=extra))
    return toml


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_shim_signed_grub_and_one_grub_cfg_with_a_branch_per_machine(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, kernels: tuple[kernelpkg.Kernel, kernelpkg.Kernel]
) -> None:
    signed, _ = kernels
    toml = _site(tmp_path, signed.vmlinuz)
    out = tmp_path / "out"
    status, _, err = run_cli(capsys, "pxe-config", str(toml), "--out", str(out), "--no-grub-images")
    assert status == 0, err
    tftp = out / "tftp"
    # shim is the boot file; the signed network GRUB sits next to it under the name shim fetches
    assert _sha(tftp / "shimx64.efi") == _sha(shim.DEBIAN.shim)
    assert _sha(tftp / "grubx64.efi") == _sha(shim.DEBIAN.grub)
    for name in ("a", "b"):
        assert _sha(tftp / "grub" / "entries" / name / "vmlinuz") == _sha(signed.vmlinuz)
        assert (tftp / "grub" / "entries" / name / "initrd").read_bytes() == b"initramfs\n"
    cfg = (tftp / "grub" / "grub.cfg").read_text()
    # one file, machines first (compared as text with the validated MACs), then every other machine
    first = cfg.index('if [ "${net_default_mac}" = "52:54:00:12:34:56" ]; then')
    second = cfg.index('elif [ "${net_default_mac}" = "52:54:00:ab:cd:ef" ]; then')
    other = cfg.index("\nelse\n")
    assert first < second < other < cfg.index("\nfi\n")
    assert "set default=a" in cfg[first:second]
    assert "set default=b" in cfg[second:other] and "set default=b" in cfg[other:]
    # kernel and initramfs from the TFTP server GRUB was loaded from: the signed GRUB has no http module
    assert "linux /grub/entries/a/vmlinuz root=qcow2:http://10.0.2.2:8080/disk.qcow2 " in cfg
    assert "initrd /grub/entries/b/initrd\n" in cfg
    assert "(http," not in cfg and "insmod" not in cfg
    # no per-MAC file under the signed GRUB's prefix: it never reads one (boot/grub keeps BIOS GRUB's own)
    assert not list((tftp / "grub").glob("grub.cfg-01-*"))
    conf = out / "dnsmasq.conf"
    text = conf.read_text()
    assert 'pxe-service=X86-64_EFI,"bootkit",shimx64.efi\n' in text
    assert 'pxe-service=BC_EFI,"bootkit",shimx64.efi\n' in text
    # BIOS has no Secure Boot: GRUB's own netboot image, as with loader = "grub"
    assert 'pxe-service=x86PC,"bootkit",boot/grub/i386-pc/core.0\n' in text
    require_tools("dnsmasq")
    run(["dnsmasq", "--test", f"--conf-file={conf}"], capture=True)


def test_the_signed_grub_reads_grub_cfg_under_the_prefix_grub() -> None:
    """The facts the layout rests on, read from the installed binary: prefix /grub, then $prefix/grub.cfg."""
    if not shim.DEBIAN.grub.is_file():
        pytest.skip(f"{shim.DEBIAN.grub} missing (package grub-efi-amd64-signed)")
    data = shim.DEBIAN.grub.read_bytes()
    assert b"\x00/grub\x00" in data  # GRUB's prefix module: the path, the device comes from the boot
    assert b"normal (memdisk)/grub.cfg" in data
    assert b"if [ -e $prefix/x86_64-efi/grub.cfg ]; then\n\tsource $prefix/x86_64-efi/grub.cfg\n" \
           b"else\n\tsource $prefix/grub.cfg\nfi\n" in data  # fmt: skip
    assert str(shim.PREFIX) == "grub" and shim.CONFIG.as_posix() == "tftp/grub/grub.cfg"


def test_rerun_removes_entries_no_longer_described(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, kernels: tuple[kernelpkg.Kernel, kernelpkg.Kernel]
) -> None:
    signed, _ = kernels
    out = tmp_path / "out"
    toml = _site(tmp_path, signed.vmlinuz, extra='\n[[entry]]\nname = "c"\nkernel = "vmlinuz"\n'
                 'initrd = "initrd.img"\nimage = "disk.qcow2"\n')  # fmt: skip
    assert run_cli(capsys, "pxe-config", str(toml), "--out", str(out), "--no-grub-images")[0] == 0
    assert (out / "tftp" / "grub" / "entries" / "c" / "vmlinuz").exists()
    toml = _site(tmp_path, signed.vmlinuz)
    assert run_cli(capsys, "pxe-config", str(toml), "--out", str(out), "--no-grub-images")[0] == 0
    assert sorted(p.name for p in (out / "tftp" / "grub" / "entries").iterdir()) == ["a", "b"]


def test_unsigned_kernel_refused_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, kernels: tuple[kernelpkg.Kernel, kernelpkg.Kernel]
) -> None:
    _, unsigned = kernels
    toml = _site(tmp_path, unsigned.vmlinuz)
    status, _, err = run_cli(capsys, "pxe-config", str(toml), "--out", str(tmp_path / "out"), "--no-grub-images")
    assert status == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "pxe.toml: entry.a.kernel:" in lines[0]
    assert "no Authenticode signature (sbverify --list)" in lines[0]
    assert not (tmp_path / "out").exists()


def test_kernel_only_at_a_url_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, kernels: tuple[kernelpkg.Kernel, kernelpkg.Kernel]
) -> None:
    signed, _ = kernels
    toml = _site(tmp_path, signed.vmlinuz)
    toml.write_text(toml.read_text().replace('kernel = "vmlinuz"', 'kernel = "http://elsewhere.example/vmlinuz"', 1))
    status, _, err = run_cli(capsys, "pxe-config", str(toml), "--out", str(tmp_path / "out"), "--no-grub-images")
    assert status == 2
    assert "entry.a.kernel: http://elsewhere.example/vmlinuz: with loader 'shim' it is served over TFTP" in err


def test_missing_signed_binaries_refused_naming_the_package(
    tmp_path: Path, kernels: tuple[kernelpkg.Kernel, kernelpkg.Kernel]
) -> None:
    signed, _ = kernels
    config = load_file(_site(tmp_path, signed.vmlinuz))
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    missing = shim.Sources(shim=tmp_path / "no-shim.efi", grub=shim.DEBIAN.grub)
    with pytest.raises(ConfigError, match=r"no-shim\.efi not found: install the Debian package shim-signed"):
        shim.install(config, tftp, missing)
    with pytest.raises(ValueError, match=r"'shim' needs .*no-shim\.efi: install the Debian package shim-signed"):
        shim.check_sources(missing)
    # an unsigned binary where the signed GRUB should be: refused, not served
    unsigned_grub = shim.Sources(shim=shim.DEBIAN.shim, grub=kernels[1].vmlinuz)
    with pytest.raises(ConfigError, match=r"has no Authenticode signature"):
        shim.install(config, tftp, unsigned_grub)


# -- kernelpkg's signed flavour ------------------------------------------------------------------------------


def test_signed_flavour_is_the_same_build_with_debians_signature(
    kernels: tuple[kernelpkg.Kernel, kernelpkg.Kernel],
) -> None:
    signed, unsigned = kernels
    assert signed.kver == unsigned.kver
    assert signed.vmlinuz != unsigned.vmlinuz and "signed" in signed.vmlinuz.parts
    assert any("Debian Secure Boot Signer" in s for s in kernelpkg.check_signed(signed.vmlinuz))
    assert kernelpkg.signature_signers(unsigned.vmlinuz) == ()
    with pytest.raises(kernelpkg.KernelPackageError, match=rf"{unsigned.vmlinuz}: no Authenticode signature"):
        kernelpkg.check_signed(unsigned.vmlinuz)
    # the modules are the same files: an initramfs built from either fits both kernels
    module = Path("kernel/drivers/block/nbd.ko")
    assert (signed.kmoddir / module).read_bytes() == (unsigned.kmoddir / module).read_bytes()
    assert kernelpkg.Flavour.signed.package(signed.kver) == f"linux-image-{signed.kver}"
    assert kernelpkg.Flavour.unsigned.package(signed.kver) == f"linux-image-{signed.kver}-unsigned"
    # a cache hit: the same tree, no command run
    assert kernelpkg.ensure_kernel(flavour=kernelpkg.Flavour.signed) == signed


def test_build_initrd_signed_kernel_refuses_an_unsigned_kmoddir(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, kernels: tuple[kernelpkg.Kernel, kernelpkg.Kernel]
) -> None:
    _, unsigned = kernels
    status, _, err = run_cli(capsys, "build-initrd", "-o", str(tmp_path / "i.img"), "--kmoddir",
                             str(unsigned.kmoddir), "--signed-kernel")  # fmt: skip
    assert status != 0
    assert f"{unsigned.vmlinuz}: no Authenticode signature" in err and "Traceback" not in err
    assert not (tmp_path / "i.img").exists()
