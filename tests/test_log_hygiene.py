"""Secrets never reach the log, and a malformed request costs one short line at most."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

from aiohttp import http_exceptions

from proxy.logs import MalformedRequests

from .conftest import Serve, write_config
from .fake_upstream import FakeUpstream

SECRETS = ("sk-leak-header-0123", "tok-leak-query-4567", "sk-leak-long-89ab", "Bearer-raw-cdef")
HOSTILE = [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-leak-header-0123\x00\r\n\r\n",
    b"GET /stats?token=tok-leak-query-4567 HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 9000 + b"sk-leak-long-89ab\r\n\r\n",
    b"BREW /pot?Bearer-raw-cdef HTTP/1.1\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
]


async def test_a_hostile_run_leaves_no_secret_and_no_flood_in_the_log(raw_config: dict[str, Any], tmp_path: Path,
                                                                     fake: FakeUpstream) -> None:
    async with Serve(write_config(raw_config, tmp_path)) as serve:
        sent = 0
        for _ in range(40):
            for raw in HOSTILE:
                reader, writer = await asyncio.open_connection("127.0.0.1", serve.port)
                writer.write(raw)
                await writer.drain()
                reply = await reader.read(4096)
                writer.close()
                await writer.wait_closed()
                assert reply.startswith(b"HTTP/1.") and b" 400 " in reply.split(b"\r\n", 1)[0]
                sent += 1
        assert await serve.signal(signal.SIGTERM) == 0
    log = "".join(serve.log)
    assert sent == 200
    assert not [s for s in SECRETS if s in log]
    assert "Traceback" not in log
    # 200 malformed requests in well under the 10 s interval: one line, naming no bytes sent.
    lines = [line for line in serve.log if "with 400" in line]
    assert len(lines) == 1 and len(lines[0]) < 200


def test_held_lines_are_counted_in_the_next_one() -> None:
    now = [0.0]
    keep = MalformedRequests(interval_s=10, clock=lambda: now[0])

    def record() -> logging.LogRecord:
        exc = http_exceptions.BadHttpMessage("Invalid header value char:\n  b'Authorization: Bearer sk-x\\x00'")
        return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
                                 ("127.0.0.1",), (type(exc), exc, None))

    first = record()
    assert keep.filter(first) and first.getMessage() == "refused a malformed request from 127.0.0.1 with 400"
    assert first.exc_info is None and first.levelname == "WARNING"
    assert [keep.filter(record()) for _ in range(99)] == [False] * 99
    now[0] = 10.0
    later = record()
    assert keep.filter(later) and "(99 more malformed requests in the last 10 s)" in later.getMessage()
    assert "sk-x" not in later.getMessage()
    # Anything else aiohttp logs passes untouched.
    other = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Unhandled exception", (), None)
    assert keep.filter(other) and other.getMessage() == "Unhandled exception"
