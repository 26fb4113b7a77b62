"""pxe-config entries that name a signed channel instead of an image: the command line they write, and the keys
a channel entry refuses (one line naming file and key, exit status 2, nothing written)."""

from __future__ import annotations

import hashlib
import subprocess
import textwrap
from pathlib import Path

import pytest
from pxecfg_fixtures import run_cli
from testtools import require_tools

from bootkit.boot import ed25519
from bootkit.boot.channel import TRUST_FILE, Channel
from bootkit.boot.cmdline import CONTRACT_FILE, CONTRACT_VERSION, KNOWN_OPTIONS, join_args, parse_cmdline
from bootkit.host.pxecfg.cmdline import kernel_args
from bootkit.host.pxecfg.load import load_file

CHANNEL = """\
base_url = "http://10.0.0.1:8080/"
docroot = "www"

[[entry]]
name = "stable"
kernel = "vmlinuz"
initrd = "initrd.img"
channel = "stable.json"
mode = "lazy"
"""


@pytest.fixture
def toml(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    for name in ("vmlinuz", "initrd.img", "stable.json", "stable.json.sig", "disk.qcow2"):
        (root / name).write_bytes(b"x\n")
    return tmp_path / "pxe.toml"


def test_channel_entry_writes_root_qcow2_channel(toml: Path) -> None:
    toml.write_text(CHANNEL + "channel_min_version = 3\n")
    [entry] = load_file(toml).entries
    args = kernel_args(entry)
    assert args[:2] == ("root=qcow2:channel:http://10.0.0.1:8080/stable.json", "rd.qcow2.mode=lazy")
    assert "rd.qcow2.channel.min-version=3" in args
    assert not any(a.startswith(("rd.qcow2.sha256", "rd.qcow2.verify", "rd.qcow2.manifest")) for a in args)
    cfg = parse_cmdline(join_args(args))
    assert cfg is not None and cfg.channel and cfg.channel_min_version == 3


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ('image = "disk.qcow2"\n', "entry.stable.image", "contradicts channel"),
        ('sha256 = "compute"\n', "entry.stable.sha256", "contradicts channel"),
        ('mirrors = ["http://m/d.qcow2"]\n', "entry.stable.mirrors", "contradicts channel"),
        ('channel_min_version = -1\n', "entry.stable.channel_min_version", ""),
        ('colour = "blue"\n', "entry.stable.colour", "unknown key"),
    ],
)
def test_channel_entry_refusals(capsys: pytest.CaptureFixture[str], toml: Path, extra: str, key: str,
                                words: str) -> None:  # fmt: skip
    toml.write_text(CHANNEL + extra)
    status, _, err = run_cli(capsys, "pxe-config", str(toml), "--out", str(toml.parent / "out"))
    [line] = err.strip().splitlines()
    assert status == 2 and line.startswith(f"error: {toml}: {key}: ") and words in line, err
    assert not (toml.parent / "out").exists()


def test_channel_file_and_min_version_refusals(capsys: pytest.CaptureFixture[str], toml: Path) -> None:
    cases = [
        (CHANNEL.replace('"stable.json"', '"disk.qcow2"'), "entry.stable.channel",
         "expected a NAME.json channel file (bootkit publish --sign)"),
        (CHANNEL.replace('"stable.json"', '"testing.json"'), "entry.stable.channel", "no such file"),
        (CHANNEL.replace('channel = "stable.json"', 'image = "disk.qcow2"\nchannel_min_version = 2'),
         "entry.stable.channel_min_version", "given without channel"),
    ]  # fmt: skip
    for text, key, words in cases:
        toml.write_text(textwrap.dedent(text))
        status, _, err = run_cli(capsys, "pxe-config", str(toml), "--out", str(toml.parent / "out"))
        [line] = err.strip().splitlines()
        assert status == 2 and line.startswith(f"error: {toml}: {key}: ") and words in line, err


