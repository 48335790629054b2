"""Connection-level defences under uvicorn: a header read timeout, and a rate limit on accept-error logs.

uvicorn bounds an idle keep-alive connection (`timeout_keep_alive`) and the number of connections
(`limit_concurrency`, a 503 beyond it), and h11 bounds the header size; it has no timeout for a client
that opens a connection and trickles its request headers, which is how a few hundred slow sockets lock
real clients out. `HeaderTimeoutH11Protocol` closes a connection whose request headers are not complete
`header_read_timeout` seconds after it opened (or after its previous response); the body has its own
timeout (body.py). A request h11 cannot parse (headers over its 16 KiB limit, a bad request line) gets an
OpenAI error body too. The HTTP protocol class is passed to uvicorn as `http=`.

When the process runs out of file descriptors, asyncio (3.11) logs every failed accept() with a traceback
— up to `backlog` (2048) records per readiness event, each scheduling a retry, and at shutdown each pending
retry logs "Exception in callback BaseSelectorEventLoop._start_serving" with its own traceback: megabytes of
log per second. `AcceptErrorLogFilter` lets one such record through per `interval_s`, without its
traceback, and counts the rest into the next one. `raise_open_file_limit()` lifts the soft descriptor limit
to the hard one (at most 65536) at startup, as vLLM does, so the cap is rarely met at all.
"""
from __future__ import annotations

import json
import logging
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from qvl.server.errors import error_body


def header_timeout_protocol(header_read_timeout: float) -> type[H11Protocol]:
    """An H11Protocol class closing connections that do not send complete headers in time."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer = None

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_read_timeout, self._headers_overdue)

        def _headers_overdue(self) -> None:
            self._header_timer = None
            # IDLE: no complete request line + headers since the connection opened or the last response
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.debug("closing a connection: no request headers within %.1f s", header_read_timeout)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def send_400_response(self, msg: str) -> None:
            """A request h11 cannot parse (bad request line, headers over h11's 16 KiB, bad chunking): an
            OpenAI error body like every other refusal, then close (uvicorn's own sends plain text)."""
            body = json.dumps(error_body(f"Invalid HTTP request: {msg}", "invalid_request_error", None,
                                         "invalid_http_request")).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol


class AcceptErrorLogFilter(logging.Filter):
    """On the "asyncio" logger: at most one 'socket.accept() out of system resource' record per
    `interval_s`; the next one says how many were dropped."""

    MESSAGE = "socket.accept() out of system resource"
    RETRY = "Exception in callback BaseSelectorEventLoop._start_serving"     # a retry firing after close

    def __init__(self, interval_s: float = 30.0):
        super().__init__()
        self.interval_s = interval_s
        self._last = float("-inf")
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith((self.MESSAGE, self.RETRY)):
            return True
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._dropped += 1
            return False
        self._last = now
        if self._dropped:
            record.msg = f"{record.msg} ({self._dropped} more in the last {self.interval_s:g} s not logged)"
            self._dropped = 0
        record.exc_info = None        # the traceback is the same every time; the message says it all
        record.exc_text = None
        return True


def install_accept_error_filter(interval_s: float = 30.0) -> AcceptErrorLogFilter:
    """Attach the filter to the "asyncio" logger (once; returns the one attached)."""
    log = logging.getLogger("asyncio")
    for f in log.filters:
        if isinstance(f, AcceptErrorLogFilter):
            return f
    f = AcceptErrorLogFilter(interval_s)
    log.addFilter(f)
    return f


def raise_open_file_limit(target: int = 65536) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards min(hard, target); returns the soft limit in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(hard, target)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want
        except (ValueError, OSError):
            return soft
    return soft
