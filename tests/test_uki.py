"""``bootkit build-uki``: the section layout objdump sees, the command line inside, the signature, the errors.

Built from systemd's real EFI stub (systemd-boot-efi), signed with keys openssl makes here and checked with the
real sbverify. The kernel and initramfs are files of odd sizes (the layout does not read them); the QEMU test
(qemu-tests/test_secureboot.py) boots real ones under Secure Boot.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from initrd_fixtures import contract_json, make_initramfs
from pxecfg_fixtures import run_cli
from testtools import require_tools

from bootkit.boot.channel import TRUST_FILE
from bootkit.boot.cmdline import CONTRACT_FILE, NETWORK_KEYS, join_args, split_cmdline
from bootkit.boot.ed25519 import fingerprint
from bootkit.boot.loaderargs import Loader
from bootkit.host import pe
from bootkit.host.initrd import read_trust_key
from bootkit.host.pxecfg.cmdline import kernel_args
from bootkit.host.pxecfg.load import load_file
from bootkit.host.uki import PAGE, SECTIONS, STUB, UKI_NETWORK, uki_args
from bootkit.run import run

HASH = "0123456789abcdef" * 4
LINE = f"root=qcow2:http://10.0.0.1/disk.qcow2 rd.qcow2.sha256={HASH} ro ip=dhcp rd.neednet=1 console=ttyS0"

DESCRIPTION = f"""\
base_url = "http://192.168.50.1/"
console = ["ttyS0,115200"]

[[entry]]
name = "node"
kernel = "vmlinuz"
initrd = "initrd.img"
image = "disk.qcow2"
sha256 = "{HASH}"
args = ["panic=-1"]

[[entry]]
name = "lazy"
kernel = "vmlinuz"
initrd = "initrd.img"
image = "lazy.qcow2"
mode = "lazy"
manifest = "lazy.qcow2.manifest"
manifest_sha256 = "{"f" * 64}"

[[machine]]
mac = "52:54:00:12:34:56"
default = "lazy"
args = ["bootkit.test=per-mac"]
"""


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Path, Path]:
    """A "kernel" and an "initramfs" of sizes that are not multiples of anything."""
    require_tools("objcopy", "objdump")
    if not STUB.exists():
        pytest.skip(f"{STUB} missing (package systemd-boot-efi)")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bytes(range(256)) * 4099 + b"k")
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"\x07" * 12345)
    return kernel, initrd


def make_key(directory: Path, name: str) -> tuple[Path, Path]:
    require_tools("openssl", "sbsign", "sbverify")
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "30",
         "-subj", f"/CN={name}/", "-keyout", key, "-out", cert], capture=True)  # fmt: skip
    return key, cert


def build(capsys: pytest.CaptureFixture[str], parts: tuple[Path, Path], out: Path, *args: str | Path) -> tuple[
    int, str, str
]:
    kernel, initrd = parts
    return run_cli(capsys, "build-uki", "-o", str(out), "--kernel", str(kernel), "--initrd", str(initrd),
                   *(str(a) for a in args))  # fmt: skip


def objdump_sections(path: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (size, VMA, file offset) as ``objdump -h`` prints them."""
    text = run(["objdump", "-h", path], capture=True).stdout.decode()
    rows = re.findall(r"^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)", text, re.M)
    return {name: (int(size, 16), int(vma, 16), int(off, 16)) for name, size, vma, off in rows}


def section_bytes(path: Path, name: str, tmp: Path) -> bytes:
    out = tmp / f"section{name}"
    run(["objcopy", "-O", "binary", f"--only-section={name}", path, out])
    return out.read_bytes()


