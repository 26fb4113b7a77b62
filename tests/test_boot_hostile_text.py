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
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from dracut_shell import MODULE, boot_entry, in_namespace, module_script, source_die_hook

from bootkit.boot.cmdline import parse_cmdline
from bootkit.boot.serve import prepare
from bootkit.boot.stages import Stages
from bootkit.errors import BootkitError
from bootkit.log import MAX_SAFE_TEXT, safe_text

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


def test_failed_hook_gives_die_no_server_text(tmp_path: Path) -> None:
    """Even a cause file that was never sanitised (written here verbatim) cannot reach the sourced hook."""
    script = (
        f"printf '%s\\n' {_sh_quote('FAILED at fetch: HTTP 404 ' + PAYLOAD)} > /run/bootkit/failed\n"
        "root=qcow2 NEWROOT=/nonexistent\n"
        f". {MODULE / 'qcow2-failed.sh'}\n"
    )
    proc = in_namespace(script, tmp_path)
    assert proc.returncode == 1, proc.stderr  # die exits 1
    out = source_die_hook(tmp_path)
    assert "bootkit: the root was not mounted" in out
    assert EXECUTED not in out + proc.stdout + proc.stderr


def test_systemd_cmdline_hook_claims_the_root_and_runs_nothing(tmp_path: Path) -> None:
    """systemd flavour: the hook only claims root=qcow2: and forces rd.neednet; the command line (shell code in
    it) is checked by the boot code that bootkit-root.service starts, not here, so no die hook holds its text."""
    ran = tmp_path / "entry-ran"
    entry = tmp_path / "fake-bootkit-boot"
    entry.write_text(f"#!/bin/sh\ntouch {ran}\n")
    entry.chmod(0o755)
    hook = module_script(tmp_path, "parse-qcow2.sh", entry)
    cmdline = f"root=qcow2:http://10.0.2.2/disk.qcow2 rd.qcow2.mode={PAYLOAD.replace(' ', '')}"
    script = (
        f'export DRACUT_SYSTEMD=1\n. {hook}\necho "claimed $root $rootok"\n'
        "cat /etc/cmdline.d/90bootkit-neednet.conf\n"
    )
    proc = in_namespace("mount -t tmpfs tmpfs /etc\nmkdir -p /etc/cmdline.d\n" + script, tmp_path, cmdline)
    assert proc.returncode == 0, proc.stderr
    assert "claimed qcow2 1" in proc.stdout and "rd.neednet=1" in proc.stdout
    assert not (tmp_path / "hooks" / "emergency" / "01-die.sh").exists()
    assert not ran.exists()
    assert EXECUTED not in proc.stdout + proc.stderr


def test_systemd_unit_refuses_a_bad_line_before_it_waits(tmp_path: Path) -> None:
    """The boot code as bootkit-root.service starts it (the unit's own options, --wait-for a file nobody
    creates): a bad option with shell code in it ends it at once with one safe FAILED line, status 2."""
    unit = (MODULE / "bootkit-root.service").read_text()
    (exec_start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    options = exec_start.split("/usr/lib/bootkit/bootkit-boot ", 1)[1].split()
    assert "--wait-for" in options
    cmdline = f"root=qcow2:http://10.0.2.2/disk.qcow2 rd.qcow2.mode={PAYLOAD.replace(' ', '')}"
    entry = boot_entry(tmp_path)
    proc = in_namespace(f'"{entry}" {" ".join(options)}; echo "status $?"\ncat /run/bootkit/failed\n', tmp_path,
                        cmdline, timeout=60)  # fmt: skip
    assert "status 2" in proc.stdout, proc.stdout + proc.stderr
    failed = [line for line in proc.stderr.splitlines() if "FAILED at cmdline" in line]
    assert len(failed) == 1 and "rd.qcow2.mode" in failed[0], proc.stderr
    assert not UNSAFE & set(failed[0].removeprefix("bootkit: "))
    assert failed[0].removeprefix("bootkit: ") in proc.stdout  # the same line in /run/bootkit/failed
    assert EXECUTED not in proc.stdout + proc.stderr


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
