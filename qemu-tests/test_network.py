"""Netboots over the networks pxe-config's ``ip``, ``vlan`` and ``bond`` keys describe (docs/pxe.md, "VLAN,
bonding, IPv6"): an IPv6-only network with iPXE's configuration handed over, and a VLAN on a bond of two NICs
served by a second guest.

The IPv6 client boots iPXE (``ipxe.lkrn``) and the script pxe-config wrote. To save boot time the VLAN client
starts by direct kernel boot with the kernel line ``pxe-config`` wrote for the entry (the iPXE line minus
``initrd=``, which only the EFI stub reads): what that test proves is the initramfs's side;
test_netboot.py and test_pxecfg_qemu.py prove the boot loaders carry the line.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
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

[[entry]]
name = "v6"
kernel = "vmlinuz"
initrd = "initrd.img"
image = "disk.qcow2"
mode = "lazy"
manifest = "disk.qcow2.manifest"
args = {args}
"""

#: iPXE as a Linux kernel (QEMU boots it directly; it runs its initrd as a script): Debian's build has IPv6
IPXE_LKRN = Path("/usr/lib/ipxe/ipxe.lkrn")
V6_MAC = "52:54:00:12:34:56"
#: iPXE under TCG: ifconf and the kernel and initramfs over QEMU's user network take 15-20 s idle, more busy
IPXE_STAGE = 120.0
#: what iPXE's router advertisement handling (SLAAC in libslirp's fec0::/64) gives the NIC with V6_MAC
V6_ADDRESS = "fec0::5054:ff:fe12:3456"

#: the stand-in for iPXE's autoboot on an IPv6 network (ifconf, then the boot file): the script pxe-config wrote
AUTOBOOT = """\
#!ipxe
ifconf --configurator ipv6 net0 || goto failed
chain http://[{host}]:{port}/boot.ipxe || goto failed
:failed
echo AUTOBOOT-FAILED
poweroff
"""


def test_ipv6_only_lease_handed_over_from_ipxe_lazy_with_manifest(kernel: Any, systemd_initrd: Path,
                                                                  debian_root: RootImage, boot_dir: BootDir) -> None:
    """No IPv4 at all (QEMU's user network with ipv4=off): iPXE configures the NIC from router advertisements
    and runs the script pxe-config wrote, which hands iPXE's IPv6 address, prefix length and router to the
    systemd initramfs as a static ip= on the boot NIC (ip = "lease", the default, with an image at an IPv6
    address); networkd takes it as given (no DHCP, no router solicitation of its own: the address stays
    static, without lifetimes), bootkit reads the image lazily from http://[fec0::2]:PORT/ and checks every
    chunk against a manifest whose URL is an IPv6 literal too; the Debian root's systemd then runs on it."""
    require_boot_code()
    if not IPXE_LKRN.exists():
        pytest.skip(f"{IPXE_LKRN} missing (package ipxe)")
    image = qcow2_image(debian_root.raw, compression="zstd")
    manifest = boot_dir.path / "disk.qcow2.manifest"
    bootkit("manifest", "-o", manifest, image)
    www = publish(boot_dir.path / "www", {"vmlinuz": Path(kernel.vmlinuz), "initrd.img": systemd_initrd,
                                          "disk.qcow2": image, "disk.qcow2.manifest": manifest})  # fmt: skip
    log = boot_dir.path / "serve-http.log"
    with _serve_http_v6(www, log) as port:
        args = "[" + ", ".join(f'"{a}"' for a in GUEST_BOOT_ARGS) + "]"
        _, script = _pxe_config(boot_dir.path, V6_DESCRIPTION.format(host=SLIRP_HOST6, port=port, www=www,
                                                                      args=args))  # fmt: skip
        url = f"http://[{SLIRP_HOST6}]:{port}"
        assert f"root=qcow2:{url}/disk.qcow2 " in script and f"rd.qcow2.manifest={url}/disk.qcow2.manifest " in script
        handover = "ip=[${netX/ip6}]::[${netX/gateway6}]:${netX/len6}::bootnet:none"
        assert f" ifname=bootnet:${{netX/mac}} {handover} rd.neednet=1 " in script
        (www / "boot.ipxe").write_text(script)
        autoboot = boot_dir.path / "autoboot.ipxe"
        autoboot.write_text(AUTOBOOT.format(host=SLIRP_HOST6, port=port))
        cmd = qemu_command(kernel=IPXE_LKRN, initrd=autoboot, netdev="user,id=n0,ipv4=off,ipv6=on", mac=V6_MAC)
        with _guest(cmd, boot_dir.path, "ipv6-lease", IPXE_STAGE) as vm:
            # iPXE's own stage (ifconf, the kernel and initramfs over HTTP) comes before the usual netboot
            boot_dir.prove(vm, debian_root, BOOT_TIMEOUT + IPXE_STAGE, network="ipv6-lease", mode="lazy",
                           root="debian", initrd="systemd", loader="ipxe")  # fmt: skip
            assert vm.seen(r"read lazily"), "the boot code did not report lazy mode"
            # the kernel line iPXE expanded: its own IPv6 configuration, numbers only
            assert vm.seen(re.escape(f"ip=[{V6_ADDRESS}]::[fe80::2]:64::bootnet:none")), vm.tail(80)
            # networkd configured the handed-over address as given, and got none of its own from the RA
            assert vm.seen(re.escape(f"bootkit: address: bootnet {V6_ADDRESS}/64 static")), vm.tail(80)
            assert not vm.seen(r"bootkit: address: .* dynamic"), vm.tail(80)
            assert not vm.seen(r"AUTOBOOT-FAILED")
    requests = log.read_text(errors="replace")
    # iPXE fetched its script, the kernel and the initramfs over IPv6; bootkit partial content of the image
    # and the whole manifest
    for path in ("boot.ipxe", "vmlinuz", "initrd.img", "disk.qcow2.manifest"):
        assert re.search(rf'"GET /{re.escape(path)} HTTP/1\.[01]" 200', requests), (path, requests[-2000:])
    assert re.search(r'"GET /disk\.qcow2 HTTP/1\.[01]" 206', requests), requests[-2000:]


