"""Netboots over the networks pxe-config's ``ip``, ``vlan`` and ``bond`` keys describe (docs/pxe.md, "VLAN,
bonding, IPv6"): an IPv6-only network, and a VLAN on a bond of two NICs served by a second guest.

To save boot time the client starts by direct kernel boot with the kernel line ``pxe-config`` wrote for the
entry (the iPXE line minus ``initrd=``, which only the EFI stub reads): what these tests prove is the
initramfs's side; test_netboot.py and test_pxecfg_qemu.py prove the boot loaders carry the line.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bkharness.fixtures import BootDir
from bkharness.guest import Guest, Nic, qemu_command
from bkharness.images import RootImage, qcow2_image
from bkharness.initramfs import tiny_initramfs
from bkharness.netboot import publish
from bkharness.pieces import GUEST_BOOT_ARGS, bootkit, require_boot_code

from bootkit.boot.cmdline import join_args
from bootkit.host.pxecfg.cmdline import kernel_args
from bootkit.host.pxecfg.load import load_file
from bootkit.run import spawn

#: a netboot under TCG takes 25-40 s on an idle machine and about 60 s on a busy one (2 cores shared)
BOOT_TIMEOUT = 300.0

#: where libslirp puts the host on an IPv6 user network (its default prefix fec0::/64); connections to it
#: reach the host's ::1, as 10.0.2.2 reaches 127.0.0.1
SLIRP_HOST6 = "fec0::2"


def _pxe_config(work: Path, description: str) -> tuple[str, str]:
    """Run ``bootkit pxe-config`` on ``description``; return the entry's kernel line (no ``initrd=``) and the
    iPXE script it wrote."""
    toml = work / "pxe.toml"
    toml.write_text(description)
    out = work / "pxe"
    bootkit("pxe-config", toml, "--out", out, "--no-grub-images")
    entry = load_file(toml).entries[0]
    return join_args(kernel_args(entry)), (out / "tftp" / "boot.ipxe").read_text()


@contextmanager
def _serve_http_v6(root: Path, log: Path) -> Iterator[int]:
    """``bootkit serve-http --bind [::1]:0 ROOT``; yields the port it announced."""
    with log.open("wb") as err:
        proc = spawn([sys.executable, "-m", "bootkit", "-v", "serve-http", "--bind", "[::1]:0", str(root)],
                     stdout=subprocess.PIPE, stderr=err)  # fmt: skip
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline().decode() if ready else ""
        m = re.search(r"\[::1\]:(\d+)", line)
        assert m, f"serve-http did not announce an IPv6 address: {line!r}"
        yield int(m.group(1))
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)


V6_DESCRIPTION = """\
base_url = "http://[{host}]:{port}/"
docroot = "{www}"
timeout = 0
bootloaders = ["ipxe"]
console = ["ttyS0,115200"]
ip = "auto6"

[[entry]]
name = "v6"
kernel = "vmlinuz"
initrd = "initrd.img"
image = "disk.qcow2"
mode = "lazy"
manifest = "disk.qcow2.manifest"
args = {args}
"""


def test_ipv6_only_auto6_lazy_with_manifest(kernel: Any, systemd_initrd: Path, debian_root: RootImage,
                                            boot_dir: BootDir) -> None:
    """No IPv4 at all (QEMU's user network with ipv4=off): the systemd initramfs (systemd-network-generator,
    networkd) configures the NIC from router advertisements (ip=auto6), bootkit reads the image lazily from
    http://[fec0::2]:PORT/ and checks every chunk against a manifest whose URL is an IPv6 literal too; the
    Debian root's systemd then runs on it."""
    require_boot_code()
    image = qcow2_image(debian_root.raw, compression="zstd")
    manifest = boot_dir.path / "disk.qcow2.manifest"
    bootkit("manifest", "-o", manifest, image)
    www = publish(boot_dir.path / "www", {"vmlinuz": Path(kernel.vmlinuz), "initrd.img": systemd_initrd,
                                          "disk.qcow2": image, "disk.qcow2.manifest": manifest})  # fmt: skip
    log = boot_dir.path / "serve-http.log"
    with _serve_http_v6(www, log) as port:
        args = "[" + ", ".join(f'"{a}"' for a in GUEST_BOOT_ARGS) + "]"
        line, script = _pxe_config(boot_dir.path, V6_DESCRIPTION.format(host=SLIRP_HOST6, port=port, www=www,
                                                                         args=args))  # fmt: skip
        url = f"http://[{SLIRP_HOST6}]:{port}"
        assert f"root=qcow2:{url}/disk.qcow2 " in line and f"rd.qcow2.manifest={url}/disk.qcow2.manifest " in line
        assert " ip=auto6 rd.neednet=1" in line
        assert f"initrd=initrd.img {line}" in script  # what iPXE would hand the kernel
        cmd = qemu_command(kernel=Path(kernel.vmlinuz), initrd=systemd_initrd, append=line,
                           netdev="user,id=n0,ipv4=off,ipv6=on")  # fmt: skip
        with _guest(cmd, boot_dir.path, "ipv6-auto6") as vm:
            boot_dir.prove(vm, debian_root, BOOT_TIMEOUT, network="ipv6-auto6", mode="lazy", root="debian",
                           initrd="systemd")  # fmt: skip
            assert vm.seen(r"read lazily"), "the boot code did not report lazy mode"
    requests = log.read_text(errors="replace")
    # partial content of the image and the whole manifest, all over IPv6
    assert re.search(r'"GET /disk\.qcow2 HTTP/1\.[01]" 206', requests), requests[-2000:]
    assert re.search(r'"GET /disk\.qcow2\.manifest HTTP/1\.[01]" 200', requests), requests[-2000:]


