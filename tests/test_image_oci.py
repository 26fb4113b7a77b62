"""``bootkit image build`` from container images: OCI layouts (directory and tar) and docker-archives.

The images are made here with tarfile and json as the specs describe them (image-spec ``image-layout.md``,
``manifest.md``, ``layer.md``; docker's ``manifest.json``), three layers deep with gzip, zstd and plain
layers, whiteouts, an opaque directory, hard links that outlive a whiteout, device nodes, setuid files and
xattrs. The built file system is listed entry by entry (``test_image_build``'s debugfs listing) and compared
with the merged tree made by hand.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard
from test_image_build import MTIME, _debugfs, _fs_listing, _partition, _run, _src_listing

from bootkit.host.cli import main

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making device nodes and root-owned files needs root")

Member = tuple[tarfile.TarInfo, bytes]
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _info(name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, MTIME
    return info


def d(name: str, mode: int = 0o755, uid: int = 0) -> Member:
    return _info(name, tarfile.DIRTYPE, mode, uid, uid), b""


def f(name: str, data: bytes, mode: int = 0o644, uid: int = 0, xattrs: dict[str, str] | None = None) -> Member:
    info = _info(name, tarfile.REGTYPE, mode, uid, uid)
    info.size = len(data)
    info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in (xattrs or {}).items()}
    return info, data


def link(name: str, target: str, kind: bytes = tarfile.LNKTYPE) -> Member:
    info = _info(name, kind, 0o777 if kind == tarfile.SYMTYPE else 0o644)
    info.linkname = target
    return info, b""


def dev(name: str, kind: bytes, major: int, minor: int, mode: int) -> Member:
    info = _info(name, kind, mode)
    info.devmajor, info.devminor = major, minor
    return info, b""


def tar_of(members: list[Member]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


LAYERS: list[list[Member]] = [
    [
        d("./"), d("bin"), f("bin/su", b"old su\n", 0o4755), link("bin/su-hard", "bin/su"),
        d("etc"), f("etc/shadow", b"root:*:19000::\n", 0o600, xattrs={"user.bootkit": "secret"}),
        f("etc/old", b"gone later\n"), d("var"), d("var/cache"), f("var/cache/a", b"a"), d("var/cache/sub"),
        f("var/cache/sub/b", b"b"), d("dev"), dev("dev/null", tarfile.CHRTYPE, 1, 3, 0o666),
        dev("dev/sda", tarfile.BLKTYPE, 8, 0, 0o660), d("usr"), d("usr/lib"), f("usr/lib/data", b"shared data\n"),
        link("usr/lib/data-link", "usr/lib/data"), d("opt"), d("opt/dir"), f("opt/dir/inner", b"x"),
        d("home"), d("home/user", 0o700, 1234), f("home/user/notes", bytes(range(256)) * 64, 0o640, 1234),
    ],
    [
        f("etc/.wh.old", b""), d("var/cache"), f("var/cache/new", b"new"), f("var/cache/.wh..wh..opq", b""),
        f("usr/lib/.wh.data", b""), f("bin/su", b"new su\n", 0o4755), f("opt/dir", b"a file now\n"),
        f("etc/mine", b"this layer's\n"), f("etc/.wh.mine", b""),  # a layer's whiteout never hides its own entry
    ],
    [
        link("usr/lib/again", "usr/lib/data-link"),  # a hard link to a file whose first name is whited out
        link("bin/sh", "su", tarfile.SYMTYPE), f("home/.wh.user", b""),
        d("home/user", 0o750, 1000), f("home/user/fresh", b"fresh\n", 0o600, 1000),
    ],
]


def _expected(base: Path) -> Path:
    """The merged tree of LAYERS, made by hand."""
    root = base / "expected"
    for path in ("bin", "etc", "var/cache", "dev", "usr/lib", "opt", "home/user"):
        (root / path).mkdir(parents=True, exist_ok=True)
    (root / "bin/su").write_bytes(b"new su\n")
    os.chmod(root / "bin/su", 0o4755)
    (root / "bin/su-hard").write_bytes(b"old su\n")  # the hard link keeps the lower layer's content
    os.chmod(root / "bin/su-hard", 0o4755)
    os.symlink("su", root / "bin/sh")
    (root / "etc/shadow").write_bytes(b"root:*:19000::\n")
    os.chmod(root / "etc/shadow", 0o600)
    os.setxattr(root / "etc/shadow", "user.bootkit", b"secret")
    (root / "etc/mine").write_bytes(b"this layer's\n")
    (root / "var/cache/new").write_bytes(b"new")
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "dev/sda", 0o660 | stat.S_IFBLK, os.makedev(8, 0))
    os.chmod(root / "dev/null", 0o666)  # mknod's mode passes through the umask
    os.chmod(root / "dev/sda", 0o660)
    (root / "usr/lib/data-link").write_bytes(b"shared data\n")
    os.link(root / "usr/lib/data-link", root / "usr/lib/again")
    (root / "opt/dir").write_bytes(b"a file now\n")
    os.chmod(root / "home/user", 0o750)
    os.chown(root / "home/user", 1000, 1000)
    (root / "home/user/fresh").write_bytes(b"fresh\n")
    os.chmod(root / "home/user/fresh", 0o600)
    os.chown(root / "home/user/fresh", 1000, 1000)
    return root


def _compress(data: bytes, how: str) -> tuple[bytes, str]:
    if how == "gzip":
        return gzip.compress(data, mtime=0), OCI_LAYER + "+gzip"
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data), OCI_LAYER + "+zstd"
    return data, OCI_LAYER


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob(layout: Path, data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
    path = layout / "blobs/sha256" / hashlib.sha256(data).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"mediaType": media_type, "digest": _sha(data), "size": len(data), **extra}


def _config(arch: str, tars: list[bytes]) -> bytes:
    return json.dumps({"architecture": arch, "os": "linux",
                       "rootfs": {"type": "layers", "diff_ids": [_sha(t) for t in tars]}}).encode()


def oci_layout(layout: Path, layers: list[list[Member]] = LAYERS,
               compressions: tuple[str, ...] = ("gzip", "zstd", "none")) -> Path:
    """An OCI layout whose index has an arm64 image (one layer) and the amd64 image of ``layers``."""
    layout.mkdir()
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    manifests = []
    images = [("arm64", [[d("./"), f("arm64", b"arm\n")]], ("gzip",)), ("amd64", layers, compressions)]
    for arch, members, comps in images:
        tars = [tar_of(m) for m in members]
        descriptors = [_blob(layout, *_compress(t, c)) for t, c in zip(tars, comps, strict=True)]
        config = _blob(layout, _config(arch, tars), "application/vnd.oci.image.config.v1+json")
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config,
                               "layers": descriptors}).encode()
        manifests.append(_blob(layout, manifest, OCI_MANIFEST, platform={"architecture": arch, "os": "linux"},
                               annotations={"org.opencontainers.image.ref.name": arch}))
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))
    return layout


def docker_archive(archive: Path, layers: list[list[Member]] = LAYERS) -> Path:
    """``docker save`` / ``podman save`` format: manifest.json, <digest>.json config, one plain tar per layer."""
    tars = [tar_of(m) for m in layers]
    config = _config("amd64", tars)
    files: list[Member] = [f(f"{hashlib.sha256(t).hexdigest()}.tar", t) for t in tars]
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    files.append(f(config_name, config))
    manifest = [{"Config": config_name, "RepoTags": ["example/app:1"], "Layers": [i.name for i, _ in files[:-1]]}]
    files.append(f("manifest.json", json.dumps(manifest).encode()))
    archive.write_bytes(tar_of(files))
    return archive


def _build(*args: object) -> int:
    return main(["image", "build", *[str(a) for a in args]])


def test_oci_and_docker_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An OCI layout directory, the same layout as a tar (oci-archive) and a docker-archive of the same layers
    give one and the same image, whose file system is the merged tree."""
    layout = oci_layout(tmp_path / "layout")
    oci_tar = tmp_path / "layout.tar"
    _run("tar", "-C", layout, "-cf", oci_tar, ".")
    docker = docker_archive(tmp_path / "docker.tar")
    images = []
    for source in (layout, oci_tar, docker):
        out = tmp_path / f"out-{source.name}/img.qcow2"
        assert _build(source, "-o", out, "--no-kernel") == 0
        assert sorted(p.name for p in out.parent.iterdir()) == ["img.qcow2"]  # no work files left
        images.append(out)
    err = capsys.readouterr().err
    assert "OCI image layout, linux/amd64 image sha256:" in err and ", 3 layers" in err
    assert "docker-archive, linux/amd64 image example/app:1, 3 layers" in err
    fs = _partition(images[0], tmp_path)
    assert _fs_listing(fs) == _src_listing(_expected(tmp_path))
    assert 'user.bootkit (6) = "secret"' in _debugfs(fs, "stat /etc/shadow")
    assert images[1].read_bytes() == images[0].read_bytes()
    assert images[2].read_bytes() == images[0].read_bytes()


