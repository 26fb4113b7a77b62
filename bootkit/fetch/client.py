"""HTTP(S) plumbing shared by the downloader and the lazy byte source.

Connections (``bootkit.fetch.http1``, one TLS context per CA setting), ``http_proxy``/``https_proxy``/``no_proxy``,
redirects with loop detection, the mapping of HTTP statuses and socket exceptions to ``bootkit.fetch.errors``,
and the retry policy (exponential backoff with jitter, bounded attempts and total time).

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import functools
import os
import random
import re
import socket
import sys
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from bootkit import __version__
from bootkit.boot.urlhost import BadHost, split_authority
from bootkit.errors import BootkitError, FetchError, UsageError
from bootkit.fetch import http1
from bootkit.fetch.errors import (
    FetchTimeout,
    GaveUp,
    HTTPStatusError,
    NotFound,
    RedirectError,
    TLSError,
    TransientError,
)
from bootkit.fetch.options import FetchOptions
from bootkit.log import log

if TYPE_CHECKING:
    import ssl

USER_AGENT = f"bootkit/{__version__}"
MAX_REDIRECTS = 10
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
#: statuses worth another attempt: the server is overloaded, restarting or behind a flaky proxy
TRANSIENT_STATUSES = (408, 429)


class Url(NamedTuple):
    """A parsed http(s) URL: what a connection needs."""

    scheme: str
    #: what to connect to (``getaddrinfo``'s name): an IPv6 literal without brackets, its zone as ``%eth0``
    host: str
    port: int
    #: path and query, as sent in the request line
    target: str
    text: str
    #: the ``Host`` header's host part: IPv6 literals in brackets, without a zone (see ``bootkit.boot.urlhost``)
    host_header: str = ""

    def host_field(self) -> str:
        """The whole ``Host`` header value, with the port unless it is the scheme's default."""
        default = 443 if self.scheme == "https" else 80
        return self.host_header + ("" if self.port == default else f":{self.port}")


def parse_url(url: str) -> Url:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise UsageError(f"{url}: only http:// and https:// URLs can be fetched")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if not authority:
        raise UsageError(f"{url}: no host in URL")
    # the host first, by bootkit's rules: urllib's checks of brackets differ between Python versions
    try:
        host = split_authority(authority)
    except BadHost as e:
        raise UsageError(f"{url}: {e}") from None
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as e:
        raise UsageError(f"{url}: {e}") from None
    port = host.port or (443 if parts.scheme == "https" else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return Url(parts.scheme, host.name, port, target, url, host.header)


@functools.lru_cache(maxsize=8)
def ssl_context(cacert: Optional[str], insecure: bool) -> ssl.SSLContext:
    """The system CA bundle, or only ``cacert``; ``insecure`` verifies nothing (self-signed lab servers).

    ``ssl`` is imported here, at the first HTTPS connection, not with this module: loading it and OpenSSL's
    TLS half costs a boot from plain HTTP a few tenths of a second of an emulated CPU. The boot code imports
    it up front when a connection may come after the root switch (``bootkit.boot.preload``)."""
    import ssl

    if insecure:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=cacert)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cacert {cacert}: cannot load CA certificates: {e}") from e


def _environment_proxies() -> Dict[str, str]:
    """``<scheme>_proxy`` variables by scheme ("no" for ``no_proxy``), as ``urllib.request`` reads them: any
    case, the lower-case spelling wins, and an empty lower-case value unsets. Written out here because
    ``urllib.request`` brings ``tempfile``, ``shutil`` and the bz2 and lzma modules with it, which cost the
    boot a quarter of a second on an emulated CPU (docs/initramfs.md, "One Python process")."""
    proxies: Dict[str, str] = {}
    for name, value in os.environ.items():
        if value and name.lower().endswith("_proxy"):
            proxies[name.lower()[:-6]] = value
    for name, value in os.environ.items():
        if name.endswith("_proxy"):
            if value:
                proxies[name[:-6]] = value
            else:
                proxies.pop(name[:-6], None)
    return proxies


def _bypassed(host: str, no_proxy: str) -> bool:
    """Whether ``no_proxy`` (comma-separated names, each also matching its subdomains; "*" for all) covers
    ``host``."""
    if no_proxy.strip() == "*":
        return True
    host = host.lower()
    for name in no_proxy.split(","):
        name = name.strip().lstrip(".").lower()
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def _proxy_for(url: Url) -> Optional[Tuple[str, int]]:
    """(host, port) of the proxy ``http_proxy``/``https_proxy`` name for ``url``, unless ``no_proxy`` says no."""
    proxies = _environment_proxies()
    proxy = proxies.get(url.scheme)
    if not proxy or _bypassed(url.host, proxies.get("no", "")):
        return None
    if "://" not in proxy:
        proxy = "http://" + proxy
    parts = urllib.parse.urlsplit(proxy)
    if parts.scheme != "http" or not parts.hostname:
        raise UsageError(f"{url.scheme}_proxy={proxy}: only http:// proxies are supported")
    return parts.hostname, parts.port or 80