def test_sections_follow_the_stub_page_aligned_and_hold_the_inputs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, parts: tuple[Path, Path]
) -> None:
    out = tmp_path / "uki.efi"
    status, stdout, err = build(capsys, parts, out, "--cmdline", LINE)
    assert status == 0, err
    assert "NOT signed" in stdout
    stub = objdump_sections(STUB)
    sections = objdump_sections(out)
    # the stub's own sections are unchanged, ours come after them in the order of SECTIONS
    assert list(sections)[: len(stub)] == list(stub)
    assert list(sections)[len(stub) :] == list(SECTIONS)
    stub_end = max(vma + size for size, vma, _ in stub.values())
    previous_end = stub_end
    for name in SECTIONS:
        size, vma, _ = sections[name]
        assert vma % PAGE == 0, name
        assert vma >= previous_end, name
        previous_end = vma + size
    kernel, initrd = parts
    assert section_bytes(out, ".linux", tmp_path) == kernel.read_bytes()
    assert section_bytes(out, ".initrd", tmp_path) == initrd.read_bytes()
    assert section_bytes(out, ".cmdline", tmp_path) == LINE.encode()
    assert b"ID=bootkit\n" in section_bytes(out, ".osrel", tmp_path)
    # bootkit's own PE reader agrees with objdump
    layout = pe.read(out)
    assert {s.name: (s.virtual_size, s.virtual_address) for s in layout.sections} == {
        name: (size, vma) for name, (size, vma, _) in sections.items()
    }


def test_the_command_line_is_the_entrys_as_pxe_config_writes_it_with_dhcp_as_network(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, parts: tuple[Path, Path]
) -> None:
    toml = tmp_path / "site.toml"
    toml.write_text(DESCRIPTION)
    config = load_file(toml)
    for argv, entry, machine in (
        ((), config.entry("node"), None),
        (("--entry", "node"), config.entry("node"), None),
        # a machine boots its default entry, with its extra arguments
        (("--machine", "52-54-00-12-34-56"), config.entry("lazy"), config.machines[0]),
    ):
        out = tmp_path / "uki.efi"
        status, stdout, err = build(capsys, parts, out, "--toml", toml, *argv)
        assert status == 0, err
        embedded = section_bytes(out, ".cmdline", tmp_path).decode()
        assert embedded == join_args(uki_args(entry, machine))
        assert f"command line: {embedded}\n" in stdout
        words = split_cmdline(embedded)
        # every word pxe-config writes for the entry, in its order; only the network part is the UKI's own
        # (what iPXE's line fills in from its lease is left out: nothing fills it in a UKI)
        pxe_words = [
            w for w in kernel_args(entry, machine, loader=Loader.ipxe)
            if w.partition("=")[0] not in NETWORK_KEYS and "${" not in w
        ]
        assert [w for w in words if w.partition("=")[0] not in NETWORK_KEYS] == pxe_words
        assert [w for w in words if w.partition("=")[0] in NETWORK_KEYS] == [a.render(None) for a in UKI_NETWORK]
        assert "${" not in embedded
    assert "rd.qcow2.manifest-sha256=" + "f" * 64 in embedded
    assert "bootkit.test=per-mac" in embedded


