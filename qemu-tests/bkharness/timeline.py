"""The stage timeline of a boot, read from its serial console, and the JSON file that collects them.

Each stage is the first console line, after the previous stage's line, that matches the stage's pattern.
Two clocks per stage: ``host_s``, seconds since QEMU started as the harness saw the line arrive (covers the
firmware, which has no clock of its own on the console), and ``guest_s``, the guest's monotonic clock when
the line carries one: the kernel's printk time stamp ``[   12.345678]`` or ``uptime=`` in bootkit's and
the proof's own lines.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bkharness.guest import ConsoleLine


@dataclass(frozen=True)
class Stage:
    name: str
    pattern: str


#: stages of a bootkit netboot in boot order (both initramfs flavours and both test roots)
BOOT_STAGES = (
    # the first kernel line: everything before it is firmware, PXE and the bootloader
    Stage("kernel", r"Linux version \d"),
    # bootkit's boot code prints "bootkit: [  guest-seconds] <stage>: ... (<duration> s)" (bootkit/boot/main.py)
    Stage("network", r"bootkit: network up|bootkit: \[\s*[\d.]+\] start:"),
    Stage("download", r"bootkit: \[\s*[\d.]+\] fetch: .*\([\d.]+ s\)$"),
    Stage("attach", r"bootkit: \[\s*[\d.]+\] attach: "),
    Stage("mount", r"bootkit: \[\s*[\d.]+\] mount: "),
    # dracut's shell init says "Switching root"; the real root's systemd first cleans up the initrd's unit
    Stage("switch_root", r"Switching root|BOOTKIT-STAGE init|systemd\[1\]: Stopped initrd-switch-root\.service"),
    Stage("target", r"^BOOTKIT-PROOF "),
    Stage("poweroff", r"reboot: Power down"),
)

_PRINTK = re.compile(r"\[\s*(\d+\.\d+)\]")
_UPTIME = re.compile(r"\buptime=(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class StageTime:
    name: str
    host_s: float
    guest_s: float | None
    line: str


def guest_clock(text: str) -> float | None:
    m = _PRINTK.search(text) or _UPTIME.search(text)
    return float(m.group(1)) if m else None


def stage_times(lines: list[ConsoleLine], stages: tuple[Stage, ...] = BOOT_STAGES) -> list[StageTime]:
    """The stages found in ``lines``, in order; a stage that never shows up is left out."""
    found: list[StageTime] = []
    start = 0
    for stage in stages:
        rx = re.compile(stage.pattern)
        for i in range(start, len(lines)):
            if rx.search(lines[i].text):
                text = lines[i].text
                found.append(StageTime(stage.name, round(lines[i].t, 3), guest_clock(text), text[:160]))
                start = i + 1
                break
    return found


@dataclass
class Timelines:
    """Every boot of a run, written to ``path`` as JSON after each boot (a crash loses nothing)."""

    path: Path
    boots: list[dict[str, object]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, test: str, lines: list[ConsoleLine], **facts: object) -> list[StageTime]:
        stages = stage_times(lines)
        with self._lock:
            self.boots.append({"test": test, **facts, "stages": [asdict(s) for s in stages]})
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"boots": self.boots}, indent=2) + "\n")
        return stages


def format_timeline(stages: list[StageTime]) -> str:
    """A small table for the terminal: stage, host seconds, guest seconds."""
    rows = [f"{'stage':<12} {'host s':>8} {'guest s':>8}"]
    for s in stages:
        guest = f"{s.guest_s:8.2f}" if s.guest_s is not None else f"{'-':>8}"
        rows.append(f"{s.name:<12} {s.host_s:8.2f} {guest}")
    return "\n".join(rows)
