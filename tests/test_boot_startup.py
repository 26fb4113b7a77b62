"""What the boot entry point imports before it does anything: ``bootkit-boot --check-cmdline`` (a check a user
or a hook can run) imports the command-line parser only, since each module is boot time under an emulated CPU
(seconds: docs/performance.md, "Where the boot time goes"). The boot path imports the whole runtime before it
forks the daemon, which cannot import after the root switch (in both flavours while udev and the network come
up: docs/initramfs.md, "One Python process").

Each check runs the entry point the way the initramfs does (``python3 -S -E``, a fresh interpreter) and
lists the modules loaded at exit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from bootkit.boot import preload

ROOT = Path(__file__).resolve().parent.parent

# runs bootkit-boot's main() like /usr/lib/bootkit/bootkit-boot, then prints the loaded modules
_PROBE = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from bootkit.boot.main import main
    code = main(sys.argv[2:])
    print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
    """
)

#: what only fetching, serving or attaching needs: none of it may load for checking the command line
HEAVY = ("ssl", "_ssl", "http.client", "email.parser", "concurrent.futures", "zstandard", "ctypes", "uuid",
         "bootkit.fetch", "bootkit.nbd", "bootkit.qcow2", "bootkit.daemon", "bootkit.boot.serve")


def loaded_by(*args: str) -> tuple[int, set[str], str]:
    """Exit code, loaded modules and stderr of bootkit-boot's main() run with ``args``."""
    proc = subprocess.run([sys.executable, "-S", "-E", "-c", _PROBE, str(ROOT), *args],
                          capture_output=True, text=True, check=False, timeout=60)
    report = json.loads(proc.stdout.splitlines()[-1])
    return int(report["code"]), set(report["modules"]), proc.stderr


def test_check_cmdline_imports_only_the_parser() -> None:
    code, modules, err = loaded_by("--check-cmdline", "--cmdline", "root=qcow2:http://10.0.2.2:8080/disk.qcow2")
    assert (code, err) == (0, "")
    assert modules & set(HEAVY) == set()
    # a sample of what it does need
    assert {"bootkit.boot.cmdline", "bootkit.log"} <= modules


def test_bad_cmdline_is_refused_without_the_runtime() -> None:
    bad = "root=qcow2:http://10.0.2.2/d.qcow2 rd.qcow2.nosuch=1"
    code, modules, err = loaded_by("--check-cmdline", "--cmdline", bad)
    assert code == 2
    assert err.startswith("error: ") and "rd.qcow2.nosuch" in err and len(err.splitlines()) == 1
    assert modules & set(HEAVY) == set()


def test_boot_path_imports_only_preloaded_modules() -> None:
    """main() and boot() import the boot path's modules inside the functions, after preload(): each of them
    must be on the preload list, or the daemon (forked in boot()) would import it after the root switch."""
    import ast

    tree = ast.parse((ROOT / "bootkit" / "boot" / "main.py").read_text())
    lazy: set[str] = set()
    for func in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        for node in ast.walk(func):
            if isinstance(node, ast.ImportFrom) and node.module:
                lazy |= {node.module if node.module != "bootkit" else f"bootkit.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                lazy |= {a.name for a in node.names}
    assert {"bootkit.boot.serve", "bootkit.daemon", "bootkit.boot.preload"} <= lazy
    assert lazy - set(preload.BOOTKIT_MODULES) - set(preload.STDLIB_MODULES) == set()


# imports the boot path's modules as bootkit-boot does before it forks the daemon (ram mode: no TLS up front)
_PRELOAD_PROBE = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import bootkit.boot.main
    from bootkit.boot.preload import preload
    from bootkit.qcow2 import compress
    missing = preload(strict=False, fallbacks=False, tls=sys.argv[2] == "tls")
    print(json.dumps({"missing": missing, "libzstd": compress.LIBZSTD.load(), "modules": sorted(sys.modules)}))
    """
)

#: what a boot never needs, each of which cost it a tenth of a second or more of an emulated CPU (docs/initramfs.md,
#: "One Python process"): http.client and its email package (bootkit.fetch.http1 speaks HTTP), dataclasses and
#: inspect (bootkit.record), argparse, urllib.request with tempfile, shutil, bz2 and lzma
NEVER_AT_BOOT = ("http.client", "email", "email.parser", "calendar", "dataclasses", "inspect", "ast",
                 "argparse", "gettext", "urllib.request", "tempfile", "shutil", "bz2", "lzma")


def preloaded(tls: bool) -> tuple[dict[str, object], set[str]]:
    proc = subprocess.run([sys.executable, "-S", "-E", "-c", _PRELOAD_PROBE, str(ROOT), "tls" if tls else "-"],
                          capture_output=True, text=True, check=True, timeout=60)
    report = json.loads(proc.stdout.splitlines()[-1])
    return report, set(report["modules"])


def test_boot_path_loads_only_what_it_can_use() -> None:
    report, modules = preloaded(tls=False)
    assert report["missing"] == []
    assert modules & set(NEVER_AT_BOOT) == set()
    # ram mode connects only before the root switch: the first HTTPS connection imports ssl then
    assert {"ssl", "_ssl"} & modules == set()
    # zstandard stands in for the system's libzstd, which is there
    assert report["libzstd"] is True and "zstandard" not in modules
    assert {"bootkit.fetch.http1", "bootkit.record", "hashlib", "socket", "ctypes"} <= modules


def test_lazy_mode_loads_tls_up_front() -> None:
    """Lazy and stream mode read after the root switch, when no module can be imported any more."""
    _, modules = preloaded(tls=True)
    assert {"ssl", "_ssl"} <= modules
    assert modules & set(NEVER_AT_BOOT) == set()
