"""``bootkit publish``: content-addressed files, the overlay's backing rename, the TOML entry, ``--prune``.

Images are written by bootkit's QCOW2 writer from small raw disks (an overlay with ``backing=``), checked with
``qemu-img``; the TOML is read back with ``tomllib`` and ``pxe-config``'s own loader.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from testtools import require_tools

from bootkit.host.cli import main
from bootkit.host.publish import prune
from bootkit.host.pxecfg.load import load_file
from bootkit.qcow2.writer import write_qcow2

MIB = 1 << 20

SITE = """\
# the site's boot menu (a comment publish must keep)
base_url = "http://192.168.1.10:8080/netboot/"
docroot = "www"
timeout = 3

[[entry]]
name = "other"    # another entry, left alone
kernel = "other.vmlinuz"
initrd = "other.initrd"
image = "other.qcow2"
sha256 = "compute"

[[entry]]
name = "web"
title = "Web servers"
args = ["quiet", "rd.qcow2.sha256.stale.qcow2=0000000000000000000000000000000000000000000000000000000000000000"]

[[machine]]
mac = "52:54:00:12:34:56"
default = "web"
"""


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tools("qemu-img")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_image(out: Path, seed: int, *, base: Path | None = None, changed: int = 3) -> Path:
    """A 4 MiB disk image (and NAME.vmlinuz, NAME.initrd next to it); with ``base``, ``changed`` clusters of
    the base's disk rewritten and the result written as an overlay naming ``base`` by plain name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_suffix(".raw")
    r = random.Random(seed)
    if base is None:
        raw.write_bytes(r.randbytes(4 * MIB))
    else:
        data = bytearray(base.with_suffix(".raw").read_bytes())
        for _ in range(changed):
            at = r.randrange(0, 4 * MIB // 65536) * 65536
            data[at : at + 65536] = r.randbytes(65536)
        raw.write_bytes(bytes(data))
    write_qcow2(raw, out, backing=base, backing_name=None if base is None else base.name)
    stem = out.name.removesuffix(".qcow2")
    out.with_name(f"{stem}.vmlinuz").write_bytes(b"kernel %d\n" % seed)
    out.with_name(f"{stem}.initrd").write_bytes(b"initrd %d\n" % seed)
    out.with_name(f"{stem}.initrd").chmod(0o600)  # as build-initrd writes it
    return out


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "www").mkdir()
    for name in ("other.vmlinuz", "other.initrd", "other.qcow2"):
        (tmp_path / "www" / name).write_bytes(name.encode())
    path = tmp_path / "site.toml"
    path.write_text(SITE)
    return path


def publish(*args: object) -> int:
    return main(["publish", *[str(a) for a in args]])


