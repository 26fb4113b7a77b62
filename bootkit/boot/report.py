"""The fleet report: one small HTTP POST per boot to ``rd.qcow2.report=URL`` (``bootkit fleet collect``).

Nobody watches 300 serial consoles. With ``rd.qcow2.report=``, each machine sends, once its root is mounted
or its boot has failed, a JSON object of at most :data:`MAX_REPORT` bytes: who it is (the MAC of the
interface it booted from, its host name), which image in which mode, the stages with the guest's monotonic
times (seconds since boot), and ``ok`` or ``failed`` with the one FAILED line (already safe text, see
:func:`bootkit.log.safe_text`).

A report must never cost the boot anything: it is sent from a daemon thread, each connect and read has a
short timeout, and the boot code waits for it at most :data:`REPORT_WAIT` seconds before it goes on (the
thread then dies with the process). Every failure to deliver is one debug line.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from typing import Any, Dict, Mapping, Optional

from bootkit.log import log, safe_text

#: the body is never longer than this; the receiver refuses longer ones
MAX_REPORT = 16 * 1024
#: seconds for each connect and read of the POST
REPORT_TIMEOUT = 2.0
#: seconds the boot waits, at most, for its report to be delivered
REPORT_WAIT = 3.0
#: the version of the report's fields (``bootkit fleet`` reads this and older)
REPORT_VERSION = 1
#: at most this many stages are reported (a boot has a handful)
MAX_STAGES = 32

SYS_NET = "/sys/class/net"
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_STAGE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_FAILED_AT = re.compile(r"FAILED at ([a-z][a-z0-9_-]{0,31}):")
_HOSTNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$")


def boot_mac(sys_net: str = SYS_NET) -> Optional[str]:
    """The MAC address of the interface the boot went through: the first (by name) that is up, has a carrier
    and is not the loopback; None if there is none (a machine is then known by its host name)."""
    try:
        names = sorted(os.listdir(sys_net))
    except OSError:
        return None
    for name in names:
        base = os.path.join(sys_net, name)
        try:
            with open(os.path.join(base, "operstate"), encoding="ascii", errors="replace") as f:
                state = f.read().strip()
            with open(os.path.join(base, "address"), encoding="ascii", errors="replace") as f:
                mac = f.read().strip().lower()
        except OSError:
            continue
        if state == "up" and _MAC.match(mac) and mac != "00:00:00:00:00:00":
            return mac
    return None


def hostname() -> Optional[str]:
    """The kernel's host name if it is a plain one (an initramfs often has only ``localhost``)."""
    name = socket.gethostname()
    return name if _HOSTNAME.match(name) else None


def build_report(
    url: str,
    mode: str,
    timeline: Mapping[str, float],
    failed: Optional[str],
    mac: Optional[str],
    host: Optional[str],
    uptime: Optional[float] = None,
) -> bytes:
    """The report's body: JSON, at most :data:`MAX_REPORT` bytes.

    ``timeline`` maps each finished stage to the guest's monotonic time it finished at; ``failed`` is the FAILED
    line (None: the root is mounted). Every text is safe text, every number finite.
    """
    stages: Dict[str, float] = {}
    for stage, at in list(timeline.items())[:MAX_STAGES]:
        if _STAGE.match(stage) and isinstance(at, (int, float)) and 0 <= at < 1e9:
            stages[stage] = round(float(at), 3)
    report: Dict[str, Any] = {
        "version": REPORT_VERSION,
        "mac": mac,
        "hostname": host,
        "image": safe_text(url),
        "mode": safe_text(mode, 16),
        "result": "ok" if failed is None else "failed",
        "stages": stages,
        "uptime": round(time.monotonic() if uptime is None else uptime, 3),
    }
    if failed is not None:
        m = _FAILED_AT.search(failed)
        report["stage"] = m.group(1) if m else None
        report["cause"] = safe_text(failed)
    elif "mount" in stages:
        report["time_to_root"] = stages["mount"]
    body = json.dumps(report, sort_keys=True).encode("ascii")
    # safe_text bounds every string, so this holds; a guard keeps the promise if fields are added
    return body if len(body) <= MAX_REPORT else json.dumps({**report, "stages": {}}).encode("ascii")[:MAX_REPORT]


def post(url: str, body: bytes, timeout: float = REPORT_TIMEOUT, cacert: Optional[str] = None,
         insecure: bool = False) -> Optional[int]:  # fmt: skip
    """POST ``body`` to ``url``; the HTTP status, or None (with a debug line) when it could not be delivered."""
    from bootkit.fetch.client import connect, parse_url
    from bootkit.fetch.options import FetchOptions

    try:
        conn, target = connect(parse_url(url), FetchOptions(verify="none", timeout=timeout, cacert=cacert,
                                                            insecure=insecure))  # fmt: skip
        try:
            headers = {"Content-Type": "application/json"}
            host_field = getattr(conn, "bootkit_host_field", None)
            if host_field is not None:
                headers["Host"] = host_field
            conn.request("POST", target, body, headers)
            response = conn.getresponse()
            response.read(4096)
            status = response.status
        finally:
            conn.close()
    except Exception as e:  # a report never fails the boot
        log.debug("report: not delivered to %s: %s: %s", safe_text(url), type(e).__name__, safe_text(str(e)))
        return None
    if not 200 <= status < 300:
        log.debug("report: %s answered %d", safe_text(url), status)
    return status


def start(url: str, body: bytes, timeout: float = REPORT_TIMEOUT, cacert: Optional[str] = None,
          insecure: bool = False) -> threading.Thread:  # fmt: skip
    """Send the report from a daemon thread (a dead receiver cannot keep the process alive)."""
    thread = threading.Thread(target=post, args=(url, body, timeout, cacert, insecure), name="bootkit-report",
                              daemon=True)  # fmt: skip
    thread.start()
    return thread


def send_report(cfg: Any, timeline: Mapping[str, float], failed: Optional[str] = None,
                wait: float = REPORT_WAIT) -> Optional[threading.Thread]:  # fmt: skip
    """Report this boot to ``cfg.report`` (a :class:`~bootkit.boot.cmdline.BootConfig`), if it names a receiver.

    Waits for the delivery at most ``wait`` seconds and returns the sending thread (still alive if the receiver
    was slower); never raises.
    """
    if cfg.report is None:
        return None
    try:
        body = build_report(cfg.url, str(cfg.mode), timeline, failed, boot_mac(), hostname())
        thread = start(cfg.report, body, min(REPORT_TIMEOUT, cfg.timeout), cfg.cacert, cfg.insecure)
        thread.join(wait)
    except Exception as e:  # a report never fails the boot
        log.debug("report: not sent: %s: %s", type(e).__name__, safe_text(str(e)))
        return None
    if thread.is_alive():
        log.debug("report: %s did not answer within %.1f s, boot goes on", safe_text(cfg.report), wait)
    return thread


def daemon_timeline(path: str) -> Dict[str, float]:
    """The stages the NBD server daemon finished (its ``status.json``), for the parent's report."""
    try:
        with open(path, encoding="utf-8") as f:
            timeline = json.load(f).get("timeline", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return dict(timeline) if isinstance(timeline, dict) else {}
