"""The channel's crypto and files: Ed25519 through ctypes against RFC 8032 and ``openssl pkeyutl`` both ways,
public keys as openssl writes them, UTC times, ``publish --sign`` and ``build-initrd --trust-key`` refusals.
"""

from __future__ import annotations

import base64
import calendar
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testtools import require_tools

from bootkit.boot import ed25519
from bootkit.boot.channel import Channel, ChannelRefused, format_time, load_keys, parse_time
from bootkit.host.cli import main
from bootkit.host.initrd import install_trust_keys, read_trust_key

# RFC 8032 section 7.1, tests 1 to 3: (public key, message, signature)
RFC8032 = [
    ("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
]  # fmt: skip


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tools("openssl", "qemu-img")


def openssl(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], input=input, capture_output=True, check=False)


def keypair(d: Path, name: str = "k") -> tuple[Path, Path, bytes]:
    key, pub = d / f"{name}.key", d / f"{name}.pub"
    assert openssl("genpkey", "-algorithm", "ed25519", "-out", str(key)).returncode == 0
    assert openssl("pkey", "-in", str(key), "-pubout", "-out", str(pub)).returncode == 0
    der = openssl("pkey", "-in", str(key), "-pubout", "-outform", "DER").stdout
    return key, pub, der[-32:]


@pytest.mark.parametrize(("pub", "msg", "sig"), RFC8032)
def test_rfc8032_vectors(pub: str, msg: str, sig: str) -> None:
    key, message, signature = bytes.fromhex(pub), bytes.fromhex(msg), bytes.fromhex(sig)
    assert ed25519.verify(key, signature, message)
    assert not ed25519.verify(key, signature, message + b"\0")
    assert not ed25519.verify(key, bytes([signature[0] ^ 1]) + signature[1:], message)
    assert not ed25519.verify(key, signature[:63], message)
    assert not ed25519.verify(bytes(32), signature, message)  # not the key


def test_openssl_and_ctypes_agree_both_ways(tmp_path: Path) -> None:
    key, pub, raw = keypair(tmp_path)
    assert ed25519.parse_public_key(pub.read_text(), str(pub)) == raw
    rng = random.Random(18)
    for size in (1, 64, 1000, 65536):  # openssl signs no empty file; RFC 8032 test 1 covers that
        msg = tmp_path / "msg"
        msg.write_bytes(rng.randbytes(size))
        sig = openssl("pkeyutl", "-sign", "-rawin", "-inkey", str(key), "-in", str(msg)).stdout
        assert len(sig) == 64
        assert ed25519.verify(raw, sig, msg.read_bytes())
        bad = bytes([sig[0] ^ 0x80]) + sig[1:]
        (tmp_path / "bad.sig").write_bytes(bad)
        verify = ["pkeyutl", "-verify", "-rawin", "-pubin", "-inkey", str(pub), "-in", str(msg), "-sigfile"]
        assert openssl(*verify, str(tmp_path / "bad.sig")).returncode != 0
        assert not ed25519.verify(raw, bad, msg.read_bytes())


