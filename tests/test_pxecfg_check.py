"""pxe-config --check against a real HTTP server (Python's http.server on 127.0.0.1, ephemeral port)."""

from __future__ import annotations

import hashlib
import os
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from initrd_fixtures import make_initramfs
from pxecfg_fixtures import LoggedServer, logged_http_server, run_cli


@pytest.fixture
def served(tmp_path: Path) -> Iterator[LoggedServer]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "vmlinuz").write_bytes(b"kernel\n" * 100)
    make_initramfs(root / "initrd.img")  # built as bootkit build-initrd builds it, with the contract file
    (root / "disk.qcow2").write_bytes(os.urandom(5 << 20))
    (root / "other.qcow2").write_bytes(b"other image\n")
    (root / "disk.manifest").write_bytes(b"manifest\n")
    with logged_http_server(root) as server:
        yield server


def _describe(tmp_path: Path, server: LoggedServer, extra: str = "") -> Path:
    path = tmp_path / "pxe.toml"
    path.write_text(
        textwrap.dedent(f"""\
            base_url = "{server.url}"
            docroot = "{server.root}"

            [[entry]]
            name = "ram"
            kernel = "vmlinuz"
            initrd = "initrd.img"
            image = "disk.qcow2"

            [[entry]]
            name = "lazy"
            kernel = "vmlinuz"
            initrd = "initrd.img"
            image = "disk.qcow2"
            mode = "lazy"
            manifest = "disk.manifest"
            """)
        + textwrap.dedent(extra)
    )
    return path


def test_everything_served_as_described(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, served: LoggedServer
) -> None:
    status, out, err = run_cli(capsys, "pxe-config", str(_describe(tmp_path, served)), "--check")
    assert (status, out) == (0, ""), err
    assert "every URL answered as described" in err
    # each URL once, HEAD first; the pinned ones (image, manifest) also streamed in full
    assert sorted(served.paths("HEAD")) == ["/disk.manifest", "/disk.qcow2", "/initrd.img", "/vmlinuz"]
    assert sorted(served.paths("GET")) == ["/disk.manifest", "/disk.qcow2"]


def test_changed_image_is_reported_by_size_and_hash(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, served: LoggedServer
) -> None:
    path = _describe(tmp_path, served)
    # pin the hash of the current image, then the image changes on the server (a rebuild, a bad copy)
    digest = hashlib.sha256((served.root / "disk.qcow2").read_bytes()).hexdigest()
    pinned = path.read_text().replace('image = "disk.qcow2"\n', f'image = "disk.qcow2"\nsha256 = "{digest}"\n', 1)
    path.write_text(pinned)
    status, out, err = run_cli(capsys, "pxe-config", str(path), "--out", str(tmp_path / "out"), "--no-grub-images")
    assert status == 0, err
    (served.root / "disk.qcow2").write_bytes(b"rebuilt\n")
    status, out, err = run_cli(capsys, "pxe-config", str(path), "--check")
    assert status == 1
    url = served.url + "disk.qcow2"
    actual = hashlib.sha256(b"rebuilt\n").hexdigest()
    assert out.splitlines() == [f"{url}: served bytes have SHA-256 {actual}, the pinned hash says {digest}"]
    assert "check: 1 problem" in err


def test_size_mismatch_with_the_local_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, served: LoggedServer
) -> None:
    # the docroot copy is not what the server sends (e.g. a stale mirror): compare Content-Length with it
    path = _describe(tmp_path, served, '[[entry]]\nname = "o"\nkernel = "vmlinuz"\ninitrd = "initrd.img"\n'
                     'image = "other.qcow2"\nsha256 = "sidecar"\n')
    (served.root / "other.qcow2.sha256").write_text(hashlib.sha256(b"other image\n").hexdigest() + "  other.qcow2\n")
    local = tmp_path / "mirror"
    local.mkdir()
    for f in served.root.iterdir():
        (local / f.name).write_bytes(f.read_bytes())
    (local / "vmlinuz").write_bytes(b"a different kernel\n")
    path.write_text(path.read_text().replace(f'docroot = "{served.root}"', f'docroot = "{local}"'))
    status, out, _ = run_cli(capsys, "pxe-config", str(path), "--check")
    assert status == 1
    assert out.splitlines() == [
        f"{served.url}vmlinuz: served size 700 differs from {local / 'vmlinuz'} (19 bytes)",
    ]


def test_missing_file_and_wrong_sidecar(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, served: LoggedServer
) -> None:
    extra = f"""\
        [[entry]]
        name = "gone"
        kernel = "{served.url}vmlinuz-gone"
        initrd = "initrd.img"
        image = "other.qcow2"
        sha256 = "sidecar"
        """
    (served.root / "other.qcow2.sha256").write_text("0" * 64 + "  other.qcow2\n")
    status, out, _ = run_cli(capsys, "pxe-config", str(_describe(tmp_path, served, extra)), "--check")
    assert status == 1
    actual = hashlib.sha256(b"other image\n").hexdigest()
    assert out.splitlines() == [
        f"{served.url}vmlinuz-gone: HEAD answered 404 File not found",
        f"{served.url}other.qcow2: served bytes have SHA-256 {actual}, the .sha256 sidecar says {'0' * 64}",
    ]


def test_server_not_answering(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # a port that was free a moment ago: nothing listens there
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "pxe.toml"
    path.write_text(textwrap.dedent(f"""\
        [[entry]]
        name = "x"
        kernel = "http://127.0.0.1:{port}/vmlinuz"
        initrd = "http://127.0.0.1:{port}/initrd.img"
        image = "http://127.0.0.1:{port}/disk.qcow2"
        sha256 = "sidecar"
        """))
    status, out, _ = run_cli(capsys, "pxe-config", str(path), "--check")
    assert status == 1
    lines = out.splitlines()
    assert len(lines) == 3
    assert all(": no answer: " in line for line in lines)
