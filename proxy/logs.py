"""The log is not a weapon: what aiohttp logs about malformed requests, made short and safe.

aiohttp logs each request it cannot parse with its traceback, and the exception's message quotes
the offending bytes: an `Authorization: Bearer <key>\\x00` header, a request line with `?token=`.
One 27-byte request wrote a 691-byte traceback, with no authentication needed. This filter turns
each into one line that names the peer and the kind of fault and quotes nothing the client sent,
and lets at most one such line through per interval, counting the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiohttp import http_exceptions

INTERVAL_S = 10.0

_KINDS: tuple[tuple[type[Exception], str], ...] = (
    (http_exceptions.LineTooLong, "a header or request line over the size limit"),
    (http_exceptions.BadStatusLine, "a malformed request line"),
    (http_exceptions.BadHttpMethod, "an unknown method"),
    (http_exceptions.InvalidHeader, "an invalid header"),
    (http_exceptions.BadHttpMessage, "a malformed request"),
    (http_exceptions.HttpProcessingError, "a request it could not process"),
)


class MalformedRequests(logging.Filter):
    """On `aiohttp.server`: malformed-request records become one redacted, rate-limited line."""

    def __init__(self, interval_s: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self._last = float("-inf")
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, http_exceptions.HttpProcessingError):
            return True
        now = self.clock()
        if now - self._last < self.interval_s:
            self._held += 1
            return False
        kind = next(text for cls, text in _KINDS if isinstance(exc, cls))
        peer = record.getMessage().rsplit(" from ", 1)[-1] if " from " in record.getMessage() else "a client"
        more = f" ({self._held} more malformed requests in the last {self.interval_s:g} s)" if self._held else ""
        record.msg, record.args = "refused %s from %s with 400%s", (kind, peer[:64], more)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        self._last, self._held = now, 0
        return True


def install() -> None:
    """Put the filter on aiohttp's server logger, once per process."""
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequests) for f in server.filters):
        server.addFilter(MalformedRequests())
