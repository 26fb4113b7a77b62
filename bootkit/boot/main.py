"""The boot sequence in the initramfs: fetch → verify → open → choose the root → attach → mount.

Started by the dracut module (``/usr/lib/bootkit/bootkit-boot``) with argv[0] ``@bootkit``: in the shell
initramfs by the cmdline hook ``parse-qcow2.sh``, long before the network is up (``--wait-for``): it checks
the command line and imports the runtime while udev and the network come up, then waits for the file the
netroot handler ``qcow2root`` creates once an interface is up (docs/initramfs.md, "One Python process"); in
the systemd initramfs by ``bootkit-root.service`` after ``network-online.target``.

The process forks the NBD server daemon first (``bootkit.daemon.fork_daemon``: before any thread
exists) and the daemon does the work that needs the image: download and verify it into ``/run`` (or open it
lazily over HTTP), open the QCOW2 chain, pick the root partition from the image itself, attach the kernel
NBD device, then report the device to the parent and serve for the rest of the system's life. The daemon is
a root storage daemon (systemd docs/ROOT_STORAGE_DAEMONS.md): it inherits the '@' argv[0], everything is
imported before anything else happens (``bootkit.boot.preload``), its memory is locked and
``oom_score_adj`` is -1000, the image is an open fd under ``/run`` (which survives the root switch), and
after the switch it never opens a file by path (the status file is written through a directory fd).

The parent waits for the partition device, mounts the root filesystem read-only and a tmpfs overlayfs over
it at the new root, and exits 0. Each stage prints one console line with the guest's monotonic time and
its duration; a failure prints one line naming the cause, leaves it in ``/run/bootkit/failed`` and exits
1, and the dracut module then follows dracut's failure path. Nothing is mounted before it is verified.

The pieces: :mod:`bootkit.boot.stages` (console lines, the cause file), :mod:`bootkit.boot.images` (fetch
and verification rules), :mod:`bootkit.boot.serve` (the daemon's body), :mod:`bootkit.boot.mount` (the
root and its overlay). This module is the entry point and the order of things.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

# Only what checking the command line needs is imported here: ``--check-cmdline`` runs in dracut's cmdline
# hook, before udev and the network, and every module costs its import again under an emulated CPU (the whole
# runtime took about 4 s there under TCG; docs/performance.md, "Where the boot time goes"). The boot path
# imports everything in main() (bootkit.boot.preload) before it forks the daemon: after switch_root the daemon
# cannot import anything (docs/initramfs.md, "After the root switch").
import os
import sys
import time
from typing import Dict, Optional, Sequence, Tuple, Union

from bootkit.boot.cmdline import BootConfig, Mode, parse_cmdline
from bootkit.boot.stages import Stages, leave_failure, setup_console
from bootkit.errors import BootkitError, ConfigError
from bootkit.log import log, safe_text

CMDLINE = "/proc/cmdline"


def boot(cfg: BootConfig, newroot: str, unit: Optional[str], lock_fd: Optional[int] = None) -> int:
    """Fork the daemon, wait for its device, mount the root; 0 once the root is mounted at ``newroot``.

    Called after :func:`bootkit.boot.preload.preload`: these imports find their modules loaded.
    """
    import json

    from bootkit import daemon
    from bootkit.boot.mount import mark_root_mounted, mount_root, wait_for
    from bootkit.boot.netinfo import print_addresses
    from bootkit.boot.report import daemon_timeline, send_report
    from bootkit.boot.serve import run_daemon
    from bootkit.boot.status import RUN_DIR, STATUS_FILE

    print_addresses()
    stages = Stages()
    os.makedirs(RUN_DIR, exist_ok=True)
    log.info("[%8.2f] start: root=qcow2:%s", stages.started, cfg.url)
    report, fd = daemon.fork_daemon()
    if report is not None:  # the daemon
        if lock_fd is not None:
            # the lock stands for "the boot code is running": the daemon serves for ever and must not hold it
            os.close(lock_fd)
        os._exit(run_daemon(cfg, stages, report))
    code, line = daemon.wait_daemon(fd)
    if code != 0:
        send_report(cfg, stages.timeline, failed=line)
        return leave_failure(line)
    try:
        info = json.loads(line)
        stages.begin("mount")
        wait_for(info["device"], cfg.timeout)
        what = mount_root(cfg, info["device"], info.get("fstype"), newroot)
        if unit and os.path.isdir("/run/systemd/system"):
            # the real root's systemd must know the unit, or it stops it at the default-target isolate
            # and the server with it (docs/initramfs.md, "Root storage daemon")
            copy = os.path.join("/run/systemd/system", os.path.basename(unit))
            with open(unit, "rb") as src, open(copy, "wb") as dst:
                dst.write(src.read())
        stages.done(what)
    except BootkitError as e:
        line = stages.failed(str(e))
        send_report(cfg, {**daemon_timeline(STATUS_FILE), **stages.timeline}, failed=line)
        return leave_failure(line)
    mark_root_mounted(RUN_DIR)
    log.info("[%8.2f] ready: root mounted, switching root", time.monotonic())
    send_report(cfg, {**daemon_timeline(STATUS_FILE), **stages.timeline})
    return 0


def wait_for_file(path: str, poll: float = 0.05) -> None:
    """Return once ``path`` exists. No timeout of its own: in the shell flavour dracut's main loop bounds the
    wait (``rd.retry``) and ends the boot, and this process with it, when the network never comes up; under
    systemd ``bootkit-network-up.service`` creates the file once ``network-online.target`` is reached, which
    ``systemd-networkd-wait-online``'s own timeout bounds (then the fetch fails with the network's error)."""
    while not os.path.exists(path):
        time.sleep(poll)


def write_status(path: str, code: int) -> None:
    """The exit status for dracut's main loop (its finished hook tests that the file exists): written whole,
    then renamed, so that the loop never reads half of it."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{code}\n")
    os.replace(tmp, path)


