"""Text from a hostile web server never reaches a shell parser in the initramfs.

A server (or anyone on the path of plain HTTP) chooses the reason phrase of its status line, its redirect
targets and its headers. They end up in the boot's failure cause; dracut's ``die`` writes its message into
``hooks/emergency/01-die.sh``, which is sourced later. These tests run the real boot code against such a
server, and the real dracut scripts (``qcow2-failed.sh``, ``parse-qcow2.sh``) with dracut's own
``dracut-lib.sh`` in a private mount namespace, then source the hook file that ``die`` wrote. The payloads
print ``PWNED42`` only when a shell evaluates them: the literal text never contains it.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootkit.boot.cmdline import parse_cmdline
from bootkit.boot.main import Stages, prepare
from bootkit.errors import BootkitError
from bootkit.log import MAX_SAFE_TEXT, safe_text

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "dracut-module" / "90bootkit"
DRACUT_BASE = Path("/usr/lib/dracut/modules.d/99base")

#: each runs a command when a shell evaluates it, in every quoting context dracut's die hook can put it in
PAYLOAD = "$(echo PWNED$((6*7))) \"; echo PWNED$((6*7)); \" `echo PWNED$((6*7))` '; echo PWNED$((6*7)); '"
EXECUTED = "PWNED42"
UNSAFE = set("\"'$`\\")


class _Hostile(http.server.BaseHTTPRequestHandler):
    """Redirects the image to a URL carrying shell code, answers that with a reason phrase carrying more."""

    def do_GET(self) -> None:
        if self.path.startswith("/disk.qcow2"):
            self.send_response(302, "Found $(echo PWNED$((6*7)))")
            self.send_header("Location", "/x$(echo%20PWNED$((6*7)))`id`.qcow2")
            self.send_header("X-Note", PAYLOAD)
        else:
            self.send_response(404, "Not Found " + PAYLOAD + "\x1b[2J")
            self.send_header("X-Note", PAYLOAD)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def hostile_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/disk.qcow2"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_safe_text_keeps_nothing_a_shell_or_console_acts_on() -> None:
    text = safe_text("HTTP/1.1 404 " + PAYLOAD + "\x1b[2J\r\n\x00" + "x" * 1000)
    assert not UNSAFE & set(text)
    assert all(0x20 <= ord(c) < 0x7F for c in text)
    assert len(text) == MAX_SAFE_TEXT and text.endswith("...")
    assert safe_text("FAILED at fetch: http://10.0.2.2/disk.qcow2: HTTP 404 Not Found") == (
        "FAILED at fetch: http://10.0.2.2/disk.qcow2: HTTP 404 Not Found"
    )


@pytest.mark.parametrize("options", ["rd.qcow2.sha256=" + "0" * 64, "rd.qcow2.verify=none"])
def test_failure_line_from_a_hostile_server_is_safe(hostile_url: str, tmp_path: Path, options: str) -> None:
    """The boot code's own failure line, made from a real fetch against the hostile server (pinned or not)."""
    cfg = parse_cmdline(f"root=qcow2:{hostile_url} {options} rd.qcow2.retries=0 rd.qcow2.timeout=10")
    assert cfg is not None
    stages = Stages()
    with pytest.raises(BootkitError) as raised:
        prepare(cfg, stages, str(tmp_path / "images"))
    line = stages.failed(str(raised.value))
    assert line.startswith("FAILED at fetch: ") and "404" in line
    assert not UNSAFE & set(line)
    assert all(0x20 <= ord(c) < 0x7F for c in line)