def test_publish_places_content_addressed_files_and_writes_the_entry(
    tmp_path: Path, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = make_image(tmp_path / "build" / "web-1.qcow2", 1)
    www = tmp_path / "www"
    assert publish(image, www, "--toml", site, "--entry", "web") == 0
    h = sha(image)
    name = f"web-{h[:16]}.qcow2"
    published = www / name
    assert published.read_bytes() == image.read_bytes()
    assert (www / f"{name}.sha256").read_text() == f"{h}  {name}\n"
    manifest = www / f"{name}.manifest"
    assert manifest.read_text().startswith("bootkit-manifest 1\n")
    assert (www / f"{name}.manifest.sha256").read_text() == f"{sha(manifest)}  {name}.manifest\n"
    kernel = f"web-{sha(image.with_name('web-1.vmlinuz'))[:16]}.vmlinuz"
    initrd = f"web-{sha(image.with_name('web-1.initrd'))[:16]}.initrd"
    # readable by the web server; the 0600 initramfs copied, not linked (the source keeps its mode)
    assert {p.stat().st_mode & 0o777 for p in www.glob("web-*")} == {0o644}
    assert image.with_name("web-1.initrd").stat().st_mode & 0o777 == 0o600
    out = capsys.readouterr().out
    assert f"{published} (" in out and f"entry 'web': image = '{name}' (new)" in out

    text = site.read_text()
    assert text.startswith("# the site's boot menu (a comment publish must keep)\n")
    assert 'name = "other"    # another entry, left alone' in text
    data = tomllib.loads(text)
    before = tomllib.loads(SITE)
    assert data["entry"][0] == before["entry"][0] and data["machine"] == before["machine"]
    assert data["entry"][1] == {
        "name": "web",
        "title": "Web servers",
        "args": ["quiet"],  # the stale pin of a backing file went; the user's argument stayed
        "image": name,
        "sha256": h,
        "mode": "lazy",
        "manifest": f"{name}.manifest",
        "manifest_sha256": sha(manifest),
        "kernel": kernel,
        "initrd": initrd,
    }
    # pxe-config reads what publish wrote
    config = load_file(site)
    entry = next(e for e in config.entries if e.name == "web")
    assert entry.image.url == f"http://192.168.1.10:8080/netboot/{name}"
    assert entry.sha256 == h and entry.manifest_sha256 == sha(manifest)

    # publishing again changes nothing
    assert publish(image, www, "--toml", site, "--entry", "web") == 0
    out = capsys.readouterr().out
    assert out.count("unchanged ") == 6 and "entry 'web' unchanged" in out
    assert site.read_text() == text


def test_overlay_names_its_base_by_published_name_before_hashing(tmp_path: Path, site: Path) -> None:
    base = make_image(tmp_path / "build" / "web-1.qcow2", 1)
    overlay = make_image(tmp_path / "build" / "web-2.qcow2", 2, base=base)
    www = tmp_path / "www"
    # the base is not published yet: refused, nothing of the overlay written
    assert publish(overlay, www, "--toml", site, "--entry", "web") == 2
    assert not list(www.glob("web-*"))
    assert publish(base, www, "--toml", site, "--entry", "web") == 0
    assert publish(overlay, www, "--toml", site, "--entry", "web") == 0
    base_pub = www / f"web-{sha(base)[:16]}.qcow2"
    (over_pub,) = set(www.glob("web-*.qcow2")) - {base_pub}
    h = sha(over_pub)
    assert over_pub.name == f"web-{h[:16]}.qcow2"  # hashed after the rewrite
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", over_pub], check=True,
                                     capture_output=True).stdout)
    assert info["backing-filename"] == base_pub.name
    subprocess.run(["qemu-img", "check", over_pub], check=True, capture_output=True)
    # the published overlay reads (through the published base) as the local one
    subprocess.run(["qemu-img", "compare", overlay, over_pub], check=True, capture_output=True)
    assert over_pub.stat().st_size == overlay.stat().st_size
    entry = tomllib.loads(site.read_text())["entry"][1]
    assert entry["image"] == over_pub.name and entry["sha256"] == h
    manifest = www / f"{base_pub.name}.manifest"
    assert entry["args"] == ["quiet", f"rd.qcow2.sha256.{base_pub.name}={sha(base_pub)}",
                             f"rd.qcow2.sha256.{base_pub.name}.manifest={sha(manifest)}"]
    load_file(site)


def publish_overlay_in_mode(tmp_path: Path, site: Path, mode: str) -> tuple[dict[str, Any], Path]:
    """Publish a base, then an overlay on it in ``mode``; the overlay's entry and the local base."""
    base = make_image(tmp_path / "build" / "web-1.qcow2", 1)
    overlay = make_image(tmp_path / "build" / "web-2.qcow2", 2, base=base)
    www = tmp_path / "www"
    assert publish(base, www, "--toml", site, "--entry", "web") == 0
    assert publish(overlay, www, "--toml", site, "--entry", "web", "--mode", mode) == 0
    return tomllib.loads(site.read_text())["entry"][1], base