@contextmanager
def _guest(cmd: list[str], log_dir: Path, name: str, extra: float = 0.0) -> Iterator[Guest]:
    """The guest of ``cmd``, killed after the netboot's time plus ``extra`` seconds (a boot loader's stage)."""
    guest = Guest(cmd, name=name, log_path=log_dir / f"{name}.serial.log", boot_timeout=BOOT_TIMEOUT + 120 + extra)
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


@pytest.mark.parametrize("flavour", ["shell", "systemd"])
def test_vlan_on_a_bond_of_two_nics(kernel: Any, boot_dir: BootDir, request: pytest.FixtureRequest,
                                    flavour: str) -> None:
    """Both initramfs flavours build bond0 of eth0 and eth1, VLAN 100 on it, get an address by DHCP on the
    VLAN and boot the image served there. The shell one with dracut's network-legacy (parse-bond, parse-vlan,
    ifup), then bootkit's netroot handler on the VLAN; the systemd one with systemd-network-generator's
    .netdev/.network files for networkd (systemd 252 writes no [Bond] section: the bond is balance-rr, as the
    server's), wait-online waiting for the VLAN only (bootkit-top-generator), then bootkit-root.service. The
    systemd flavour boots the Debian root: systemd's switch-root wants an OS tree."""
    require_boot_code()
    initrd: Path = request.getfixturevalue(f"{flavour}_initrd")
    root: RootImage = request.getfixturevalue("busybox_root" if flavour == "shell" else "debian_root")
    image = qcow2_image(root.raw, compression="zstd")
    www = publish(boot_dir.path / "www", {"disk.qcow2": image})
    args = "[" + ", ".join(f'"{a}"' for a in (*GUEST_BOOT_ARGS, "net.ifnames=0")) + "]"
    line, _ = _pxe_config(boot_dir.path, VLAN_DESCRIPTION.format(server_ip=SERVER_IP, www=www, vid=VLAN_ID,
                                                                 args=args))  # fmt: skip
    assert f" vlan=bond0.{VLAN_ID}:bond0 bond=bond0:eth0,eth1:mode=balance-rr ip=bond0.{VLAN_ID}:dhcp " in line
    server_initrd = _server_initramfs(kernel, www, boot_dir.path)
    with tempfile.TemporaryDirectory(prefix="bk-vlan-") as sockdir:  # unix socket paths: 108 bytes at most
        server_cmd = _sockets(qemu_command(kernel=Path(kernel.vmlinuz), initrd=server_initrd, memory_mib=768,
                                           append="console=ttyS0,115200 panic=-1 quiet"),
                              sockdir, server=True, macs=("52:54:00:00:60:01", "52:54:00:00:60:02"))  # fmt: skip
        with _guest(server_cmd, boot_dir.path, "vlan-server") as server:
            server.expect(r"SERVER-READY", BOOT_TIMEOUT)
            client_cmd = _sockets(qemu_command(kernel=Path(kernel.vmlinuz), initrd=initrd, append=line),
                                  sockdir, server=False, macs=("52:54:00:00:61:01", "52:54:00:00:61:02"))  # fmt: skip
            with _guest(client_cmd, boot_dir.path, "vlan-client") as vm:
                boot_dir.prove(vm, root, BOOT_TIMEOUT, network="vlan-on-bond", mode="ram", root=root.kind,
                               initrd=flavour)  # fmt: skip
                addresses = re.findall(r"bootkit: address: (\S+) (\S+) (static|dynamic)", vm.output)
                if flavour == "shell":
                    # dracut's ifup ran bootkit's netroot handler on the VLAN, the top interface
                    assert vm.seen(r"bootkit: network up on bond0\.100"), vm.tail(60)
            # the only address: DHCP's on the VLAN, none on the bond or its NICs
            assert [(n, k) for n, _, k in addresses] == [(f"bond0.{VLAN_ID}", "dynamic")], addresses
            assert addresses[0][1].startswith("192.168.60."), addresses
            # the only way to the image: udhcpd and httpd answer on the tagged VLAN of the server's bond only
            assert server.seen(r"SERVER-READY on bond0\.100")


