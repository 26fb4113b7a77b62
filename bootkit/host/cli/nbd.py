"""``bootkit serve-nbd``, ``bootkit attach``, ``bootkit detach``: the NBD server and the kernel attach."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bootkit.errors import BootkitError, UsageError
from bootkit.log import log

if TYPE_CHECKING:
    from bootkit.daemon import DaemonReport


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve-nbd",
        help="serve an image read-only over NBD (Unix socket, TCP or socket activation)",
        description="Serve IMAGE read-only to NBD clients. Prints the NBD URI once listening. Without --unix "
        "or --tcp: the sockets passed by socket activation (LISTEN_FDS), else TCP 127.0.0.1:10809. "
        "There is no authentication and no TLS: every client that can connect can read the whole image (any "
        "local user, for the default 127.0.0.1:10809; anyone who can reach HOST:PORT, for --tcp). To restrict "
        "who may read it, use --unix PATH in a directory only they can enter.",
    )
    p.add_argument("image", metavar="IMAGE", help="QCOW2 image file")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--unix", metavar="PATH", help="listen on a Unix socket")
    where.add_argument("--tcp", metavar="HOST:PORT", help="listen on TCP (HOST defaults to 127.0.0.1; port 0: any)")
    _common(p)
    p.add_argument("--export", metavar="NAME", default="", help="export name (the default export '' also works)")
    p.set_defaults(handler=serve_nbd)

    p = sub.add_parser(
        "attach",
        help="attach an image to the kernel NBD driver, read-only, and serve it",
        description="Configure the kernel NBD driver over socketpairs (generic netlink) and serve IMAGE to it. "
        "Prints the device name; stays in the foreground until detached, or with --daemon detaches itself.",
    )
    p.add_argument("image", metavar="IMAGE", help="QCOW2 image file")
    p.add_argument("--device", metavar="/dev/nbdN", help="device to use (default: the kernel picks a free one)")
    p.add_argument("--connections", type=int, default=1, metavar="N", help="sockets to the kernel (default 1)")
    p.add_argument("--timeout", type=int, default=0, metavar="SECONDS", help="kernel request timeout (0: none)")
    _common(p)
    p.set_defaults(handler=attach)

    p = sub.add_parser("detach", help="disconnect an NBD device attached by `bootkit attach`")
    p.add_argument("device", metavar="/dev/nbdN")
    p.set_defaults(handler=detach)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snapshot", metavar="NAME", help="serve an internal snapshot instead of the active layer")
    p.add_argument("--threads", type=int, default=4, metavar="N", help="threads per connection (default 4)")
    from bootkit.nbd.server import DEFAULT_POLL_US

    p.add_argument(
        "--poll-us",
        type=int,
        default=DEFAULT_POLL_US,
        metavar="US",
        help="an idle connection looks for its next request this long before sleeping "
        f"(default {DEFAULT_POLL_US}, 0: never)",
    )
    p.add_argument("--daemon", action="store_true", help="detach once ready (argv[0] '@bootkit-nbd', memory locked)")
    p.add_argument(
        "--pid-file",
        metavar="PATH",
        help="with --daemon: write the daemon's pid here (replaced atomically; a symbolic link there is refused)",
    )


def _open_image(args: argparse.Namespace) -> Any:
    from bootkit import qcow2

    return qcow2.open(args.image, snapshot=args.snapshot)


class _Lifecycle:
    """What a serving command tells its runner: ``opened()`` before starting threads, ``ready(line)`` once
    serving. In the foreground ``ready`` prints the line; a daemon hardens itself at ``opened`` and has the
    process that started it print the line and exit."""

    def opened(self) -> None:
        pass

    def ready(self, line: str) -> None:
        print(line, flush=True)


class _DaemonLifecycle(_Lifecycle):
    def __init__(self, report: DaemonReport, pid_file: str | None) -> None:
        self.report = report
        self.pid_file = pid_file
        self.wrote_pid_file = False

    def opened(self) -> None:
        from bootkit import daemon
        from bootkit.boot.preload import preload

        # the image opened fine; now, before any serving thread exists (PR_SET_IO_FLUSHER is a per-thread
        # flag that new threads inherit), import everything and lock down
        for name in preload(strict=False):
            log.debug("preload: %s: not importable", name)
        daemon.harden()

    def ready(self, line: str) -> None:
        from bootkit import daemon

        if self.pid_file:
            daemon.write_pid_file(self.pid_file)
            self.wrote_pid_file = True
        self.report.send(0, line)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)


def _as_daemon(args: argparse.Namespace, body: Callable[[_Lifecycle], int]) -> int:
    """Run ``body`` in the foreground, or, with --daemon, in a detached '@' process.

    A BootkitError before ``ready`` becomes the original process's error line and exit status.
    """
    from bootkit import daemon

    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be at least 1")
    from bootkit.nbd.server import MAX_POLL_US

    if not 0 <= args.poll_us <= MAX_POLL_US:
        raise UsageError(f"--poll-us {args.poll_us}: must be 0 to {MAX_POLL_US}")
    if not args.daemon:
        if args.pid_file:
            raise UsageError("--pid-file needs --daemon")
        return body(_Lifecycle())
    if not daemon.argv0().startswith("@"):
        daemon.reexec_with_argv0(sys.argv[1:])
    pid_file = os.path.abspath(args.pid_file) if args.pid_file else None
    report, fd = daemon.fork_daemon()
    if report is None:
        status, line = daemon.wait_daemon(fd)
        print(line, file=sys.stdout if status == 0 else sys.stderr, flush=True)
        return status
    life = _DaemonLifecycle(report, pid_file)
    try:
        return body(life)
    except BootkitError as e:
        report.send(e.exit_status, f"error: {e}")
        return e.exit_status
    finally:
        if pid_file and life.wrote_pid_file:
            try:
                os.unlink(pid_file)
            except OSError:
                pass


def serve_nbd(args: argparse.Namespace) -> int:
    from bootkit.nbd import transport
    from bootkit.nbd.server import NBDServer

    activated = transport.activation_listeners()
    args.image = os.path.abspath(args.image)  # the daemon runs in /
    if args.unix:
        args.unix = os.path.abspath(args.unix)

    def body(life: _Lifecycle) -> int:
        with _open_image(args) as image:
            life.opened()
            if args.unix:
                listeners = [transport.unix_listener(args.unix)]
            elif args.tcp:
                listeners = [transport.tcp_listener(*transport.parse_hostport(args.tcp))]
            elif activated:
                listeners = activated
            else:
                listeners = [transport.tcp_listener("127.0.0.1", transport.DEFAULT_PORT)]
            server = NBDServer(image, name=args.export, threads=args.threads, poll_us=args.poll_us)
            # socket activation by a client (nbdcopy -- [ CMD ]): done when that client is
            by_client = listeners is activated and not args.daemon
            acceptor = transport.Acceptor(listeners, server.serve_connection, once=by_client)
            signal.signal(signal.SIGTERM, lambda *_: acceptor.stop())
            try:
                if not by_client:  # else stdout belongs to the client that started us (nbdcopy ... -)
                    life.ready(" ".join(transport.describe(s) for s in listeners))
                acceptor.run()
            finally:
                server.shutdown_connections()
                for s in listeners:
                    s.close()
                if args.unix:
                    try:
                        os.unlink(args.unix)
                    except OSError:
                        pass
        return 0

    return _as_daemon(args, body)


def attach(args: argparse.Namespace) -> int:
    from bootkit.nbd import kernel

    if args.connections < 1:
        raise UsageError(f"--connections {args.connections}: must be at least 1")
    args.image = os.path.abspath(args.image)  # the daemon runs in /

    def body(life: _Lifecycle) -> int:
        with _open_image(args) as image:
            life.opened()
            attachment = kernel.attach(
                image,
                device=args.device,
                connections=args.connections,
                timeout=args.timeout,
                threads=args.threads,
                poll_us=args.poll_us,
            )
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            life.ready(attachment.device)
            try:
                while not attachment.wait(1.0):
                    if stop.is_set():
                        attachment.close()
            except KeyboardInterrupt:
                attachment.close()
                return 130
        return 0

    return _as_daemon(args, body)


def detach(args: argparse.Namespace) -> int:
    from bootkit.nbd import kernel

    kernel.detach(args.device)
    return 0
