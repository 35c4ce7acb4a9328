"""A stream whose final frame reached the client is a success, whatever the connection does next.

Real servers close a stream a moment after its last frame; the openai SDK hangs up as soon as it
reads `data: [DONE]`. The fake holds the end of every stream until the test lets it go, so each
client leaves before the upstream has finished: the books must still say `ok`, with the
upstream's own usage.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import openai
import orjson
import pytest

from .conftest import Proxy
from .fake_upstream import Behavior, FakeUpstream


async def test_openai_sdk_hanging_up_at_done_is_ok(proxy: Proxy, fake: FakeUpstream,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event()
    fake.behavior = Behavior(prompt_tokens=12, chunks=3, completion_per_chunk=2, pause_before_eof=release)
    recorded = proxy.records()
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="bot", max_retries=0)

    async def one(i: int) -> str:
        stream = await client.chat.completions.create(
            model="gpt-4o", stream=True, messages=[{"role": "user", "content": f"hola {i}"}])
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    try:
        with caplog.at_level(logging.DEBUG):
            texts = await asyncio.gather(*(one(i) for i in range(100)))
            rows = await recorded.wait_for(100)
    finally:
        release.set()
        await client.close()
    assert texts == ["w0 w1 w2 "] * 100
    assert [r.outcome for r in rows] == ["ok"] * 100
    assert {r.status for r in rows} == {200}
    assert not any(r.estimated for r in rows)
    assert sum(r.total_tokens for r in rows) == fake.reported.total == 100 * 18
    assert not [r for r in caplog.records if r.exc_info or "closing transport" in r.getMessage()]


async def _read_until(url: str, body: dict[str, object], last: bytes) -> bytes:
    """A client that stops reading and hangs up as soon as it has seen `last`."""
    seen = b""
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=orjson.dumps(body),
                                headers={"Content-Type": "application/json"}) as response:
            assert response.status == 200
            async for chunk in response.content.iter_any():
                seen += chunk
                if last in seen:
                    response.close()
                    break
    return seen


@pytest.mark.parametrize("path,body,last", [
    ("/v1/responses", {"model": "gpt-4o", "input": "hola", "stream": True}, b"response.completed"),
    ("/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "hola"}]}, b'"done":true'),
    ("/api/generate", {"model": "llama3.2", "prompt": "hola"}, b'"done":true'),
])
async def test_hanging_up_after_the_final_frame_is_ok(proxy: Proxy, fake: FakeUpstream, path: str,
                                                       body: dict[str, object], last: bytes) -> None:
    release = asyncio.Event()
    fake.behavior = Behavior(prompt_tokens=5, chunks=2, completion_per_chunk=3, pause_before_eof=release)
    recorded = proxy.records()
    try:
        await asyncio.gather(*(_read_until(proxy.url + path, body, last) for _ in range(10)))
        rows = await recorded.wait_for(10)
    finally:
        release.set()
    assert [(r.outcome, r.status, r.estimated) for r in rows] == [("ok", 200, False)] * 10
    assert sum(r.total_tokens for r in rows) == fake.reported.total == 10 * 11


async def test_hanging_up_before_the_final_frame_is_still_cancelled(proxy: Proxy, fake: FakeUpstream) -> None:
    """The other side of the rule: a client that leaves mid-stream did not get its answer."""
    gate = asyncio.Event()
    fake.behavior = Behavior(prompt_tokens=5, chunks=3, gate_before_last=gate)
    recorded = proxy.records()
    try:
        await _read_until(proxy.url + "/v1/chat/completions",
                          {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "x"}]},
                          b"w0")
        rows = await recorded.wait_for(1)
    finally:
        gate.set()
    assert rows[0].outcome == "cancelled" and rows[0].status == 499
