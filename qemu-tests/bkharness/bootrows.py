"""The boots bench/boot.py compares: one :class:`Row` per way of reaching the same root, and how to boot it.

Every row boots the same kernel with the same memory and CPU under TCG and ends at the root's proof
(``BOOTKIT-PROOF ... uptime=``): the guest's clock from kernel start to a running system, and the host's clock
from QEMU's start. The network rows (dracut's NBD root, dracut's livenet, bootkit) all start from QEMU's
BIOS PXE and iPXE, so their host clocks include the same firmware work; the two floors boot their kernel
directly from QEMU (``-kernel``), as a local disk needs no network.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bkharness import images, pieces
from bkharness.guest import GUEST_KERNEL_ARGS, Guest, qemu_direct, qemu_pxe
from bkharness.initramfs import LOCAL_DISK_INIT, tiny_initramfs
from bkharness.netboot import publish
from bkharness.peers import Peer, peer_initrd, qemu_nbd_server, squashfs_image
from bkharness.proof import Proof, expect_clean_poweroff, expect_proof
from bkharness.servers import http_server
from bkharness.timeline import stage_times

MEMORY_MIB = 1024
#: the tiny busybox initramfs of floor A loads these itself (insmod), in this order with their dependencies
LOCAL_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")

#: what QEMU's user network gives the guest (its DHCP server hands out 10.0.2.15, the host is 10.0.2.2)
GUEST_IP, GATEWAY, NETMASK = "10.0.2.15", "10.0.2.2", "255.255.255.0"
#: QEMU's default MAC address for the first NIC
GUEST_MAC = "52:54:00:12:34:56"
#: the boot interface's name, pinned by MAC (dracut's ifname=, the way the handover names it)
BOOT_IF = "bootnet"

#: dracut's static configuration of the boot NIC: what the lease handover gives, written out
STATIC_ARGS = (f"ip={GUEST_IP}::{GATEWAY}:{NETMASK}::{BOOT_IF}:none", f"ifname={BOOT_IF}:{GUEST_MAC}")
#: the same, from the values iPXE holds after its DHCP (a stand-in while pxe-config writes ip=dhcp)
IPXE_LEASE_ARGS = (f"ip=${{netX/ip}}::${{netX/gateway}}:${{netX/netmask}}::{BOOT_IF}:none",
                   f"ifname={BOOT_IF}:${{netX/mac}}")
#: kernel arguments that configure the initramfs network, replaced when a row sets its own
_NET_KEYS = ("ip=", "ifname=", "BOOTIF=", "nameserver=")


class Kind(enum.StrEnum):
    """What boots the root."""

    floor_a = "floor A: busybox initramfs, local disk"
    floor_b = "floor B: dracut, local disk"
    #: floor B with dracut's network handler bringing the boot NIC up before the root (rd.neednet=1)
    floor_c = "floor C: dracut network up, local disk"
    nbd = "dracut NBD root"
    livenet = "dracut livenet"
    bootkit = "bootkit"


class Net(enum.StrEnum):
    """How the initramfs gets its address."""

    none = "-"
    #: DHCP in the initramfs (dracut's ip=dhcp)
    dhcp = "ip=dhcp"
    #: static ip= of the boot NIC, the values the firmware's lease had
    static = "static ip="
    #: bootkit: iPXE's lease handed to the kernel
    lease = "lease"


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    kind: Kind
    net: Net
    systemd: bool

    @property
    def flavour(self) -> str:
        return "-" if self.kind is Kind.floor_a else ("systemd" if self.systemd else "shell")

    @property
    def key(self) -> str:
        """A short stable name (JSON keys, log directories)."""
        kind = self.kind.name.replace("_", "-")
        net = {Net.none: "", Net.dhcp: "-dhcp", Net.static: "-static", Net.lease: "-lease"}[self.net]
        return f"{kind}{net}" + ("" if self.kind is Kind.floor_a else f"-{self.flavour}")

    @property
    def label(self) -> str:
        net = "" if self.net is Net.none else f", {self.net.value}"
        flavour = "" if self.kind is Kind.floor_a else f" ({self.flavour})"
        return f"{self.kind.value}{flavour}{net}"

    @property
    def is_peer(self) -> bool:
        return self.kind in (Kind.nbd, Kind.livenet)


def rows_for(systemd: bool) -> list[Row]:
    """The rows of one run: peers and floor B in the root's flavour, bootkit's lease in both flavours."""
    return [
        Row(Kind.floor_a, Net.none, systemd),
        Row(Kind.floor_b, Net.none, systemd),
        Row(Kind.floor_c, Net.static, systemd),
        Row(Kind.nbd, Net.dhcp, systemd),
        Row(Kind.nbd, Net.static, systemd),
        Row(Kind.livenet, Net.dhcp, systemd),
        Row(Kind.livenet, Net.static, systemd),
        Row(Kind.bootkit, Net.lease, False),
        Row(Kind.bootkit, Net.lease, True),
        Row(Kind.bootkit, Net.dhcp, systemd),
    ]


@dataclass
class Setup:
    """What every boot of a run shares: kernel, root image, its QCOW2 and squashfs, and the initramfs
    images, each built once per run (the first row that needs one builds it)."""

    kernel: Any
    image: images.RootImage
    qcow2: Path
    work: Path
    _initrds: dict[tuple[str, bool], Path]

    def __init__(self, kernel: Any, image: images.RootImage, qcow2: Path, work: Path) -> None:
        self.kernel, self.image, self.qcow2, self.work = kernel, image, qcow2, work
        self._initrds = {}

    def initrd(self, kind: Kind, systemd: bool) -> Path:
        """bootkit's initramfs or a peer's, built on first use."""
        key = (kind.name, systemd)
        if key not in self._initrds:
            out = self.work / f"initrd-{kind.name}-{'systemd' if systemd else 'shell'}.img"
            if kind is Kind.bootkit:
                pieces.initrd(out, systemd=systemd, drivers=("virtio_net",))
            else:
                peer = {Kind.floor_b: Peer.local, Kind.floor_c: Peer.local_net, Kind.nbd: Peer.nbd,
                        Kind.livenet: Peer.livenet}[kind]
                peer_initrd(out, peer, kver=self.kernel.kver, kmoddir=self.kernel.kmoddir, systemd=systemd)
            self._initrds[key] = out
        return self._initrds[key]

    def squashfs(self) -> Path:
        return squashfs_image(self.image, self.work / "rootfs.squashfs")


@dataclass(frozen=True)
class Result:
    """One boot's figures: guest and host clock at the proof, and the stage timeline."""

    guest_target_s: float
    host_target_s: float
    stages: dict[str, dict[str, float | None]]
    #: seconds the guest's one vCPU had been idle at the proof (the proof's ``idle=``; None in older runs)
    guest_idle_s: float | None = None

    @property
    def guest_busy_s(self) -> float | None:
        """Guest CPU seconds used from kernel start to the proof: with one vCPU, the clock minus the idle time."""
        return None if self.guest_idle_s is None else round(self.guest_target_s - self.guest_idle_s, 2)

    @property
    def host_kernel_s(self) -> float:
        """Host seconds from the kernel's first console line to the proof: the guest clock's span measured
        by the host, which stays right when a loaded host makes the guest's clocksource jump (TSC marked
        unstable, the guest clock running ahead)."""
        kernel = self.stages.get("kernel", {}).get("host_s")
        return round(self.host_target_s - kernel, 2) if kernel is not None else self.host_target_s

    def to_json(self) -> dict[str, object]:
        return {"guest_target_s": self.guest_target_s, "host_target_s": self.host_target_s,
                "host_kernel_s": self.host_kernel_s, "guest_idle_s": self.guest_idle_s, "stages": self.stages}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Result:
        idle = d.get("guest_idle_s")
        return cls(float(d["guest_target_s"]), float(d["host_target_s"]), d["stages"],
                   None if idle is None else float(idle))