def test_skopeo_docker_archive(tmp_path: Path) -> None:
    """Cross-check with a real tool: skopeo's docker-archive of the layout builds the same image."""
    shutil.which("skopeo") or pytest.skip("skopeo is not installed (Debian package skopeo)")
    layout = oci_layout(tmp_path / "layout", compressions=("gzip", "none", "gzip"))  # docker has no zstd layers
    archive = tmp_path / "skopeo.tar"
    _run("skopeo", "--override-arch", "amd64", "copy", "--quiet", f"oci:{layout}:amd64",
         f"docker-archive:{archive}:example/app:1")
    # and an OCI layout skopeo wrote: one manifest, no platform in index.json (the config says linux/amd64)
    copied = tmp_path / "copied"
    _run("skopeo", "copy", "--quiet", f"oci:{layout}:amd64", f"oci:{copied}:latest")
    assert "platform" not in json.loads((copied / "index.json").read_text())["manifests"][0]
    ours = tmp_path / "ours.qcow2"
    assert _build(layout, "-o", ours, "--no-kernel") == 0
    for source in (archive, copied):
        theirs = tmp_path / f"{source.name}.qcow2"
        assert _build(source, "-o", theirs, "--no-kernel") == 0
        assert theirs.read_bytes() == ours.read_bytes(), source


