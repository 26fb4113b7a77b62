"""Three machines boot at the same moment from one server (issue 17, "Real concurrent boots").

One site description (TOML) with three ``[[entry]]`` and three ``[[machine]]`` tables goes through
``bootkit pxe-config``; what it writes is used unmodified: ``dnsmasq.conf`` by a real dnsmasq (full DHCP and
TFTP), ``tftp/boot.ipxe`` by QEMU's BIOS iPXE. Everything runs in a network namespace of its own
(bkharness.netns): a bridge, one tap per guest, dnsmasq, a stock nginx with docs/deploy-nginx.md's origin
configuration, and ``bootkit fleet collect``. The three guests start together and boot the shell initramfs:

- alpha: ram mode, zstd image; bravo: lazy mode with a 64 KiB manifest; charlie: ram mode, deflate image.
  Each image is the busybox root with its own known file (its own SHA-256) and the storm init
  (qemu-tests/rootfs/storm), which prints the kernel's host name and the machine's ``storm.marker=``, writes
  ``/storm-<host name>`` into its overlay, waits until every guest has written its file (the host then puts
  the go file on the web server), and lists the ``storm-*`` files it sees: its own only.
- The server's logs: each MAC got one lease and fetched ``boot.ipxe`` once; each client fetched the kernel and
  the initramfs once and only its own image: a ram machine one copy of it in one request, the lazy machine
  the manifest once and fewer bytes than the image, in distinct ranges.
- Each machine posted its report (``report`` in the TOML); ``bootkit fleet status`` lists exactly the three,
  ok, each with its MAC, host name and mode.

Why a network namespace and not a server guest on a socket network (test_secureboot.py's HTTP Boot): the
servers run on the host at full speed instead of in a fourth TCG guest competing for the 2 cores, they are the
host's own dnsmasq and nginx, and several guests on one bridge is what a classroom is.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bkharness.fixtures import BootDir
from bkharness.guest import Guest
from bkharness.images import KNOWN_FILE, MIB, ROOT_START, RootImage, extract_root_fs, known_bytes, qcow2_image
from bkharness.netboot import publish
from bkharness.netns import ACCESS_LINE, SERVER_IP, lan, lan_guest, net_dnsmasq, net_fleet_collect, net_nginx
from bkharness.paths import ROOTFS_FILES
from bkharness.pieces import GUEST_BOOT_ARGS, bootkit

from bootkit.run import run

#: one guest's overall limit; three TCG guests on 2 shared cores took 170-260 s together, loaded (docs/testing.md)
BOOT_TIMEOUT = 400.0
REPO = Path(__file__).resolve().parent.parent
DEPLOY_DOC = REPO / "docs" / "deploy-nginx.md"
#: the lazy machine's manifest chunk size: the boot reads a part of the image, not every chunk of it
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Machine:
    """One machine of the site: its ``[[machine]]`` table, its entry and its image."""

    name: str
    mac: str
    mode: str
    compression: str

    @property
    def marker(self) -> str:
        return f"{self.name}-{self.mode}-{self.compression}"


MACHINES = (
    Machine("alpha", "52:54:00:17:00:0a", "ram", "zstd"),
    Machine("bravo", "52:54:00:17:00:0b", "lazy", "zstd"),
    Machine("charlie", "52:54:00:17:00:0c", "ram", "deflate"),
)


def storm_root(base: RootImage, dest: Path, *, seed: str) -> RootImage:
    """``base`` (the busybox root) with its own known file and the storm init in front of its own init."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".storm.") as tmp:
        fs = extract_root_fs(base, Path(tmp) / "root.ext4")
        known = Path(tmp) / "known.bin"
        data = known_bytes(seed)
        known.write_bytes(data)
        init = ROOTFS_FILES / "storm" / "sbin" / "init"
        # debugfs' ln and unlink leave the link count alone: together they rename /sbin/init
        script = (f"rm /{KNOWN_FILE}\nwrite {known} /{KNOWN_FILE}\nsif /{KNOWN_FILE} mode 0100644\n"
                  "ln /sbin/init /sbin/init.proof\nunlink /sbin/init\n"
                  f"write {init} /sbin/init\nsif /sbin/init mode 0100755\n")  # fmt: skip
        run(["debugfs", "-w", "-f", "-", fs], input=script.encode(), capture=True)
        run(["e2fsck", "-fn", fs], capture=True)
        shutil.copyfile(base.raw, dest)
        run(["dd", f"if={fs}", f"of={dest}", "bs=1M", f"seek={ROOT_START // MIB}", "conv=notrunc,sparse",
             "status=none"])  # fmt: skip
    return RootImage("storm", dest, base.root_partition, hashlib.sha256(data).hexdigest(), base.root_fs_size)


