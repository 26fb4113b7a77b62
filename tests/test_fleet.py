"""The fleet view: ``rd.qcow2.report=URL`` (bootkit.boot.report) and ``bootkit fleet collect|status``.

The initramfs' report code posts to the real receiver (bootkit.host.fleet) on 127.0.0.1; hostile bodies are
sent raw over a socket. One test runs the real boot entry point (bootkit.boot.main, with its forked daemon)
in a private mount namespace against an image that is not there, and finds its FAILED report collected.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootkit.boot.cmdline import KNOWN_OPTIONS, join_args, parse_cmdline
from bootkit.boot.report import MAX_REPORT, boot_mac, build_report, post, send_report
from bootkit.errors import ConfigError
from bootkit.host.cli import main as cli_main
from bootkit.host.fleet import BadReport, parse_report, read_reports, serve_reports
from bootkit.log import setup

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "http://10.0.2.2:8080/disk.qcow2"
MAC = "52:54:00:12:34:56"


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    setup(0)  # log lines to this test's stderr (an earlier CLI test left the handler on a closed capture)
    reports = tmp_path / "reports"
    reports.mkdir()
    with serve_reports(reports) as url:
        yield url, reports


def _raw(url: str, request: bytes) -> bytes:
    """Send ``request`` as it is and return the whole answer."""
    host, port = url.split("/")[2].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        chunks: list[bytes] = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def _post_raw(url: str, body: bytes, path: str = "/report") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    return _raw(url, head + body)


# --- the command line -------------------------------------------------------------------------------------


def test_cmdline_report_option_round_trips() -> None:
    cfg = parse_cmdline(f"root=qcow2:{IMAGE} rd.qcow2.report=http://10.0.2.2:8070/report")
    assert cfg is not None and cfg.report == "http://10.0.2.2:8070/report"
    assert "rd.qcow2.report=http://10.0.2.2:8070/report" in cfg.to_args()
    assert parse_cmdline(join_args(cfg.to_args())) == cfg
    # added last: the options an older initramfs lists keep their order
    assert KNOWN_OPTIONS.index("rd.qcow2.report") > KNOWN_OPTIONS.index("rd.qcow2.mirror")


@pytest.mark.parametrize("value", ["ftp://10.0.2.2/report", "http://10.0.2.2/", "report", ""])
def test_cmdline_report_needs_an_http_url(value: str) -> None:
    with pytest.raises(ConfigError, match=r"rd\.qcow2\.report"):
        parse_cmdline(f"root=qcow2:{IMAGE} rd.qcow2.report={value}")


# --- the report the initramfs sends -----------------------------------------------------------------------


def test_report_is_bounded_and_safe_whatever_the_cause() -> None:
    cause = "FAILED at fetch: HTTP 404 " + "\x1b[2J$(reboot)`x`" * 5000
    body = build_report(IMAGE + "?" + "a" * 100000, "lazy", {"fetch": 3.25, "../x": 1.0, "open": float("nan")},
                        cause, MAC, None, uptime=4.5)  # fmt: skip
    assert len(body) <= MAX_REPORT
    report = parse_report(body)  # the receiver takes it as it is
    assert report["result"] == "failed" and report["stage"] == "fetch"
    assert report["stages"] == {"fetch": 3.25}
    assert "\x1b" not in report["cause"] and "$" not in report["cause"] and "`" not in report["cause"]
    assert len(report["cause"]) <= 400


def test_report_of_a_mounted_root_has_time_to_root() -> None:
    body = build_report(IMAGE, "ram", {"fetch": 2.0, "open": 2.1, "root": 2.2, "attach": 2.3, "mount": 2.9},
                        None, None, "pc-17", uptime=3.0)  # fmt: skip
    report = parse_report(body)
    assert report["result"] == "ok" and report["time_to_root"] == 2.9 and report["hostname"] == "pc-17"


def test_boot_mac_is_the_first_interface_that_is_up(tmp_path: Path) -> None:
    for name, state, mac in (("lo", "unknown", "00:00:00:00:00:00"), ("eth0", "down", "52:54:00:00:00:01"),
                             ("eth1", "up", "52:54:00:00:00:02\n"), ("eth2", "up", "52:54:00:00:00:03")):  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "operstate").write_text(state + "\n")
        (tmp_path / name / "address").write_text(mac)
    assert boot_mac(str(tmp_path)) == "52:54:00:00:00:02"
    assert boot_mac(str(tmp_path / "missing")) is None


def test_report_arrives_and_status_shows_it(receiver: tuple[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    url, reports = receiver
    ok = build_report(IMAGE, "lazy", {"fetch": 1.5, "mount": 4.25}, None, MAC, "pc-1", uptime=4.3)
    assert post(url, ok) == 200
    failed = build_report(IMAGE, "ram", {}, "FAILED at fetch: server answered 404", None, "pc-2", uptime=9.0)
    assert post(url, failed) == 200
    assert sorted(p.name for p in reports.iterdir()) == ["52-54-00-12-34-56.json", "host-pc-2.json"]
    stored = json.loads((reports / "52-54-00-12-34-56.json").read_text())
    assert stored["peer"] == "127.0.0.1" and stored["time_to_root"] == 4.25

    assert cli_main(["fleet", "status", str(reports)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("pc-2  ") and lines[0].endswith("  ram  FAILED at fetch: server answered 404")
    assert lines[1].startswith(f"{MAC} (pc-1)  ") and "lazy  ok      root after 4.2 s" in lines[1]
    assert cli_main(["fleet", "status", "--json", str(reports)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["hostname"] for r in data] == ["pc-2", "pc-1"]  # newest first


def test_a_machines_new_report_replaces_its_last(receiver: tuple[str, Path]) -> None:
    url, reports = receiver
    assert post(url, build_report(IMAGE, "ram", {}, "FAILED at fetch: timeout", MAC, None)) == 200
    assert post(url, build_report(IMAGE, "ram", {"mount": 5.0}, None, MAC, None)) == 200
    assert [r["result"] for r in read_reports(reports)] == ["ok"]
    assert [p.name for p in reports.iterdir()] == ["52-54-00-12-34-56.json"]  # no temporary file left


# --- hostile bodies ---------------------------------------------------------------------------------------


def _valid() -> dict[str, object]:
    data: dict[str, object] = json.loads(build_report(IMAGE, "ram", {"mount": 5.0}, None, MAC, None, uptime=5.0))
    return data


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"mac": "../../etc/passwd"}, "mac"),
        ({"mac": None, "hostname": ".."}, "hostname"),
        ({"mac": None, "hostname": None}, "mac, hostname"),
        ({"mac": "52:54:00:12:34:56/x"}, "mac"),
        ({"image": "http://x/\x1b[2J"}, "image"),
        ({"result": "pwned"}, "result"),
        ({"mode": "rm -rf"}, "mode"),
        ({"stages": {"a b": 1}}, "stages"),
        ({"stages": {f"s{i}": 1 for i in range(100)}}, "stages"),
        ({"uptime": -1}, "uptime"),
        ({"uptime": True}, "uptime"),
        ({"version": 99}, "version"),
        ({"extra": 1}, "extra"),
        ({"result": "failed", "cause": "x" * 401}, "cause"),
        ({"cause": "FAILED at fetch: but the result says ok"}, "cause"),
    ],
)
def test_hostile_reports_are_refused_with_400(receiver: tuple[str, Path], change: dict[str, object],
                                              field: str) -> None:  # fmt: skip
    url, reports = receiver
    body = {**_valid(), **change}
    if body["result"] == "failed":
        body.pop("time_to_root")
    answer = _post_raw(url, json.dumps(body).encode())
    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), answer[:80]
    assert f"bad report: {field}".encode() in answer
    assert list(reports.iterdir()) == []


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", b"400"),
        (b"\xff\xfe{}", b"400"),
        (b"[" * 100000 + b"]" * 100000, b"413"),  # oversized (and nested past the recursion limit)
        (b"[" * 5000 + b"]" * 5000, b"400"),  # nested past the recursion limit, within the size
        (b"[]", b"400"),
    ],
)
def test_bodies_that_are_not_reports(receiver: tuple[str, Path], body: bytes, status: bytes) -> None:
    url, reports = receiver
    assert _post_raw(url, body).split(b" ", 2)[1] == status
    assert list(reports.iterdir()) == []


def test_only_post_report_with_a_length(receiver: tuple[str, Path]) -> None:
    url, reports = receiver
    body = json.dumps(_valid()).encode()
    assert _post_raw(url, body, path="/../report").split(b" ", 2)[1] == b"404"
    assert _raw(url, b"GET /report HTTP/1.1\r\nHost: x\r\n\r\n").split(b" ", 2)[1] == b"405"
    no_length = b"POST /report HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert _raw(url, no_length).split(b" ", 2)[1] == b"411"
    huge = b"POST /report HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n"
    assert _raw(url, huge).split(b" ", 2)[1] == b"411"
    assert list(reports.iterdir()) == []


def test_status_skips_files_that_are_not_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "evil.json").write_text(json.dumps({**_valid(), "cause": "\x1b[2J", "received": "x", "peer": "y"}))
    (tmp_path / "junk.json").write_text("{")
    assert cli_main(["fleet", "status", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""
    assert cli_main(["fleet", "status", str(tmp_path / "missing")]) == 2


# --- a report never holds up the boot -----------------------------------------------------------------------


def test_dead_receiver_costs_the_boot_at_most_its_wait() -> None:
    """A receiver that accepts nothing and answers nothing: send_report returns after its wait with the sending
    thread still alive (a daemon thread, which cannot keep the boot process from exiting)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        cfg = parse_cmdline(f"root=qcow2:{IMAGE} rd.qcow2.report=http://127.0.0.1:{port}/report")
        assert cfg is not None
        # fill the backlog so that the next connect hangs in SYN_SENT-like silence or is accepted and ignored
        stuck = socket.create_connection(("127.0.0.1", port))
        thread = send_report(cfg, {"mount": 1.0}, wait=0.2)
        assert thread is not None and thread.daemon and thread.is_alive()
        thread.join(10)  # the POST's own timeout ends it: nobody answers within REPORT_TIMEOUT
        assert not thread.is_alive()
        stuck.close()


