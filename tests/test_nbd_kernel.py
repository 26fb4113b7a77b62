"""Kernel attach on the build host (no NBD driver here) and the daemon bits of a root storage daemon.

The kernel path itself is proven in a QEMU guest (tests/test_nbd_kernel_qemu.py). Here: `attach` says in one
line that the module is missing and exits 2; the generic netlink client works against the kernel's own
controller family; and a `--daemon` server has argv[0] '@bootkit-nbd', a pid file, locked memory, and keeps
serving after the files it was started from are gone (what switch_root does to it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import bootkit
from bootkit.errors import NBDError
from bootkit.nbd import kernel

BOOTKIT = [sys.executable, "-m", "bootkit"]
REPO = Path(bootkit.__file__).resolve().parent.parent


def _nbd_family_present() -> bool:
    with kernel.GenericNetlink() as nl:
        return nl.family_id("nbd") is not None


def _has_cap(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


CAP_SYS_RESOURCE = 24


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    pytest.importorskip("bootkit.qcow2", reason="the QCOW2 reader (bootkit.qcow2) is not there yet")
    d = tmp_path_factory.mktemp("nbdkernel")
    raw = d / "disk.raw"
    data = (os.urandom(1 << 20) + b"compressible text " * 60000)[: 2 << 20]
    raw.write_bytes(data + bytes(1 << 20))
    img = d / "disk.qcow2"
    # zstd: the reader imports zstandard lazily, which is what the daemon must do before the root switch
    opts = ["-O", "qcow2", "-c", "-o", "compression_type=zstd"]
    subprocess.run(["qemu-img", "convert", "-f", "raw", *opts, str(raw), str(img)], check=True)
    return img, raw.read_bytes()


def test_generic_netlink_resolves_families() -> None:
    with kernel.GenericNetlink() as nl:
        assert nl.family_id("nlctrl") == kernel.GENL_ID_CTRL
        assert nl.family_id("nosuchfamily") is None


@pytest.mark.skipif(_nbd_family_present(), reason="this kernel has the nbd driver loaded: nothing to refuse")
def test_attach_without_nbd_module_says_so_in_one_line(image: tuple[Path, bytes]) -> None:
    proc = subprocess.run([*BOOTKIT, "attach", str(image[0])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: nbd module not available")


@pytest.mark.skipif(_nbd_family_present(), reason="this kernel has the nbd driver loaded: nothing to refuse")
def test_detach_without_nbd_module_exits_2() -> None:
    proc = subprocess.run([*BOOTKIT, "detach", "/dev/nbd0"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (
        2,
        "error: nbd module not available: the kernel has no nbd netlink family\n",
    )


def test_device_names() -> None:
    assert kernel.device_index("/dev/nbd12") == 12
    assert kernel.device_index("nbd0") == 0
    with pytest.raises(NBDError, match="/dev/sda"):
        kernel.device_index("/dev/sda")
    proc = subprocess.run([*BOOTKIT, "detach", "/dev/sda"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("error: /dev/sda: not an NBD device name")


def _read(sock_path: str, offset: int, length: int) -> bytes:
    """One NBD_CMD_READ through libnbd."""
    nbd = pytest.importorskip("nbd", reason="libnbd's Python binding (python3-libnbd) is not installed")
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///?socket={sock_path}")
    try:
        return bytes(h.pread(length, offset))
    finally:
        h.shutdown()


def _start_daemon(image: Path, tmp_path: Path, *, exec_a: bool) -> tuple[int, Path, Path]:
    """`serve-nbd --daemon` from a private copy of bootkit (and zstandard) that the test may delete.

    exec_a: started the way the initramfs starts it, `exec -a @bootkit-nbd python3 -S -m bootkit ...`: no
    re-exec, and nothing on sys.path but the standard library and the private copy.
    """
    pkg = tmp_path / "pkg"
    shutil.copytree(REPO / "bootkit", pkg / "bootkit", ignore=shutil.ignore_patterns("__pycache__"))
    zstandard = pytest.importorskip("zstandard", reason="the zstandard module is not installed")
    shutil.copytree(Path(zstandard.__file__).parent, pkg / "zstandard")
    sock, pid_file, log_file = tmp_path / "nbd.sock", tmp_path / "nbd.pid", tmp_path / "daemon.log"
    args = ["serve-nbd", str(image), "--unix", str(sock), "--daemon", "--pid-file", str(pid_file)]
    if exec_a:
        python = os.path.realpath(sys.executable)
        cmd = ["bash", "-c", 'exec -a @bootkit-nbd "$@"', "bash", python, "-S", "-m", "bootkit", *args]
    else:
        cmd = [sys.executable, "-m", "bootkit", *args]
    with log_file.open("w") as log:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=dict(os.environ, PYTHONPATH=str(pkg)),
            cwd=tmp_path, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 0, log_file.read_text()
    assert proc.stdout == f"nbd+unix:///?socket={sock}\n"
    return int(pid_file.read_text()), pkg, log_file


@pytest.fixture(params=["reexec", "exec-a"])
def daemon(
    request: pytest.FixtureRequest, image: tuple[Path, bytes], tmp_path: Path
) -> Iterator[tuple[int, Path, Path]]:
    pid, pkg, log_file = _start_daemon(image[0], tmp_path, exec_a=request.param == "exec-a")
    try:
        yield pid, pkg, log_file
    finally:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _gone(pid: int, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)  # polling a pid that is not our child: there is nothing to wait on
    return False


def test_daemon_is_a_root_storage_daemon(
    daemon: tuple[int, Path, Path], image: tuple[Path, bytes], tmp_path: Path
) -> None:
    pid, _, log_file = daemon
    proc = Path(f"/proc/{pid}")
    assert (proc / "cmdline").read_bytes().split(b"\0")[0] == b"@bootkit-nbd"
    assert os.getsid(pid) != os.getsid(0)  # a session of its own (double fork: not its leader)
    status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines())
    assert int(status["VmLck"].split()[0]) > 0
    if _has_cap(CAP_SYS_RESOURCE):
        assert (proc / "oom_score_adj").read_text().strip() == "-1000"
        flags = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[6])
        assert flags & 0x00080000  # PF_MEMALLOC_NOIO, set by PR_SET_IO_FLUSHER
    else:  # this sandbox withholds CAP_SYS_RESOURCE: the daemon must say what it could not do
        text = log_file.read_text()
        assert "oom_score_adj: Permission denied" in text and "PR_SET_IO_FLUSHER" in text
    assert _read(str(tmp_path / "nbd.sock"), 4096, 8192) == image[1][4096 : 4096 + 8192]
    os.kill(pid, signal.SIGTERM)
    assert _gone(pid)
    assert not (tmp_path / "nbd.pid").exists() and not (tmp_path / "nbd.sock").exists()


def test_daemon_keeps_serving_after_its_files_are_gone(
    daemon: tuple[int, Path, Path], image: tuple[Path, bytes], tmp_path: Path
) -> None:
    """Like switch_root: the packages it ran from disappear (bootkit, zstandard); everything still works."""
    nbd = pytest.importorskip("nbd", reason="libnbd's Python binding (python3-libnbd) is not installed")
    pid, pkg, log_file = daemon
    shutil.rmtree(pkg)
    data = image[1]
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(f"nbd+unix:///?socket={tmp_path / 'nbd.sock'}")
    assert h.pread(len(data), 0) == data
    extents: list[int] = []
    h.block_status(len(data), 0, lambda meta, off, e, err: extents.extend(e))
    assert extents[-1] == 3  # the zero tail
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 512, 0)
    h.shutdown()
    # a protocol violation exercises the warning path (logging, exception formatting)
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(tmp_path / "nbd.sock"))
    s.recv(18)
    s.sendall(b"\xff" * 20)
    s.settimeout(60)
    try:
        assert s.recv(1) == b""
    except ConnectionResetError:
        pass  # closed with our garbage unread: a reset, not a FIN
    s.close()
    assert _read(str(tmp_path / "nbd.sock"), 0, 4096) == data[:4096]
    assert "ModuleNotFoundError" not in log_file.read_text()
    os.kill(pid, signal.SIGTERM)
    assert _gone(pid)


def test_daemon_reports_bad_image_to_its_starter(tmp_path: Path) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"not an image at all" * 10)
    proc = subprocess.run(
        [*BOOTKIT, "attach", str(bad), "--daemon", "--pid-file", str(tmp_path / "p")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "bad.qcow2" in proc.stderr
    assert not (tmp_path / "p").exists()


def test_initramfs_modules_import_only_the_standard_library() -> None:
    code = (
        "import sys; before = set(sys.modules); "
        "import bootkit.nbd.server, bootkit.nbd.transport, bootkit.nbd.kernel, bootkit.nbd.protocol; "
        "bad = sorted(m for m in set(sys.modules) - before if m.split('.')[0] not in sys.stdlib_module_names "
        "and m.split('.')[0] != 'bootkit'); print(bad); sys.exit(bool(bad))"
    )
    subprocess.run([sys.executable, "-S", "-c", code], check=True, cwd=REPO, timeout=60)
    vermin = shutil.which("vermin") or str(Path(sys.executable).parent / "vermin")
    proc = subprocess.run(
        [vermin, "-t=3.9-", "--violations", "--no-tips", str(REPO / "bootkit" / "nbd")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _python39() -> str | None:
    """A real Python 3.9 (not a pyenv shim, which needs a version selected to work)."""
    candidates = [*sorted(Path.home().glob(".pyenv/versions/3.9*/bin/python3.9")), Path("/usr/bin/python3.9")]
    return next((str(c) for c in candidates if c.exists()), None)


@pytest.mark.skipif(_python39() is None, reason="no Python 3.9 interpreter on this host (initramfs floor)")
def test_server_runs_on_python_3_9(image: tuple[Path, bytes], tmp_path: Path) -> None:
    """The initramfs may carry Python 3.9: serve with it (stdlib only, zstd via the copied module) and copy."""
    python39 = _python39()
    assert python39 is not None
    sock = tmp_path / "nbd.sock"
    code = (
        "import sys\n"
        "from bootkit.nbd.server import NBDServer\n"
        "from bootkit.nbd import kernel, transport\n"
        "import bootkit.qcow2 as qcow2\n"
        "image = qcow2.open(sys.argv[1])\n"
        "listener = transport.unix_listener(sys.argv[2])\n"
        "print(sys.version_info[:2], flush=True)\n"
        "transport.Acceptor([listener], NBDServer(image).serve_connection, once=True).run()\n"
    )
    # deflate, not zstd: the zstandard module in this venv is built for its own Python
    raw = tmp_path / "disk.raw"
    raw.write_bytes(image[1])
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", str(raw), str(img)], check=True)
    proc = subprocess.Popen(
        [python39, "-I", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); exec({code!r})", str(img), str(sock)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "(3, 9)"
        out = tmp_path / "out.raw"
        subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sock}", str(out)], check=True, timeout=300)
        assert out.read_bytes() == image[1]
        assert proc.wait(60) == 0
    finally:
        proc.kill()


def test_serve_nbd_help_says_the_default_listener_has_no_authentication() -> None:
    proc = subprocess.run([*BOOTKIT, "serve-nbd", "--help"], capture_output=True, text=True, timeout=60, check=True)
    text = " ".join(proc.stdout.split())
    assert "else TCP 127.0.0.1:10809. There is no authentication and no TLS" in text
    assert "use --unix PATH in a directory only they can enter" in text
