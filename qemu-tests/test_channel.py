"""A signed image channel end to end: ``publish --sign`` → ``pxe-config`` → PXE boot via
``root=qcow2:channel:URL`` to the root proof. One boot.

The guest's initramfs trusts the test's key: the run's shell initramfs with one more (uncompressed) cpio
archive in front holding ``usr/lib/bootkit/channel-keys``, written by the function ``build-initrd
--trust-key`` uses (the kernel unpacks every archive of the initramfs in turn, as for early microcode). That
spares the suite a dracut build of its own; tests/test_initrd_build.py shows ``build-initrd --trust-key``
putting the same file into a dracut image. The refusals (wrong key, altered file or signature, expired,
rollback, wrong image) need no guest: tests/test_channel_boot.py runs them through the same boot code.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bkharness.fixtures import BootDir
from bkharness.guest import qemu_pxe
from bkharness.images import RootImage, qcow2_image
from bkharness.pieces import GUEST_BOOT_ARGS, bootkit, require_boot_code
from bkharness.servers import http_server

from bootkit.boot.channel import TRUST_FILE, Channel
from bootkit.boot.ed25519 import fingerprint, parse_public_key
from bootkit.host.initrd import install_trust_keys

#: a lazy netboot of the busybox root under TCG: 25-40 s idle, about 60 s on a busy 2-core machine
BOOT_TIMEOUT = 300.0


def newc(root: Path, names: list[str]) -> bytes:
    """A newc cpio archive of ``names`` (directories and files under ``root``), owned by root."""
    out = bytearray()
    for ino, name in enumerate([*names, "TRAILER!!!"], 1):
        path = root / name
        data = b"" if name == "TRAILER!!!" or path.is_dir() else path.read_bytes()
        mode = 0 if name == "TRAILER!!!" else (0o40755 if path.is_dir() else 0o100644)
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out += b"070701" + b"".join(b"%08x" % f for f in fields) + encoded
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out + b"\0" * (-len(out) % 512))


def trusting(initrd: Path, key: bytes, out: Path) -> Path:
    """``initrd`` with the trusted-key archive in front."""
    tree = out.parent / "trust-tree"
    site = tree / Path(TRUST_FILE).parent
    site.mkdir(parents=True)
    install_trust_keys(site, (key,))
    parts = Path(TRUST_FILE).parts
    names = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    with out.open("wb") as f:
        f.write(newc(tree, names))
        with initrd.open("rb") as src:
            shutil.copyfileobj(src, f)
    return out


def test_publish_sign_to_a_channel_boot(kernel: Any, shell_initrd: Path, busybox_root: RootImage,
                                        boot_dir: BootDir) -> None:  # fmt: skip
    require_boot_code()
    work = boot_dir.path
    key = work / "channel.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", key], check=True, capture_output=True)
    pem = subprocess.run(["openssl", "pkey", "-in", key, "-pubout"], check=True, capture_output=True).stdout
    pub = parse_public_key(pem.decode(), "channel.key")
    src = work / "src"
    src.mkdir()
    shutil.copyfile(qcow2_image(busybox_root.raw, compression="zstd"), src / "busybox.qcow2")
    shutil.copyfile(kernel.vmlinuz, src / "busybox.vmlinuz")
    trusting(shell_initrd, pub, src / "busybox.initrd")
    www, site = work / "www", work / "site.toml"
    www.mkdir()
    with http_server(www, log_dir=work) as web:
        site.write_text(
            f'base_url = "{web.guest_url}/"\n'
            'docroot = "www"\n'
            "timeout = 0\n"
            'bootloaders = ["ipxe"]\n'
            'console = ["ttyS0,115200"]\n'
            "\n"
            "[[entry]]\n"
            'name = "busybox"\n'
            f"args = [{', '.join(repr(a).replace(chr(39), chr(34)) for a in GUEST_BOOT_ARGS)}]\n"
        )
        out = bootkit("publish", src / "busybox.qcow2", www, "--toml", site, "--sign", key, "--channel", "stable",
                      "--mode", "lazy")  # fmt: skip
        assert f"{www.resolve() / 'stable.json'}: channel stable version 1 -> busybox-" in out, out
        assert 'channel = "stable.json"' in site.read_text()
        channel = Channel.parse((www / "stable.json").read_bytes(), "stable.json")
        bootkit("pxe-config", site, "--out", work / "pxe", "--no-grub-images")
        menus = "".join(p.read_text() for p in (work / "pxe" / "tftp").glob("*.ipxe"))
        assert f"root=qcow2:channel:{web.guest_url}/stable.json" in menus
        with qemu_pxe(work / "pxe" / "tftp", "boot.ipxe", log_dir=work, name="channel",
                      boot_timeout=BOOT_TIMEOUT) as vm:  # fmt: skip
            boot_dir.prove(vm, busybox_root, BOOT_TIMEOUT, firmware="bios", loader="ipxe", mode="lazy",
                           root="busybox", initrd="shell")  # fmt: skip
            assert vm.seen(rf"channel: channel stable version 1 signed by key {fingerprint(pub)}, valid until "
                           rf"\S+: {channel.image} sha256 {channel.pin.sha256}")  # fmt: skip
            assert vm.seen(r"chunks verified by manifest")
            # bootkit status on the booted system names the channel that chose the image
            assert vm.seen(rf'status: "channel": \{{ "expires": "\S+", "image": "{re.escape(channel.image)}", '
                           rf'"name": "stable", "url": "{re.escape(web.guest_url)}/stable.json", "version": 1 \}}'), \
                vm.tail()  # fmt: skip