def site_toml(www: Path, report_url: str) -> str:
    """The site description: one entry per machine (its image and mode), one machine table per MAC."""
    args = [a for a in GUEST_BOOT_ARGS if a != "rw"]  # pxe-config writes rw itself (tmpfs overlay)
    args.append(f"storm.go=http://{SERVER_IP}/storm-go")
    toml = [
        f'base_url = "http://{SERVER_IP}/"',
        f'docroot = "{www}"',
        "timeout = 0",
        'console = ["ttyS0,115200"]',
        f'report = "{report_url}"',
        f'default = "{MACHINES[0].name}"',
    ]
    for m in MACHINES:
        toml += ["", "[[entry]]", f'name = "{m.name}"', 'kernel = "vmlinuz"', 'initrd = "initrd.img"',
                 f'image = "images/{m.name}.qcow2"', f'mode = "{m.mode}"',
                 "args = [" + ", ".join(f'"{a}"' for a in args) + "]"]  # fmt: skip
        if m.mode == "lazy":
            toml.append(f'manifest = "images/{m.name}.qcow2.manifest"')
    for m in MACHINES:
        toml += ["", "[[machine]]", f'mac = "{m.mac}"', f'name = "{m.name}"', f'default = "{m.name}"',
                 f'hostname = "{m.name}"', f'args = ["storm.marker={m.marker}"]']  # fmt: skip
    toml += ["", "[dhcp]", 'mode = "full"', 'range_start = "10.77.0.100"', 'range_end = "10.77.0.199"',
             'netmask = "255.255.255.0"', 'interface = "br0"']  # fmt: skip
    return "\n".join(toml) + "\n"


def origin_site(www: Path) -> str:
    """docs/deploy-nginx.md's tested origin block, with only its listen address and root changed."""
    m = re.search(r"<!-- tested: origin -->\n```nginx\n(.*?)```", DEPLOY_DOC.read_text(), re.S)
    assert m, f"no tested origin block in {DEPLOY_DOC}"
    block = m.group(1)
    for old, new in (("listen 80;", f"listen {SERVER_IP}:80;"), ("root /srv/bootkit;", f"root {www};")):
        assert old in block, f"{old!r} is no longer in the documented origin configuration"
        block = block.replace(old, new)
    return block


def leases(dnsmasq_log: str) -> dict[str, list[str]]:
    """MAC -> the addresses dnsmasq acknowledged to it (``DHCPACK(br0) 10.77.0.123 52:54:...``)."""
    acks: dict[str, list[str]] = {}
    for ip, mac in re.findall(r"DHCPACK\(br0\) (\S+) ([0-9a-f:]{17})", dnsmasq_log):
        acks.setdefault(mac, []).append(ip)
    return acks


def requests_by_client(access_log: str) -> dict[str, list[re.Match[str]]]:
    by: dict[str, list[re.Match[str]]] = {}
    for line in access_log.splitlines():
        m = ACCESS_LINE.match(line)
        assert m, f"not an access-log line: {line!r}"
        by.setdefault(m["client"], []).append(m)
    return by


def expect_all(vms: dict[str, Guest], pattern: str, timeout: float) -> dict[str, re.Match[str]]:
    """Each guest's console line matching ``pattern`` (the guests run at once; the waits overlap)."""
    return {name: vm.expect(pattern, timeout) for name, vm in vms.items()}


