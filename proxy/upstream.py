"""One connection pool per upstream (http1.py), and the one place where client errors are mapped.

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

import functools
from collections.abc import AsyncIterator, Mapping
from typing import Literal

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import http1
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


@functools.lru_cache(maxsize=1024)
def _quoted(path: str) -> str:
    """A path as it goes on the wire: percent-encoded where it must be, as aiohttp's client did
    (the server hands routes their decoded path). Calls name a handful of paths: kept."""
    return URL.build(path=path).raw_path


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
        self._pool: http1.Pool | None = None

    async def start(self) -> None:
        self._pool = http1.Pool(self.upstream.base_url, self.upstream.connect_timeout_s,
                                self.upstream.read_timeout_s, limit=512,
                                max_body_bytes=self.upstream.max_response_bytes)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    @property
    def idle_connections(self) -> int:
        return self._pool.idle if self._pool is not None else 0

    def target(self, prefix: Literal["v1", "api"], rest: str, query: str = "") -> str:
        """The request target for `/<prefix>/<rest>`: an OpenAI base URL already ends in its
        version. `query` is the client's, still percent-encoded."""
        assert self._pool is not None, "UpstreamClient.start() was not awaited"
        path = _quoted(f"{self._pool.base_path}/{rest}" if prefix == "v1" and self.upstream.kind == "openai"
                       else f"{self._pool.base_path}/{prefix}/{rest}")
        return f"{path}?{query}" if query else path

    async def send(self, method: str, target: str, headers: CIMultiDict[str], body: bytes | None) -> http1.Response:
        assert self._pool is not None, "UpstreamClient.start() was not awaited"
        name = self.upstream.name
        try:
            return await self._pool.request(method, target, headers.items(), body)
        except TimeoutError:
            raise UpstreamTimeout(f"Upstream '{name}' did not answer within its timeout.") from None
        except http1.ConnectFailure as exc:
            raise Unreachable(f"Upstream '{name}' is unreachable ({exc}).") from None
        except http1.Failure as exc:
            raise Unreachable(f"Upstream '{name}' failed before answering: it {exc}.") from None

    async def chunks(self, response: http1.Response) -> AsyncIterator[bytes]:
        """The body as it arrives; failures mid-way become UpstreamTimeout, BrokenStream or
        ResponseTooLarge (a runaway upstream must not fill the proxy or the client)."""
        name, limit, size = self.upstream.name, self.upstream.max_response_bytes, 0
        try:
            async for chunk in response.chunks():
                size += len(chunk)
                if size > limit:
                    raise ResponseTooLarge(f"Upstream '{name}' sent more than {limit:,} bytes "
                                           f"(max_response_bytes); the reply was cut off.")
                yield chunk
        except TimeoutError:
            raise UpstreamTimeout(f"Upstream '{name}' stalled: no data for "
                                  f"{self.upstream.read_timeout_s:g} s.") from None
        except http1.Failure as exc:
            raise BrokenStream(f"Upstream '{name}' broke the response off: it {exc}.") from None

    async def read(self, response: http1.Response) -> bytes:
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
        target = self.target("v1", "models") if self.upstream.kind == "openai" else self.target("api", "version")
        response = await self.send("GET", target, request_headers({}, self.upstream), None)
        async with response:
            await self.read(response)
            return f"HTTP {response.status}"