def test_platform(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = oci_layout(tmp_path / "layout")
    # the platforms one index further down, as a multi-platform image keeps them
    nested = _blob(layout, (layout / "index.json").read_bytes(), "application/vnd.oci.image.index.v1+json")
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [nested]}))
    out = tmp_path / "arm.qcow2"
    assert _build(layout, "-o", out, "--no-kernel", "--platform", "linux/arm64") == 0
    assert _debugfs(_partition(out, tmp_path), "cat /arm64") == "arm\n"
    capsys.readouterr()
    assert _build(layout, "-o", out, "--no-kernel", "--platform", "linux/s390x") == 2
    assert capsys.readouterr().err == (f"error: {layout}: index {nested['digest'][:19]}: no linux/s390x image (it"
                                       " has linux/amd64, linux/arm64); choose one with --platform\n")
    assert _build(layout, "-o", out, "--no-kernel", "--platform", "amd64") == 2
    assert capsys.readouterr().err == "error: --platform 'amd64': not OS/ARCH[/VARIANT], e.g. linux/amd64\n"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert _build(plain, "-o", out, "--no-kernel", "--platform", "linux/amd64") == 2
    assert capsys.readouterr().err == (f"error: --platform linux/amd64: {plain} is a root tree, not an OCI image"
                                       " or docker-archive\n")


def _refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, source: Path) -> str:
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    assert _build(source, "-o", out_dir / "a.qcow2", "--no-kernel") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    assert list(out_dir.iterdir()) == []  # nothing left behind
    return err[-1]


def _amd64_manifest(layout: Path) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][1]["digest"].split(":")[1]
    return dict(json.loads((layout / "blobs/sha256" / digest).read_bytes()))


