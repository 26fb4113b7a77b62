"""dracut's own ways to boot a root, built the way bootkit's initramfs is built, for bench/boot.py.

A user who wants a network root without bootkit picks one of dracut's stock modules; the benchmark boots the
same root content through each of them, with the same kernel, so the table shows what bootkit costs or saves:

* :attr:`Peer.local`  ``base`` + ``rootfs-block`` with only the disk drivers: the root from a local virtio disk
  (the floor of everything dracut does before the root is mounted);
* :attr:`Peer.local_net`  the same with the network handler and the NIC's driver: the root still from the local
  disk, the boot NIC brought up first (``rd.neednet=1``), so the difference to :attr:`Peer.local` is what
  dracut's own network bring-up costs before any network root can start;
* :attr:`Peer.nbd`  dracut-network's ``nbd`` module and ``nbd-client``: ``netroot=nbd:SERVER:PORT`` against
  ``qemu-nbd --read-only`` serving the same QCOW2, the root partition under a tmpfs overlay
  (``overlay-root``'s ``rootovl``, as dracut makes a read-only network root writable);
* :attr:`Peer.livenet`  ``livenet`` + ``dmsquash-live``: ``root=live:URL`` of the same tree as squashfs,
  downloaded by curl into RAM and mounted under an overlayfs.

Each initramfs is built like ``bootkit build-initrd --drivers virtio_net``: ``--conf /dev/null``, an empty
confdir, ``--no-hostonly``, zstd, the network handler named (network-legacy or systemd-networkd), and a
``90kernel-network-modules`` of our own that installs only virtio_net, so no image pays for drivers the
guest does not have. :func:`peer_initrd` caches nothing: the caller keeps one per run.
"""

from __future__ import annotations

import enum
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bkharness.images import RootImage, extract_root_fs
from bkharness.servers import _stop, _wait_listening, free_port
from bootkit.host.initrd import link_dracut_tree, shadow_module
from bootkit.run import run, spawn

DRACUT_DIR = Path("/usr/lib/dracut")

#: dracut modules every peer initramfs starts from, per flavour (those of bootkit's own, bootkit.host.initrd)
_SHELL_BASE = ("base", "bash", "udev-rules")
_SYSTEMD_BASE = ("base", "bash", "systemd", "systemd-initrd", "dracut-systemd", "udev-rules")

#: the guest's only disk and network hardware (virtio-blk, virtio-net on PCI)
_DISK_DRIVERS = ("virtio_pci", "virtio_blk")
_NET_DRIVERS = ("virtio_pci", "virtio_net", "af_packet")


class Peer(enum.StrEnum):
    """A way stock dracut boots the test root, and what its initramfs needs."""

    local = "local"
    local_net = "local-net"
    nbd = "nbd"
    livenet = "livenet"

    def modules(self, *, systemd: bool) -> tuple[str, ...]:
        """The dracut modules (``--modules``), with the network handler of the flavour named."""
        base = _SYSTEMD_BASE if systemd else _SHELL_BASE
        handler = "systemd-networkd" if systemd else "network-legacy"
        if self is Peer.local:
            return (*base, "rootfs-block")
        if self is Peer.local_net:
            return (*base, handler, "network", "rootfs-block")
        if self is Peer.nbd:
            return (*base, handler, "nbd", "overlay-root")
        return (*base, handler, "livenet", "dmsquash-live")

    def drivers(self) -> tuple[str, ...]:
        """Kernel modules added by name (``--add-drivers``): the disk or the NIC with its bus, and the root's
        file system where the peer mounts an ext4 (livenet's squashfs, loop and overlay come with its modules)."""
        if self is Peer.local:
            return (*_DISK_DRIVERS, "ext4")
        if self is Peer.local_net:
            return (*_DISK_DRIVERS, *_NET_DRIVERS, "ext4")
        return (*_NET_DRIVERS, "ext4") if self is Peer.nbd else _NET_DRIVERS

    def package(self) -> str:
        """The Debian package that holds the peer's dracut module (for the error when it is missing)."""
        return {Peer.local: "dracut-core", Peer.local_net: "dracut-network", Peer.nbd: "dracut-network",
                Peer.livenet: "dracut-live"}[self]


class PeerMissing(Exception):
    """A tool or dracut module a peer needs is not installed; the message names the Debian package."""


def check_peer(peer: Peer) -> None:
    """One line naming the package to install when the peer cannot be built or served here."""
    need = {Peer.local: ["95rootfs-block"], Peer.local_net: ["95rootfs-block", "40network"],
            Peer.nbd: ["95nbd", "90overlay-root"],
            Peer.livenet: ["90livenet", "90dmsquash-live"]}[peer]
    for mod in need:
        if not (DRACUT_DIR / "modules.d" / mod).is_dir():
            raise PeerMissing(f"dracut module {mod} not found: install the Debian package {peer.package()!r}")
    tools = {Peer.local: [], Peer.local_net: [],
             Peer.nbd: [("nbd-client", "nbd-client"), ("qemu-nbd", "qemu-utils")],
             Peer.livenet: [("mksquashfs", "squashfs-tools"), ("curl", "curl")]}[peer]
    for tool, package in tools:
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            raise PeerMissing(f"{tool} not found: install the Debian package {package!r}")


