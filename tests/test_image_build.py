"""``bootkit build-image``: root tree (directory, tar, tar.zst) to GPT + ext4 + QCOW2, checked with real tools.

Every image is checked with ``qemu-img check``, its partition table read with ``sfdisk --json``, the
partition's file system with ``e2fsck -fn`` and listed entry by entry with ``debugfs`` (owner, mode, link
count, xattrs, symlink target, device numbers, content) against the source tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from boot_fixtures import debian_kernel  # noqa: F401 - fixture

from bootkit.host.cli import main
from bootkit.host.image.disk import used_inodes
from bootkit.host.kernelpkg import Kernel

ROOT_TYPE_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
MTIME = 1_700_000_000

Entry = tuple[object, ...]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making device nodes and root-owned files needs root")


def _tree(base: Path) -> Path:
    """A small root tree with every kind of entry mke2fs -d must carry over."""
    root = base / "src"
    for d in ("bin", "etc/ssh", "dev", "empty", "home/user"):
        (root / d).mkdir(parents=True)
    (root / "bin/su").write_bytes(b"#!/bin/sh\necho su\n")
    os.chmod(root / "bin/su", 0o4755)
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    os.chmod(root / "etc/shadow", 0o600)
    os.setxattr(root / "etc/shadow", "user.bootkit", b"secret\x00value")
    os.symlink("../bin/su", root / "bin/su-link")
    os.symlink("/etc/shadow", root / "bin/abs-link")
    os.link(root / "bin/su", root / "bin/su-hard")
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "dev/sda", 0o660 | stat.S_IFBLK, os.makedev(8, 0))
    (root / "home/user/notes").write_bytes(os.urandom(0) + bytes(range(256)) * 100)
    os.chown(root / "home/user/notes", 1234, 1235)
    os.chown(root / "home/user", 1234, 1235)
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("PRIVATE\n")
    (root / "etc/ssh/ssh_host_ed25519_key.pub").write_text("PUBLIC\n")
    (root / "etc/ssh/sshd_config").write_text("Port 22\n")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (MTIME, MTIME), follow_symlinks=False)
    os.utime(root, (MTIME, MTIME))
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return _tree(tmp_path)


def _build(*args: object) -> int:
    return main(["image", "build", *[str(a) for a in args]])


def _run(*cmd: object) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True).stdout.decode(errors="replace")


def _partition(image: Path, work: Path) -> Path:
    """qemu-img check the image, read its GPT, return the root partition's file system as a file."""
    check = subprocess.run(["qemu-img", "check", image], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No errors were found" in check.stdout
    raw = work / "disk.raw"
    _run("qemu-img", "convert", "-O", "raw", image, raw)
    table = json.loads(_run("sfdisk", "--json", raw))["partitiontable"]
    assert table["label"] == "gpt"
    (part,) = table["partitions"]
    assert part["type"] == ROOT_TYPE_X86_64
    fs = work / "root.ext4"
    _run("dd", f"if={raw}", f"of={fs}", "bs=512", f"skip={part['start']}", f"count={part['size']}",
         "status=none")
    raw.unlink()
    fsck = subprocess.run(["e2fsck", "-fn", fs], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    return fs


def _debugfs(fs: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, fs], check=True, capture_output=True).stdout.decode(
        errors="surrogateescape")


def _fs_listing(fs: Path) -> dict[str, Entry]:
    """Every entry of the file system (lost+found aside), as ``_src_listing`` describes one."""
    out: dict[str, Entry] = {}
    dirs = ["/"]
    while dirs:
        d = dirs.pop()
        for line in _debugfs(fs, f"ls -p {d}").splitlines():
            m = re.fullmatch(r"/(\d+)/(\d+)/(\d+)/(\d+)/(.*)/(\d*)/", line.strip())
            if not m or m.group(5) in (".", "..") or (d == "/" and m.group(5) == "lost+found"):
                continue
            path = d.rstrip("/") + "/" + m.group(5)
            mode, uid, gid = int(m.group(2), 8), int(m.group(3)), int(m.group(4))
            st = _debugfs(fs, f"stat {path}")
            links = int(re.search(r"Links: (\d+)", st).group(1))  # type: ignore[union-attr]
            xattrs = tuple(sorted(re.findall(r"^  (\S+) \(\d+\) = (.*)$", st, re.M)))
            detail: object = None
            if stat.S_ISDIR(mode):
                dirs.append(path)
            elif stat.S_ISLNK(mode):
                target = re.search(r'Fast link dest: "(.*)"', st)
                detail = target.group(1) if target else _debugfs(fs, f"cat {path}")
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                major, minor = re.search(r"Device major/minor number: (\w+):(\w+)", st).groups()  # type: ignore[union-attr]
                detail = (int(major, 16), int(minor, 16))
            elif stat.S_ISREG(mode):
                data = subprocess.run(["debugfs", "-R", f"cat {path}", fs], check=True, capture_output=True).stdout
                detail = hashlib.sha256(data).hexdigest()
            out[path] = (oct(mode), uid, gid, links if not stat.S_ISDIR(mode) else None, len(xattrs), detail)
    return out


def _src_listing(root: Path) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            detail: object = None
            if stat.S_ISLNK(st.st_mode):
                detail = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                detail = (os.major(st.st_rdev), os.minor(st.st_rdev))
            elif stat.S_ISREG(st.st_mode):
                detail = hashlib.sha256(path.read_bytes()).hexdigest()
            links = st.st_nlink if not stat.S_ISDIR(st.st_mode) else None
            xattrs = len(os.listxattr(path, follow_symlinks=False))
            out["/" + path.relative_to(root).as_posix()] = (oct(st.st_mode), st.st_uid, st.st_gid, links, xattrs,
                                                            detail)
    return out


def _expected(root: Path) -> dict[str, Entry]:
    """The source listing as the image should show it: machine-id emptied, SSH host keys gone."""
    want = _src_listing(root)
    del want["/etc/ssh/ssh_host_ed25519_key"], want["/etc/ssh/ssh_host_ed25519_key.pub"]
    mode, uid, gid, links, xattrs, _ = want["/etc/machine-id"]
    want["/etc/machine-id"] = (mode, uid, gid, links, xattrs, hashlib.sha256(b"").hexdigest())
    return want


def test_directory_source(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _src_listing(tree)
    out = tmp_path / "out/web.qcow2"
    assert _build(tree, "-o", out, "--no-kernel") == 0
    captured = capsys.readouterr()
    assert "etc/machine-id emptied, etc/ssh/ssh_host_ed25519_key removed" in captured.err
    assert f"{out}: " in captured.out
    assert sorted(p.name for p in out.parent.iterdir()) == ["web.qcow2"]  # no work files, no kernel
    fs = _partition(out, tmp_path)
    assert _fs_listing(fs) == _expected(tree)
    # the xattr's value survives too, and the label is the default
    assert 'user.bootkit (12) = "secret\\000value"' in _debugfs(fs, "stat /etc/shadow")
    assert re.search(r"volume name:\s+root", _run("dumpe2fs", "-h", fs))
    assert _src_listing(tree) == before  # the user's tree is never modified


def test_tar_sources_give_the_same_image(tree: Path, tmp_path: Path) -> None:
    tar = tmp_path / "root.tar"
    _run("tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-C", tree, "-cpf", tar, ".")
    tzst = tmp_path / "root.tar.zst"
    _run("zstd", "-q", tar, "-o", tzst)
    tgz = tmp_path / "root.tar.gz"
    _run("tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-C", tree, "-czpf", tgz, ".")
    images = []
    for src in (tree, tar, tzst, tgz):
        out = tmp_path / f"{src.name}.qcow2"
        assert _build(src, "-o", out, "--no-kernel") == 0
        images.append(out.read_bytes())
    fs = _partition(tmp_path / "root.tar.zst.qcow2", tmp_path)
    assert _fs_listing(fs) == _expected(tree)
    assert all(image == images[0] for image in images), "directory and archives of one tree differ"


def test_build_image_is_an_alias(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``bootkit build-image`` is ``bootkit image build``: same options, same bytes."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    assert _build(tree, "-o", a, "--no-kernel", "--label", "x") == 0
    assert main(["build-image", str(tree), "-o", str(b), "--no-kernel", "--label", "x"]) == 0
    assert a.read_bytes() == b.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["image"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: bootkit image: the following arguments are required: COMMAND\n"


def test_reproducible_and_seeded(tree: Path, tmp_path: Path) -> None:
    # enough inodes for several block groups (debugfs then rewrites the superblock: its write time must be
    # the fake one too), and builds seconds apart
    many = tree / "usr/share/many"
    many.mkdir(parents=True)
    for i in range(3000):
        (many / f"f{i:04}").write_bytes(b"%d" % i)
        os.utime(many / f"f{i:04}", (MTIME, MTIME))
    for d in (many, many.parent, many.parent.parent):
        os.utime(d, (MTIME, MTIME))
    a, b, c = tmp_path / "a.qcow2", tmp_path / "b.qcow2", tmp_path / "c.qcow2"
    assert _build(tree, "-o", a, "--no-kernel") == 0
    time.sleep(1.5)
    copy = tmp_path / "copy"
    _run("cp", "-a", tree, copy)  # a different place, new ctimes and atimes: the same image
    assert _build(copy, "-o", b, "--no-kernel") == 0
    assert a.read_bytes() == b.read_bytes()
    assert _build(tree, "-o", c, "--no-kernel", "--seed", "other") == 0
    assert a.read_bytes() != c.read_bytes()
    # the seed only changes identifiers: same files, new file system UUID
    fs = _partition(a, tmp_path)
    head = _run("dumpe2fs", "-h", fs)
    count, free = (int(re.search(rf"^{f}:\s+(\d+)$", head, re.M).group(1))  # type: ignore[union-attr]
                   for f in ("Inode count", "Free inodes"))
    assert len(used_inodes(fs)) == count - free > 3000
    uuids = {_run("blkid", "-o", "value", "-s", "UUID", _partition(img, tmp_path)) for img in (a, c)}
    assert len(uuids) == 2


def test_source_date_epoch_clamps(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(MTIME - 1000))
    out = tmp_path / "a.qcow2"
    assert _build(tree, "-o", out, "--no-kernel", "--compress", "deflate", "--cluster-size", "4K") == 0
    fs = _partition(out, tmp_path)
    st = _debugfs(fs, "stat /bin/su")
    assert f"mtime: {MTIME - 1000:#010x}" in st
    assert f"ctime: {MTIME - 1000:#010x}" in st
    assert "cluster_size: 4096" in _run("qemu-img", "info", out)


def test_keep_identity(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a.qcow2"
    assert _build(tree, "-o", out, "--no-kernel", "--keep-identity", "--label", "data") == 0
    err = capsys.readouterr().err
    assert "build-image: per-machine identity kept (--keep-identity)" in err
    assert "removed" not in err
    fs = _partition(out, tmp_path)
    assert _fs_listing(fs) == _src_listing(tree)
    assert re.search(r"volume name:\s+data", _run("dumpe2fs", "-h", fs))


def _fails(capsys: pytest.CaptureFixture[str], out: Path, *args: object) -> str:
    assert _build(*args, "-o", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    assert list(out.parent.iterdir()) == [] or all(p.name != out.name and not p.name.startswith(".")
                                                   for p in out.parent.iterdir())
    return err[-1]


def test_missing_kernel(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = _fails(capsys, out_dir / "a.qcow2", tree)
    assert line == (f"error: {tree}: no kernel in the tree (boot/vmlinuz-* or usr/lib/modules/*/vmlinuz with its"
                    " modules): add one or pass --no-kernel")
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("content", [b"not a tar archive at all" * 100, b"\x28\xb5\x2f\xfd" + b"junk" * 10])
def test_broken_archive(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(content)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = _fails(capsys, out_dir / "a.qcow2", bad, "--no-kernel")
    assert line.startswith(f"error: {bad}: ")
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("cut", [512 * 9 + 100, 512 * 4, 512 * 4 + 300])
def test_truncated_archive(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], cut: int) -> None:
    tar = tmp_path / "root.tar"
    _run("tar", "-C", tree, "-cpf", tar, ".")
    data = tar.read_bytes()
    tar.write_bytes(data[:cut])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = _fails(capsys, out_dir / "a.qcow2", tar, "--no-kernel")
    assert line.startswith(f"error: {tar}: ")
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("compress", ["", "gzip", "xz"])
def test_garbled_header(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], compress: str) -> None:
    """tarfile stops quietly at a header that is not one: the build must not go on with half a tree."""
    import tarfile

    tar = tmp_path / "root.tar"
    _run("tar", "-C", tree, "-cpf", tar, ".")
    with tarfile.open(tar) as t:
        offset = t.getmembers()[5].offset
    data = bytearray(tar.read_bytes())
    data[offset:offset + 512] = b"garbage!" * 64
    tar.write_bytes(data)
    if compress:
        _run(compress, "-q", tar)
        tar = tar.with_name(tar.name + {"gzip": ".gz", "xz": ".xz"}[compress])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert _fails(capsys, out_dir / "a.qcow2", tar, "--no-kernel") == (
        f"error: {tar}: truncated or damaged archive: neither a member header nor the end-of-archive blocks"
        f" at byte {offset}")
    assert list(out_dir.iterdir()) == []


def test_hostile_archive_members(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import io
    import tarfile

    outside = tmp_path / "outside"
    outside.mkdir()
    cases = {
        "dotdot": [("a/../../escape", tarfile.REGTYPE, "")],
        "absolute": [("/etc/escape", tarfile.REGTYPE, "")],
        "through-symlink": [("etc", tarfile.SYMTYPE, str(outside)), ("etc/passwd", tarfile.REGTYPE, "")],
        "hardlink-out": [("x", tarfile.LNKTYPE, "../outside/f")],
    }
    for name, members in cases.items():
        archive = tmp_path / f"{name}.tar"
        with tarfile.open(archive, "w") as tar:
            for member, kind, link in members:
                info = tarfile.TarInfo(member)
                info.type = kind
                info.linkname = link
                info.size = 0
                tar.addfile(info, io.BytesIO(b""))
        out_dir = tmp_path / f"out-{name}"
        out_dir.mkdir()
        line = _fails(capsys, out_dir / "a.qcow2", archive, "--no-kernel")
        assert "outside the tree" in line or "through a symlink" in line, line
        assert list(out_dir.iterdir()) == []
    assert list(outside.iterdir()) == []


def test_member_replacing_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import io
    import tarfile

    archive = tmp_path / "replace.tar"
    with tarfile.open(archive, "w") as tar:
        for kind in (tarfile.DIRTYPE, tarfile.REGTYPE):
            info = tarfile.TarInfo("d")
            info.type = kind
            tar.addfile(info, io.BytesIO(b""))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert _fails(capsys, out_dir / "a.qcow2", archive, "--no-kernel") == (
        f"error: {archive}: member 'd' would replace a directory")
    assert list(out_dir.iterdir()) == []


def test_no_room(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tree / "big").write_bytes(os.urandom(8 << 20))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = _fails(capsys, out_dir / "a.qcow2", tree, "--no-kernel", "--size", "4M")
    assert line == "error: the tree does not fit in a 4 MiB file system: use a larger --size or --headroom"
    assert list(out_dir.iterdir()) == []


def test_sizes(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def fs_bytes(image: Path) -> int:
        table = json.loads(_run("qemu-img", "info", "--output=json", image))
        return int(table["virtual-size"]) - 2 * (1 << 20)  # 1 MiB before the partition, 1 MiB for the GPT tail

    small, exact = tmp_path / "small.qcow2", tmp_path / "exact.qcow2"
    assert _build(tree, "-o", small, "--no-kernel", "--headroom", "16M") == 0
    # 16M free + 64M journal allowance + 2% metadata + the content (~100 KiB), rounded up to MiB
    assert 80 << 20 < fs_bytes(small) <= 82 << 20
    head = _run("dumpe2fs", "-h", _partition(small, tmp_path))
    free_blocks = int(re.search(r"^Free blocks:\s+(\d+)$", head, re.M).group(1))  # type: ignore[union-attr]
    assert free_blocks * 4096 >= 16 << 20  # the headroom is really free
    assert _build(tree, "-o", exact, "--no-kernel", "--size", "100M") == 0
    assert fs_bytes(exact) == 100 << 20
    capsys.readouterr()
    assert _build(tree, "-o", tmp_path / "x.qcow2", "--no-kernel", "--size", "1G", "--headroom", "1M") == 2
    assert capsys.readouterr().err.strip() == "error: --size and --headroom contradict each other: give one"


def test_output_inside_the_source(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _src_listing(tree)
    assert _build(tree, "-o", tree / "out/a.qcow2", "--no-kernel") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: -o {tree / 'out/a.qcow2'}: the output must not be inside SOURCE {tree}")
    assert _src_listing(tree) == before


def test_not_a_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = _fails(capsys, out_dir / "a.qcow2", tmp_path / "missing", "--no-kernel")
    assert line == f"error: {tmp_path / 'missing'}: no such directory or tar archive"


def test_kernel_and_initrd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], debian_kernel: Kernel  # noqa: F811
) -> None:
    """A fake tree holding the cached Debian kernel: NAME.vmlinuz is that kernel, NAME.initrd boots with it."""
    shutil.which("dracut") or pytest.skip("dracut is not installed")
    root = tmp_path / "src"
    (root / "boot").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    os.symlink("usr/lib", root / "lib")  # merged /usr, as Debian
    shutil.copyfile(debian_kernel.vmlinuz, root / f"boot/vmlinuz-{debian_kernel.kver}")
    shutil.copytree(debian_kernel.kmoddir, root / f"usr/lib/modules/{debian_kernel.kver}", symlinks=True)
    out = tmp_path / "out/k.qcow2"
    assert _build(root, "-o", out, "--drivers", "virtio_net") == 0
    assert f"kernel {debian_kernel.kver}" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["k.initrd", "k.qcow2", "k.vmlinuz"]
    assert (out.parent / "k.vmlinuz").read_bytes() == debian_kernel.vmlinuz.read_bytes()
    listing = _run("lsinitrd", out.parent / "k.initrd")
    assert "virtio_net" in listing and "bootkit" in listing
