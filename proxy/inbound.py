"""What the client sent: its body, read whole but bounded in size and in time, and decoded."""

from __future__ import annotations

import asyncio

from aiohttp import web

from .config import Config
from .errors import BadRequest, BodyTimeout, PayloadTooLarge


async def read_body(request: web.Request, config: Config) -> bytes:
    """The whole request body, bounded in size and in time (a client trickling bytes must not
    hold a connection and its memory open forever)."""
    limit = config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"The request body is {request.content_length:,} bytes; "
                              f"this proxy accepts at most {limit:,}.")

    try:
        if request.content.is_eof():  # already all here (the usual case): no timer needed
            body = await request.content.read()
            if len(body) > limit:
                raise PayloadTooLarge(f"The request body is over {limit:,} bytes, the most this proxy accepts.")
            return body
        chunks, size = [], 0
        # asyncio.timeout, not wait_for: no extra task per call.
        async with asyncio.timeout(config.server.body_timeout_s):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"The request body is over {limit:,} bytes, the most this proxy accepts.")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout(f"The request body did not arrive within {config.server.body_timeout_s:g} s.") from None
    except web.RequestPayloadError:
        # aiohttp decodes a compressed body as it arrives; this one was not what its header said.
        coding = request.headers.get("Content-Encoding", "its Content-Encoding")
        raise BadRequest(f"The request body could not be decoded as {coding}.") from None
    return b"".join(chunks)