def test_signed_uki_verifies_with_the_site_cert_only(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, parts: tuple[Path, Path]
) -> None:
    key, cert = make_key(tmp_path, "site")
    _, other_cert = make_key(tmp_path, "other")
    out = tmp_path / "uki.efi"
    status, stdout, err = build(capsys, parts, out, "--cmdline", LINE, "--sign-key", key, "--sign-cert", cert)
    assert status == 0, err
    assert ", signed;" in stdout
    assert run(["sbverify", "--cert", cert, out], check=False, capture=True).returncode == 0
    assert run(["sbverify", "--cert", other_cert, out], check=False, capture=True).returncode != 0
    # the signature covers the command line: one changed digit of the pinned hash breaks it
    data = bytearray(out.read_bytes())
    data[data.index(HASH.encode())] ^= 0x01
    altered = tmp_path / "altered.efi"
    altered.write_bytes(bytes(data))
    assert run(["sbverify", "--cert", cert, altered], check=False, capture=True).returncode != 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--cmdline", LINE, "--stub", "/nonexistent/linuxx64.efi.stub"),
         "error: EFI stub /nonexistent/linuxx64.efi.stub: no such file\n"),
        (("--cmdline", LINE, "--sign-key", "/nonexistent/db.key", "--sign-cert", "/nonexistent/db.crt"),
         "error: --sign-key /nonexistent/db.key: no such file\n"),
        (("--cmdline", LINE, "--sign-key", "/nonexistent/db.key"),
         "error: --sign-key and --sign-cert go together: give both, or neither for an unsigned UKI\n"),
        (("--cmdline", LINE + " x=" + "y" * 2048,),
         "error: --cmdline: the kernel command line is 2207 bytes; the kernel keeps 2047\n"),
        (("--cmdline", LINE.replace("ip=dhcp", "ip=${net0/ip}::::"),),
         "error: --cmdline: ${...} is a boot-loader variable, and nothing fills it in inside a UKI\n"),
        (("--cmdline", "root=/dev/sda1 console=ttyS0"),
         "error: --cmdline: no root=qcow2:URL: bootkit's initramfs would not boot anything from it\n"),
        (("--cmdline", LINE + " rd.qcow2.sha265=x"),
         "error: --cmdline: the initramfs would refuse this command line: "),
        (("--cmdline", LINE + "\nroot=qcow2:http://evil/x.qcow2"),
         "error: --cmdline: the kernel command line must be printable ASCII on one line\n"),
        ((), "error: give the command line: --toml FILE [--entry NAME] [--machine MAC], or --cmdline LINE\n"),
        (("--entry", "node"), "error: --entry/--machine name things in a description: give --toml FILE too\n"),
    ],
    ids=["stub", "key", "key-without-cert", "huge-cmdline", "loader-variable", "not-qcow2", "unknown-option",
         "newline", "no-cmdline", "entry-without-toml"],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, parts: tuple[Path, Path], args: tuple[str, ...],
    message: str,
) -> None:
    out = tmp_path / "uki.efi"
    status, stdout, err = build(capsys, parts, out, *args)
    assert status == 2
    assert err.startswith(message), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert stdout == ""
    assert not out.exists()


def test_description_errors_name_the_entry_or_machine(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, parts: tuple[Path, Path]
) -> None:
    toml = tmp_path / "site.toml"
    toml.write_text(DESCRIPTION)
    out = tmp_path / "uki.efi"
    status, _, err = build(capsys, parts, out, "--toml", toml, "--entry", "nope")
    assert (status, err) == (2, f"error: --entry nope: {toml} has no such entry (entries: node, lazy)\n")
    status, _, err = build(capsys, parts, out, "--toml", toml, "--machine", "52:54:00:00:00:01")
    assert (status, err) == (2, f"error: --machine 52:54:00:00:00:01: {toml} has no [[machine]] with this MAC\n")
    status, _, err = build(capsys, parts, out, "--toml", toml, "--machine", "not-a-mac")
    assert status == 2 and err.startswith("error: --machine: 'not-a-mac' is not a MAC address"), err
    status, _, err = build(capsys, parts, out, "--toml", toml, "--cmdline", LINE)
    assert (status, err) == (2, "error: --cmdline contradicts --toml/--entry/--machine: give the line one way\n")
    assert not out.exists()


def test_a_key_sbsign_cannot_use_fails_in_one_line_and_leaves_no_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, parts: tuple[Path, Path]
) -> None:
    _, cert = make_key(tmp_path, "site")
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("not a key\n")
    out = tmp_path / "uki.efi"
    status, _, err = build(capsys, parts, out, "--cmdline", LINE, "--sign-key", bad_key, "--sign-cert", cert)
    assert status == 1
    # after the progress line, one error line quoting sbsign's complaint
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: sbsign --key "), err
    assert "Traceback" not in err
    assert not out.exists()
    assert list(tmp_path.glob(".uki.*")) == []


