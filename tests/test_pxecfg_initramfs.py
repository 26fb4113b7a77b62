"""Which command-line contract an initramfs understands: written by build-initrd, read back by
pxe-config --check out of the cpio (zstd, gzip or plain; after an early-microcode archive or not)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from boot_fixtures import debian_kernel  # noqa: F401
from initrd_fixtures import contract_json, make_initramfs
from pxecfg_fixtures import logged_http_server, run_cli
from testtools import require_tools

from bootkit.boot.cmdline import CONTRACT_FILE, CONTRACT_VERSION, KNOWN_OPTIONS, contract_info, describe_contract
from bootkit.host.kernelpkg import Kernel
from bootkit.host.pxecfg.check import InitrdContract, read_contract
from bootkit.host.pxecfg.initramfs import UnreadableInitramfs

REPO = Path(__file__).resolve().parent.parent
EXPECTED = InitrdContract(contract_info()["version"], frozenset(KNOWN_OPTIONS))  # type: ignore[arg-type]


def _contract(path: Path) -> InitrdContract:
    with path.open("rb") as f:
        return read_contract(f.read, str(path))


@pytest.mark.parametrize("compress", ["zstd", "gzip", None])
@pytest.mark.parametrize("early", [False, True], ids=["no-early", "early-microcode"])
def test_contract_is_read_from_every_kind_of_image(tmp_path: Path, compress: str | None, early: bool) -> None:
    ucode = {"kernel/x86/microcode/GenuineIntel.bin": b"\x01" * 3000} if early else None
    image = make_initramfs(tmp_path / "initrd.img", compress=compress, early=ucode)
    assert _contract(image) == EXPECTED


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: make_initramfs(p, {"usr/lib/bootkit/bootkit-boot": b"x"}),
         f"has no {CONTRACT_FILE}: built before bootkit recorded its command-line contract"),
        (lambda p: p.write_bytes(b"initrd\n" * 100), "not an initramfs bootkit can read (neither a cpio archive"),
        (lambda p: make_initramfs(p, {CONTRACT_FILE: b"{not json"}), "is not a bootkit contract file"),
        (lambda p: make_initramfs(p, {CONTRACT_FILE: contract_json(options="rd.qcow2.x")}),
         "is not a bootkit contract file"),
        (lambda p: p.write_bytes(make_initramfs(p).read_bytes()[:-40]), "empty or truncated compressed archive"),
        (lambda p: p.write_bytes(make_initramfs(p, compress="gzip").read_bytes()[:-40]), "corrupt compressed data"),
        (lambda p: p.write_bytes(b""), "empty or truncated archive"),
        (lambda p: p.write_bytes(make_initramfs(p, compress=None).read_bytes()[:300]), "truncated"),
        (lambda p: p.write_bytes(b"070701" + b"0" * 88 + b"FFFFFFFF" + b"0" * 8), "name of 4294967295 bytes"),
        (lambda p: p.write_bytes(b"070701" + b"z" * 104), "corrupt cpio header"),
        (lambda p: p.write_bytes(b"\0" * (2 << 20)), "NUL bytes"),
    ],
)  # fmt: skip
def test_unreadable_images_give_one_line(tmp_path: Path, make: object, message: str) -> None:
    path = tmp_path / "initrd.img"
    make(path)  # type: ignore[operator]
    with pytest.raises(UnreadableInitramfs) as e:
        _contract(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def _describe(tmp_path: Path, url: str, root: Path, extra: str = "") -> Path:
    path = tmp_path / "pxe.toml"
    path.write_text(textwrap.dedent(f"""\
        base_url = "{url}"
        docroot = "{root}"

        [[entry]]
        name = "snap"
        kernel = "vmlinuz"
        initrd = "initrd.img"
        image = "disk.qcow2"
        snapshot = "golden"
        """) + textwrap.dedent(extra))
    return path


@pytest.fixture
def www(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    (root / "vmlinuz").write_bytes(b"kernel\n")
    (root / "disk.qcow2").write_bytes(b"image\n")
    return root


def test_check_refuses_an_option_the_initramfs_does_not_know(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, www: Path
) -> None:
    # an initramfs built before rd.qcow2.snapshot existed
    older = [o for o in KNOWN_OPTIONS if o != "rd.qcow2.snapshot"]
    make_initramfs(www / "initrd.img", {CONTRACT_FILE: contract_json(options=older)})
    with logged_http_server(www) as server:
        path = _describe(tmp_path, server.url, www)
        out_dir = tmp_path / "out"
        status, out, err = run_cli(capsys, "pxe-config", str(path), "--out", str(out_dir), "--check",
                                   "--no-grub-images")  # fmt: skip
        assert status == 1
        assert out.splitlines() == [
            f"{server.url}initrd.img: this initramfs (contract {CONTRACT_VERSION}) does not know rd.qcow2.snapshot, "
            "which entry 'snap' passes: rebuild it with bootkit build-initrd"
        ]
        assert f"nothing written to {out_dir}" in err
        assert not out_dir.exists()
        # the same initramfs is fine for an entry that does not pass the option
        path.write_text(path.read_text().replace('snapshot = "golden"\n', ""))
        status, out, err = run_cli(capsys, "pxe-config", str(path), "--out", str(out_dir), "--check",
                                   "--no-grub-images")  # fmt: skip
        assert (status, out) == (0, ""), err
        assert f"understands command-line contract {CONTRACT_VERSION}" in err


def test_check_reports_an_initramfs_from_before_the_contract(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, www: Path
) -> None:
    make_initramfs(www / "initrd.img", {"usr/lib/bootkit/bootkit-boot": b"x"})
    with logged_http_server(www) as server:
        status, out, _ = run_cli(capsys, "pxe-config", str(_describe(tmp_path, server.url, www)), "--check")
    assert status == 1
    assert out.splitlines() == [
        f"{server.url}initrd.img: has no {CONTRACT_FILE}: built before bootkit recorded its command-line contract, "
        "or not by bootkit build-initrd; rebuild it with bootkit build-initrd"
    ]


def test_check_reads_a_served_initramfs_it_has_no_local_copy_of(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, www: Path
) -> None:
    older = [o for o in KNOWN_OPTIONS if o != "rd.qcow2.snapshot"]
    make_initramfs(www / "initrd.img", {CONTRACT_FILE: contract_json(version=0, options=older)})
    digest = hashlib.sha256(b"image\n").hexdigest()
    with logged_http_server(www) as server:
        path = tmp_path / "pxe.toml"
        path.write_text(textwrap.dedent(f"""\
            [[entry]]
            name = "snap"
            kernel = "{server.url}vmlinuz"
            initrd = "{server.url}initrd.img"
            image = "{server.url}disk.qcow2"
            sha256 = "{digest}"
            snapshot = "golden"
            """))
        status, out, _ = run_cli(capsys, "pxe-config", str(path), "--check")
        assert "/initrd.img" in server.paths("GET")
    assert status == 1
    assert out.splitlines() == [
        f"{server.url}initrd.img: this initramfs (contract 0) does not know rd.qcow2.snapshot, which entry 'snap' "
        "passes: rebuild it with bootkit build-initrd"
    ]


def test_build_initrd_records_and_prints_the_contract(tmp_path: Path, debian_kernel: Kernel) -> None:  # noqa: F811
    require_tools("dracut", "lsinitrd")
    out = tmp_path / "initrd.img"
    proc = subprocess.run(
        [sys.executable, "-m", "bootkit", "build-initrd", "-o", str(out), "--kver", debian_kernel.kver,
         "--kmoddir", str(debian_kernel.kmoddir), "--drivers", "virtio_net"],
        capture_output=True, text=True, cwd=REPO, timeout=1800, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == describe_contract()
    assert describe_contract().startswith(
        f"kernel command-line contract {CONTRACT_VERSION}: root=qcow2:<URL> rd.qcow2.sha256 "
    )
    # bootkit's reader and dracut's own lsinitrd find the same file in the zstd-compressed image
    assert _contract(out) == EXPECTED
    listed = subprocess.run(["lsinitrd", "-f", CONTRACT_FILE, str(out)], capture_output=True, check=True).stdout
    assert json.loads(listed) == contract_info()
