"""The benchmark's output: the Markdown table, issue 17's targets as verdict lines, the plot."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from bench.fleetlib.storm import Row

MIB = 1 << 20
COLUMNS = (
    "mode", "N", "p50 s", "p95 s", "max s", "origin MiB", "origin MiB/client", "MiB/client", "limit s",
    "p95/single", "p95/limit", "failed", "reports", "fill p95 s",
)  # fmt: skip


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def single(rows: Sequence[Row], mode: str) -> Row | None:
    """The mode's single-client row (N = 1), the reference of ``p95/single``."""
    return next((r for r in rows if r.mode == mode and r.n == 1), None)


def cells(row: Row, rows: Sequence[Row]) -> dict[str, str]:
    """One row's cells by column name."""
    one = single(rows, row.mode)
    ratio_single = row.p95 / one.p95 if row.p95 and one and one.p95 else None
    return {
        "mode": row.mode,
        "N": str(row.n),
        "p50 s": _f(row.p50),
        "p95 s": _f(row.p95),
        "max s": _f(row.max),
        "origin MiB": _f(row.origin_bytes / MIB, 1),
        "origin MiB/client": _f(row.origin_per_client / MIB, 2),
        "MiB/client": _f(row.per_client / MIB, 1),
        "limit s": _f(row.limit),
        "p95/single": _f(ratio_single),
        "p95/limit": _f(row.p95 / row.limit if row.p95 else None),
        "failed": str(row.failed),
        "reports": str(row.reports),
        "fill p95 s": _f(row.fill_p95),
    }


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        c = cells(row, rows)
        lines.append("| " + " | ".join(c[k] for k in COLUMNS) + " |")
    return "\n".join(lines)


def verdict(rows: Sequence[Row], image_size: int) -> list[str]:
    """Issue 17's targets at the largest N of each mode, one line each (met or MISSED, with the figures)."""
    out = []
    for mode in dict.fromkeys(r.mode for r in rows):
        mine = [r for r in rows if r.mode == mode]
        top = max(mine, key=lambda r: r.n)
        one = single(rows, mode)
        if mode.split("+")[0] in ("lazy", "stream") and top.p95 and one and one.p95 and top.n > 1:
            a, b = top.p95 / one.p95, top.p95 / top.limit
            out.append(f"{mode} N={top.n}: p95 {top.p95:.2f} s = {a:.2f}x single ({one.p95:.2f} s, target <= 3x): "
                       f"{'met' if a <= 3 else 'MISSED'}; {b:.2f}x the physical limit ({top.limit:.2f} s, "
                       f"target <= 1.5x): {'met' if b <= 1.5 else 'MISSED'}")  # fmt: skip
            if (a > 3 or b > 1.5) and top.read_ms:
                out.append(f"  where the time went: each read to root waited {list(top.read_ms)} ms (median over "
                           f"the clients) at N={top.n}, {list(one.read_ms)} ms at N=1")  # fmt: skip
        if mode.endswith("+rack"):
            share = top.origin_per_client / image_size
            out.append(f"{mode} N={top.n}: origin bytes per client {top.origin_per_client / MIB:.2f} MiB = "
                       f"{share:.1%} of the image (target < 5%): {'met' if share < 0.05 else 'MISSED'}")
        if top.failed:
            out.append(f"{mode} N={top.n}: {top.failed} clients FAILED: {'; '.join(top.errors)}")
    return out


def check_plot() -> str | None:
    """None if the plot can be drawn, else what to install."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install -e '.[bench]' (or apt-get install python3-matplotlib)"
    return None


def plot(rows: Sequence[Row], out: Path, title: str) -> None:
    """p95 time to root against N, one line per mode, on log-log axes (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for mode in dict.fromkeys(r.mode for r in rows):
        mine = sorted((r for r in rows if r.mode == mode), key=lambda r: r.n)
        done = [(r.n, r.p95) for r in mine if r.p95 is not None]
        ax.plot([n for n, _ in done], [p95 for _, p95 in done], marker="o", label=f"{mode} p95")
        ax.plot([r.n for r in mine], [r.limit for r in mine], linestyle=":", color=ax.lines[-1].get_color(),
                label=f"{mode} limit")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ns = sorted({r.n for r in rows})
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("clients booting at once (N)")
    ax.set_ylabel("time to root, p95 (s)")
    ax.set_title("\n".join(textwrap.wrap(title, 100)), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
