"""A root storage daemon: the process that serves the root device must outlive the initramfs and never stall.

It follows systemd's docs/ROOT_STORAGE_DAEMONS.md: argv[0] starting with '@' (spared by the switch-root and
shutdown killing sprees), every module imported before the root is switched (the initramfs is emptied
underneath the process; a lazy import then fails: ``bootkit.boot.preload``), memory locked,
``oom_score_adj`` -1000 and ``PR_SET_IO_FLUSHER`` (reclaim must never wait on I/O to the device this process
serves). ``fork_daemon`` detaches it and keeps a pipe back to the starter, which prints the daemon's one
line and exits with its status. The boot code (``bootkit.boot.main``) and ``bootkit serve-nbd|attach
--daemon`` use it.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import ctypes
import os
import signal
import stat
import sys
from typing import List, Optional, Sequence, Tuple

from bootkit.errors import BootkitError
from bootkit.log import log

MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4  # Linux 4.4: lock pages as they are touched, so idle thread stacks are not populated
PR_SET_IO_FLUSHER = 57  # Linux 5.6
DAEMON_ARGV0 = "@bootkit-nbd"


class PidFileError(BootkitError):
    """The pid file cannot be written safely (exit status 2: fix the path)."""

    exit_status = 2


def argv0() -> str:
    """This process's argv[0] as the kernel (and systemd) sees it."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return f.read().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return sys.argv[0]


def reexec_with_argv0(args: Sequence[str], name: str = DAEMON_ARGV0) -> None:
    """Replace this process by ``python -m bootkit ARGS`` whose argv[0] is ``name`` (like ``exec -a``).

    Python finds its prefix (and a virtualenv's site-packages) from argv[0]; '@name' is no path, so the
    current ``sys.path`` is passed on as PYTHONPATH. Inside the initramfs one would rather start the
    process that way in the first place (``exec -a @bootkit-nbd python3 -m bootkit attach ...``): then
    argv[0] already starts with '@' and nothing is re-executed.
    """
    import bootkit

    # the package's own parent first: an editable install is found through a .pth hook, not a path entry
    here = os.path.dirname(os.path.dirname(os.path.abspath(bootkit.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([here, *(p for p in sys.path if p and p != here)])
    os.execve(sys.executable, [name, "-m", "bootkit", *args], env)


def harden() -> List[str]:
    """Lock memory, oom_score_adj -1000, PR_SET_IO_FLUSHER; returns what failed (best effort, logged).

    Call before starting the serving threads: the I/O flusher flag belongs to the calling thread and is
    inherited by threads it creates afterwards.
    """
    failed = []
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0 and libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        failed.append(f"mlockall: {os.strerror(ctypes.get_errno())}")
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000\n")
    except OSError as e:
        failed.append(f"oom_score_adj: {e.strerror}")
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        failed.append(f"PR_SET_IO_FLUSHER: {os.strerror(ctypes.get_errno())}")
    for what in failed:
        log.warning("daemon: %s", what)
    return failed


class DaemonReport:
    """The daemon's one message to the process that started it: exit status and a line to print."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def send(self, status: int, line: str) -> None:
        if self._fd < 0:
            return
        try:
            os.write(self._fd, f"{status} {line}\n".encode())
        finally:
            os.close(self._fd)
            self._fd = -1


def fork_daemon() -> Tuple[Optional[DaemonReport], int]:
    """Double fork. In the daemon: (report, -1); in the original process: (None, fd to ``wait_daemon``).

    Call before starting any thread (threads do not survive fork).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        os.waitpid(pid, 0)
        return None, r
    os.close(r)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    os.umask(0o022)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    return DaemonReport(w), -1


def wait_daemon(fd: int) -> Tuple[int, str]:
    """(exit status, line) reported by the daemon; status 1 if it died without a word."""
    chunks = []
    while True:
        b = os.read(fd, 4096)
        if not b:
            break
        chunks.append(b)
    os.close(fd)
    text = b"".join(chunks).decode(errors="replace").strip()
    status, _, line = text.partition(" ")
    if not status.isdigit():
        return 1, "error: the daemon exited before it was ready"
    return int(status), line


def write_pid_file(path: str) -> None:
    """Write this process's pid to ``path``, which must not be a symbolic link.

    The pid goes into a new file of an unpredictable name in the same directory, created with O_EXCL and
    O_NOFOLLOW (a link planted there fails the open instead of being written through), then renamed over
    ``path`` (rename replaces a directory entry and never follows a link). A link at ``path`` itself is
    refused rather than silently replaced: someone meant it to point somewhere.
    """
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise PidFileError(f"--pid-file {path}: is a symbolic link, refusing to write through it")
    except FileNotFoundError:
        pass
    except OSError as e:
        raise PidFileError(f"--pid-file {path}: {e.strerror}") from e
    directory, base = os.path.split(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = os.path.join(directory, f".{base}.{os.urandom(8).hex()}")
        try:
            fd = os.open(tmp, flags, 0o644)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise PidFileError(f"--pid-file {path}: cannot create a file in its directory: {e.strerror}") from e
    else:
        raise PidFileError(f"--pid-file {path}: cannot create a file of a new name in its directory")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.rename(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise PidFileError(f"--pid-file {path}: {e.strerror}") from e