def test_a_stub_that_is_not_a_pe_image_is_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, parts: tuple[Path, Path]
) -> None:
    stub = tmp_path / "stub.efi"
    stub.write_bytes(b"MZ" + b"\0" * 0x3A + (0x1000).to_bytes(4, "little"))
    status, _, err = build(capsys, parts, tmp_path / "uki.efi", "--cmdline", LINE, "--stub", stub)
    assert (status, err) == (2, f"error: {stub}: no PE signature at e_lfanew 0x1000\n")
    # a UKI is not a stub: its sections would be added twice
    uki = tmp_path / "uki.efi"
    assert build(capsys, parts, uki, "--cmdline", LINE)[0] == 0
    status, _, err = build(capsys, parts, tmp_path / "second.efi", "--cmdline", LINE, "--stub", uki)
    assert (status, err) == (2, f"error: EFI stub {uki}: already has a .osrel section (a UKI, not a stub?)\n")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"ELF", "x: not a PE image (no MZ signature at offset 0)"),
        (b"MZ" + b"\0" * 10, "x: truncated at e_lfanew (offset 0x3c, file 12 bytes)"),
    ],
)
def test_pe_reader_names_the_field(data: bytes, message: str) -> None:
    with pytest.raises(pe.PeError) as e:
        pe.parse(data, "x")
    assert str(e.value) == message


# -- signed channels: the UKI's initramfs must trust a channel key ------------------------------------------

CHANNEL_LINE = "root=qcow2:channel:http://10.0.0.1/stable.json ro ip=dhcp rd.neednet=1 console=ttyS0"


def channel_key(directory: Path) -> tuple[Path, bytes]:
    """An Ed25519 public key as openssl writes it (what ``--trust-key`` takes), and its raw bytes."""
    require_tools("openssl")
    key, pub = directory / "channel.key", directory / "channel.pub"
    run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", key], capture=True)
    run(["openssl", "pkey", "-in", key, "-pubout", "-out", pub], capture=True)
    return pub, read_trust_key(pub)


def test_a_channel_line_with_an_initramfs_that_trusts_a_key(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                            parts: tuple[Path, Path]) -> None:  # fmt: skip
    _, raw = channel_key(tmp_path)
    kernel, _ = parts
    initrd = make_initramfs(tmp_path / "initrd-keys.img", {
        CONTRACT_FILE: contract_json(), TRUST_FILE: base64.b64encode(raw) + b"\n",
    })  # fmt: skip
    out = tmp_path / "uki.efi"
    status, stdout, err = build(capsys, (kernel, initrd), out, "--cmdline", CHANNEL_LINE)
    assert status == 0, err
    assert f"signed channels (root=qcow2:channel:) trusted from keys {fingerprint(raw)}\n" in stdout
    assert out.exists()


@pytest.mark.parametrize("initrd_files", ["no keys", "not an initramfs"])
def test_a_channel_line_with_an_initramfs_that_trusts_no_key_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, parts: tuple[Path, Path], initrd_files: str
) -> None:
    kernel, fake = parts
    initrd = fake if initrd_files == "not an initramfs" else make_initramfs(tmp_path / "initrd-nokeys.img")
    out = tmp_path / "uki.efi"
    status, stdout, err = build(capsys, (kernel, initrd), out, "--cmdline", CHANNEL_LINE)
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    if initrd_files == "no keys":
        assert err == ("error: the command line boots a signed channel (root=qcow2:channel:http://10.0.0.1/"
                       "stable.json), and the initramfs trusts no channel key: give --trust-key PUB (or an --initrd "
                       "built with it)\n")  # fmt: skip
    else:
        assert err.startswith(f"error: --initrd {initrd}: "), err
    assert stdout == "" and not out.exists()


def test_trust_key_is_for_the_initramfs_built_here(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                   parts: tuple[Path, Path]) -> None:  # fmt: skip
    pub, _ = channel_key(tmp_path)
    kernel, _ = parts
    out = tmp_path / "uki.efi"
    status, _, err = build(capsys, parts, out, "--cmdline", CHANNEL_LINE, "--trust-key", pub)
    assert (status, err) == (2, "error: --systemd/--drivers/--trust-key are about the initramfs built here; --initrd "
                                "gives a built one\n")  # fmt: skip
    # building the initramfs here for a channel line: refused before dracut runs when no key is given
    status, _, err = run_cli(capsys, "build-uki", "-o", str(out), "--kernel", str(kernel), "--cmdline", CHANNEL_LINE)
    assert status == 2 and err.startswith("error: the command line boots a signed channel"), err
    assert "would trust no channel key: give --trust-key PUB" in err
    assert not out.exists()