#: bootkit-boot's options: option -> (attribute in Args, takes a value, help)
OPTIONS: Dict[str, Tuple[str, bool, str]] = {
    "--check-cmdline": ("check_cmdline", False, "only validate the command line"),
    "--newroot": ("newroot", True, "where the root goes (default: /sysroot)"),
    "--unit": ("unit", True, "systemd unit file to copy to /run/systemd/system"),
    "--cmdline": ("cmdline", True, "kernel command line (default: /proc/cmdline)"),
    "--wait-for": ("wait_for", True, "check the command line and import the runtime now, boot once FILE exists"),
    "--status-file": ("status_file", True, "write the exit status to FILE when finished"),
    "--lock-fd": ("lock_fd", True, "an inherited fd holding a lock that the netroot handler waits on: this "
                                   "process keeps it until it exits, the NBD server it leaves behind does not"),
}


class Args:
    """bootkit-boot's options. Parsed by hand: ``argparse`` (with ``gettext`` and its message machinery) costs
    the boot about a tenth of a second of an emulated CPU, for options that only the dracut module passes."""

    def __init__(self) -> None:
        self.check_cmdline = False
        self.newroot = "/sysroot"
        self.unit: Optional[str] = None
        self.cmdline: Optional[str] = None
        self.wait_for: Optional[str] = None
        self.status_file: Optional[str] = None
        self.lock_fd: Optional[int] = None


USAGE = "usage: bootkit-boot [--check-cmdline] [--cmdline TEXT] [--newroot DIR] [--unit FILE] " \
        "[--wait-for FILE] [--status-file FILE] [--lock-fd FD]"


class UsageExit(Exception):
    """A bad bootkit-boot option: the message, then exit status 2."""


def parse_args(argv: Sequence[str]) -> Args:
    """``--opt VALUE`` or ``--opt=VALUE``, each option once; an unknown or repeated one raises UsageExit."""
    args = Args()
    seen = set()
    i = 0
    while i < len(argv):
        word = argv[i]
        name, eq, value = word.partition("=")
        spec = OPTIONS.get(name)
        if spec is None:
            raise UsageExit(f"unrecognized argument: {safe_text(word)}")
        attr, takes_value, _ = spec
        if name in seen:
            raise UsageExit(f"{name} given twice")
        seen.add(name)
        if not takes_value:
            if eq:
                raise UsageExit(f"{name} takes no value")
            setattr(args, attr, True)
        else:
            if not eq:
                i += 1
                if i == len(argv):
                    raise UsageExit(f"{name} needs a value")
                value = argv[i]
            converted: Union[str, int] = value
            if attr == "lock_fd":
                if not value.isdigit():
                    raise UsageExit(f"{name}: not a file descriptor number: {safe_text(value)}")
                converted = int(value)
            setattr(args, attr, converted)
        i += 1
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    if "-h" in words or "--help" in words:
        sys.stdout.write(USAGE + "\n\n" + "".join(f"  {o:16} {h}\n" for o, (_, _, h) in OPTIONS.items()))
        return 0
    try:
        args = parse_args(words)
    except UsageExit as e:
        sys.stderr.write(f"{USAGE}\nbootkit-boot: error: {e}\n")
        return 2
    code = run(args)
    if args.status_file:
        write_status(args.status_file, code)
    return code


def entry() -> None:
    """The initramfs' entry point (``/usr/lib/bootkit/bootkit-boot``): :func:`main`, then out at once.

    The interpreter's teardown (every module of the runtime, one by one) takes a tenth of a second or more of
    an emulated CPU, and dracut's netroot handler waits for this process to exit; the NBD server it forked
    lives on as a process of its own, and this one has no threads or buffers left to finish."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run(args: Args) -> int:
    text = args.cmdline
    if text is None:
        with open(CMDLINE, encoding="utf-8", errors="replace") as f:
            text = f.read()
    try:
        cfg = parse_cmdline(text)
    except ConfigError as e:
        if args.check_cmdline:
            # a line for whoever runs the check (a hook's die, a user at a shell): safe text only
            sys.stderr.write(f"error: {safe_text(str(e))}\n")
        else:
            line = safe_text(f"FAILED at cmdline: bad kernel command line: {e}")
            sys.stderr.write(f"bootkit: {line}\n")
            leave_failure(line)
        return 2
    setup_console(bool(cfg and cfg.debug))
    if cfg is None:
        sys.stderr.write("error: root= does not name a QCOW2 image (root=qcow2:<URL>)\n")
        return 2
    if cfg.debug and (args.check_cmdline or args.wait_for):
        log.info("python %s: command line ok: %s", sys.version.split()[0], cfg)
    if args.check_cmdline:
        return 0
    from bootkit.boot.preload import preload

    # TLS up front only when the image is read after the root switch (lazy and stream mode); in ram mode
    # every connection is made before it, and the first HTTPS one imports ssl itself
    missing = preload(strict=False, fallbacks=False, tls=cfg.mode is not Mode.ram)
    if missing:
        return leave_failure(Stages().failed(f"bootkit runtime incomplete, missing modules: {', '.join(missing)}"))
    if args.wait_for:
        wait_for_file(args.wait_for)
    return boot(cfg, args.newroot, args.unit, args.lock_fd)


if __name__ == "__main__":
    sys.exit(main())
