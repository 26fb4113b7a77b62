"""From a root tree to booting machines: debootstrap → ``build-image`` → ``publish`` → ``pxe-config`` → PXE boot,
then a one-file change → ``build-image --base`` → ``publish`` → boot again. Two boots.

The tree is ``debootstrap --variant=minbase --include=systemd-sysv,linux-image-amd64 bookworm`` (cached,
:mod:`bkharness.debtree`) made a test guest the way the harness's Debian root is (proof unit, known file).
Every boot uses the kernel FROM THE IMAGE (build-image's ``NAME.vmlinuz``, published under its content
hash) and the initramfs build-image made from the tree's own modules; ``pxe-config`` reads the TOML as
``publish`` left it.

The entry boots in lazy mode with a local cache disk (``cache`` in the TOML: ``rd.qcow2.cache=``, a disk
``bootkit cache prepare`` made): the first boot keeps every verified chunk it read, so the second boot, of the
new overlay over the same base, reads the base's chunks from its own disk. Its server log shows the overlay's
bytes, at most its size, a small fraction of the base's, and of the base nothing but size probes: "machines that
have the base fetch only the overlay".
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from bkharness.debtree import debootstrap_kernel_tree
from bkharness.fixtures import BootDir
from bkharness.guest import qemu_pxe
from bkharness.images import _write_known_file, configure_debian_root, file_sha256
from bkharness.pieces import GUEST_BOOT_ARGS, bootkit, require_boot_code
from bkharness.proof import expect_clean_poweroff, expect_proof
from bkharness.servers import WebServer, nginx_server

#: a Debian/systemd netboot with the distribution kernel's modules (udev loads them) under TCG in lazy mode:
#: about 4 minutes on an idle machine, 7 on a busy 2-core one
BOOT_TIMEOUT = 900.0
EPOCH = "1700000000"
_ACCESS = re.compile(r'"(?:GET|HEAD) /(\S+) HTTP/[\d.]+" (\d{3}) (\d+)')


def _served(log: str) -> Counter[str]:
    """Body bytes the web server sent, per file (nginx's combined access log)."""
    sent: Counter[str] = Counter()
    for m in _ACCESS.finditer(log):
        sent[m.group(1)] += int(m.group(3))
    return sent


def _toml(path: Path, web: WebServer) -> None:
    """The site description before publish: server, console, and the entry's own kernel arguments."""
    args = ", ".join(f'"{a}"' for a in GUEST_BOOT_ARGS)
    path.write_text(
        "# written by the test; publish fills in the entry's files and hashes\n"
        f'base_url = "{web.guest_url}/"\n'
        'docroot = "www"\n'
        "timeout = 0\n"
        'bootloaders = ["ipxe"]\n'
        'console = ["ttyS0,115200"]\n'
        '# the cache disk the test gives the machine: the second boot reads the base from it\n'
        'cache = "PARTLABEL=bootkit-cache"\n'
        "\n"
        "[[entry]]\n"
        'name = "debian"\n'
        'title = "Debian from bootkit publish"\n'
        f"args = [{args}]\n"
    )


def _boot(boot_dir: BootDir, site: Path, name: str, known_sha256: str, cache_disk: Path) -> None:
    pxe = boot_dir.path / "pxe"
    bootkit("pxe-config", site, "--out", pxe, "--no-grub-images")
    with qemu_pxe(pxe / "tftp", "boot.ipxe", log_dir=boot_dir.path, name=name, boot_timeout=BOOT_TIMEOUT,
                  writable_disks=[cache_disk]) as vm:  # fmt: skip
        proof = expect_proof(vm, BOOT_TIMEOUT)
        expect_clean_poweroff(vm)
        boot_dir.record(vm, firmware="bios", loader="ipxe", mode="lazy", root="debian-built", initrd="built")
        assert proof.problems(None, sha256=known_sha256) == [], f"{name}: {proof}"
        assert vm.seen(r"fetch: .*\(lazy, "), "the boot code did not report lazy mode"
        assert vm.seen(r"cache: .*PARTLABEL=bootkit-cache|local cache"), "the boot did not use the cache disk"


@pytest.mark.timeout(3 * BOOT_TIMEOUT)  # two builds and two boots: more than the suite's 600 s per test
def test_root_tree_to_booting_machines_and_a_delta(boot_dir: BootDir, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    require_boot_code()
    # the build epoch stays put when the known file changes (its mtime is clamped): a small overlay
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    work = boot_dir.path
    # the tree (with device nodes) and the images stay out of the directory a failed test keeps as artifacts
    build = tmp_path_factory.mktemp("pipeline-build")
    root = build / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", debootstrap_kernel_tree(), root], check=True)
    (root / ".complete").unlink()
    for old in (root / "boot").glob("initrd.img-*"):
        old.unlink()  # Debian's own initramfs: build-image makes bootkit's from the tree's modules
    configure_debian_root(root)
    # e2scrub_reap looks for LVM snapshots for two minutes under TCG; the text consoles wait for nobody
    for unit in ("e2scrub_reap.service", "e2scrub_all.timer", "getty.target"):
        mask = root / "etc/systemd/system" / unit
        mask.unlink(missing_ok=True)
        mask.symlink_to("/dev/null")
    known1 = _write_known_file(root, "pipeline-1")
    images = build / "images"
    www = work / "www"
    www.mkdir()
    site = work / "site.toml"
    cache_disk = build / "cache.raw"
    bootkit("cache", "prepare", cache_disk, "--size", "1G")
    bootkit("build-image", root, "-o", images / "debian-1.qcow2", "--drivers", "virtio_net")
    kernel_sha = file_sha256(images / "debian-1.vmlinuz")
    with nginx_server(www, log_dir=work) as web:
        _toml(site, web)
        bootkit("publish", images / "debian-1.qcow2", www, "--toml", site, "--entry", "debian")
        (base,) = www.glob("debian-*.qcow2")
        (vmlinuz,) = www.glob("debian-*.vmlinuz")
        assert file_sha256(vmlinuz) == kernel_sha  # the tree's own kernel, under its content name
        _boot(boot_dir, site, "pipeline-1", known1, cache_disk)
        first = _served(web.requests_log())
        assert first[vmlinuz.name] == vmlinuz.stat().st_size, "the guest did not boot the image's kernel"

        # one file of the tree changes: the overlay holds its clusters only
        known2 = _write_known_file(root, "pipeline-2")
        bootkit("build-image", root, "-o", images / "debian-2.qcow2", "--base", images / "debian-1.qcow2",
                "--drivers", "virtio_net")
        bootkit("publish", images / "debian-2.qcow2", www, "--toml", site, "--entry", "debian")
        (overlay,) = set(www.glob("debian-*.qcow2")) - {base}
        text = site.read_text()
        assert f'image = "{overlay.name}"' in text
        assert f"rd.qcow2.sha256.{base.name}=" in text  # the base is pinned through the entry's args
        assert text.startswith("# written by the test")  # the rest of the file as it was
        mark = len(web.requests_log())
        _boot(boot_dir, site, "pipeline-2", known2, cache_disk)
        log2 = web.requests_log()[mark:]
        second = _served(log2)
    base_size, overlay_size = base.stat().st_size, overlay.stat().st_size
    print(f"\nbase {base_size} bytes, overlay {overlay_size} bytes; boot 2 read {second[overlay.name]} bytes of the"
          f" overlay and {second[base.name]} of the base (boot 1: {first[base.name]})")
    assert overlay_size < base_size // 20, (overlay_size, base_size)
    assert 0 < second[overlay.name] <= overlay_size + 1  # each chunk once (kept on the disk), and a size probe
    # the base's chunks come from the cache disk: of the base, the server sends at most a 1-byte size probe
    assert second[base.name] <= 1, f"boot 2 fetched {second[base.name]} bytes of the base it had cached"
    assert not re.search(rf'"GET /{re.escape(base.name)} HTTP/[\d.]+" 200 ', log2), "the base was downloaded whole"
