"""bootkit-top-generator, run on the host: with vlan= or bond= on the line, systemd-networkd-wait-online waits
for the VLAN or bond that ip= configures, not for --any link (a bond slave or the VLAN's parent is "online"
before the VLAN has an address)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parent.parent / "dracut-module" / "90bootkit"
DROP_IN = "systemd-networkd-wait-online.service.d/60-bootkit-top.conf"


def _generate(tmp_path: Path, cmdline: str) -> str | None:
    """The drop-in the generator writes for ``cmdline``, or None."""
    proc_cmdline = tmp_path / "cmdline"
    proc_cmdline.write_text(cmdline + "\n")
    out = tmp_path / "generator"
    proc = subprocess.run(
        ["sh", str(MODULE / "bootkit-top-generator.sh"), str(out), str(out), str(out)],
        env={
            "PATH": "/usr/bin:/bin",
            "BOOTKIT_PROC_CMDLINE": str(proc_cmdline),
            "BOOTKIT_SYSTEMD_UTILDIR": "/usr/lib/systemd",
        },
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    path = out / DROP_IN
    return path.read_text() if path.exists() else None


@pytest.mark.parametrize(
    ("cmdline", "top"),
    [
        ("vlan=bond0.100:bond0 bond=bond0:eth0,eth1:mode=active-backup ip=bond0.100:dhcp rd.neednet=1", "bond0.100"),
        ("bond=bond0:eth0,eth1 ip=bond0:dhcp rd.neednet=1", "bond0"),
        ("vlan=eth0.7:eth0 ip=::::node-7:eth0.7:auto6 rd.neednet=1", "eth0.7"),
        ("bond=bond0 ip=bond0:dhcp6", "bond0"),
    ],
)
def test_wait_online_waits_for_the_top_interface(tmp_path: Path, cmdline: str, top: str) -> None:
    text = _generate(tmp_path, "root=qcow2:http://[2001:db8::1]/d.qcow2 " + cmdline)
    assert text is not None
    assert text.endswith(f"[Service]\nExecStart=\nExecStart=/usr/lib/systemd/systemd-networkd-wait-online "
                         f"--interface={top}\n")  # fmt: skip
    # after bootkit's --any drop-in, so that its ExecStart= reset wins
    assert sorted(["50-bootkit-any.conf", Path(DROP_IN).name])[-1] == Path(DROP_IN).name


@pytest.mark.parametrize(
    "cmdline",
    [
        "ip=dhcp rd.neednet=1",  # no VLAN, no bond: --any stays
        "ifname=bootnet:52:54:00:12:34:56 ip=10.0.2.15::10.0.2.2:255.255.255.0::bootnet:none: rd.neednet=1",
        "vlan=a;reboot:eth0 ip=a:dhcp",  # not an interface name: nothing written
        "bond=$(reboot) ip=dhcp",
        "bond=verylongbondname0 ip=dhcp",
        "vlan=*:eth0",  # a glob matches nothing but itself
        "bond=-x",
        'vlan="eth0.5:eth0"',  # quotes: not split the way the kernel splits, leave it
    ],
)
def test_every_other_line_keeps_any(tmp_path: Path, cmdline: str) -> None:
    (tmp_path / "eth0.5").touch()  # what an unquoted glob would match in the working directory
    assert _generate(tmp_path, cmdline) is None
