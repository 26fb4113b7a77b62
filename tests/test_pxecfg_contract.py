"""pxe-config writes the kernel command line through the contract (bootkit/boot/cmdline.py) and refuses a
line the initramfs would refuse."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pxecfg_fixtures import GOLDEN, run_cli

from bootkit.boot.cmdline import BootConfig, RootSpec
from bootkit.boot.loaderargs import WIDEST_LEASE
from bootkit.host.pxecfg.cmdline import Network, boot_config, kernel_cmdline
from bootkit.host.pxecfg.load import load_file

HEAD = """\
[[entry]]
name = "a"
kernel = "http://10.0.0.1/vmlinuz"
initrd = "http://10.0.0.1/initrd.img"
image = "http://10.0.0.1/disk.qcow2"
sha256 = "sidecar"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pxe.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_the_initramfs_parses_back_what_each_entry_asks_for() -> None:
    config = load_file(GOLDEN / "representative.toml")
    for entry in config.entries:
        for machine in (None, *config.machines):
            for network in Network:
                parsed = BootConfig.parse(kernel_cmdline(entry, machine, network=network))
                assert parsed == boot_config(entry, machine, network).substitute(WIDEST_LEASE), (entry, machine)


def test_root_is_typed_by_the_contract(tmp_path: Path) -> None:
    entry = load_file(_write(tmp_path, HEAD + 'root = "PARTUUID=AB-1"\n')).entries[0]
    assert entry.root == RootSpec("partuuid", "ab-1")
    assert "rd.qcow2.root=PARTUUID=ab-1" in kernel_cmdline(entry).split()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (HEAD + 'args = ["rd.qcow2.sha265=00"]\n',
         "entry.a.args: the initramfs would refuse the command line of entry 'a': unknown option "
         "rd.qcow2.sha265 (did you mean rd.qcow2.sha256?)"),
        (HEAD + 'args = ["rd.qcow2sha256=00"]\n', "unknown option rd.qcow2sha256 (did you mean rd.qcow2.sha256?)"),
        (HEAD + 'args = ["rd.qcow2.retries=-1"]\n', "rd.qcow2.retries=-1: must be at least 0"),
        (HEAD + 'args = ["rd.qcow2.verify=pinned"]\n', "rd.qcow2.verify=pinned needs rd.qcow2.sha256"),
        (HEAD + 'args = ["root=/dev/sda2"]\n',
         "entry.a.args: a root= argument replaces root=qcow2:http://10.0.0.1/disk.qcow2 of entry 'a'"),
        (HEAD + '[[machine]]\nmac = "52:54:00:12:34:56"\nargs = ["rd.qcow2.moed=lazy"]\n',
         "machine.52:54:00:12:34:56.args: the initramfs would refuse the command line of entry 'a': "
         "unknown option rd.qcow2.moed (did you mean rd.qcow2.mode?)"),
    ],
)  # fmt: skip
def test_a_line_the_initramfs_would_refuse_is_refused_here(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, message: str
) -> None:
    path = _write(tmp_path, text)
    status, _, err = run_cli(capsys, "pxe-config", str(path), "--out", str(tmp_path / "out"), "--no-grub-images")
    assert status == 2, err
    assert err.startswith(f"error: {path}: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_known_options_in_args_are_fine(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = _write(tmp_path, HEAD + 'args = ["rd.qcow2.debug", "rd.qcow2.retries=9"]\n')
    entry = load_file(path).entries[0]
    parsed = BootConfig.parse(kernel_cmdline(entry))
    assert parsed is not None and parsed.debug and parsed.retries == 9