def test_slow_receiver_times_out_and_refused_receiver_is_one_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    accepted: list[socket.socket] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
        body = build_report(IMAGE, "ram", {}, None, MAC, None)
        with caplog.at_level("DEBUG", logger="bootkit"):
            assert post(f"http://127.0.0.1:{port}/report", body, timeout=0.3) is None
        assert "report: not delivered" in caplog.text and "timed out" in caplog.text
        for s in accepted:
            s.close()
    caplog.clear()
    with caplog.at_level("DEBUG", logger="bootkit"):
        assert post(f"http://127.0.0.1:{port}/report", body, timeout=0.3) is None  # nobody listens now
    assert "ConnectionRefusedError" in caplog.text


def test_no_report_option_sends_nothing() -> None:
    cfg = parse_cmdline(f"root=qcow2:{IMAGE}")
    assert cfg is not None and send_report(cfg, {}) is None


# --- the real boot entry point ----------------------------------------------------------------------------


def test_failed_boot_reports_its_failed_line(receiver: tuple[str, Path], tmp_path: Path) -> None:
    """bootkit.boot.main as the initramfs runs it: the forked daemon fails to fetch (404), the parent reports
    the FAILED line, leaves the cause file and exits 1 (in a private mount namespace with its own /run)."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace (unshare -m)")
    url, reports = receiver
    served = tmp_path / "served"
    served.mkdir()
    from bootkit.host.httpserve import http_server

    with http_server(str(served)) as base:
        cmdline = f"root=qcow2:{base}/missing.qcow2 rd.qcow2.verify=none rd.qcow2.retries=0 rd.qcow2.report={url}"
        script = (
            "import sys\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "from bootkit.boot.main import main\n"
            f"rc = main(['--cmdline', {cmdline!r}, '--newroot', {str(tmp_path / 'newroot')!r}])\n"
            "print(open('/run/bootkit/failed').read(), end='')\n"
            "sys.exit(rc)\n"
        )
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs tmpfs /run && exec "$0" -c "$1"', sys.executable, script],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("FAILED at fetch: ") and "404" in proc.stdout
    (report,) = read_reports(reports)
    assert report["result"] == "failed" and report["stage"] == "fetch"
    assert report["cause"] == proc.stdout.strip()
    assert report["image"] == f"{base}/missing.qcow2" and report["mode"] == "ram"


def test_bad_report_json_names_the_field() -> None:
    with pytest.raises(BadReport, match=r"^mac: "):
        parse_report(json.dumps({**_valid(), "mac": "x"}).encode())


# --- pxe-config: the report key ---------------------------------------------------------------------------

PXE = """\
base_url = "http://10.0.0.1:8080/"
docroot = "www"
{top}
[[entry]]
name = "a"
kernel = "vmlinuz"
initrd = "initrd.img"
image = "disk.qcow2"
{entry}
[[entry]]
name = "b"
kernel = "vmlinuz"
initrd = "initrd.img"
image = "disk.qcow2"
"""


def _pxe(tmp_path: Path, top: str = "", entry: str = "") -> Path:
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    for name in ("vmlinuz", "initrd.img", "disk.qcow2"):
        (www / name).write_bytes(name.encode())
    path = tmp_path / "pxe.toml"
    path.write_text(PXE.format(top=top, entry=entry))
    return path


def test_pxe_config_report_key_top_level_and_per_entry(tmp_path: Path) -> None:
    from bootkit.host.pxecfg.cmdline import kernel_args
    from bootkit.host.pxecfg.load import load_file

    def reports(path: Path) -> list[list[str]]:
        return [[a for a in kernel_args(e) if a.startswith("rd.qcow2.report=")] for e in load_file(path).entries]

    assert reports(_pxe(tmp_path)) == [[], []]
    top = 'report = "http://10.0.0.1:8070/report"'
    assert reports(_pxe(tmp_path, top=top)) == [["rd.qcow2.report=http://10.0.0.1:8070/report"]] * 2
    own = 'report = "http://[2001:db8::1]:8070/report"'
    assert reports(_pxe(tmp_path, top=top, entry=own)) == [
        ["rd.qcow2.report=http://[2001:db8::1]:8070/report"],
        ["rd.qcow2.report=http://10.0.0.1:8070/report"],
    ]


@pytest.mark.parametrize(("top", "entry", "key"), [
    ('report = "ftp://10.0.0.1/report"', "", "report"),
    ("", 'report = "http://10.0.0.1/a b"', "entry.a.report"),
])  # fmt: skip
def test_pxe_config_refuses_a_bad_report_url(tmp_path: Path, top: str, entry: str, key: str) -> None:
    from bootkit.host.pxecfg.load import load_file

    with pytest.raises(ConfigError, match=rf"{re.escape(key)}.*(not an http|single word)"):
        load_file(_pxe(tmp_path, top=top, entry=entry))


def test_fleet_collect_command_receives_until_stopped(tmp_path: Path) -> None:
    """``bootkit fleet collect`` as a user runs it: it names its URL on stderr, stores what it is sent."""
    proc = subprocess.Popen([sys.executable, "-m", "bootkit", "fleet", "collect", "--bind", "127.0.0.1:0",
                             str(tmp_path)], stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        m = re.search(r"receiving reports at (http://127\.0\.0\.1:[0-9]+/report) ", line)
        assert m, line
        assert post(m.group(1), build_report(IMAGE, "stream", {"mount": 2.0}, None, MAC, None)) == 200
        assert [r["mode"] for r in read_reports(tmp_path)] == ["stream"]
    finally:
        proc.terminate()
        proc.wait(10)
    bad = subprocess.run([sys.executable, "-m", "bootkit", "fleet", "collect", "--bind", "nowhere", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert (bad.returncode, bad.stderr) == (2, "error: --bind nowhere: expected HOST:PORT\n")
