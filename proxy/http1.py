"""HTTP/1.1 to an upstream: a bounded pool of keep-alive connections, a request out, the answer in
as it arrives.

aiohttp's client cost a loopback chat call about 147 µs of CPU, more than all of Tollgate's
metering; this one costs about 25 (bench/client.py). It does what the calls to an upstream need
and nothing else: connect and read timeouts, TLS, gzip and deflate bodies, close-delimited
bodies, back-pressure when the client reads slower than the upstream writes, at most `limit`
connections (a caller past it waits for a place). No redirects, cookies or proxies: Tollgate
never followed, kept or used them. llhttp parses, through httptools (uvloop's authors).

Failures raise `Failure` (the connection broke or the upstream broke HTTP; its text names how and
quotes nothing the upstream sent), `ConnectFailure` (never connected) or `TimeoutError`;
upstream.py maps them to the proxy's errors.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterable
from types import TracebackType

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# An idle connection is not reused after this long: servers close theirs after a while (uvicorn
# 5 s, nginx 75 s), and a request written into a closing connection is lost. aiohttp's default.
KEEPALIVE_S = 15.0
# Bytes held for a client that reads slower than the upstream writes, before reading pauses.
PAUSE_AT = 256 << 10
RESUME_AT = 64 << 10
_DEFAULT_PORTS = {"http": 80, "https": 443}
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


class Failure(Exception):
    """The connection or the upstream's HTTP failed; the text says how, quoting nothing sent."""


class ConnectFailure(Failure):
    """No connection could be made."""