# -- DHCPv6, systemd flavour: dnsmasq in a network namespace of the test's own ----------------------------------
#
# QEMU's user network has no DHCPv6. The guest's NIC is a tap device in a network namespace this test makes
# (``unshare -n``), which holds the server side: dnsmasq (router advertisements with the managed flag, and
# DHCPv6) and ``bootkit serve-http``. (A VLAN on it would need the host's 8021q module or a VLAN-filtering
# bridge; the machine the tests run on may have neither, so the VLAN boots stay with the server guest above.)

V6_SERVER = "fd00:100::1"
V6_PORT = 8080

NETNS_SETUP = """\
set -e
ip link set lo up
ip tuntap add tap0 mode tap
ip link set tap0 up
# nodad: serve-http binds the address at once, before duplicate address detection would have finished
ip addr add {server}/64 dev tap0 nodad
dnsmasq --conf-file=/dev/null --keep-in-foreground --port=0 --no-resolv --bind-interfaces --interface=tap0 \\
    --enable-ra --dhcp-range=fd00:100::100,fd00:100::1ff,64,1h --dhcp-leasefile={work}/dnsmasq.leases \\
    --log-dhcp --log-facility={work}/dnsmasq.log &
echo $! > {work}/dnsmasq.pid
{python} -m bootkit -v serve-http --bind [{server}]:{port} {www} > {work}/serve-http.out 2> {work}/serve-http.log &
echo $! > {work}/serve-http.pid
exec "$@"
"""

DHCP6_DESCRIPTION = """\
base_url = "http://[{server}]:{port}/"
docroot = "{www}"
timeout = 0
bootloaders = ["ipxe"]
console = ["ttyS0,115200"]
ip = "dhcp6"

[[entry]]
name = "dhcp6"
kernel = "vmlinuz"
initrd = "initrd.img"
image = "disk.qcow2"
args = {args}
"""


def test_dhcp6_from_dnsmasq_systemd_flavour(kernel: Any, systemd_initrd: Path, debian_root: RootImage,
                                            boot_dir: BootDir) -> None:
    """The systemd initramfs (systemd-network-generator: ip=dhcp6; networkd's DHCPv6 client) gets its address
    from dnsmasq's DHCPv6 (router advertisement with the managed flag, no SLAAC prefix) and boots the image
    served at that network's IPv6 address."""
    require_boot_code()
    for tool in ("unshare", "dnsmasq", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing")
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a network namespace (unshare -n): needs root or user namespaces")
    work = boot_dir.path
    image = qcow2_image(debian_root.raw, compression="zstd")
    www = publish(work / "www", {"vmlinuz": Path(kernel.vmlinuz), "initrd.img": systemd_initrd, "disk.qcow2": image})
    args = "[" + ", ".join(f'"{a}"' for a in GUEST_BOOT_ARGS) + "]"
    line, _ = _pxe_config(work, DHCP6_DESCRIPTION.format(server=V6_SERVER, port=V6_PORT, www=www, args=args))
    assert " ip=dhcp6 rd.neednet=1 " in line
    setup = NETNS_SETUP.format(server=V6_SERVER, port=V6_PORT, www=www, work=work, python=sys.executable)
    cmd = qemu_command(kernel=Path(kernel.vmlinuz), initrd=systemd_initrd, append=line,
                       netdev="tap,id=n0,ifname=tap0,script=no,downscript=no")  # fmt: skip
    try:
        with _guest(["unshare", "-n", "--", "sh", "-c", setup, "netns", *cmd], work, "dhcp6-client") as vm:
            boot_dir.prove(vm, debian_root, BOOT_TIMEOUT, network="dhcp6", mode="ram", root="debian",
                           initrd="systemd")  # fmt: skip
            addresses = re.findall(r"bootkit: address: (\S+) (\S+) (static|dynamic)", vm.output)
    finally:
        # dnsmasq and serve-http, started by the namespace's shell (stopped by PID, as they were started)
        for pid_file in ("dnsmasq.pid", "serve-http.pid"):
            pid = (work / pid_file).read_text().strip() if (work / pid_file).exists() else ""
            if pid.isdigit():
                try:
                    os.kill(int(pid), signal.SIGTERM)
                except ProcessLookupError:
                    pass
    # the only address: DHCPv6's (a /128 with a lifetime; the advertisement's prefix has no SLAAC flag)
    assert len(addresses) == 1, addresses
    _name, address, kind = addresses[0]
    assert kind == "dynamic" and address.startswith("fd00:100::") and address.endswith("/128"), addresses
    dhcp_log = (work / "dnsmasq.log").read_text(errors="replace")
    assert re.search(rf"DHCPREPLY\(tap0\) {re.escape(address.split('/')[0])} ", dhcp_log), dhcp_log[-3000:]
    requests = (work / "serve-http.log").read_text(errors="replace")
    assert re.search(r'"GET /disk\.qcow2 HTTP/1\.[01]" 200', requests), requests[-2000:]