class Pins:
    """Server addresses looked up once per (host, port), then reused by every connection.

    For a source that goes on reading after switch_root (lazy mode): name lookup there reads the new
    root's resolv.conf and loads its NSS modules, which may not work, or not be there. The host name still
    goes into the Host header and into TLS (SNI and the certificate check); only the lookup is pinned.
    """

    def __init__(self) -> None:
        self._addresses: Dict[Tuple[str, int], List[Any]] = {}
        self._lock = threading.Lock()

    def addresses(self, host: str, port: int) -> List[Any]:
        with self._lock:
            found = self._addresses.get((host, port))
        if found is None:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            with self._lock:
                self._addresses[(host, port)] = found
        return found

    def connector(self, host: str, port: int) -> Callable[..., socket.socket]:
        """A ``socket.create_connection`` for (host, port) that tries the pinned addresses in order."""

        def create_connection(address: Any, timeout: Any = None, source_address: Any = None) -> socket.socket:
            error: Optional[OSError] = None
            for family, kind, proto, _, sockaddr in self.addresses(host, port):
                sock = socket.socket(family, kind, proto)
                try:
                    if timeout is not None:
                        sock.settimeout(timeout)
                    if source_address:
                        sock.bind(source_address)
                    sock.connect(sockaddr)
                    return sock
                except OSError as e:
                    error = e
                    sock.close()
            raise error or OSError(f"{host}: no address")

        return create_connection


def connect(url: Url, options: FetchOptions, pins: Optional[Pins] = None) -> Tuple[http1.HTTPConnection, str]:
    """A (not yet connected) connection for ``url`` and the request target to send on it; with ``pins``, it
    connects to the addresses found the first time (see ``Pins``)."""
    conn, target = _connection(url, options)
    if "%" in url.host:
        # a zone id is for getaddrinfo only; it must not go into the Host header
        conn.bootkit_host_field = url.host_field()  # type: ignore[attr-defined]
    if pins is not None:
        conn.create_connection = pins.connector(conn.host, conn.port)
    return conn, target


def _connection(url: Url, options: FetchOptions) -> Tuple[http1.HTTPConnection, str]:
    proxy = _proxy_for(url)
    if url.scheme == "https":
        context = ssl_context(options.cacert, options.insecure)
        if proxy is None:
            return http1.HTTPSConnection(url.host, url.port, timeout=options.timeout, context=context), url.target
        conn = http1.HTTPSConnection(proxy[0], proxy[1], timeout=options.timeout, context=context)
        conn.set_tunnel(url.host, url.port)
        return conn, url.target
    if proxy is None:
        return http1.HTTPConnection(url.host, url.port, timeout=options.timeout), url.target
    # a plain-HTTP proxy takes the absolute URL in the request line
    return http1.HTTPConnection(proxy[0], proxy[1], timeout=options.timeout), url.text


def request(
    conn: http1.HTTPConnection,
    target: str,
    headers: Optional[Dict[str, str]] = None,
    method: str = "GET",
) -> http1.HTTPResponse:
    all_headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    host_field = getattr(conn, "bootkit_host_field", None)
    if host_field is not None:
        all_headers["Host"] = host_field
    all_headers.update(headers or {})
    conn.request(method, target, headers=all_headers)
    return conn.getresponse()


class Opened(NamedTuple):
    """A response whose headers have arrived; the caller reads the body and closes ``conn``."""

    conn: http1.HTTPConnection
    response: http1.HTTPResponse
    #: the URL after redirects
    url: str


def open_url(
    url: str,
    options: FetchOptions,
    headers: Optional[Dict[str, str]] = None,
    method: str = "GET",
    pins: Optional[Pins] = None,
) -> Opened:
    """Send one request, following redirects; any status other than a redirect is returned, not raised.

    Raises ``RedirectError`` for loops and long chains, and lets socket/TLS exceptions through (see
    ``classify``).
    """
    seen: List[str] = [url]
    current = url
    while True:
        conn, target = connect(parse_url(current), options, pins)
        try:
            response = request(conn, target, headers, method)
        except BaseException:
            conn.close()
            raise
        if response.status not in REDIRECT_STATUSES:
            return Opened(conn, response, current)
        location = response.getheader("Location")
        conn.close()
        if not location:
            raise RedirectError(f"{current}: HTTP {response.status} redirect without a Location header")
        current = urllib.parse.urljoin(current, location)
        if current in seen:
            chain = " -> ".join([*seen[seen.index(current) :], current])
            raise RedirectError(f"{url}: redirect loop: {chain}")
        seen.append(current)
        if len(seen) > MAX_REDIRECTS + 1:
            raise RedirectError(f"{url}: more than {MAX_REDIRECTS} redirects (last: {current})")
        log.debug("fetch: redirected to %s", current)


