"""``bootkit build-uki``: kernel + bootkit's initramfs + command line in one (signed) EFI program."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bootkit.errors import UsageError

if TYPE_CHECKING:
    from bootkit.boot.cmdline import BootConfig

DESCRIPTION = """\
Build a unified kernel image (UKI) for UEFI HTTP Boot and Secure Boot: systemd's EFI stub with the kernel,
bootkit's initramfs (built here with build-initrd's options, or given with --initrd) and the kernel command line
as sections, signed with the site's Secure Boot key (--sign-key/--sign-cert) and checked with sbverify. The
command line is the one pxe-config writes for an entry of a TOML description (--toml/--entry/--machine), with
DHCP as its network part, or given whole with --cmdline. Under Secure Boot the firmware verifies every byte of
it, the pinned image hash included. A line that boots a signed channel (root=qcow2:channel:) needs an initramfs
that trusts a channel key (--trust-key). See docs/secure-boot.md.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("build-uki", help="build a signed unified kernel image (kernel + initramfs + command line)",
                       description=DESCRIPTION)
    p.add_argument("-o", "--output", required=True, type=Path, metavar="FILE", help="UKI to write (e.g. uki.efi)")
    line = p.add_argument_group("the kernel command line (one of)")
    line.add_argument("--toml", type=Path, metavar="FILE", help="pxe-config description to take the entry from")
    line.add_argument("--entry", metavar="NAME", help="with --toml: the entry (default: the description's default)")
    line.add_argument("--machine", metavar="MAC", help="with --toml: add this machine's extra arguments")
    line.add_argument("--cmdline", metavar="LINE", help="the whole kernel command line, root=qcow2:URL included")
    parts = p.add_argument_group("kernel and initramfs")
    parts.add_argument("--kernel", type=Path, metavar="FILE",
                       help="kernel (default: the vmlinuz of --kver/--kmoddir, or the cached Debian kernel)")
    parts.add_argument("--initrd", type=Path, metavar="FILE",
                       help="initramfs built by bootkit build-initrd (default: build one now)")
    parts.add_argument("--kver", metavar="VER", help="kernel version (as build-initrd)")
    parts.add_argument("--kmoddir", type=Path, metavar="DIR",
                       help="kernel modules, .../lib/modules/VER (as build-initrd)")
    parts.add_argument("--systemd", action="store_true", help="build a systemd initramfs (as build-initrd)")
    parts.add_argument("--drivers", metavar="LIST", help="NIC drivers for the initramfs built here (as build-initrd)")
    parts.add_argument("--trust-key", dest="trust_keys", action="append", default=[], type=Path, metavar="PUB",
                       help="Ed25519 public key whose signed channels the initramfs built here boots (as "
                            "build-initrd; repeatable)")  # fmt: skip
    parts.add_argument("--stub", type=Path, metavar="FILE",
                       help="systemd EFI stub (default: /usr/lib/systemd/boot/efi/linuxx64.efi.stub)")
    signing = p.add_argument_group("Secure Boot signature")
    signing.add_argument("--sign-key", type=Path, metavar="KEY", help="private key (PEM) of the site's db certificate")
    signing.add_argument("--sign-cert", type=Path, metavar="CERT", help="the certificate (PEM) enrolled in db")
    p.set_defaults(handler=_build_uki)


def _command_line(args: argparse.Namespace) -> tuple[str, str, BootConfig]:
    """(the line, the os-release PRETTY_NAME, the line as the initramfs reads it) from --toml/--entry/--machine
    or --cmdline."""
    from bootkit.boot.cmdline import join_args
    from bootkit.host.uki import check_cmdline, uki_args

    if args.cmdline is not None:
        if args.toml is not None or args.entry is not None or args.machine is not None:
            raise UsageError("--cmdline contradicts --toml/--entry/--machine: give the line one way")
        return args.cmdline, "bootkit netboot", check_cmdline(args.cmdline, "--cmdline")
    if args.toml is None:
        if args.entry is not None or args.machine is not None:
            raise UsageError("--entry/--machine name things in a description: give --toml FILE too")
        raise UsageError("give the command line: --toml FILE [--entry NAME] [--machine MAC], or --cmdline LINE")

    from bootkit.host.pxecfg import values
    from bootkit.host.pxecfg.load import load_file

    config = load_file(args.toml)
    machine = None
    if args.machine is not None:
        try:
            mac = values.mac(args.machine)
        except values.BadValue as e:
            raise UsageError(f"--machine: {e}") from None
        machine = next((m for m in config.machines if m.mac == mac), None)
        if machine is None:
            raise UsageError(f"--machine {mac}: {args.toml} has no [[machine]] with this MAC")
    name = args.entry or (machine.default if machine is not None else config.default)
    try:
        entry = config.entry(name)
    except KeyError:
        names = ", ".join(e.name for e in config.entries)
        raise UsageError(f"--entry {name}: {args.toml} has no such entry (entries: {names})") from None
    line = join_args(uki_args(entry, machine))
    cfg = check_cmdline(line, f"{args.toml}: entry {entry.name!r}")
    return line, f"bootkit {entry.name}" + (f" on {machine.mac}" if machine is not None else ""), cfg