def test_ram_mode_pins_the_chain_without_manifests(tmp_path: Path, site: Path) -> None:
    entry, base = publish_overlay_in_mode(tmp_path, site, "ram")
    base_pub = f"web-{sha(base)[:16]}.qcow2"
    assert entry["mode"] == "ram" and "manifest" not in entry and "manifest_sha256" not in entry
    assert entry["args"] == ["quiet", f"rd.qcow2.sha256.{base_pub}={sha(base)}"]
    load_file(site)


def test_stream_mode_pins_the_chain_with_manifests(tmp_path: Path, site: Path) -> None:
    """Stream mode reads ranges like lazy mode: the entry gets the manifest and the chain's manifest pins."""
    entry, base = publish_overlay_in_mode(tmp_path, site, "stream")
    base_pub = f"web-{sha(base)[:16]}.qcow2"
    assert entry["mode"] == "stream" and entry["manifest"] == entry["image"] + ".manifest"
    assert len(entry["manifest_sha256"]) == 64
    assert f"rd.qcow2.sha256.{base_pub}.manifest" in " ".join(entry["args"])
    load_file(site)


def test_an_existing_different_file_is_never_replaced(tmp_path: Path, site: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image(tmp_path / "build" / "web-1.qcow2", 1)
    www = tmp_path / "www"
    squatter = www / f"web-{sha(image)[:16]}.qcow2"
    squatter.write_bytes(b"a machine may be reading this\n")
    capsys.readouterr()
    assert publish(image, www, "--toml", site, "--entry", "web") == 2
    assert capsys.readouterr().err == (f"error: {squatter}: exists with different bytes: refusing to replace a"
                                       " published file (a machine may be reading it)\n")
    assert squatter.read_bytes() == b"a machine may be reading this\n"
    assert site.read_text() == SITE
    assert not [p for p in www.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "../evil"], "error: --name '../evil': 1-64 characters of A-Z a-z 0-9 . _ + -, starting with a"
                                " letter or digit\n"),
        (["--entry", "a b"], "error: --entry 'a b': 1-64 characters of A-Z a-z 0-9 . _ + -, starting with a letter"
                             " or digit\n"),
        (["--name=-rf"], "error: --name '-rf': 1-64 characters of A-Z a-z 0-9 . _ + -, starting with a letter"
                            " or digit\n"),
        (["--prune", "2"], "error: --prune needs --toml: a version is removed only when no entry references it\n"),
        (["--toml", "NEW"], "error: NEW: no such file; give --base-url (the URL WWW is served at) to create it\n"),
        (["--toml", "BADROOT"], "error: BADROOT: docroot 'elsewhere' is not WWW: pxe-config would look for the"
                                " published files elsewhere\n"),
    ],
    ids=["name-dotdot", "entry-space", "name-dash", "prune-without-toml", "new-toml-without-url", "docroot"],
)
def test_bad_input_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                     message: str) -> None:
    image = make_image(tmp_path / "build" / "web-1.qcow2", 1)
    www = tmp_path / "www"
    www.mkdir()
    badroot = tmp_path / "bad.toml"
    badroot.write_text('base_url = "http://x/"\ndocroot = "elsewhere"\n')
    subst = {"NEW": str(tmp_path / "new.toml"), "BADROOT": str(badroot), "WWW": str(www)}
    argv = [subst.get(a, a) for a in args]
    capsys.readouterr()
    assert publish(image, www, *argv) == 2
    expected = message
    for key, value in subst.items():
        expected = expected.replace(key, value)
    assert capsys.readouterr().err == expected
    assert list(www.iterdir()) == []