def test_digest_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = oci_layout(tmp_path / "layout", compressions=("none", "none", "none"))
    digest = _amd64_manifest(layout)["layers"][2]["digest"]
    blob = layout / "blobs/sha256" / digest.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[600] ^= 1  # inside the first member's content: still a valid tar
    blob.write_bytes(data)
    line = _refused(capsys, tmp_path, layout)
    assert line.startswith(f"error: {layout}: layer blobs/sha256/{digest.split(':')[1]}: digest mismatch: sha256:")
    assert line.endswith(f" instead of {digest[:23]}...")


def test_docker_diff_id_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A docker-archive has no blob digests: the config's diff_ids are checked."""
    archive = docker_archive(tmp_path / "docker.tar")
    work = tmp_path / "x"
    work.mkdir()
    _run("tar", "-C", work, "-xf", archive)
    manifest = json.loads((work / "manifest.json").read_text())
    layer = work / manifest[0]["Layers"][0]
    layer.write_bytes(tar_of(LAYERS[0] + [f("extra", b"smuggled")]))
    _run("tar", "-C", work, "-cf", archive, ".")
    line = _refused(capsys, tmp_path, archive)
    assert f"layer {layer.name} uncompressed (diff_id): digest mismatch" in line, line


def test_symlinked_blob(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A blob that is a symlink out of the image is refused even when the file it names has the right digest."""
    layout = oci_layout(tmp_path / "layout")
    digest = _amd64_manifest(layout)["layers"][0]["digest"].split(":")[1]
    blob = layout / "blobs/sha256" / digest
    outside = tmp_path / "outside-blob"
    blob.rename(outside)
    blob.symlink_to(outside)
    assert _refused(capsys, tmp_path, layout) == (
        f"error: {layout}: 'blobs/sha256/{digest}' is a symlink out of the image")
    blob.unlink()
    blob.symlink_to("/dev/zero")  # never read: it would never end
    assert _refused(capsys, tmp_path, layout) == (
        f"error: {layout}: 'blobs/sha256/{digest}' is a symlink out of the image")


def test_huge_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = oci_layout(tmp_path / "layout")
    index = json.loads((layout / "index.json").read_text())
    index["annotations"] = {"padding": "x" * (5 << 20)}
    (layout / "index.json").write_text(json.dumps(index))
    assert _refused(capsys, tmp_path, layout) == (
        f"error: {layout}: 'index.json': 5.0 MiB of JSON, more than the 4.0 MiB allowed")
    (layout / "index.json").write_text("[" * 100000 + "]" * 100000)
    assert _refused(capsys, tmp_path, layout) == f"error: {layout}: 'index.json': JSON nested too deeply"


@pytest.mark.parametrize("member", [
    f("../escape", b"x"),
    f("/abs", b"x"),
    link("evil", "/etc/passwd"),
    f("etc/.wh...", b""),
])
def test_hostile_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str], member: Member) -> None:
    layout = oci_layout(tmp_path / "layout", [[d("./"), d("etc"), member]], ("gzip",))
    line = _refused(capsys, tmp_path, layout)
    assert line.startswith(f"error: {layout}: layer 1 (blobs/sha256/"), line
    assert "outside the tree" in line or "names no entry" in line, line
    assert not (tmp_path / "escape").exists()


def test_hard_link_to_a_symlink_stays_in_the_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A hard link to a symlink links the symlink (as GNU tar does), never the host file the symlink names."""
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"host only\n")
    layout = oci_layout(tmp_path / "layout", [[d("./"), link("s", str(secret), tarfile.SYMTYPE), link("h", "s")]],
                        ("none",))
    out = tmp_path / "a.qcow2"
    assert _build(layout, "-o", out, "--no-kernel") == 0
    listing = _fs_listing(_partition(out, tmp_path))
    # two symlinks (mke2fs -d does not keep hard links between symlinks), not the host file's content
    assert listing["/h"] == listing["/s"] == ("0o120777", 0, 0, 1, 0, str(secret))
