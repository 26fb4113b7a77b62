"""The harness itself, proven with real tools and a real kernel before any bootkit piece is involved:
the root images are what they claim, the QCOW2 variants decode to the same disk, a kernel boots under TCG
with its console read line by line, iPXE fetches over HTTP from both web servers, and the guest's proof
script reports a local-disk root correctly (and a failure is reported as one)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from bkharness import images
from bkharness.fixtures import BootDir
from bkharness.guest import GUEST_KERNEL_ARGS, ConsoleLine, Firmware, GuestError, qemu_command, qemu_direct, qemu_pxe
from bkharness.images import KNOWN_FILE, ROOT_TYPE_X86_64, RootImage, qcow2_image
from bkharness.initramfs import LOCAL_DISK_INIT, SMOKE_INIT, tiny_initramfs
from bkharness.netboot import publish
from bkharness.paths import ROOTFS_FILES
from bkharness.proof import expect_clean_poweroff, expect_proof
from bkharness.servers import http_server, nginx_server
from bkharness.timeline import stage_times

from bootkit.run import run

LOCAL_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")


def _read_known_file(image: RootImage, tmp: Path) -> bytes:
    fs = images.extract_root_fs(image, tmp / "root.ext4")
    return run(["debugfs", "-R", f"cat /{KNOWN_FILE}", fs], capture=True).stdout


@pytest.mark.parametrize("kind", ["busybox", "debian"])
def test_root_image_is_a_gpt_disk_with_esp_and_discoverable_root(kind: str, tmp_path: Path) -> None:
    image = images.root_image(kind)
    table = images.partition_table(image.raw)
    assert table["label"] == "gpt"
    parts = table["partitions"]
    assert isinstance(parts, list)
    assert [p["type"] for p in parts] == [images.ESP_TYPE, ROOT_TYPE_X86_64]
    assert parts[1]["start"] * 512 == images.ROOT_START
    assert parts[1]["size"] * 512 == image.root_fs_size
    images.fsck_root(image)
    data = _read_known_file(image, tmp_path)
    assert hashlib.sha256(data).hexdigest() == image.known_sha256
    # a cache hit returns the same image without rebuilding it
    assert images.root_image(kind) == image


def test_busybox_root_init_is_the_proof_script(busybox_root: RootImage, tmp_path: Path) -> None:
    fs = images.extract_root_fs(busybox_root, tmp_path / "root.ext4")
    init = run(["debugfs", "-R", "cat /sbin/init", fs], capture=True).stdout
    assert init == (ROOTFS_FILES / "busybox" / "sbin" / "init").read_bytes()
    assert images.qcow2_image(busybox_root.raw).stat().st_size < 8 * images.MIB


@pytest.mark.parametrize(
    ("compression", "extended_l2"), [("deflate", False), ("zstd", False), (None, True), ("zstd", True)]
)
def test_qcow2_variants_decode_to_the_raw_disk(busybox_root: RootImage, compression: str | None,
                                               extended_l2: bool) -> None:
    q = qcow2_image(busybox_root.raw, compression=compression, extended_l2=extended_l2)
    info = images.image_info(q)
    specific = info["format-specific"]
    assert isinstance(specific, dict)
    assert specific["data"]["extended-l2"] is extended_l2
    if compression is not None:
        assert specific["data"]["compression-type"] == {"deflate": "zlib"}.get(compression, compression)
    run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", busybox_root.raw, q])


def test_backing_chain_holds_only_the_change(busybox_root: RootImage, tmp_path: Path) -> None:
    base = qcow2_image(busybox_root.raw, compression="zstd", out=tmp_path / "base.qcow2")
    changed = images.modified_copy(busybox_root, tmp_path / "changed.raw", seed="overlay")
    top = qcow2_image(changed.raw, compression="zstd", backing=base, out=tmp_path / "top.qcow2")
    info = images.image_info(top)
    assert info["backing-filename"] == "base.qcow2"
    assert top.stat().st_size < base.stat().st_size
    run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", changed.raw, top])
    assert changed.known_sha256 != busybox_root.known_sha256
    assert hashlib.sha256(_read_known_file(changed, tmp_path)).hexdigest() == changed.known_sha256


def test_rootfs_scripts_pass_shellcheck() -> None:
    scripts = [ROOTFS_FILES / "common/usr/libexec/bootkit-proof", ROOTFS_FILES / "busybox/sbin/init"]
    run(["shellcheck", "-s", "sh", *scripts])


def test_kernel_boots_under_tcg_and_console_is_read(kernel: Any, boot_dir: BootDir) -> None:
    cpio = tiny_initramfs(boot_dir.path / "smoke.cpio", SMOKE_INIT)
    append = " ".join((*GUEST_KERNEL_ARGS, "harness=direct"))
    with qemu_direct(kernel.vmlinuz, cpio, append, log_dir=boot_dir.path, name="smoke") as vm:
        vm.expect(r"Linux version \d", 60)
        m = vm.expect(r"^HARNESS-SMOKE cmdline=(.*) uptime=", 120)
        assert "harness=direct" in m[1]
        assert vm.wait_exit(60) == 0
    assert (boot_dir.path / "smoke.serial.log").read_text().count("HARNESS-SMOKE") == 1


def test_expect_fails_when_the_guest_stops_first(kernel: Any, boot_dir: BootDir) -> None:
    cpio = tiny_initramfs(boot_dir.path / "smoke.cpio", SMOKE_INIT)
    append = " ".join(GUEST_KERNEL_ARGS)
    with (
        qemu_direct(kernel.vmlinuz, cpio, append, log_dir=boot_dir.path, name="early-exit") as vm,
        pytest.raises(GuestError, match=r"QEMU exited .* before 'NEVER-PRINTED' appeared"),
    ):
        vm.expect("NEVER-PRINTED", 120)


@pytest.mark.parametrize("server", ["bootkit", "nginx"])
def test_ipxe_fetches_kernel_and_initrd_over_http(kernel: Any, boot_dir: BootDir, server: str) -> None:
    """BIOS firmware -> QEMU's iPXE ROM -> DHCP/TFTP script -> HTTP from the host's loopback server."""
    cpio = tiny_initramfs(boot_dir.path / "smoke.cpio", SMOKE_INIT)
    www = publish(boot_dir.path / "www", {"vmlinuz": kernel.vmlinuz, "smoke.cpio": cpio})
    serve = http_server if server == "bootkit" else nginx_server
    with serve(www, log_dir=boot_dir.path) as web:
        tftp = boot_dir.path / "tftp"
        tftp.mkdir()
        (tftp / "boot.ipxe").write_text(
            "#!ipxe\n"
            f"kernel {web.guest_url}/vmlinuz {' '.join(GUEST_KERNEL_ARGS)} harness=pxe-{server}\n"
            f"initrd {web.guest_url}/smoke.cpio\n"
            "boot\n"
        )
        with qemu_pxe(tftp, "boot.ipxe", log_dir=boot_dir.path, name=f"pxe-{server}") as vm:
            m = vm.expect(r"^HARNESS-SMOKE cmdline=(.*) uptime=", 300)
            assert f"harness=pxe-{server}" in m[1]
            assert vm.wait_exit(60) == 0
        if server == "nginx":  # bootkit serve-http logs requests only with -v
            assert "GET /vmlinuz" in web.requests_log()
            assert "GET /smoke.cpio" in web.requests_log()


@pytest.mark.parametrize("kind", ["busybox", "debian"])
def test_proof_from_a_local_disk(kind: str, kernel: Any, boot_dir: BootDir) -> None:
    """The test roots' proof runs on a real kernel: read from a local virtio disk (no NBD, read-only), it
    must report the right checksum and, honestly, no NBD root, no overlay and no server."""
    image = images.root_image(kind)
    cpio = tiny_initramfs(boot_dir.path / "local.cpio", LOCAL_DISK_INIT, kmoddir=kernel.kmoddir,
                          modules=LOCAL_MODULES)
    append = " ".join(GUEST_KERNEL_ARGS)
    with qemu_direct(kernel.vmlinuz, cpio, append, disks=[image.raw], log_dir=boot_dir.path,
                     name=f"local-{kind}") as vm:
        proof = expect_proof(vm, 300)
        expect_clean_poweroff(vm)
    boot_dir.record(vm, root=kind, boot="local-disk")
    assert proof.sha256 == image.known_sha256
    # the inits remount a read-only ext4 root read-write, so only the overlay check tells it apart
    assert proof.problems(image) == [
        "root none: not mounted from a partition of an NBD device",
        "root file system ext4: not bootkit's overlay",
        "NBD server after switch root: dead",
    ]


def test_stage_times_follow_boot_order() -> None:
    """Stages are taken in order (a late line never counts for an early stage) with the guest's clock."""
    lines = [
        ConsoleLine(9.5, "[    0.000000] Linux version 6.1.0-56-amd64"),
        ConsoleLine(20.0, "bootkit: [   12.00] mount: too early, before the network"),
        ConsoleLine(21.0, "[   11.50] python3[218]: bootkit: [   11.49] start: root=qcow2:http://10.0.2.2:1/d"),
        ConsoleLine(22.0, "bootkit: [   12.40] fetch: disk.qcow2: 2.4 MiB at 12 MiB/s (0.19 s)"),
        ConsoleLine(23.0, "BOOTKIT-PROOF root=/dev/nbd0p2 rootfs=overlay sha256=x overlay=rw nbd-server=alive "
                          "uptime=15.25"),
    ]
    stages = {s.name: s for s in stage_times(lines)}
    assert list(stages) == ["kernel", "network", "download", "target"]
    assert stages["kernel"].host_s == 9.5
    assert stages["network"].guest_s == 11.5
    assert stages["download"].guest_s == 12.4
    assert stages["target"].guest_s == 15.25