def _finish(vm: Guest, check: Callable[[Proof], list[str]], what: str) -> Result:
    proof = expect_proof(vm, 600)
    host = vm.first_time(r"^BOOTKIT-PROOF ") or vm.elapsed
    expect_clean_poweroff(vm)
    problems = check(proof)
    if problems:
        raise AssertionError(f"{what}: " + "; ".join(problems))
    stages = {s.name: {"host_s": s.host_s, "guest_s": s.guest_s} for s in stage_times(vm.lines)}
    idle = next((float(m[1]) for line in vm.lines if (m := _IDLE.match(line.text))), None)
    return Result(proof.uptime, round(host, 2), stages, idle)


#: the proof's idle line (qemu-tests/rootfs/common/usr/libexec/bootkit-proof)
_IDLE = re.compile(r"^BOOTKIT-PROOF-INFO idle=(\d+(?:\.\d+)?)$")


def _same_data(image: images.RootImage) -> Callable[[Proof], list[str]]:
    def check(proof: Proof) -> list[str]:
        return [] if proof.sha256 == image.known_sha256 else [f"known file {proof.sha256} != {image.known_sha256}"]
    return check


#: on every dracut guest's line: a failed boot powers off instead of waiting in the emergency shell, and no
#: fsck of the root (bootkit runs none; e2fsck cannot open the read-only NBD export and stops the boot)
_DRACUT_ARGS = ("rd.shell=0", "rd.emergency=poweroff", "rd.skipfsck")