@contextmanager
def _guest(cmd: list[str], log_dir: Path, name: str) -> Iterator[Guest]:
    guest = Guest(cmd, name=name, log_path=log_dir / f"{name}.serial.log", boot_timeout=BOOT_TIMEOUT + 120)
    try:
        yield guest
    finally:
        guest.close()


# -- a VLAN on a bond, served by a second guest ----------------------------------------------------------------
#
# The server guest (busybox, a tiny initramfs) bonds its two NICs, puts VLAN 100 on the bond and serves DHCP
# (udhcpd) and HTTP (httpd, the image) on that VLAN only. The client's two NICs are connected to the server's
# two by point-to-point QEMU networks over unix sockets: untagged frames reach nothing, so the client boots
# only if its initramfs built the bond and the VLAN as pxe-config wrote them.

SERVER_IP = "192.168.60.1"
VLAN_ID = 100

SERVER_INIT = """\
#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
@LOAD_MODULES@
ip link set lo up
# the bonding module made bond0 (max_bonds=1), balance-rr by default, as the client's bond (systemd's generator
# would make it balance-rr whatever bond= says)
for nic in eth0 eth1; do ip link set "$nic" down; echo "+$nic" > /sys/class/net/bond0/bonding/slaves; done
ip link set bond0 up
ip link add link bond0 name bond0.{vid} type vlan id {vid} || vconfig add bond0 {vid}
ip link set bond0.{vid} up
ip addr add {server_ip}/24 dev bond0.{vid}
mkdir -p /var/lib/misc /tmp
touch /tmp/udhcpd.leases
udhcpd -f /etc/udhcpd.conf &
httpd -p 80 -h /srv/http
echo "SERVER-READY on bond0.{vid}"
while true; do sleep 60; done
"""

UDHCPD_CONF = """\
start 192.168.60.100
end 192.168.60.150
interface bond0.{vid}
lease_file /tmp/udhcpd.leases
option subnet 255.255.255.0
"""

VLAN_DESCRIPTION = """\
base_url = "http://{server_ip}/"
docroot = "{www}"
timeout = 0
bootloaders = ["ipxe"]
console = ["ttyS0,115200"]

# kernel and initrd as URLs: the client boots them directly, only the image is served (and hashed)
[[entry]]
name = "vlan"
kernel = "http://{server_ip}/vmlinuz"
initrd = "http://{server_ip}/initrd.img"
image = "disk.qcow2"
vlan = "bond0.{vid}:bond0"
bond = "bond0:eth0,eth1:mode=balance-rr"
args = {args}
"""