def test_missing_pieces_are_named() -> None:
    from bkharness.pieces import MissingPiece, require_command

    require_command("serve-http")  # exists: no exception
    with pytest.raises(MissingPiece, match="'bootkit no-such-command' does not exist yet"):
        require_command("no-such-command")


def test_qemu_command_defaults_and_network_options(tmp_path: Path) -> None:
    """The options tests/ boots with (another -netdev, a MAC, UEFI's own PXE) change only their own parts."""
    tftp = tmp_path / "tftp"
    assert qemu_command(tftp_dir=tftp, bootfile="boot.ipxe")[-6:] == [
        "-netdev", f"user,id=n0,tftp={tftp},bootfile=boot.ipxe",
        "-device", "virtio-net-pci,netdev=n0,bootindex=1",
        "-boot", "n",
    ]  # fmt: skip
    vars_file = tmp_path / "vars.fd"
    socket = "stream,id=n0,server=off,addr.type=unix,addr.path=/tmp/s"
    cmd = qemu_command(firmware=Firmware.uefi, vars_file=vars_file, netdev=socket, mac="52:54:00:65:43:21",
                       firmware_pxe=True)  # fmt: skip
    assert cmd[-6:] == [
        "-netdev", socket,
        "-device", "virtio-net-pci,netdev=n0,bootindex=1,romfile=,mac=52:54:00:65:43:21",
        "-boot", "n",
    ]  # fmt: skip
    assert cmd == qemu_command(firmware=Firmware.uefi, vars_file=vars_file)[:-4] + cmd[-6:]
    with pytest.raises(ValueError, match="only OVMF has a PXE client of its own"):
        qemu_command(netdev=socket, firmware_pxe=True)
