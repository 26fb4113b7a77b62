"""The one edge where bootkit starts external commands, on the host and inside the initramfs.

argv lists only, never a shell; each command is logged as ``+ cmd`` at debug level; a failure is raised once,
with the command and the tail of its stderr.

Runs inside the initramfs too (``modprobe nbd``): standard library only, Python >= 3.9.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence

from bootkit.errors import BootkitError
from bootkit.log import log

Cmd = Sequence["str | os.PathLike[str]"]


class CommandFailed(BootkitError):
    """An external command exited non-zero."""


def _argv(cmd: Cmd) -> list[str]:
    return [os.fspath(c) for c in cmd]


def run(
    cmd: Cmd,
    *,
    check: bool = True,
    capture: bool = False,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``cmd`` to completion; stderr is always captured so a failure can quote it."""
    argv = _argv(cmd)
    log.debug("+ %s", shlex.join(argv))
    try:
        proc = subprocess.run(
            argv,
            input=input,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE,
            env=None if env is None else dict(env),
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise CommandFailed(f"{argv[0]}: command not found") from e
    except subprocess.TimeoutExpired as e:
        raise CommandFailed(f"{shlex.join(argv)}: timed out after {timeout} s") from e
    if check and proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise CommandFailed(f"{shlex.join(argv)} exited with {proc.returncode}: " + " / ".join(tail))
    return proc


def spawn(
    cmd: Cmd,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    **kwargs: object,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in the background; the caller owns the process and must wait for it."""
    argv = _argv(cmd)
    log.debug("+ %s &", shlex.join(argv))
    return subprocess.Popen(argv, env=None if env is None else dict(env), cwd=cwd, **kwargs)  # type: ignore[call-overload,no-any-return]