def _server_initramfs(kernel: Any, www: Path, work: Path) -> Path:
    """The server guest's initramfs: busybox, the NIC, bonding and VLAN modules, ``www`` under /srv/http."""
    archive = tiny_initramfs(work / "server.cpio", SERVER_INIT.format(vid=VLAN_ID, server_ip=SERVER_IP),
                             kmoddir=Path(kernel.kmoddir),
                             modules=("virtio_pci", "virtio_net", "bonding", "8021q"))  # fmt: skip
    # the files to serve and udhcpd's configuration, appended as a second cpio archive (the kernel unpacks both)
    extra = work / "server-files"
    (extra / "etc").mkdir(parents=True)
    (extra / "etc" / "udhcpd.conf").write_text(UDHCPD_CONF.format(vid=VLAN_ID))
    publish(extra / "srv" / "http", {p.name: p for p in www.iterdir()})
    names = sorted(p.relative_to(extra).as_posix() for p in extra.rglob("*"))
    files = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=extra,
                           input="\n".join(names).encode() + b"\n", capture_output=True, check=True).stdout  # fmt: skip
    with archive.open("ab") as f:
        f.write(files)
    return archive


def _sockets(cmd: list[str], sockdir: str, *, server: bool, macs: tuple[str, str]) -> list[str]:
    """``cmd`` with its network replaced by two NICs on unix-socket links n0 and n1 to the other guest."""
    i = cmd.index("-netdev")
    del cmd[i : i + 4]  # -netdev VALUE -device VALUE
    for n, mac in enumerate(macs):
        mode = "server=on" if server else "server=off"
        cmd += [
            "-netdev", f"stream,id=n{n},{mode},addr.type=unix,addr.path={sockdir}/link{n}",
            "-device", f"{Nic.virtio},netdev=n{n},mac={mac}",
        ]  # fmt: skip
    return cmd


def test_vlan_on_a_bond_of_two_nics(kernel: Any, shell_initrd: Path, busybox_root: RootImage,
                                    boot_dir: BootDir) -> None:
    """The shell initramfs (dracut's network-legacy: parse-bond, parse-vlan, ifup) builds bond0 of eth0 and
    eth1, VLAN 100 on it, gets an address by DHCP on the VLAN, and bootkit's netroot handler boots the image
    served there. (The systemd flavour boots IPv6 above; its vlan=/bond= handling, systemd-network-generator,
    is checked on the host in tests/test_pxecfg_net.py.)"""
    require_boot_code()
    image = qcow2_image(busybox_root.raw, compression="zstd")
    www = publish(boot_dir.path / "www", {"disk.qcow2": image})
    args = "[" + ", ".join(f'"{a}"' for a in (*GUEST_BOOT_ARGS, "net.ifnames=0")) + "]"
    line, _ = _pxe_config(boot_dir.path, VLAN_DESCRIPTION.format(server_ip=SERVER_IP, www=www, vid=VLAN_ID,
                                                                 args=args))  # fmt: skip
    assert f" vlan=bond0.{VLAN_ID}:bond0 bond=bond0:eth0,eth1:mode=balance-rr ip=bond0.{VLAN_ID}:dhcp " in line
    server_initrd = _server_initramfs(kernel, www, boot_dir.path)
    with tempfile.TemporaryDirectory(prefix="bk-vlan-") as sockdir:  # unix socket paths: 108 bytes at most
        server_cmd = _sockets(qemu_command(kernel=Path(kernel.vmlinuz), initrd=server_initrd, memory_mib=512,
                                           append="console=ttyS0,115200 panic=-1 quiet"),
                              sockdir, server=True, macs=("52:54:00:00:60:01", "52:54:00:00:60:02"))  # fmt: skip
        with _guest(server_cmd, boot_dir.path, "vlan-server") as server:
            server.expect(r"SERVER-READY", BOOT_TIMEOUT)
            client_cmd = _sockets(qemu_command(kernel=Path(kernel.vmlinuz), initrd=shell_initrd, append=line),
                                  sockdir, server=False, macs=("52:54:00:00:61:01", "52:54:00:00:61:02"))  # fmt: skip
            with _guest(client_cmd, boot_dir.path, "vlan-client") as vm:
                boot_dir.prove(vm, busybox_root, BOOT_TIMEOUT, network="vlan-on-bond", mode="ram", root="busybox",
                               initrd="shell")  # fmt: skip
                # dracut's ifup ran bootkit's netroot handler on the VLAN, the top interface
                assert vm.seen(r"bootkit: network up on bond0\.100"), vm.tail(60)
            # the only way to the image: udhcpd and httpd answer on the tagged VLAN of the server's bond only
            assert server.seen(r"SERVER-READY on bond0\.100")
