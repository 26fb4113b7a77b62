"""The ``bootkit`` command line: one parser, subcommands dispatched in one place.

Each module of this package registers the subcommands of one area (``image``: inspect/map/convert/check/compress,
``nbd``: serve-nbd/attach/detach, ...) and turns the parsed arguments into library calls; nothing past this
package sees an ``argparse.Namespace``. Library errors become one ``error: ...`` line and an exit status:
0 success, 1 runtime failure, 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable, Sequence

from bootkit import __version__
from bootkit.errors import BootkitError
from bootkit.log import log, setup

#: modules that register subcommands, in the order they appear in ``--help``
COMMAND_MODULES = (
    "bootkit.host.cli.image",
    "bootkit.host.cli.nbd",
    "bootkit.host.cli.fetch",
    "bootkit.host.cli.pxe",
    "bootkit.host.cli.initrd",
    "bootkit.host.cli.build",
    "bootkit.host.cli.uki",
    "bootkit.host.cli.publish",
    "bootkit.host.cli.status",
    "bootkit.host.cli.fleet",
    "bootkit.host.cli.cache",
)

#: which module registers each subcommand: ``bootkit convert`` imports only the reader's CLI module, not the
#: HTTP client or the PXE templates (start-up time is part of every command; tests keep this table true)
COMMANDS = {
    "inspect": "bootkit.host.cli.image",
    "map": "bootkit.host.cli.image",
    "convert": "bootkit.host.cli.image",
    "check": "bootkit.host.cli.image",
    "compress": "bootkit.host.cli.image",
    "serve-nbd": "bootkit.host.cli.nbd",
    "attach": "bootkit.host.cli.nbd",
    "detach": "bootkit.host.cli.nbd",
    "fetch": "bootkit.host.cli.fetch",
    "manifest": "bootkit.host.cli.fetch",
    "serve-http": "bootkit.host.cli.fetch",
    "pxe-config": "bootkit.host.cli.pxe",
    "build-initrd": "bootkit.host.cli.initrd",
    "image": "bootkit.host.cli.build",
    "build-image": "bootkit.host.cli.build",
    "build-uki": "bootkit.host.cli.uki",
    "publish": "bootkit.host.cli.publish",
    "status": "bootkit.host.cli.status",
    "fleet": "bootkit.host.cli.fleet",
    "cache": "bootkit.host.cli.cache",
}

_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Argument type of every size option: ``256M``, ``1G``, ``4096``, ``1 GiB`` -> bytes (binary units)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4096, 512K, 256M or 1G")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one ``error:`` line and exit status 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        sys.exit(2)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``command``, only the module that registers that subcommand is imported."""
    parser = _Parser(prog="bootkit", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"bootkit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more diagnostics (repeatable)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    modules = (COMMANDS[command],) if command in COMMANDS else COMMAND_MODULES
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # an area not built yet
        module.register(sub)
    return parser


def _command_word(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (global options take no values), if any."""
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_word(argv))
    args = parser.parse_args(argv)
    setup(-1 if args.quiet else args.verbose)
    handler: Handler = args.handler
    try:
        return handler(args)
    except BootkitError as e:
        sys.stderr.write(f"error: {e}\n")
        return e.exit_status
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    except BrokenPipeError:
        return 1
    except OSError as e:
        # an environment failure (disk full, permission) rather than a bug: one line, no traceback
        log.debug("OS error", exc_info=True)
        sys.stderr.write(f"error: {e}\n")
        return 1