def test_publish_sign_writes_a_channel_entry_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """publish --sign --toml: the entry names the channel; the next image changes the channel, not the TOML."""
    require_tools("qemu-img", "qemu-io", "openssl")
    key = tmp_path / "k.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True, capture_output=True)
    src = tmp_path / "src"
    src.mkdir()
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(src / "web.qcow2"), "16M"], check=True,
                   capture_output=True)  # fmt: skip
    (src / "web.vmlinuz").write_bytes(b"kernel\n")
    (src / "web.initrd").write_bytes(b"initrd\n")
    www, site = tmp_path / "www", tmp_path / "site.toml"
    www.mkdir()
    publish = ["publish", str(src / "web.qcow2"), str(www), "--toml", str(site), "--sign", str(key)]
    assert run_cli(capsys, *publish, "--base-url", "http://10.0.0.1/")[0] == 0
    [entry] = load_file(site).entries
    assert kernel_args(entry)[:2] == ("root=qcow2:channel:http://10.0.0.1/web.json", "rd.qcow2.mode=lazy")
    text = site.read_text()
    assert 'channel = "web.json"' in text and "image" not in text and "sha256" not in text
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 64k", str(src / "web.qcow2")], check=True, capture_output=True)
    status, out, _ = run_cli(capsys, *publish)
    assert status == 0 and f"{site}: entry 'web' unchanged" in out, out
    assert site.read_text() == text
    channel = Channel.parse((www / "web.json").read_bytes(), "web.json")
    assert channel.version == 2 and channel.pin.sha256 == hashlib.sha256((www / channel.image).read_bytes()).hexdigest()


def test_check_follows_the_channel_as_the_initramfs_would(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """pxe-config --check: the initramfs must know channels and trust a key that signed the served channel,
    which must be valid now and at least channel_min_version."""
    require_tools("qemu-img", "openssl")
    from initrd_fixtures import contract_json, make_initramfs
    from pxecfg_fixtures import logged_http_server

    keys = {}
    for name in ("good", "other"):
        key = tmp_path / f"{name}.pem"
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True,
                       capture_output=True)  # fmt: skip
        pem = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout"], check=True, capture_output=True).stdout
        keys[name] = (key, ed25519.key_text(ed25519.parse_public_key(pem.decode(), name)))
    www = tmp_path / "www"
    www.mkdir()
    (www / "vmlinuz").write_bytes(b"kernel\n")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(tmp_path / "web.qcow2"), "16M"], check=True,
                   capture_output=True)  # fmt: skip
    assert run_cli(capsys, "publish", str(tmp_path / "web.qcow2"), str(www), "--sign", str(keys["good"][0]),
                   "--channel", "stable")[0] == 0  # fmt: skip
    boot = {"usr/lib/bootkit/bootkit-boot": b"#!/usr/bin/python3\n"}

    def check(files: dict[str, bytes], extra: str = "") -> tuple[int, str]:
        make_initramfs(www / "initrd.img", {**boot, **files})
        toml = tmp_path / "pxe.toml"
        toml.write_text(f'base_url = "{server.url}"\ndocroot = "www"\n\n[[entry]]\nname = "web"\n'
                        f'kernel = "vmlinuz"\ninitrd = "initrd.img"\nchannel = "stable.json"\n{extra}')  # fmt: skip
        status, out, _ = run_cli(capsys, "pxe-config", str(toml), "--out", str(tmp_path / "out"), "--check",
                                   "--no-grub-images")  # fmt: skip
        return status, out

    contract = {CONTRACT_FILE: contract_json()}
    with logged_http_server(www) as server:
        initrd, channel = f"{server.url}initrd.img", f"{server.url}stable.json"
        assert check({**contract, TRUST_FILE: f"{keys['other'][1]}\n{keys['good'][1]}\n".encode()}) == (0, "")
        assert check({**contract, TRUST_FILE: f"{keys['other'][1]}\n".encode()}) == (1, (
            f"{channel}: the signature does not verify with any of the 1 trusted key (altered, or signed by another "
            "key)\n"))  # fmt: skip
        assert check(contract) == (1, (
            f"{initrd}: this initramfs trusts no channel key, and entry 'web' boots a signed channel: rebuild it with "
            "bootkit build-initrd --trust-key PUB\n"))  # fmt: skip
        older = [o for o in KNOWN_OPTIONS if o != "rd.qcow2.channel.min-version"]
        assert check({CONTRACT_FILE: contract_json(options=older)}) == (1, (
            f"{initrd}: this initramfs (contract {CONTRACT_VERSION}) does not know signed channels, which entry 'web' "
            "boots: rebuild it with bootkit build-initrd\n"))  # fmt: skip
        status, out = check({**contract, TRUST_FILE: f"{keys['good'][1]}\n".encode()}, "channel_min_version = 2\n")
        assert (status, out) == (1, f"{channel}: channel stable version 1 is older than rd.qcow2.channel.min-version=2 "
                                    "(a rollback?)\n")  # fmt: skip
