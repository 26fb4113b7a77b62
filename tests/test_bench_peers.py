"""bench/boot.py's peers: dracut's own network-root initramfs images hold what they claim, and the kernel line
of each bootkit row configures the network the way its row says. No boots, no timings."""

from __future__ import annotations

from pathlib import Path

import pytest
from bkharness.bootrows import IPXE_LEASE_ARGS, Net, set_network
from bkharness.peers import Peer, PeerMissing, check_peer, initrd_modules, peer_initrd
from boot_fixtures import debian_kernel, need  # noqa: F401 - fixtures

from bootkit.host.kernelpkg import Kernel
from bootkit.run import run


def _files(initrd: Path) -> str:
    return run(["lsinitrd", initrd], capture=True).stdout.decode(errors="replace")


# One dracut build (about 15-35 s of CPU): livenet, the peer with the most modules (network, url-lib, dm,
# dmsquash-live, overlayfs); the NBD peer's list is built the same way and proves itself in every bench run.
@pytest.mark.parametrize("peer", [Peer.livenet])
def test_peer_initrd_holds_its_modules(peer: Peer, tmp_path: Path, debian_kernel: Kernel) -> None:  # noqa: F811
    need("dracut", "lsinitrd")
    try:
        check_peer(peer)
    except PeerMissing as e:
        pytest.skip(str(e))
    out = peer_initrd(tmp_path / f"{peer}.img", peer, kver=debian_kernel.kver, kmoddir=debian_kernel.kmoddir,
                      systemd=False)
    modules = initrd_modules(out)
    assert set(peer.modules(systemd=False)) <= modules, modules
    assert "bootkit" not in modules
    files = _files(out)
    want = {Peer.nbd: ["/nbd.ko", "usr/sbin/nbd-client", "/overlay.ko", "/ext4.ko"],
            Peer.livenet: ["/squashfs.ko", "/loop.ko", "/overlay.ko", "bin/curl", "sbin/dmsquash-live-root"]}
    for name in [*want[peer], "/virtio_net.ko", "/virtio_pci.ko"]:
        assert name in files, f"{name} missing from the {peer} initramfs"
    # only the guest's NIC: the trimmed kernel-network-modules, as bootkit build-initrd --drivers virtio_net
    for other in ("/e1000.ko", "/e1000e.ko", "/igb.ko", "/r8169.ko"):
        assert other not in files, f"{other}: the NIC drivers were not trimmed"


SCRIPT = """#!ipxe
:default-qcow2
kernel http://10.0.2.2:1/vmlinuz initrd=initrd.img root=qcow2:http://10.0.2.2:1/disk.qcow2 rw {net} \
rd.neednet=1 console=ttyS0,115200 || goto failed
initrd --name initrd.img http://10.0.2.2:1/initrd.img || goto failed
"""


def _kernel_words(script: str) -> list[str]:
    line = next(x for x in script.splitlines() if x.startswith("kernel "))
    head, sep, tail = line.partition(" || ")
    assert sep and tail == "goto failed", line
    return head.split(" ")


def test_lease_row_stands_in_for_a_pxe_config_without_handover() -> None:
    script, native = set_network(SCRIPT.format(net="ip=dhcp"), Net.lease)
    words = _kernel_words(script)
    assert not native
    assert "ip=dhcp" not in words
    assert [w for w in words if w.startswith(("ip=", "ifname="))] == list(IPXE_LEASE_ARGS)
    assert "root=qcow2:http://10.0.2.2:1/disk.qcow2" in words and "rd.neednet=1" in words


def test_lease_row_keeps_pxe_config_handover_and_dhcp_row_replaces_it() -> None:
    handover = "ip=${netX/ip}::${netX/gateway}:${netX/netmask}::boot0:none ifname=boot0:${netX/mac}"
    script, native = set_network(SCRIPT.format(net=handover), Net.lease)
    assert native
    assert script == SCRIPT.format(net=handover)
    script, native = set_network(SCRIPT.format(net=handover), Net.dhcp)
    words = _kernel_words(script)
    assert not native
    assert [w for w in words if w.startswith(("ip=", "ifname="))] == ["ip=dhcp"]
