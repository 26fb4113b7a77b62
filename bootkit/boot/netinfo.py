"""The addresses the boot uses, one console line each, printed when the boot code starts its work:

    bootkit: address: bootnet 10.0.2.15/24 static
    bootkit: address: bootnet fec0::5054:ff:fe12:3456/64 static

IPv4 and IPv6, not link-local or host scope (IPv6 site-local fec0::/10, QEMU's user network, counts).
"static" is an address without a lifetime (given on the command line: the lease the boot loader handed
over), "dynamic" one with a lifetime (from DHCP or SLAAC in the initramfs). The tests read these lines to
prove which interfaces came up and how; on a real machine they say what the boot used. One ``ip`` process
reads them (a process costs a noticeable fraction of a second on an emulated CPU); interface names come
from the kernel, and only [A-Za-z0-9._-] of them is printed.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import re
from typing import List

from bootkit.errors import BootkitError
from bootkit.log import log
from bootkit.run import run


def address_lines(text: str) -> List[str]:
    """The report lines (without the ``bootkit: `` prefix) for the output of ``ip -o addr show``."""
    out = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 4 or words[2] not in ("inet", "inet6"):
            continue
        rest = " ".join(words[4:])
        if " scope link" in f" {rest}" or " scope host" in f" {rest}":
            continue
        kind = "static" if "valid_lft forever" in rest else "dynamic"
        name = re.sub(r"[^A-Za-z0-9._-]", "?", words[1].rstrip(":"))
        addr = re.sub(r"[^0-9a-f:./]", "?", words[3])
        out.append(f"address: {name} {addr} {kind}")
    return out


def print_addresses() -> None:
    """Print the lines; says nothing when ``ip`` cannot run (the boot goes on: this is a report)."""
    try:
        proc = run(["ip", "-o", "addr", "show"], check=False, capture=True, timeout=10)
    except (BootkitError, OSError):  # a report never stops the boot
        return
    for line in address_lines(proc.stdout.decode(errors="replace")):
        log.info("%s", line)