def test_published_channel_verifies_with_openssl(tmp_path: Path) -> None:
    """publish --sign's signature checks with openssl, and with the initramfs' code against the key the
    initramfs gets from build-initrd --trust-key (PEM and base64 alike)."""
    key, pub, raw = keypair(tmp_path)
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(tmp_path / "web.qcow2"), "16M"], check=True,
                   capture_output=True)  # fmt: skip
    www = tmp_path / "www"
    www.mkdir()
    assert main(["publish", str(tmp_path / "web.qcow2"), str(www), "--sign", str(key)]) == 0
    data, sig = (www / "web.json").read_bytes(), (www / "web.json.sig").read_bytes()
    proc = openssl("pkeyutl", "-verify", "-rawin", "-pubin", "-inkey", str(pub), "-in", str(www / "web.json"),
                   "-sigfile", str(www / "web.json.sig"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    b64 = tmp_path / "k.b64"
    b64.write_text(base64.b64encode(raw).decode() + "\n")
    site = tmp_path / "site"
    site.mkdir()
    installed = install_trust_keys(site, (read_trust_key(pub), read_trust_key(b64), read_trust_key(pub)))
    assert installed.name == "channel-keys"
    assert load_keys(str(installed)) == (raw,)  # one key, given three times
    assert ed25519.verify(load_keys(str(installed))[0], sig, data)
    # the next publish is version 2, the images stay as they were, and no temporary file is left behind
    before = {p.name for p in www.iterdir()}
    assert main(["publish", str(tmp_path / "web.qcow2"), str(www), "--sign", str(key), "--valid-for", "2h"]) == 0
    assert {p.name for p in www.iterdir()} == before
    channel = Channel.parse((www / "web.json").read_bytes(), "web.json")
    assert channel.version == 2 and channel.expires - channel.not_before == 7200


def test_mapped_libcrypto_is_the_one_hashlib_links() -> None:
    import _hashlib

    path = ed25519._mapped_libcrypto()
    assert path is not None
    linked = subprocess.run(["ldd", _hashlib.__file__], capture_output=True, text=True, check=True).stdout
    assert any(line.split("=>")[-1].split()[0] == path or Path(line.split("=>")[-1].split()[0]).resolve() ==
               Path(path).resolve() for line in linked.splitlines() if "libcrypto" in line)  # fmt: skip


def test_public_key_refusals(tmp_path: Path) -> None:
    key, _pub, _raw = keypair(tmp_path)
    rsa = tmp_path / "rsa.pub"
    assert openssl("genpkey", "-algorithm", "rsa", "-pkeyopt", "rsa_keygen_bits:1024", "-out", str(tmp_path / "r")
                   ).returncode == 0  # fmt: skip
    assert openssl("pkey", "-in", str(tmp_path / "r"), "-pubout", "-out", str(rsa)).returncode == 0
    short = tmp_path / "short.b64"
    short.write_text(base64.b64encode(b"x" * 31).decode())
    cases = {
        key: "a PEM file but not a PUBLIC KEY (give the public half: openssl pkey -pubout)",
        rsa: "not an Ed25519 public key (RFC 8410 SubjectPublicKeyInfo, 44 bytes)",
        short: "base64 of 31 bytes; an Ed25519 public key is 32 bytes",
        tmp_path / "none": "cannot read: No such file or directory",
    }
    for path, why in cases.items():
        proc = subprocess.run([sys.executable, "-m", "bootkit", "build-initrd", "-o", str(tmp_path / "i"),
                               "--trust-key", str(path)], capture_output=True, text=True)  # fmt: skip
        assert (proc.returncode, proc.stderr) == (2, f"error: --trust-key {path}: {why}\n")
    assert not (tmp_path / "i").exists()


def test_publish_sign_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key, pub, _raw = keypair(tmp_path)
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(tmp_path / "web.qcow2"), "16M"], check=True,
                   capture_output=True)  # fmt: skip
    www = tmp_path / "www"
    www.mkdir()
    image = str(tmp_path / "web.qcow2")

    def refused(*args: str) -> str:
        capsys.readouterr()
        assert main(["publish", image, str(www), *args]) == 2
        [line] = capsys.readouterr().err.splitlines()
        return line

    assert refused("--channel", "x") == "error: --channel is about --sign (the signed channel)"
    assert refused("--sign", str(tmp_path / "nokey")) == f"error: --sign {tmp_path / 'nokey'}: no such file"
    assert refused("--sign", str(pub)).startswith(f"error: --sign {pub}: openssl cannot read the key: ")
    assert refused("--sign", str(key), "--channel", "../x").startswith("error: --channel '../x': ")
    assert refused("--sign", str(key), "--valid-for", "0") == "error: --valid-for must be longer than 0"
    assert list(www.iterdir()) == []  # refused before any file was placed
    assert main(["publish", image, str(www), "--sign", str(key), "--channel-version", "5"]) == 0
    assert refused("--sign", str(key), "--channel-version", "5") == (
        f"error: --channel-version 5: {www.resolve() / 'web.json'} is at version 5 already; machines that booted "
        "it refuse a lower one (publish a higher version)"
    )
    (www / "web.json").write_text("{}")
    assert refused("--sign", str(key)) == (
        f"error: {www.resolve() / 'web.json'}: not a bootkit channel file (no \"bootkit-channel\": 1) (remove it, "
        "or give --channel-version, to start the channel again)"
    )


def test_utc_times() -> None:
    rng = random.Random(1)
    for _ in range(2000):
        t = rng.randrange(0, 1 << 34)
        text = format_time(t)
        assert parse_time(text, "t") == t == calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))
    assert parse_time("2028-02-29T23:59:59Z", "t") == 1835481599
    for bad in ("2026-02-29T00:00:00Z", "2026-13-01T00:00:00Z", "2026-12-02 16:30:00Z", "2026-12-02T16:30:00+01:00"):
        with pytest.raises(ChannelRefused, match=r"^t: '.*' is not a (valid|UTC) time"):
            parse_time(bad, "t")