def _channel_keys(initrd: Path, cfg: BootConfig) -> tuple[bytes, ...]:
    """With a signed channel on the line (``root=qcow2:channel:``): the keys the given ``--initrd`` trusts,
    read out of it, refused when there are none (the machine would refuse every channel). Without one: ()."""
    if not cfg.channel:
        return ()
    from bootkit.host.pxecfg.initramfs import UnreadableInitramfs, read_trust_keys

    try:
        with initrd.open("rb") as f:
            keys = read_trust_keys(f.read, what=f"--initrd {initrd}")
    except OSError as e:
        raise UsageError(f"--initrd {initrd}: cannot read: {e.strerror or e}") from None
    except UnreadableInitramfs as e:
        raise UsageError(str(e)) from None
    if not keys:
        raise UsageError(f"the command line boots a signed channel (root=qcow2:channel:{cfg.url}), and the "
                         "initramfs trusts no channel key: give --trust-key PUB (or an --initrd built with it)")
    return keys


def _build_uki(args: argparse.Namespace) -> int:
    from bootkit.host import initrd as initrd_mod
    from bootkit.host import uki

    if (args.sign_key is None) != (args.sign_cert is None):
        raise UsageError("--sign-key and --sign-cert go together: give both, or neither for an unsigned UKI")
    builds_initrd = args.initrd is None
    if not builds_initrd and (args.systemd or args.drivers is not None or args.trust_keys):
        raise UsageError("--systemd/--drivers/--trust-key are about the initramfs built here; --initrd gives a "
                         "built one")
    line, pretty_name, cfg = _command_line(args)
    trust_keys = tuple(initrd_mod.read_trust_key(p) for p in args.trust_keys)
    if builds_initrd and cfg.channel and not trust_keys:
        raise UsageError(f"the command line boots a signed channel (root=qcow2:channel:{cfg.url}), and the "
                         "initramfs built here would trust no channel key: give --trust-key PUB")
    signing = None if args.sign_key is None else uki.Signing(args.sign_key, args.sign_cert)
    stub = args.stub or uki.STUB

    from bootkit import __version__
    from bootkit.log import log

    with tempfile.TemporaryDirectory(prefix="bootkit-uki.") as tmp:
        kernel = args.kernel
        initrd = args.initrd
        keys: tuple[bytes, ...] = ()
        if builds_initrd:
            drivers = None
            if args.drivers is not None:
                drivers = tuple(d.strip() for d in args.drivers.split(",") if d.strip())
            built = initrd_mod.build_initrd(initrd_mod.InitrdOptions(
                output=Path(tmp) / "initrd.img", kver=args.kver, kmoddir=args.kmoddir, systemd=args.systemd,
                drivers=drivers, trust_keys=trust_keys,
            ))  # fmt: skip
            log.info("build-uki: %s", initrd_mod.describe(built))
            initrd = built.output
            kernel = kernel or built.vmlinuz
            # the keys the build installed (a channel line without any was refused before it)
            keys = built.trust_keys if cfg.channel else ()
        elif kernel is None:
            kernel = initrd_mod.resolve_kernel(args.kver, args.kmoddir)[2]
        if kernel is None:
            raise UsageError("no kernel found next to the modules: give --kernel FILE")
        if not builds_initrd:
            keys = _channel_keys(initrd, cfg)
        result = uki.build_uki(uki.UkiOptions(
            output=args.output,
            kernel=kernel,
            initrd=initrd,
            cmdline=line,
            os_release=uki.os_release(pretty_name, __version__),
            stub=stub,
            signing=signing,
        ))  # fmt: skip
    print(uki.describe(result))
    print(f"command line: {line}")
    if keys:
        from bootkit.boot.ed25519 import fingerprint

        print(f"signed channels (root=qcow2:channel:) trusted from keys {', '.join(map(fingerprint, keys))}")
    return 0
