"""HTTP/1.1's awkward parts between Tollgate and an upstream, at the byte level.

The fake here is a raw TCP server on loopback that answers each request with bytes a test
writes: what aiohttp's server never sends (a body that ends where the connection does, a
100 Continue first, raw deflate, a malformed status line, a connection closed while idle). The
proxy is the real app and the client the real openai SDK; each call must come out right, be
booked once, and leave the connection pool usable.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from proxy.keys import UPSTREAMS

from .conftest import Proxy, base_config
from .servers import self_signed_certificate

ANSWER = orjson.dumps({"id": "c1", "object": "chat.completion", "created": 0, "model": "gpt-4o",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "hola"},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}})


class RawUpstream:
    """Reads each request whole (headers and Content-Length body), then answers with
    `answer(n)` for the n-th request of the server's life; `close_after` ends the connection
    once it is written. Counts connections, so a test sees whether they were reused."""

    def __init__(self, answer: Callable[[int], bytes], close_after: bool = False,
                 tls: ssl.SSLContext | None = None) -> None:
        self.answer, self.close_after, self.tls = answer, close_after, tls
        self.connections = 0
        self.requests = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    async def stop(self) -> None:
        for writer in self.writers:
            writer.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.requests += 1
                writer.write(self.answer(self.requests))
                await writer.drain()
                if self.close_after:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionResetError):
            writer.close()


@pytest.fixture
async def raw_proxy(tmp_path: Path, cloud_key: str) -> AsyncIterator[Callable[..., Any]]:
    started: list[tuple[Proxy, RawUpstream]] = []

    async def make(answer: Callable[[int], bytes], close_after: bool = False, tls: ssl.SSLContext | None = None,
                   **upstream_keys: Any) -> tuple[Proxy, RawUpstream]:
        upstream = RawUpstream(answer, close_after, tls)
        config = base_config(await upstream.start(), tmp_path / f"data{len(started)}")
        config["upstreams"]["gpt4o_cloud"].update(upstream_keys)
        proxy = Proxy(config)
        await proxy.start()
        started.append((proxy, upstream))
        return proxy, upstream

    yield make
    for proxy, upstream in started:
        await proxy.stop()
        await upstream.stop()


def _sdk(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)


async def _ask(proxy: Proxy) -> openai.types.chat.ChatCompletion:
    async with _sdk(proxy) as sdk:
        return await sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hola"}])


def _response(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    return (f"HTTP/1.1 {status}\r\n" + "".join(f"{h}\r\n" for h in headers) + "\r\n").encode() + body


async def test_a_body_without_a_length_ends_with_the_connection(raw_proxy: Callable[..., Any]) -> None:
    proxy, upstream = await raw_proxy(lambda _: _response(ANSWER, "Content-Type: application/json",
                                                          "Connection: close"), close_after=True)
    recorded = proxy.records()
    for _ in range(2):
        reply = await _ask(proxy)
        assert reply.choices[0].message.content == "hola"
    rows = await recorded.wait_for(2)
    assert [(r.outcome, r.prompt_tokens, r.completion_tokens, r.estimated) for r in rows] == [("ok", 11, 3, False)] * 2
    assert upstream.connections == 2  # a closed connection is never handed to the next call


async def test_keep_alive_connections_are_reused(raw_proxy: Callable[..., Any]) -> None:
    proxy, upstream = await raw_proxy(lambda _: _response(ANSWER, "Content-Type: application/json",
                                                          f"Content-Length: {len(ANSWER)}"))
    for _ in range(5):
        await _ask(proxy)
    assert (upstream.requests, upstream.connections) == (5, 1)


async def test_an_idle_connection_the_upstream_closed_is_not_used_again(raw_proxy: Callable[..., Any]) -> None:
    proxy, upstream = await raw_proxy(lambda _: _response(ANSWER, "Content-Type: application/json",
                                                          f"Content-Length: {len(ANSWER)}"))
    await _ask(proxy)
    # The upstream closes its idle connection (as uvicorn does after 5 s): the proxy sees the
    # end of it and opens a new one for the next call instead of writing into a dead one.
    assert proxy.server is not None
    client = proxy.server.app[UPSTREAMS]["gpt4o_cloud"]
    assert client.idle_connections == 1
    upstream.writers[0].close()
    await upstream.writers[0].wait_closed()
    for _ in range(1000):  # the proxy's loop (this one) reads the end of it within a few turns
        if not client.idle_connections:
            break
        await asyncio.sleep(0)
    assert client.idle_connections == 0
    reply = await _ask(proxy)
    assert reply.usage is not None and reply.usage.total_tokens == 14
    assert upstream.connections == 2


async def test_an_interim_100_continue_is_skipped(raw_proxy: Callable[..., Any]) -> None:
    proxy, _ = await raw_proxy(lambda _: b"HTTP/1.1 100 Continue\r\n\r\n" + _response(
        ANSWER, "Content-Type: application/json", f"Content-Length: {len(ANSWER)}"))
    reply = await _ask(proxy)
    assert reply.choices[0].message.content == "hola"


@pytest.mark.parametrize("wrap", [16 + zlib.MAX_WBITS, zlib.MAX_WBITS, -zlib.MAX_WBITS], ids=["gzip", "deflate", "raw-deflate"])
async def test_compressed_answers_are_decoded_and_counted(raw_proxy: Callable[..., Any], wrap: int) -> None:
    packer = zlib.compressobj(wbits=wrap)
    packed = packer.compress(ANSWER) + packer.flush()
    coding = "gzip" if wrap > zlib.MAX_WBITS else "deflate"
    proxy, _ = await raw_proxy(lambda _: _response(packed, "Content-Type: application/json",
                                                   f"Content-Encoding: {coding}", f"Content-Length: {len(packed)}"))
    recorded = proxy.records()
    reply = await _ask(proxy)
    assert reply.choices[0].message.content == "hola"
    (row,) = await recorded.wait_for(1)
    assert (row.outcome, row.total_tokens) == ("ok", 14)


async def test_a_malformed_answer_is_a_502_that_quotes_nothing(raw_proxy: Callable[..., Any]) -> None:
    proxy, _ = await raw_proxy(lambda _: b"HTTP/1.1 2x0 secret-token-abc\r\n\r\n", close_after=True)
    recorded = proxy.records()
    with pytest.raises(openai.APIStatusError) as caught:
        await _ask(proxy)
    assert caught.value.status_code == 502
    message = str(caught.value)
    assert "malformed HTTP response" in message and "secret-token-abc" not in message
    (row,) = await recorded.wait_for(1)
    assert (row.outcome, row.status) == ("unreachable", 502)


async def test_a_body_cut_short_is_a_broken_stream(raw_proxy: Callable[..., Any]) -> None:
    proxy, _ = await raw_proxy(lambda _: _response(ANSWER[:40], "Content-Type: application/json",
                                                   f"Content-Length: {len(ANSWER)}"), close_after=True)
    recorded = proxy.records()
    with pytest.raises(openai.APIStatusError) as caught:
        await _ask(proxy)
    assert caught.value.status_code == 502 and "before the end of the body" in str(caught.value)
    (row,) = await recorded.wait_for(1)
    assert row.outcome == "broken_stream"


async def test_a_compressed_answer_is_refused_at_its_size_once_decoded_without_decoding_it_all(
        raw_proxy: Callable[..., Any]) -> None:
    """100 MB of zeros, gzipped to 100 KB, from an upstream whose replies may be 1 MB: a 502
    naming the limit, and the proxy never holds more than a piece of it."""
    bomb = gzip.compress(b"0" * (100 << 20), compresslevel=9)
    proxy, _ = await raw_proxy(lambda _: _response(bomb, "Content-Type: application/json", "Content-Encoding: gzip",
                                                   f"Content-Length: {len(bomb)}"), max_response_bytes=1 << 20)
    recorded = proxy.records()
    tracemalloc.start()
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            await _ask(proxy)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.status_code == 502 and "max_response_bytes" in str(caught.value)
    assert peak < 16 << 20, f"{peak:,} bytes held at the peak"
    (row,) = await recorded.wait_for(1)
    assert row.outcome == "response_too_large"


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
async def test_an_https_upstream_is_verified(raw_proxy: Callable[..., Any], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, trusted: bool) -> None:
    """GitHub Models is HTTPS: the certificate is checked against the system's trust store (here
    pointed at the test's own by SSL_CERT_FILE); one it does not trust is a 502 saying so."""
    cert, key = self_signed_certificate(tmp_path, "upstream")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    if trusted:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    proxy, upstream = await raw_proxy(lambda _: _response(ANSWER, "Content-Type: application/json",
                                                          f"Content-Length: {len(ANSWER)}"), tls=tls)
    if trusted:
        for _ in range(2):
            reply = await _ask(proxy)
            assert reply.usage is not None and reply.usage.total_tokens == 14
        assert upstream.connections == 1  # the TLS connection is kept alive too
        return
    with pytest.raises(openai.APIStatusError) as caught:
        await _ask(proxy)
    assert caught.value.status_code == 502
    assert "is unreachable (TLS: its certificate is not trusted, self-signed certificate)" in str(caught.value)
    assert upstream.requests == 0