def test_three_machines_boot_at_the_same_moment(
    kernel: Any, shell_initrd: Path, busybox_root: RootImage, boot_dir: BootDir
) -> None:
    work = boot_dir.path
    www = work / "www"
    images = www / "images"
    images.mkdir(parents=True)
    roots = {m.name: storm_root(busybox_root, work / f"{m.name}.raw", seed=f"storm-{m.name}") for m in MACHINES}
    for m in MACHINES:
        qcow2_image(roots[m.name].raw, compression=m.compression, out=images / f"{m.name}.qcow2")
        if m.mode == "lazy":
            bootkit("manifest", "--chunk-size", str(CHUNK), "-o", images / f"{m.name}.qcow2.manifest",
                    images / f"{m.name}.qcow2")  # fmt: skip
    publish(www, {"vmlinuz": Path(kernel.vmlinuz), "initrd.img": shell_initrd})
    toml = work / "site.toml"
    toml.write_text(site_toml(www, f"http://{SERVER_IP}:8070/report"))
    out = work / "out"
    bootkit("pxe-config", toml, "--out", out, "--no-grub-images")
    conf = out / "dnsmasq.conf"
    run(["dnsmasq", "--test", f"--conf-file={conf}"], capture=True)
    reports = work / "reports"
    reports.mkdir()

    started = time.monotonic()
    with (
        lan(len(MACHINES)) as net,
        net_dnsmasq(net, conf, log_dir=work) as dhcp,
        net_nginx(net, origin_site(www), log_dir=work) as web,
        net_fleet_collect(net, reports, log_dir=work) as collect,
        ExitStack() as stack,
    ):
        assert collect.url == f"http://{SERVER_IP}:8070/report"
        vms = {
            m.name: stack.enter_context(lan_guest(net, i, mac=m.mac, log_dir=work, name=m.name,
                                                  boot_timeout=BOOT_TIMEOUT))
            for i, m in enumerate(MACHINES)
        }  # fmt: skip
        wrote = expect_all(vms, r"^STORM-WROTE hostname=(\S+) marker=(\S+)$", BOOT_TIMEOUT)
        # every machine has written its file: now each looks for the others'
        (www / "storm-go").write_text("go\n")
        sees = expect_all(vms, r"^STORM-SEES (.*)$", 120)
        for m in MACHINES:
            boot_dir.prove(vms[m.name], roots[m.name], BOOT_TIMEOUT, firmware="bios", loader="ipxe",
                           mode=m.mode, compression=m.compression, root="busybox", initrd="shell",
                           machines=len(MACHINES))  # fmt: skip
        elapsed = time.monotonic() - started
        dnsmasq_log, access_log = dhcp.log(), web.log()
    print(f"\nthree machines booted together in {elapsed:.0f} s")

    # host clock: every machine listed the files after the last one had written its own
    def at(vm: Guest, pattern: str) -> float:
        t = vm.first_time(pattern)
        assert t is not None, f"{vm.name}: no {pattern!r}"
        return vm.started + t

    last_written = max(at(vm, r"^STORM-WROTE ") for vm in vms.values())
    assert all(at(vm, r"^STORM-SEES ") > last_written for vm in vms.values())
    for m in MACHINES:
        # its own entry (host name and marker from its [[machine]] table) and only its own overlay file
        assert (wrote[m.name][1], wrote[m.name][2]) == (m.name, m.marker), wrote[m.name][0]
        assert sees[m.name][1].strip() == f"storm-{m.name}", sees[m.name][0]

    # dnsmasq: one address per MAC, distinct, and boot.ipxe sent once to each
    acks = leases(dnsmasq_log)
    assert sorted(acks) == sorted(m.mac for m in MACHINES), dnsmasq_log[-3000:]
    address = {m.name: acks[m.mac][0] for m in MACHINES}
    assert len(set(address.values())) == len(MACHINES)
    for m in MACHINES:
        assert set(acks[m.mac]) == {address[m.name]}, acks
        sent = re.findall(rf"sent {re.escape(str(out / 'tftp' / 'boot.ipxe'))} to {re.escape(address[m.name])}$",
                          dnsmasq_log, re.M)  # fmt: skip
        assert len(sent) == 1, f"{m.name}: boot.ipxe sent {len(sent)} times"

    # nginx: per client, kernel and initramfs once, its own image only, as much of it as its mode reads
    by_client = requests_by_client(access_log)
    assert sorted(by_client) == sorted(address.values())
    for m in MACHINES:
        requests = by_client[address[m.name]]
        ok = [r for r in requests if r["path"] != "/storm-go"]
        assert all(r["status"] in ("200", "206") for r in ok), [r[0] for r in ok]
        paths = Counter(r["path"] for r in ok)
        image = f"/images/{m.name}.qcow2"
        size = (images / f"{m.name}.qcow2").stat().st_size
        assert paths["/vmlinuz"] == 1 and paths["/initrd.img"] == 1, paths
        assert {p for p in paths if p.startswith("/images/")} <= {image, image + ".manifest"}, paths
        image_requests = [r for r in ok if r["path"] == image]
        image_bytes = sum(int(r["bytes"]) for r in image_requests)
        if m.mode == "ram":
            # one copy of the image, in one request
            assert [int(r["bytes"]) for r in image_requests] == [size], (m.name, [r[0] for r in image_requests])
        else:
            assert paths[image + ".manifest"] == 1, paths
            assert all(r["status"] == "206" for r in image_requests), [r[0] for r in image_requests]
            # a 1-byte probe, then whole manifest chunks, each at most once, not all of them
            ranges = [r["range"] for r in image_requests]
            assert ranges.count("bytes=0-0") == 1, ranges
            spans = [tuple(map(int, r.removeprefix("bytes=").split("-"))) for r in ranges if r != "bytes=0-0"]
            assert all(first % CHUNK == 0 and last == min(first + CHUNK, size) - 1 for first, last in spans), ranges
            assert len(set(spans)) == len(spans), f"{m.name}: a chunk asked for twice: {ranges}"
            assert image_bytes == 1 + sum(last - first + 1 for first, last in spans) < size, (image_bytes, size)
        print(f"{m.name}: {m.mode}: {len(image_requests)} image requests, {image_bytes} of {size} bytes")
        go = [r for r in requests if r["path"] == "/storm-go"]
        assert go and go[-1]["status"] == "200", [r[0] for r in go]

    # the fleet view: exactly the three machines, ok, each with its MAC, host name and mode
    status = subprocess.run([sys.executable, "-m", "bootkit", "fleet", "status", str(reports)],
                            capture_output=True, text=True, check=True).stdout.splitlines()  # fmt: skip
    assert len(status) == len(MACHINES), status
    for m in MACHINES:
        (line,) = [s for s in status if s.startswith(f"{m.mac} ")]
        assert re.match(rf"{m.mac} \({m.name}\)  \S+ \S+  {m.mode}  ok      root after [0-9.]+ s$", line), line