#: on the local-disk floors' line: the Debian root's systemd would otherwise find the disk's ESP through
#: systemd-gpt-auto-generator and wait 90 s for its device (no vfat module in the root); the network rows
#: have no local disk, so nothing there waits for it
_LOCAL_ARGS = ("systemd.gpt_auto=0",)


def boot_floor_a(setup: Setup, row: Row, d: Path) -> Result:
    cpio = tiny_initramfs(d / "local.cpio", LOCAL_DISK_INIT, kmoddir=setup.kernel.kmoddir, modules=LOCAL_MODULES)
    args = [*GUEST_KERNEL_ARGS, *_LOCAL_ARGS]
    with qemu_direct(setup.kernel.vmlinuz, cpio, " ".join(args), disks=[setup.image.raw],
                     memory_mib=MEMORY_MIB, log_dir=d, name=row.key) as vm:
        return _finish(vm, _same_data(setup.image), row.label)


def boot_floor_b(setup: Setup, row: Row, d: Path) -> Result:
    args = [*GUEST_KERNEL_ARGS, *_DRACUT_ARGS, *_LOCAL_ARGS, f"root=/dev/vda{setup.image.root_partition}", "rw"]
    with qemu_direct(setup.kernel.vmlinuz, setup.initrd(row.kind, row.systemd), " ".join(args),
                     disks=[setup.image.raw], memory_mib=MEMORY_MIB, log_dir=d, name=row.key) as vm:
        return _finish(vm, _same_data(setup.image), row.label)


def boot_floor_c(setup: Setup, row: Row, d: Path) -> Result:
    """Floor B's disk and root, with dracut's network handler configuring the boot NIC from the handed-over
    static configuration first: ``rd.neednet=1`` makes dracut's main loop wait for the interface before it
    mounts the root, as it does for a network root. No fetch, no network root: dracut's own network cost."""
    args = [*GUEST_KERNEL_ARGS, *_DRACUT_ARGS, *_LOCAL_ARGS, f"root=/dev/vda{setup.image.root_partition}", "rw",
            *STATIC_ARGS, "rd.neednet=1"]
    with qemu_direct(setup.kernel.vmlinuz, setup.initrd(row.kind, row.systemd), " ".join(args),
                     disks=[setup.image.raw], memory_mib=MEMORY_MIB, log_dir=d, name=row.key) as vm:
        return _finish(vm, _same_data(setup.image), row.label)


def ipxe_script(base_url: str, args: list[str]) -> str:
    """A minimal iPXE script: kernel and initramfs over HTTP, ``args`` on the kernel line."""
    return (
        "#!ipxe\n"
        f"kernel {base_url}/vmlinuz initrd=initrd.img {' '.join(args)}\n"
        f"initrd --name initrd.img {base_url}/initrd.img\n"
        "boot\n"
    )


def _net_args(net: Net) -> list[str]:
    return ["ip=dhcp"] if net is Net.dhcp else list(STATIC_ARGS)


