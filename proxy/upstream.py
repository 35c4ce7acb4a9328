"""One aiohttp ClientSession per upstream, and the one place where client errors are mapped.

Exception tree (all `errors.ProxyError`, so the error middleware renders them in the caller's
dialect and the call's ledger row gets the outcome):

    UpstreamError
    ├── Unreachable       502  connection refused, DNS failure, TLS failure, connection reset
    ├── UpstreamTimeout   504  no headers, or no bytes for `read_timeout_s`, mid-stream included
    ├── BrokenStream      502  the upstream closed or corrupted the body before its end
    ├── BadResponse       502  a success whose body is not what the protocol promises (not JSON)
    └── ResponseTooLarge  502  a body over the upstream's `max_response_bytes`

Request and response bodies are relayed, never buffered whole: `send` returns as soon as the
status line and headers are in, and `chunks` yields the body piece by piece as it arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Literal

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from .config import Upstream
from .errors import ProxyError


class UpstreamError(ProxyError):
    type, code = "upstream_error", "upstream_error"


class Unreachable(UpstreamError):
    status, outcome = 502, "unreachable"


class UpstreamTimeout(UpstreamError):
    status, type, code, outcome = 504, "timeout", "upstream_timeout", "timeout"


class BrokenStream(UpstreamError):
    status, outcome = 502, "broken_stream"


class BadResponse(UpstreamError):
    status, code, outcome = 502, "bad_upstream_response", "bad_upstream_response"


class ResponseTooLarge(UpstreamError):
    status, code, outcome = 502, "upstream_response_too_large", "response_too_large"


# What a client may send on to an upstream: an allow-list, so a credential or a routing hint a
# client (or a page in a browser) adds never reaches the operator's upstream by default. The
# protocols' own headers, and the openai SDKs' X-Stainless-* telemetry; per upstream,
# `forward_headers` adds more.
_FORWARDED_UP = frozenset({"content-type", "accept", "user-agent", "openai-beta", "openai-organization",
                           "openai-project", "idempotency-key"})
_FORWARDED_UP_PREFIXES = ("x-stainless-",)
# Hop-by-hop headers (RFC 9110 §7.6.1) and those the relay recomputes itself.
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "proxy-connection"}
_NOT_RELAYED_DOWN = _HOP | {"content-length", "content-encoding", "set-cookie"}


def request_headers(incoming: Mapping[str, str], upstream: Upstream) -> CIMultiDict[str]:
    """The client's headers that the upstream needs, plus the upstream's key. Headers named in
    the client's Connection header are hop-by-hop (RFC 9110 §7.6.1) and never go on."""
    hop = {name.strip().lower() for name in incoming.get("Connection", "").split(",")}
    allowed = _FORWARDED_UP | upstream.forward_headers
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if (lower in allowed or lower.startswith(_FORWARDED_UP_PREFIXES)) and lower not in hop:
            out.add(name, value)
    api_key = upstream.api_key()
    if api_key:
        out["Authorization"] = f"Bearer {api_key}"
    return out


def response_headers(incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in _NOT_RELAYED_DOWN:
            out.add(name, value)
    return out


class UpstreamClient:
    """The connection pool and URL layout of one configured upstream."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, connect=self.upstream.connect_timeout_s,
                                        sock_read=self.upstream.read_timeout_s)
        connector = aiohttp.TCPConnector(limit=512, enable_cleanup_closed=True)
        # Cookies from an upstream are never the client's business, nor shared across clients.
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector,
                                              cookie_jar=aiohttp.DummyCookieJar(),
                                              auto_decompress=True)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, prefix: Literal["v1", "api"], rest: str) -> str:
        """Where `/<prefix>/<rest>` goes: an OpenAI base URL already ends in its version."""
        base = self.upstream.base_url
        if prefix == "v1" and self.upstream.kind == "openai":
            return f"{base}/{rest}"
        return f"{base}/{prefix}/{rest}"

    async def send(self, method: str, url: str, headers: CIMultiDict[str],
                   body: bytes | None, query: str = "") -> aiohttp.ClientResponse:
        assert self._session is not None, "UpstreamClient.start() was not awaited"
        name = self.upstream.name
        if query:
            url = f"{url}?{query}"
        try:
            return await self._session.request(method, url, headers=headers, data=body,
                                               allow_redirects=False)
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"Upstream '{name}' did not answer within its timeout.") from None
        except aiohttp.ClientConnectorError as exc:
            raise Unreachable(f"Upstream '{name}' is unreachable ({exc.os_error.strerror or 'connection failed'}).") from None
        except aiohttp.ClientError as exc:
            raise Unreachable(f"Upstream '{name}' failed before answering ({type(exc).__name__}).") from None

    async def chunks(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The body as it arrives; failures mid-way become UpstreamTimeout, BrokenStream or
        ResponseTooLarge (a runaway upstream must not fill the proxy or the client)."""
        name, limit, size = self.upstream.name, self.upstream.max_response_bytes, 0
        try:
            async for chunk in response.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise ResponseTooLarge(f"Upstream '{name}' sent more than {limit:,} bytes "
                                           f"(max_response_bytes); the reply was cut off.")
                yield chunk
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"Upstream '{name}' stalled: no data for "
                                  f"{self.upstream.read_timeout_s:g} s.") from None
        except aiohttp.ClientError as exc:
            raise BrokenStream(f"Upstream '{name}' broke the response off ({type(exc).__name__}).") from None

    async def read(self, response: aiohttp.ClientResponse) -> bytes:
        """The whole body of a reply known to be small, with the same error mapping."""
        return b"".join([chunk async for chunk in self.chunks(response)])

    @staticmethod
    async def read_up_to(body: AsyncIterator[bytes], limit: int) -> tuple[bytes, bool]:
        """Read from `body` until it ends or passes `limit`: (what was read, whether more follows)."""
        parts, size = [], 0
        async for chunk in body:
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                return b"".join(parts), True
        return b"".join(parts), False

    async def probe(self) -> str:
        """One cheap authenticated GET, for `tollgate check`; raises UpstreamError."""
        url = self.url("v1", "models") if self.upstream.kind == "openai" else self.url("api", "version")
        response = await self.send("GET", url, request_headers({}, self.upstream), None)
        async with response:
            await response.read()
            return f"HTTP {response.status}"