def _dracut_lib(tmp_path: Path) -> Path:
    """dracut's dracut-lib.sh as the initramfs has it: its helpers where it looks for them (/lib, $PATH)."""
    if not (DRACUT_BASE / "dracut-lib.sh").exists():
        pytest.skip(f"{DRACUT_BASE} not found: install the Debian package 'dracut-core'")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("dracut-getarg", "dracut-getargs"):
        (bin_dir / name).symlink_to("/usr/lib/dracut/dracut-util")
    lib = tmp_path / "dracut-lib.sh"
    text = (DRACUT_BASE / "dracut-lib.sh").read_text()
    lib.write_text(text.replace("/lib/dracut-dev-lib.sh", str(DRACUT_BASE / "dracut-dev-lib.sh")))
    return lib


def _in_namespace(script: str, tmp_path: Path, cmdline: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``script`` under bash in a private mount namespace: its own /run, /dev/kmsg and /proc/cmdline,
    with dracut's shell library sourced first."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace (unshare -m)")
    lib = _dracut_lib(tmp_path)
    kmsg = tmp_path / "kmsg"
    kmsg.touch()
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    prologue = (
        "mount -t tmpfs tmpfs /run\n"
        f"mount --bind {kmsg} /dev/kmsg\n"
        f"mount --bind {tmp_path / 'cmdline'} /proc/cmdline\n"
        f"export PATH={tmp_path / 'bin'}:$PATH\n"
        f". {lib}\n"
        # after dracut-lib.sh, which sets the initramfs' own hookdir
        f"export hookdir={tmp_path}/hooks\n"
        'mkdir -p "$hookdir/emergency" "$hookdir/shutdown-emergency" /run/bootkit\n'
    )
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", prologue + script],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _source_die_hook(tmp_path: Path) -> str:
    """What sourcing the hook that dracut's die wrote prints (dracut sources it in the emergency path)."""
    hook = tmp_path / "hooks" / "emergency" / "01-die.sh"
    assert hook.exists(), "dracut's die did not run"
    proc = subprocess.run(
        ["bash", "-c", 'warn() { echo "$*"; }; . "$1"', "bash", str(hook)], capture_output=True, text=True
    )
    return proc.stdout + proc.stderr


def test_failed_hook_gives_die_no_server_text(tmp_path: Path) -> None:
    """Even a cause file that was never sanitised (written here verbatim) cannot reach the sourced hook."""
    script = (
        f"printf '%s\\n' {_sh_quote('FAILED at fetch: HTTP 404 ' + PAYLOAD)} > /run/bootkit/failed\n"
        "root=qcow2 NEWROOT=/nonexistent\n"
        f". {MODULE / 'qcow2-failed.sh'}\n"
    )
    proc = _in_namespace(script, tmp_path)
    assert proc.returncode == 1, proc.stderr  # die exits 1
    out = _source_die_hook(tmp_path)
    assert "bootkit: the root was not mounted" in out
    assert EXECUTED not in out + proc.stdout + proc.stderr


def test_cmdline_hook_gives_die_only_safe_text(tmp_path: Path) -> None:
    """A command line that fails bootkit's check, with shell code in it: die gets the message without it.

    The hook runs as shipped except for where it finds the boot code (the initramfs has it in
    /usr/lib/bootkit; here it is this checkout)."""
    entry = tmp_path / "bootkit-boot"
    entry.write_text(
        "#!/usr/bin/python3 -sE\nimport sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from bootkit.boot.main import main\n"
        "sys.exit(main())\n"
    )
    entry.chmod(0o755)
    hook = (MODULE / "parse-qcow2.sh").read_text().replace("/usr/lib/bootkit/bootkit-boot", str(entry))
    (tmp_path / "parse-qcow2.sh").write_text(hook)
    cmdline = f"root=qcow2:http://10.0.2.2/disk.qcow2 rd.qcow2.mode={PAYLOAD.replace(' ', '')}"
    proc = _in_namespace(f". {tmp_path / 'parse-qcow2.sh'}\n", tmp_path, cmdline)
    assert proc.returncode == 1, proc.stderr
    out = _source_die_hook(tmp_path)
    assert "rd.qcow2.mode" in out
    assert EXECUTED not in out + proc.stdout + proc.stderr


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