def _dracutbase(work: Path) -> Path:
    """A symlink farm of /usr/lib/dracut whose 90kernel-network-modules installs only virtio_net.

    The same trim ``bootkit build-initrd --drivers virtio_net`` makes (bootkit.host.initrd): dracut's own
    module installs every NIC driver (about 10 MB compressed), which each peer would otherwise unpack at boot.
    """
    base = link_dracut_tree(work)
    own = work / "modules" / "90kernel-network-modules"
    own.mkdir(parents=True)
    (own / "module-setup.sh").write_text(
        "#!/bin/bash\n"
        "# bench: only the NIC the guests have (shadows the stock module, like bootkit --drivers)\n"
        "check() { return 255; }\n"
        "depends() { return 0; }\n"
        f"installkernel() {{ hostonly='' instmods {' '.join(_NET_DRIVERS)}; }}\n"
        "install() { return 0; }\n"
    )
    shadow_module(base, own)
    # overlay-root's check() looks for overlayfs under /lib/modules/$kernel, not under --kmoddir ($srcmods),
    # and so refuses a kernel that is not installed on the build host (the benchmark's cached one)
    ovl = work / "modules" / "90overlay-root"
    shutil.copytree(DRACUT_DIR / "modules.d" / "90overlay-root", ovl)
    setup = ovl / "module-setup.sh"
    setup.write_text(setup.read_text().replace("/lib/modules/$kernel/", "$srcmods/"))
    shadow_module(base, ovl)
    return base


def peer_initrd(out: Path, peer: Peer, *, kver: str, kmoddir: Path, systemd: bool) -> Path:
    """Build the initramfs of ``peer`` for the kernel at ``kmoddir`` into ``out`` (zstd, like bootkit's)."""
    check_peer(peer)
    with tempfile.TemporaryDirectory(prefix=".peer-initrd.", dir=out.parent) as tmp:
        work = Path(tmp)
        confdir = work / "emptyconf"
        confdir.mkdir()
        cmd = [
            "dracut",
            "--conf", "/dev/null",
            "--confdir", str(confdir),
            "--no-hostonly",
            "--no-early-microcode",
            "--kver", kver,
            "--kmoddir", str(kmoddir),
            "--modules", " ".join(peer.modules(systemd=systemd)),
            "--add-drivers", " ".join(peer.drivers()),
            "--zstd",
            "--force",
            str(out),
        ]  # fmt: skip
        run(cmd, env=dict(os.environ, dracutbasedir=str(_dracutbase(work))), capture=True, timeout=1800)
    return out


def initrd_modules(initrd: Path) -> set[str]:
    """The dracut modules an initramfs holds: the list dracut writes into it (usr/lib/dracut/modules.txt)."""
    out = run(["lsinitrd", "-f", "usr/lib/dracut/modules.txt", initrd], capture=True).stdout.decode(
        errors="replace")
    return {line.strip() for line in out.splitlines() if line.strip()}


def squashfs_image(image: RootImage, out: Path) -> Path:
    """The root file system of ``image`` as a squashfs (zstd) at ``out``: the same tree, no loop mount.

    ``debugfs rdump`` copies the tree out of the ext4 with owners and modes (run as root) into a temporary
    directory ($TMPDIR), then mksquashfs. Reused when ``out`` is newer than the disk it came from.
    """
    check_peer(Peer.livenet)
    if out.exists() and out.stat().st_mtime >= image.raw.stat().st_mtime:
        return out
    with tempfile.TemporaryDirectory(prefix="squashfs.") as tmp:
        fs = extract_root_fs(image, Path(tmp) / "root.ext4")
        tree = Path(tmp) / "tree"
        tree.mkdir()
        run(["debugfs", "-R", f"rdump / {tree}", fs], capture=True)
        shutil.rmtree(tree / "lost+found", ignore_errors=True)
        partial = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        run(["mksquashfs", tree, partial, "-comp", "zstd", "-noappend", "-quiet", "-no-progress"], capture=True)
        os.replace(partial, out)
    return out


@contextmanager
def qemu_nbd_server(qcow2: Path, *, log_dir: Path) -> Iterator[int]:
    """``qemu-nbd --read-only`` serving ``qcow2`` on a loopback port (yielded); stopped by PID on exit."""
    check_peer(Peer.nbd)
    log_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        port = free_port()
        cmd = [
            "qemu-nbd",
            "--read-only",
            "--format", "qcow2",
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--persistent",
            "--shared", "4",
            str(qcow2),
        ]  # fmt: skip
        with (log_dir / "qemu-nbd.log").open("ab") as log_file:
            proc = spawn(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _wait_listening(port, proc, 30, "qemu-nbd")
        except RuntimeError:
            _stop(proc)
            if attempt == 4:
                raise
            continue  # the port was taken between free_port() and qemu-nbd's bind: try another
        try:
            yield port
        finally:
            _stop(proc)
        return