class Response:
    """One answer: status and headers once `Pool.request` returns, the body as `chunks()`."""

    def __init__(self, conn: _Connection, method: str) -> None:
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self.content_type = "application/octet-stream"
        self._conn: _Connection | None = conn
        self._loop = conn.loop
        self._head_only = method == "HEAD"
        self._raw: list[tuple[bytes, bytes]] = []
        self._head: asyncio.Future[None] = conn.loop.create_future()
        self._body: deque[bytes] = deque()
        self._held = 0
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: BaseException | None = None
        self._until_close = False  # the body ends when the upstream closes the connection
        self._decoder: _Decoder | None = None

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()

    def release(self) -> None:
        """Done with the answer: an unfinished body cannot be left in a connection for the next
        request to read, so the connection is closed; a finished one was pooled already."""
        conn, self._conn = self._conn, None
        self._body.clear()
        if conn is not None and conn.response is self:
            conn.close()

    @property
    def ended(self) -> bool:
        """The whole body has arrived and `chunks()` has handed all of it out: what it gave last
        was the end."""
        return self._done and not self._body

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: each step everything received since the last."""
        while True:
            if self._body:
                chunk = self._body.popleft() if len(self._body) == 1 else b"".join(self._body)
                self._body.clear()
                self._held = 0
                if self._conn is not None and self._conn.paused:
                    self._conn.resume()
                yield chunk
            elif self._error is not None:
                raise self._error
            elif self._done:
                return
            else:
                if self._conn is None:
                    raise Failure("its answer was read after it was released")
                self._waiter = self._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None

    # --- fed by the connection ------------------------------------------------------------

    def _headers_done(self, status: int) -> None:
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in self._raw:
            headers.add(name.decode("latin-1"), value.decode("utf-8", "replace"))
        self._raw = []
        self.status, self.headers = status, CIMultiDictProxy(headers)
        kind = headers.get("Content-Type")
        if kind:
            self.content_type = kind.partition(";")[0].strip().lower()
        coding = headers.get("Content-Encoding", "identity").strip().lower()
        if coding not in ("identity", ""):
            if coding not in ("gzip", "x-gzip", "deflate"):
                self._fail(Failure(f"answered in an encoding it was not offered ({coding[:20]})"))
                return
            self._decoder = _Decoder(coding, self._conn.pool.max_body_bytes + 1 if self._conn else 1)
        self._until_close = ("Content-Length" not in headers and "chunked" not in
                             headers.get("Transfer-Encoding", "").lower() and status not in (204, 304))
        self._head.set_result(None)
        if self._head_only:
            self._finish()

    def _feed(self, data: bytes) -> None:
        if self._decoder is not None:
            try:
                data = self._decoder.feed(data)
            except zlib.error:
                self._fail(Failure("sent a body its Content-Encoding does not decode"))
                return
            if not data:
                return
        self._body.append(data)
        self._held += len(data)
        if self._held > PAUSE_AT and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        if self._decoder is not None:
            try:
                tail = self._decoder.flush()
            except zlib.error:
                self._fail(Failure("sent a body its Content-Encoding does not decode"))
                return
            if tail:
                self._body.append(tail)
        self._done = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._done or self._error is not None:
            return
        if not self._head.done():
            self._head.set_exception(exc)
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class _Decoder:
    """gzip or deflate, as it arrives (deflate: zlib-wrapped as the RFC says, or raw as some send).

    A few compressed bytes can stand for a thousand times as many: no piece decodes to more than
    `cap` (one byte past the upstream's `max_response_bytes`, which the reader then refuses),
    whatever it holds."""

    def __init__(self, coding: str, cap: int) -> None:
        self.coding, self.cap = coding, cap
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS if coding != "deflate" else zlib.MAX_WBITS)
        self._started = False
        self._over = False  # a piece reached the cap: the body is refused, the rest never decoded

    def feed(self, data: bytes) -> bytes:
        if self._over:
            return b""
        if not self._started and self.coding == "deflate":
            self._started = True
            try:
                return self._decode(data)
            except zlib.error:
                self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        return self._decode(data)

    def _decode(self, data: bytes) -> bytes:
        out = self._z.decompress(data, self.cap)
        self._over = bool(self._z.unconsumed_tail)
        return out

    def flush(self) -> bytes:
        return b"" if self._over else self._z.flush()


class _Connection(asyncio.Protocol):
    """One connection: it hands what it reads to the response in progress, and times it out."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.paused = False
        self.idle_since = 0.0
        self.last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.response is None:
            self.close()  # bytes nobody asked for: this connection cannot be trusted again
            return
        self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.response is not None:
                self.response._fail(Failure("sent a malformed HTTP response"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.pool._lost(self)
        self._cancel_timer()
        response, self.response = self.response, None
        if response is None:
            return
        if response._head.done() and response._until_close and response._error is None:
            response._finish()  # a body without a length ends where the connection does
        elif not response._head.done():
            response._fail(Failure("closed the connection before answering"))
        else:
            response._fail(Failure("closed the connection before the end of the body"))

    # --- httptools callbacks (raising in them would be lost: they only record) -----------------

    def on_status(self, reason: bytes) -> None:
        if self.response is not None:
            self.response.reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response._raw.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:
            return
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue and its like: the answer is still to come
            response._raw = []
            return
        response._headers_done(status)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is None or self.parser.get_status_code() < 200:
            return
        response._finish()
        self.response = None
        if response._head_only or not self.parser.should_keep_alive() or response._error is not None:
            self.close()
        else:
            response._conn = None
            if self.paused:  # the body's last bytes came with the ones that filled the buffer
                self.resume()
            self.pool._put(self)

    # --- used by the pool and the response ----------------------------------------------------

    def send(self, response: Response, data: Iterable[bytes]) -> None:
        assert self.transport is not None
        self.response = response
        self.last_read = self.loop.time()
        self._arm()
        self.transport.writelines(data)

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.last_read = self.loop.time()  # the upstream did not stall: the reader did
            self.transport.resume_reading()
            self._arm()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.closed:
            self.closed = True
            self.pool._lost(self)

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = self.loop.call_at(self.last_read + self.pool.read_timeout_s, self._check)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        """The read timeout, checked at its deadline rather than re-armed on every read or every
        request: a kept-alive connection's timer stays set across its requests, and a timer
        handle per read or per call would cost more than the reads."""
        self._timer = None
        if self.response is None or self.paused:
            return
        if self.loop.time() - self.last_read >= self.pool.read_timeout_s:
            self.response._fail(TimeoutError())
            self.close()
        else:
            self._arm()


class Pool:
    """Keep-alive connections to one origin, at most `limit` of them open at once."""

    def __init__(self, base_url: str, connect_timeout_s: float, read_timeout_s: float, limit: int = 512,
                 max_body_bytes: int = 64 << 20) -> None:
        url = URL(base_url)
        self.loop = asyncio.get_running_loop()
        self.host = url.raw_host or ""
        self.port = url.port or _DEFAULT_PORTS.get(url.scheme, 80)
        default = self.port == _DEFAULT_PORTS.get(url.scheme)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default else f"{host}:{self.port}"
        self.base_path = url.raw_path.rstrip("/")
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.connect_timeout_s, self.read_timeout_s, self.limit = connect_timeout_s, read_timeout_s, limit
        self.max_body_bytes = max_body_bytes
        self._idle: deque[_Connection] = deque()
        self._open = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def request(self, method: str, target: str, headers: Iterable[tuple[str, str]],
                      body: bytes | None) -> Response:
        """Send the request; return once the status and headers are in."""
        head = self._head(method, target, headers, body)
        conn = await self._acquire()
        response = Response(conn, method)
        conn.send(response, (head, body) if body else (head,))
        try:
            await response._head
        except BaseException:
            response.release()  # cancelled or failed: the connection holds half an exchange
            raise
        return response

    def _head(self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes | None) -> bytes:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}"]
        named = set()
        for name, value in headers:
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise Failure(f"its request header '{name[:40]}' holds a line break")
            lines.append(f"{name}: {value}")
            named.add(name.lower())
        if body is not None or method in _WITH_BODY:
            lines.append(f"Content-Length: {len(body or b'')}")
        if "accept-encoding" not in named:
            lines.append("Accept-Encoding: gzip, deflate")
        if "accept" not in named:
            lines.append("Accept: */*")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def _acquire(self) -> _Connection:
        while True:
            now = self.loop.time()
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed and now - conn.idle_since < KEEPALIVE_S:
                    return conn
                conn.close()
            if self._open < self.limit:
                return await self._connect()
            waiter = self.loop.create_future()
            self._waiting.append(waiter)
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()

    async def _connect(self) -> _Connection:
        self._open += 1
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None)
        except OSError as exc:
            self._open -= 1
            self._wake_one()
            raise ConnectFailure(_why(exc)) from None
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise
        return conn

    def _put(self, conn: _Connection) -> None:
        conn.idle_since = now = self.loop.time()
        while self._idle and now - self._idle[0].idle_since >= KEEPALIVE_S:
            self._idle.popleft().close()
        self._idle.append(conn)
        self._wake_one()

    def _lost(self, conn: _Connection) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    @property
    def idle(self) -> int:
        """Connections waiting for a request that the upstream has not closed."""
        return sum(not conn.closed for conn in self._idle)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


def _why(exc: OSError) -> str:
    """A connect failure in a few words: never the exception's repr, which can be long."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: its certificate is not trusted, {exc.verify_message or 'verification failed'}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or 'handshake failed'}"
    return exc.strerror or type(exc).__name__