def check_status(response: http1.HTTPResponse, url: str, expected: Tuple[int, ...] = (200,)) -> None:
    """Raise the error that fits a status outside ``expected``."""
    status = response.status
    if status in expected:
        return
    text = f"{url}: HTTP {status} {response.reason}".rstrip()
    if status in (404, 410):
        raise NotFound(text)
    if status >= 500 or status in TRANSIENT_STATUSES:
        raise TransientError(text)
    raise HTTPStatusError(text)


def classify(exc: BaseException, url: str, timeout: float) -> BootkitError:
    """Turn a socket, TLS or HTTP protocol exception into a one-line FetchError naming ``url``."""
    if isinstance(exc, BootkitError):
        return exc
    # ssl is in sys.modules whenever an HTTPS connection was tried (ssl_context imports it)
    ssl = sys.modules.get("ssl")
    if ssl is not None and isinstance(exc, ssl.SSLCertVerificationError):
        return TLSError(
            f"{url}: TLS certificate verification failed: {exc.verify_message or exc.reason}"
            " (give the CA file with --cacert, or --insecure for a self-signed lab server)"
        )
    if ssl is not None and isinstance(exc, ssl.SSLError):
        return TransientError(f"{url}: TLS error: {exc.reason or exc}")
    if isinstance(exc, socket.timeout):  # TimeoutError on 3.10+
        return TransientError(f"{url}: no data for {timeout:g} s (timed out)")
    if isinstance(exc, socket.gaierror):
        return TransientError(f"{url}: cannot resolve host: {exc.strerror}")
    if isinstance(exc, http1.IncompleteRead):
        return TransientError(f"{url}: connection closed early ({exc.expected} bytes missing)")
    if isinstance(exc, http1.HTTPException):
        return TransientError(f"{url}: bad HTTP response: {type(exc).__name__} {exc}".rstrip())
    if isinstance(exc, OSError):
        return TransientError(f"{url}: {exc.strerror or exc}")
    return FetchError(f"{url}: {type(exc).__name__}: {exc}")


class Retry:
    """Exponential backoff with jitter, bounded in consecutive failed attempts and in total time.

    ``retries`` counts attempts in a row that made no progress: a flaky network that drops a long download
    every few minutes keeps resuming, while a dead server is given up after ``retries + 1`` attempts.
    """

    def __init__(self, url: str, options: FetchOptions) -> None:
        self.url = url
        self.options = options
        self.started = time.monotonic()
        self.deadline = self.started + options.total_timeout
        self.failures = 0
        self.attempts = 0
        self._delay = options.retry_delay

    def check_deadline(self) -> None:
        if time.monotonic() >= self.deadline:
            raise FetchTimeout(f"{self.url}: not done within the total time limit of {self.options.total_timeout:g} s")

    def failed(self, error: BootkitError, progressed: bool = False) -> None:
        """Record a failed attempt: sleep before the next one, or raise the error that ends the fetch."""
        self.attempts += 1
        if not isinstance(error, TransientError):
            raise error
        if progressed:
            self.failures = 0
            self._delay = self.options.retry_delay
        self.failures += 1
        if self.failures > self.options.retries:
            raise GaveUp(f"{error} (gave up after {self.failures} attempts in a row)")
        delay = self._delay * random.uniform(0.75, 1.25)
        if time.monotonic() + delay > self.deadline:
            raise FetchTimeout(f"{error} (total time limit of {self.options.total_timeout:g} s reached)")
        log.warning("fetch: %s; retry %d of %d in %.1f s", error, self.failures, self.options.retries, delay)
        time.sleep(delay)
        self._delay = min(self._delay * 2, self.options.retry_delay_max)


def get_small(
    url: str, options: FetchOptions, limit: int = 1 << 20, what: str = "a checksum or manifest file"
) -> bytes:
    """The body of a small resource (a checksum file, a manifest: ``what``), with retries; NotFound is not
    retried."""
    retry = Retry(url, options)
    while True:
        try:
            opened = open_url(url, options)
            try:
                check_status(opened.response, opened.url)
                data = opened.response.read(limit + 1)
            finally:
                opened.conn.close()
            if len(data) > limit:
                raise HTTPStatusError(f"{url}: larger than {limit} bytes; not {what}")
            return data
        except Exception as e:  # classify decides what is retried
            retry.failed(classify(e, url, options.timeout))
