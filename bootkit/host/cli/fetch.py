"""``bootkit fetch``, ``bootkit manifest`` and ``bootkit serve-http``: the fetch area on the command line.

The same code the initramfs runs (``bootkit.fetch``), and the small server for demos and tests.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bootkit.errors import UsageError
from bootkit.host.cli import parse_size


def register(sub: Any) -> None:
    p = sub.add_parser(
        "fetch",
        help="download an image over HTTP(S), verified, with retries and resume",
        description="Download URL to PATH (through PATH.part, renamed only once verified). Progress lines go to"
        " stderr; the SHA-256 and path of the result to stdout.",
    )
    p.add_argument("url", metavar="URL")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="where the verified file goes")
    p.add_argument("--sha256", metavar="HEX", help="the SHA-256 the file must have (verify=pinned)")
    p.add_argument(
        "--verify",
        choices=("pinned", "sidecar", "none"),
        help="pinned: --sha256; sidecar: URL.sha256 or SHA256SUMS next to URL; none: no check"
        " (default: pinned with --sha256, else none with a warning)",
    )
    p.add_argument("--retries", type=int, default=5, metavar="N", help="failed attempts in a row (default 5)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="per connect/read (default 30)")
    p.add_argument("--total-timeout", type=float, default=3600.0, metavar="S", help="whole fetch (default 3600)")
    p.add_argument("--cacert", metavar="FILE", help="trust only the CA certificates in FILE")
    p.add_argument("--insecure", action="store_true", help="do not verify the TLS certificate (lab servers)")
    p.add_argument(
        "--reserve",
        type=parse_size,
        default=256 << 20,
        metavar="SIZE",
        help="RAM to keep free when PATH is on tmpfs/ramfs, like rd.minmem (default 256M)",
    )
    p.add_argument("--progress-interval", type=float, default=5.0, metavar="S", help="seconds between lines")
    p.set_defaults(handler=_fetch)

    p = sub.add_parser(
        "manifest",
        help="write the chunk-hash manifest that lazy mode verifies against",
        description="Hash IMAGE chunk by chunk into a manifest file and print the manifest's own SHA-256 (the"
        " value to pin in the boot configuration).",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-o", "--output", metavar="FILE", help="manifest file (default: IMAGE.manifest)")
    p.add_argument("--chunk-size", type=parse_size, default=1 << 20, metavar="SIZE", help="default 1M")
    p.set_defaults(handler=_manifest)

    p = sub.add_parser(
        "serve-http",
        help="serve a directory over HTTP with Range support (demos and tests)",
        description="A small threaded static server with Range (206, 416, suffix ranges), HEAD, ETag,"
        " Last-Modified and If-Range; never serves outside DIR. For production, use nginx or any web server."
        " Prints the base URL on stdout.",
    )
    p.add_argument("directory", metavar="DIR")
    p.add_argument(
        "--bind",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="HOST:PORT, [IPV6]:PORT or PORT (default 127.0.0.1:8080; port 0: any free port)",
    )
    p.add_argument("--cert", metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--key", metavar="FILE", help="private key for --cert (if not in the same file)")
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds a client may take to send a request, or stay idle between requests (default 30)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=256,
        metavar="N",
        help="connections held at once; when full, the one waiting longest for its request is dropped (default 256)",
    )
    p.set_defaults(handler=_serve_http)


def _fetch(args: argparse.Namespace) -> int:
    from bootkit.fetch import FetchOptions, download

    verify = args.verify or ("pinned" if args.sha256 else "none")
    options = FetchOptions(
        sha256=args.sha256,
        verify=verify,
        retries=args.retries,
        timeout=args.timeout,
        total_timeout=args.total_timeout,
        cacert=args.cacert,
        insecure=args.insecure,
        reserve_bytes=args.reserve,
        progress_interval=args.progress_interval,
    )
    result = download(args.url, args.output, options)
    sys.stdout.write(f"{result.sha256}  {result.path}\n")
    return 0


def _manifest(args: argparse.Namespace) -> int:
    from bootkit.fetch import Manifest

    try:
        manifest = Manifest.build(args.image, args.chunk_size)
    except OSError as e:
        raise UsageError(f"{args.image}: cannot read: {e.strerror}") from e
    output = args.output or args.image + ".manifest"
    digest = manifest.write(output)
    sys.stdout.write(f"{digest}  {output}\n")
    return 0


def _serve_http(args: argparse.Namespace) -> int:
    from bootkit.host.httpserve import make_server
    from bootkit.log import log

    if args.key and not args.cert:
        raise UsageError("--key needs --cert")
    server, url = make_server(
        args.directory,
        args.bind,
        certfile=args.cert,
        keyfile=args.key,
        timeout=args.timeout,
        max_connections=args.max_connections,
    )
    log.info("serve-http: serving %s at %s (Ctrl-C stops)", args.directory, url)
    sys.stdout.write(url + "\n")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