def _namespaces() -> set[str]:
    return {line.split()[0] for line in run(["ip", "netns", "list"], capture=True).stdout.decode().splitlines()}


def test_lan_namespace_holds_the_servers_and_is_removed(tmp_path: Path) -> None:
    """The harness's LAN without guests: the taps are on the bridge, fleet collect listens inside the namespace
    (a report posted from inside is stored), and the namespace is gone afterwards, also when the body fails."""
    reports = tmp_path / "reports"
    reports.mkdir()
    post = (
        "import sys\n"
        "from bootkit.boot.report import build_report, post\n"
        "body = build_report('http://x/disk.qcow2', 'ram', {'mount': 1.0}, None, '52:54:00:17:00:0a', None)\n"
        "sys.exit(0 if post(sys.argv[1], body) == 200 else 1)\n"
    )
    names: list[str] = []
    with (
        pytest.raises(RuntimeError, match="as a failing test would"),
        lan(2) as net,
        net_fleet_collect(net, reports, log_dir=tmp_path) as collect,
    ):
        names.append(net.netns)
        assert net.netns in _namespaces()
        links = run(["ip", "-n", net.netns, "-o", "link", "show", "master", "br0"], capture=True).stdout.decode()
        assert re.findall(r"^\d+: (tap\d+):", links, re.M) == ["tap0", "tap1"]
        run(net.inside([sys.executable, "-c", post, collect.url]))
        raise RuntimeError("leaves the context as a failing test would")
    assert names and names[0] not in _namespaces()
    status = subprocess.run([sys.executable, "-m", "bootkit", "fleet", "status", str(reports)],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert status.startswith("52:54:00:17:00:0a  ") and "  ram  ok" in status
