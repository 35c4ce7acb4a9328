"""A stored answer replayed in whatever shape the caller asks (issue 13's replay, not yet in the
relay): answers taken from the fake upstream, whole and streamed, are served back by a small
loopback server in the other shape too, and the real openai and ollama clients read the same
text, the same end and the same usage as from the live upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import ollama
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.cache import replay as cache_replay
from proxy.cache.replay import Answer

from .fake_upstream import Behavior, FakeUpstream

MESSAGES = [{"role": "user", "content": "¿Cuál es el horario?"}]


async def raw(url: str, body: dict[str, Any]) -> bytes:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body) as r:
            assert r.status == 200
            return await r.read()


class Replayer:
    """Answers every call with the one stored answer, in the shape the call asks for."""

    def __init__(self) -> None:
        self.answer: Answer | None = None
        self.app = web.Application()
        for path in ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate"):
            self.app.router.add_post(path, self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.answer is not None
        body = await request.json()
        ollama_call = request.path.startswith("/api/")
        streamed = body.get("stream", ollama_call)
        if not streamed:
            return web.Response(body=cache_replay.json_body(self.answer), content_type="application/json")
        response = web.StreamResponse(headers={
            "Content-Type": "application/x-ndjson" if ollama_call else "text/event-stream"})
        await response.prepare(request)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        for frame in cache_replay.stream(self.answer, include_usage):
            await response.write(frame)
        await response.write_eof()
        return response


@pytest.fixture
async def replayer() -> AsyncIterator[tuple[Replayer, str]]:
    r = Replayer()
    server = TestServer(r.app, host="127.0.0.1")
    await server.start_server()
    yield r, str(server.make_url("")).rstrip("/")
    await server.close()


async def openai_reads(base: str, stream: bool) -> tuple[str, str | None, tuple[int, int] | None]:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    try:
        if not stream:
            done = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, temperature=0)  # type: ignore[arg-type]
            usage = done.usage
            return (done.choices[0].message.content or "", done.choices[0].finish_reason,
                    (usage.prompt_tokens, usage.completion_tokens) if usage else None)
        text, finish, counted = "", None, None
        chunks = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES,  # type: ignore[call-overload]
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
        async for chunk in chunks:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
            if chunk.usage:
                counted = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        return text, finish, counted
    finally:
        await client.close()


@pytest.mark.parametrize("stored_streamed", [False, True])
async def test_the_openai_client_reads_a_replay_as_it_reads_the_live_answer(
        fake: FakeUpstream, replayer: tuple[Replayer, str], stored_streamed: bool) -> None:
    r, url = replayer
    # The stored stream comes with real streams' awkward parts: mixed line endings, keep-alive
    # comments, id: and retry: fields.
    fake.behavior = Behavior(chunks=9, completion_per_chunk=3, prompt_tokens=23, line_ending="mixed", keepalive=True,
                             sse_fields=True)
    body = {"model": "gpt-4o", "messages": MESSAGES, "temperature": 0, "stream": stored_streamed,
            **({"stream_options": {"include_usage": True}} if stored_streamed else {})}
    r.answer = cache_replay.read("openai", "chat", await raw(fake.url + "/chat/completions", body),  # type: ignore[attr-defined]
                                 streamed=stored_streamed)
    assert r.answer is not None and r.answer.text
    fake.behavior = Behavior(chunks=9, completion_per_chunk=3, prompt_tokens=23)   # the live answers, plainly framed
    for stream in (False, True):
        live = await openai_reads(fake.url, stream)  # type: ignore[attr-defined]
        replayed = await openai_reads(url, stream)
        assert replayed == live, (stream, replayed, live)


async def ollama_reads(host: str, endpoint: str, stream: bool) -> tuple[str, str | None, tuple[int, int]]:
    client = ollama.AsyncClient(host=host)
    try:
        return await _ollama_reads(client, endpoint, stream)
    finally:
        await client.close()  # type: ignore[no-untyped-call]  # ollama's close() has no annotations


async def _ollama_reads(client: ollama.AsyncClient, endpoint: str, stream: bool) -> tuple[str, str | None, tuple[int, int]]:
    if endpoint == "chat":
        if not stream:
            done = await client.chat(model="llama3.2", messages=MESSAGES, options={"temperature": 0})
            return done.message.content or "", done.done_reason, (done.prompt_eval_count or 0, done.eval_count or 0)
        text, last = "", None
        async for part in await client.chat(model="llama3.2", messages=MESSAGES, stream=True,
                                            options={"temperature": 0}):
            text += part.message.content or ""
            last = part
        assert last is not None and last.done
        return text, last.done_reason, (last.prompt_eval_count or 0, last.eval_count or 0)
    if not stream:
        whole = await client.generate(model="llama3.2", prompt="¿Horario?", options={"temperature": 0})
        return whole.response or "", whole.done_reason, (whole.prompt_eval_count or 0, whole.eval_count or 0)
    text, final = "", None
    async for piece in await client.generate(model="llama3.2", prompt="¿Horario?", stream=True,
                                             options={"temperature": 0}):
        text += piece.response or ""
        final = piece
    assert final is not None and final.done
    return text, final.done_reason, (final.prompt_eval_count or 0, final.eval_count or 0)


@pytest.mark.parametrize("endpoint", ["chat", "generate"])
@pytest.mark.parametrize("stored_streamed", [False, True])
async def test_the_ollama_client_reads_a_replay_as_it_reads_the_live_answer(
        fake: FakeUpstream, replayer: tuple[Replayer, str], endpoint: str, stored_streamed: bool) -> None:
    r, url = replayer
    fake.behavior = Behavior(chunks=7, completion_per_chunk=2, prompt_tokens=11)
    body: dict[str, Any] = {"model": "llama3.2", "stream": stored_streamed, "options": {"temperature": 0}}
    body.update({"messages": MESSAGES} if endpoint == "chat" else {"prompt": "¿Horario?"})
    r.answer = cache_replay.read("ollama", endpoint, await raw(fake.url + f"/api/{endpoint}", body),  # type: ignore[attr-defined]
                                 streamed=stored_streamed)
    assert r.answer is not None and r.answer.text
    for stream in (False, True):
        assert await ollama_reads(url, endpoint, stream) == await ollama_reads(fake.url, endpoint, stream)  # type: ignore[attr-defined]


async def test_answers_a_cache_must_not_keep_read_as_none(fake: FakeUpstream) -> None:
    url = fake.url + "/chat/completions"  # type: ignore[attr-defined]
    cut_by_length = orjson.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o",
                                  "choices": [{"index": 0, "finish_reason": "length",
                                               "message": {"role": "assistant", "content": "w0 w1"}}],
                                  "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
    fake.behavior = Behavior(raw_body=cut_by_length)
    assert cache_replay.read("openai", "chat", await raw(url, {"model": "gpt-4o", "messages": MESSAGES}), False) is None
    fake.behavior = Behavior(chunks=4)
    whole = await raw(url, {"model": "gpt-4o", "messages": MESSAGES, "stream": True,
                            "stream_options": {"include_usage": True}})
    assert cache_replay.read("openai", "chat", whole, True) is not None
    cut = whole[:whole.index(b"data: [DONE]")]
    assert cache_replay.read("openai", "chat", cut, True) is None                # a stream that never ended
    assert cache_replay.read("openai", "chat", b"{not json", False) is None