def test_an_entry_publish_cannot_edit_safely_is_left_alone(tmp_path: Path, site: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image(tmp_path / "build" / "web-1.qcow2", 1)
    text = SITE.replace('args = ["quiet", ', 'args = "quiet"\nold_args = [')
    site.write_text(text)
    capsys.readouterr()
    assert publish(image, tmp_path / "www", "--toml", site, "--entry", "web") == 2
    assert capsys.readouterr().err == f"error: {site}: entry.web.args: not an array of strings\n"
    assert site.read_text() == text
    site.write_text("entry = [{ name = 'web' }]\n" + SITE.split("\n", 1)[1].split("[[entry]]")[0])
    assert publish(image, tmp_path / "www", "--toml", site, "--entry", "web") == 2
    assert "'entry' is not an array of tables" in capsys.readouterr().err


def test_a_new_toml_is_created_with_base_url(tmp_path: Path) -> None:
    image = make_image(tmp_path / "build" / "web-1.qcow2", 1)
    www = tmp_path / "srv" / "www"
    www.mkdir(parents=True)
    site = tmp_path / "site.toml"
    assert publish(image, www, "--toml", site, "--base-url", "http://10.0.0.1/boot/") == 0
    data = tomllib.loads(site.read_text())
    assert data["base_url"] == "http://10.0.0.1/boot/" and data["docroot"] == "srv/www"
    assert [e["name"] for e in data["entry"]] == ["web-1"]
    load_file(site)


def test_prune_keeps_newest_referenced_recent_and_needed_bases(tmp_path: Path, site: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    www = tmp_path / "www"
    v1 = make_image(tmp_path / "build" / "web-1.qcow2", 1)
    v2 = make_image(tmp_path / "build" / "web-2.qcow2", 2)
    v3 = make_image(tmp_path / "build" / "web-3.qcow2", 3, base=v2)
    v4 = make_image(tmp_path / "build" / "web-4.qcow2", 4)
    for v in (v1, v2, v3):
        assert publish(v, www, "--toml", site, "--entry", "web", "--name", "web") == 0
    p1, p2 = (www / f"web-{sha(v)[:16]}.qcow2" for v in (v1, v2))
    (p3,) = set(www.glob("web-*.qcow2")) - {p1, p2}
    # a grace period not yet over: nothing goes, whatever N says
    assert publish(v3, www, "--toml", site, "--entry", "web", "--prune", "1") == 0
    assert {p1, p2, p3} <= set(www.iterdir())
    # a day later: v1 goes with its companions (the newest is v3, which needs v2 as its base)
    removed = prune.prune(www, "web", site, keep=1, grace=prune.DEFAULT_GRACE, now=time.time() + 2 * 86400)
    assert p1 not in set(www.iterdir()) and not list(www.glob(f"{p1.name}*"))
    assert {p1, p1.with_name(p1.name + ".sha256"), p1.with_name(p1.name + ".manifest")} <= set(removed)
    assert p2.exists() and p3.exists()
    assert not (www / f"web-{sha(v1.with_name('web-1.vmlinuz'))[:16]}.vmlinuz").exists()
    assert (www / f"web-{sha(v3.with_name('web-3.vmlinuz'))[:16]}.vmlinuz").exists()
    # another entry referencing an old version keeps it; --grace 0 removes the rest at once
    assert publish(v4, www, "--toml", site, "--entry", "web") == 0
    text = site.read_text().replace('name = "other"    # another entry, left alone',
                                    f'name = "other"    # another entry, left alone\nmanifest = "{p3.name}.manifest"')
    text = text.replace('image = "other.qcow2"\nsha256 = "compute"', f'image = "{p3.name}"\nmode = "lazy"')
    site.write_text(text)
    capsys.readouterr()
    assert publish(v4, www, "--toml", site, "--entry", "web", "--prune", "1", "--grace", "0") == 0
    assert f"removed {www}" in capsys.readouterr().out
    p4 = www / f"web-{sha(v4)[:16]}.qcow2"
    assert p4.exists() and p3.exists() and p2.exists()  # p3: referenced by 'other'; p2: p3's base
    state = json.loads((www / prune.STATE).read_text())
    assert p1.name not in state["published"]
