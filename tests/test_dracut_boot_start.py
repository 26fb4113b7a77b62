"""The shell initramfs's one Python process, on the host with real processes and dracut's own shell library.

``parse-qcow2.sh`` (dracut's cmdline hook) starts the boot code at once: it checks the command line and
imports the runtime while udev and the network come up, then waits for ``/run/bootkit/network-up``, which
the netroot handler ``qcow2root`` creates; ``qcow2root`` waits on the lock the process holds until it exits,
and the process leaves its status in ``/run/bootkit/done`` (dracut's finished hook) and its cause in
``/run/bootkit/failed``. Each case runs in a private mount namespace (dracut_shell.in_namespace).
"""

from __future__ import annotations

from pathlib import Path

from dracut_shell import MODULE, boot_entry, in_namespace, module_script, source_die_hook

#: each runs a command when a shell evaluates it
PAYLOAD = "$(echo PWNED$((6*7)))`echo PWNED$((6*7))`;echo${IFS}PWNED$((6*7))"
EXECUTED = "PWNED42"

#: after the hook: wait as qcow2root does (the lock), then show what the boot code left
REPORT = (
    "flock /run/bootkit/boot.lock true\n"
    'echo "done=$(cat /run/bootkit/done 2>/dev/null)"\n'
    'echo "failed=$(cat /run/bootkit/failed 2>/dev/null)"\n'
    'echo "network-up=$([ -e /run/bootkit/network-up ] && echo yes || echo no)"\n'
)


def _report(out: str) -> dict[str, str]:
    pairs = (line.partition("=") for line in out.splitlines() if "=" in line)
    return {k: v for k, _, v in pairs if k in ("done", "failed", "network-up")}


def test_a_bad_option_fails_before_the_network_with_safe_text(tmp_path: Path) -> None:
    """The boot code refuses the line on its own, with no network: the status ends dracut's main loop
    (the finished hook the cmdline hook wrote), and the pre-mount hook dies with fixed text."""
    hook = module_script(tmp_path, "parse-qcow2.sh", boot_entry(tmp_path))
    cmdline = f"root=qcow2:http://10.0.2.2/disk.qcow2 rd.qcow2.mode={PAYLOAD}"
    script = (
        f". {hook}\n"
        + REPORT
        + 'echo "finished=$(cat "$hookdir"/initqueue/finished/90-bootkit.sh)"\n'
        + '. "$hookdir"/initqueue/finished/90-bootkit.sh && echo "main loop ends"\n'
        + f"root=qcow2 NEWROOT=/nonexistent\n. {MODULE / 'qcow2-failed.sh'}\n"
    )
    proc = in_namespace(script, tmp_path, cmdline)
    assert proc.returncode == 1, proc.stderr  # die exits 1
    report = _report(proc.stdout)
    assert report["done"] == "2"
    assert report["failed"].startswith("FAILED at cmdline: bad kernel command line: rd.qcow2.mode"), report
    assert report["network-up"] == "no"
    assert "main loop ends" in proc.stdout
    # the console line of the boot code itself
    assert "bootkit: FAILED at cmdline: bad kernel command line: rd.qcow2.mode" in proc.stderr
    assert "bootkit: the root was not mounted" in source_die_hook(tmp_path)
    assert EXECUTED not in proc.stdout + proc.stderr + source_die_hook(tmp_path)


def test_the_boot_code_waits_for_the_network_then_boots(tmp_path: Path) -> None:
    """A good line: the process checks and imports, then does nothing until qcow2root says the network is
    up; it then boots (here the image is on a port nobody listens on: the fetch fails) and qcow2root
    returns once it has finished, with its status and cause in place."""
    hook = module_script(tmp_path, "parse-qcow2.sh", boot_entry(tmp_path))
    qcow2root = module_script(tmp_path, "qcow2root.sh", boot_entry(tmp_path))
    cmdline = "root=qcow2:http://127.0.0.1:9/disk.qcow2 rd.qcow2.verify=none rd.qcow2.retries=0 rd.qcow2.timeout=5"
    script = (
        f". {hook}\n"
        # not before the network: the process is alive and has left nothing
        "sleep 3\n"
        '[ -e /run/bootkit/done ] && echo "early done"\n'
        f"{qcow2root} lo lo /sysroot\n"
        + REPORT
    )
    proc = in_namespace(script, tmp_path, cmdline)
    assert proc.returncode == 0, proc.stderr
    assert "early done" not in proc.stdout
    report = _report(proc.stdout)
    assert report["network-up"] == "yes"
    assert report["done"] == "1", (report, proc.stderr)
    assert report["failed"].startswith("FAILED at fetch: http://127.0.0.1:9/disk.qcow2"), report
    assert "bootkit: network up on lo" in (tmp_path / "kmsg").read_text()  # dracut's info


def test_a_boot_code_that_dies_without_a_word_still_fails_the_boot(tmp_path: Path) -> None:
    """The process ends without a status (killed, or an interpreter that cannot start): qcow2root, which
    waited on its lock, leaves the failure for the pre-mount hook itself."""
    entry = tmp_path / "bootkit-boot"
    entry.write_text("#!/bin/sh\nexit 0\n")
    entry.chmod(0o755)
    hook = module_script(tmp_path, "parse-qcow2.sh", entry)
    qcow2root = module_script(tmp_path, "qcow2root.sh", entry)
    script = f". {hook}\n{qcow2root} lo lo /sysroot\n" + REPORT
    proc = in_namespace(script, tmp_path, "root=qcow2:http://10.0.2.2/disk.qcow2")
    assert proc.returncode == 0, proc.stderr
    report = _report(proc.stdout)
    assert report["done"] == "1"
    assert report["failed"].startswith("FAILED at start: the boot code ended without a result"), report


def test_other_roots_start_nothing(tmp_path: Path) -> None:
    hook = module_script(tmp_path, "parse-qcow2.sh", boot_entry(tmp_path))
    proc = in_namespace(f". {hook}\n" + 'ls /run/bootkit | wc -l\necho "root=$root"\n', tmp_path,
                        "root=/dev/sda2 rd.qcow2.mode=bogus")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "root=/dev/sda2"]
