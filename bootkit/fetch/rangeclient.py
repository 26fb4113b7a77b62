"""Range requests for one file over HTTP(S): the lazy byte source's connection to its server.

The file's size, URL after redirects and validator are learnt once, from a one-byte probe (which also proves
that the server honours ``Range``). Every later answer must be exactly the range asked for, of that same
version of the file: a 200 or 416, another Content-Range or another validator is ``RemoteChanged``; a body
larger than the range is never read (see ``ranges.read_range``). Connections are kept alive and reused, and
they connect to the addresses looked up at the probe (``client.Pins``): the source reads on after
switch_root, where name lookup may not work.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, Tuple

from bootkit.fetch import client, http1
from bootkit.fetch.errors import HTTPStatusError, RemoteChanged
from bootkit.fetch.options import FetchOptions
from bootkit.fetch.ranges import check_range_length, content_range, if_range_validator, read_range, shown_header


class RangeClient:
    """Range requests for ``url`` on keep-alive connections (thread-safe); ``close`` drops the idle ones."""

    def __init__(self, url: str, options: FetchOptions) -> None:
        self.name = url
        self.options = options
        self._lock = threading.Lock()
        self._idle: List[http1.HTTPConnection] = []
        self._closed = False
        # the server's addresses are looked up here, once: the source goes on reading after switch_root
        self._pins = client.Pins()
        #: size in bytes, URL after redirects, and the validator sent in If-Range (None: the server gave none)
        self.size, self.url, self.validator = self._probe()
        self._target = client.connect(self._url_parts(), options)[1]

    def get(self, offset: int, length: int) -> bytes:
        """Bytes ``offset`` to ``offset + length - 1``, one request; a stale idle connection is replaced once,
        silently. Raises what the request raised (the caller retries, see ``client.classify``)."""
        conn, reused = self._get_conn()
        try:
            data = self._range_on(conn, offset, length)
        except (http1.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            conn.close()
            if not reused:
                raise
            conn = self.connect()
            try:
                data = self._range_on(conn, offset, length)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise
        self._put_conn(conn)
        return data

    def open_from(self, conn: http1.HTTPConnection, offset: int) -> http1.HTTPResponse:
        """Ask on ``conn`` for everything from ``offset`` to the end; the answer is checked, the body unread."""
        response = client.request(conn, self._target, self._headers(f"bytes={offset}-"))
        self._check(response, offset, self.size - 1)
        return response

    def connect(self) -> http1.HTTPConnection:
        """A new connection (not from the idle ones) to the pinned addresses."""
        return client.connect(self._url_parts(), self.options, self._pins)[0]

    def drop_idle(self) -> None:
        """Close the idle connections (the network is no longer needed for now)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.drop_idle()

    def _headers(self, byte_range: str) -> Dict[str, str]:
        headers = {"Range": byte_range}
        if self.validator:
            headers["If-Range"] = self.validator
        return headers

    def _range_on(self, conn: http1.HTTPConnection, offset: int, length: int) -> bytes:
        last = offset + length - 1
        response = client.request(conn, self._target, self._headers(f"bytes={offset}-{last}"))
        self._check(response, offset, last)
        data = read_range(response, self.name, length)
        if response.will_close:
            conn.close()
        return data

    def _check(self, response: http1.HTTPResponse, offset: int, last: int) -> None:
        """A 206 with bytes ``offset``-``last`` of the file opened, or the error that says what came instead."""
        if response.status in (200, 416):
            response.close()
            raise RemoteChanged(
                f"{self.name}: the file changed on the server since it was opened"
                f" (HTTP {response.status} to a range request)"
            )
        client.check_status(response, self.name, (206,))
        first, total = content_range(response)
        if first != offset or total != self.size:
            response.close()
            raise RemoteChanged(
                f"{self.name}: asked for bytes from {offset} of {self.size}, the server sent"
                f" Content-Range {shown_header(response.getheader('Content-Range'))}"
            )
        validator = if_range_validator(response)
        if self.validator and validator and validator != self.validator:
            response.close()
            raise RemoteChanged(f"{self.name}: the file changed on the server (validator {shown_header(validator)})")
        check_range_length(response, self.name, offset, last)

    def _url_parts(self) -> client.Url:
        return client.parse_url(self.url)

    def _get_conn(self) -> Tuple[http1.HTTPConnection, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self.connect(), False

    def _put_conn(self, conn: http1.HTTPConnection) -> None:
        if conn.sock is None:
            return
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def _probe(self) -> Tuple[int, str, Optional[str]]:
        """Size, URL after redirects and validator, from a one-byte range request (also proves Range works)."""
        retry = client.Retry(self.name, self.options)
        while True:
            try:
                opened = client.open_url(self.name, self.options, {"Range": "bytes=0-0"}, pins=self._pins)
                try:
                    response = opened.response
                    if response.status == 200:
                        raise HTTPStatusError(
                            f"{self.name}: the server ignores Range requests; lazy mode needs them (use ram mode)"
                        )
                    _, total = content_range(response)
                    if response.status == 416 and total == 0:
                        return 0, opened.url, if_range_validator(response)
                    client.check_status(response, self.name, (206,))
                    if total is None:
                        raise HTTPStatusError(f"{self.name}: no size in the Content-Range of a range request")
                    check_range_length(response, self.name, 0, 0)
                    read_range(response, self.name, 1)
                    return total, opened.url, if_range_validator(response)
                finally:
                    opened.conn.close()
            except Exception as e:  # classify decides what is retried
                retry.failed(client.classify(e, self.name, self.options.timeout))