def boot_peer(setup: Setup, row: Row, d: Path) -> Result:
    """dracut's NBD root or livenet, netbooted through iPXE like bootkit."""
    files = {"vmlinuz": Path(setup.kernel.vmlinuz), "initrd.img": setup.initrd(row.kind, row.systemd)}
    if row.kind is Kind.livenet:
        files["rootfs.squashfs"] = setup.squashfs()
    www = publish(d / "www", files)
    tftp = d / "tftp"
    tftp.mkdir()
    with http_server(www, log_dir=d) as web:
        if row.kind is Kind.nbd:
            with qemu_nbd_server(setup.qcow2, log_dir=d) as port:
                # the root partition of the exported disk (dracut's nbd module reads root=nbd:... only for a
                # file system on the whole device); rootovl: a tmpfs overlay over the read-only export
                root = [f"root=/dev/nbd0p{setup.image.root_partition}", f"netroot=nbd:{GATEWAY}:{port}",
                        "rootovl", "nbd.max_part=16"]
                return _boot_peer_pxe(setup, row, d, tftp, web.guest_url, root)
        # a squashfs of the tree itself (no LiveOS/rootfs.img inside): dmsquash-live mounts it under an
        # overlayfs, and the shell flavour's mount hook (90overlayfs) acts only when told so on the command line
        root = [f"root=live:{web.guest_url}/rootfs.squashfs", "rd.live.overlay.overlayfs=1"]
        return _boot_peer_pxe(setup, row, d, tftp, web.guest_url, root)


def _boot_peer_pxe(setup: Setup, row: Row, d: Path, tftp: Path, base_url: str, root: list[str]) -> Result:
    # NBD: the export is read-only and rootovl makes the root writable; livenet mounts its own overlay
    rw = [] if row.kind is Kind.nbd else ["rw"]
    args = [*root, *_net_args(row.net), "rd.neednet=1", *rw, *GUEST_KERNEL_ARGS, *_DRACUT_ARGS]
    (tftp / "boot.ipxe").write_text(ipxe_script(base_url, args))
    with qemu_pxe(tftp, "boot.ipxe", log_dir=d, memory_mib=MEMORY_MIB, name=row.key) as vm:
        return _finish(vm, _same_data(setup.image), row.label)


def set_network(script: str, net: Net) -> tuple[str, bool]:
    """``script`` (pxe-config's boot.ipxe) with the kernel line's network set for ``net``.

    Lease: pxe-config's own handover when its kernel line carries one (it reads iPXE's ``${netX/...}``),
    else the stand-in :data:`IPXE_LEASE_ARGS`; DHCP: ``ip=dhcp`` instead of any handover. Returns the script
    and whether pxe-config's own handover was kept.
    """
    out = []
    native = False
    for line in script.splitlines():
        if line.startswith("kernel "):
            head, sep, tail = line.partition(" || ")
            words = head.split(" ")
            has_lease = any(w.startswith(_NET_KEYS) and "${" in w for w in words)
            if net is Net.lease and has_lease:
                native = True
            else:
                words = [w for w in words if not w.startswith(_NET_KEYS)]
                words += list(IPXE_LEASE_ARGS) if net is Net.lease else ["ip=dhcp"]
            line = " ".join(words) + sep + tail
        out.append(line)
    return "\n".join(out) + "\n", native


def boot_bootkit(setup: Setup, row: Row, d: Path) -> tuple[Result, bool]:
    """bootkit's netboot through iPXE (pxe-config's boot.ipxe), the network set as the row says."""
    pieces.require_boot_code()
    initrd = setup.initrd(Kind.bootkit, row.systemd)
    www = publish(d / "www", {"vmlinuz": Path(setup.kernel.vmlinuz), "initrd.img": initrd,
                              "disk.qcow2": setup.qcow2})
    with http_server(www, log_dir=d) as web:
        tftp = pieces.pxe_tree(d / "pxe", base_url=web.guest_url + "/", docroot=www)
        script, native = set_network((tftp / "boot.ipxe").read_text(), row.net)
        (tftp / "boot.ipxe").write_text(script)
        with qemu_pxe(tftp, "boot.ipxe", log_dir=d, memory_mib=MEMORY_MIB, name=row.key) as vm:
            image = setup.image
            return _finish(vm, lambda proof: proof.problems(image), row.label), native

