"""The OpenAI dialect through the proxy, driven by the real `openai` package."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from proxy import tokens

from .conftest import Proxy, settled
from .fake_upstream import Behavior, FakeUpstream


def sync_client(proxy: Proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="bot-key", max_retries=0)


@pytest.fixture
async def client(proxy: Proxy) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="bot-key", max_retries=0)
    yield c
    await c.close()


async def test_sync_chat_counts_reported_usage(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.behavior = Behavior(prompt_tokens=21, chunks=3, completion_per_chunk=4, cached_tokens=5)
    reply = await asyncio.to_thread(
        lambda: sync_client(proxy).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hola"}]))
    assert reply.choices[0].message.content == "w0 w1 w2 "
    assert reply.usage is not None and reply.usage.total_tokens == 33
    # The alias reached the upstream, with the upstream key and not the bot's.
    assert fake.seen[-1].body["model"] == "openai/gpt-4o"
    assert fake.seen[-1].headers["Authorization"] == "Bearer ghp_fakeCloudKey_0123456789abcdef"
    stats = await settled(proxy)
    assert stats["tokens"]["gpt4o_cloud"] == 33
    assert stats["detail"]["by_model"]["gpt-4o"]["cached_tokens"] == 5
    assert stats["detail"]["tokens"]["estimated"] == 0
    # 16 fresh input + 5 cached + 12 output, per 1K
    assert stats["costo_estimado_usd"] == f"${(16 * 0.03 + 5 * 0.015 + 12 * 0.06) / 1000:.4f}"


async def test_async_stream_without_include_usage_is_exactly_what_was_asked(
        proxy: Proxy, fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.behavior = Behavior(prompt_tokens=11, chunks=5, completion_per_chunk=1)
    stream = await client.chat.completions.create(
        model="gpt-4o", stream=True, messages=[{"role": "user", "content": "hola"}])
    chunks = [c async for c in stream]
    # The proxy asked the upstream for usage on the client's behalf...
    assert fake.seen[-1].body["stream_options"] == {"include_usage": True}
    # ...and the client got no usage chunk and no usage field: 5 words + the finish chunk.
    assert len(chunks) == 6
    assert all(c.choices for c in chunks)
    assert all("usage" not in c.model_dump(exclude_unset=True) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "w0 w1 w2 w3 w4 "
    stats = await settled(proxy)
    assert stats["tokens"]["gpt4o_cloud"] == 16
    assert stats["detail"]["tokens"]["estimated"] == 0


async def test_stream_with_include_usage_passes_usage_chunk(proxy: Proxy, fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.behavior = Behavior(prompt_tokens=9, chunks=2, completion_per_chunk=3)
    stream = await client.chat.completions.create(
        model="gpt-4o", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hola"}])
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 15
    assert (await settled(proxy))["tokens"]["total"] == 15


async def test_sync_stream(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.behavior = Behavior(prompt_tokens=4, chunks=3, completion_per_chunk=1)

    def run() -> str:
        stream = sync_client(proxy).chat.completions.create(
            model="gpt-4o", stream=True, messages=[{"role": "user", "content": "hola"}])
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert await asyncio.to_thread(run) == "w0 w1 w2 "
    assert (await settled(proxy))["tokens"]["gpt4o_cloud"] == 7


async def test_stream_is_relayed_before_upstream_finishes(proxy: Proxy, fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    gate = asyncio.Event()
    fake.behavior = Behavior(chunks=4, gate_before_last=gate)
    stream = await client.chat.completions.create(
        model="gpt-4o", stream=True, messages=[{"role": "user", "content": "hola"}])
    iterator = stream.__aiter__()
    first = await iterator.__anext__()
    # The client holds the first chunk while the upstream is still held before its last one.
    assert first.choices[0].delta.content == "w0 "
    assert not gate.is_set()
    gate.set()
    rest = [c async for c in iterator]
    assert "".join(c.choices[0].delta.content or "" for c in rest if c.choices) == "w1 w2 w3 "


async def test_upstream_ignoring_include_usage_is_estimated(proxy: Proxy, fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.behavior = Behavior(chunks=3, honor_include_usage=False)
    stream = await client.chat.completions.create(
        model="gpt-4o", stream=True, messages=[{"role": "user", "content": "hola, ¿qué tal?"}])
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "w0 w1 w2 "
    stats = await settled(proxy)
    # gpt-4o's o200k_base: the reply's tokens, and the prompt's with 3 tokens of framing for
    # the message and 3 priming the reply.
    enc = tokens.encoding("o200k_base")
    assert stats["detail"]["tokens"]["completion"] == len(enc.encode("w0 w1 w2 "))
    assert stats["detail"]["tokens"]["prompt"] == 6 + len(enc.encode("hola, ¿qué tal?"))
    assert stats["detail"]["tokens"]["estimated"] == stats["tokens"]["total"]
    assert stats["detail"]["tokens"]["estimated_calls"] == 1


async def test_completions_embeddings_and_responses(proxy: Proxy, fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.behavior = Behavior(prompt_tokens=10, chunks=2, completion_per_chunk=5)
    done = await client.completions.create(model="gpt-4o", prompt="hola")
    assert done.usage is not None and done.usage.total_tokens == 20
    stream = await client.completions.create(model="gpt-4o", prompt="hola", stream=True)
    assert [c async for c in stream]
    emb = await client.embeddings.create(model="gpt-4o", input=["a", "b"])
    assert len(emb.data) == 2
    resp = await client.responses.create(model="gpt-4o", input="hola")
    assert resp.output_text == "w0 w1 "
    events = [e async for e in await client.responses.create(model="gpt-4o", input="hola", stream=True)]
    assert events[-1].type == "response.completed"
    stats = await settled(proxy)
    # completion 20 + stream 20 + embeddings 10 + responses 20 + streamed responses 20
    assert stats["tokens"]["gpt4o_cloud"] == 90
    assert stats["detail"]["tokens"]["estimated"] == 0
    assert stats["total_requests"] == 5


async def test_models_lists_what_upstreams_serve(proxy: Proxy, client: openai.AsyncOpenAI) -> None:
    ids = {m.id async for m in client.models.list()}
    assert {"gpt-4o", "gpt-4o-mini", "llama3.2:latest", "qwen2.5:7b"} <= ids


async def test_paths_listed_under_passthrough_go_through_uncounted(raw_config: dict[str, Any], fake: FakeUpstream) -> None:
    raw_config["upstreams"]["gpt4o_cloud"]["passthrough"] = ["/v1/echo/*"]
    proxy = Proxy(raw_config)
    await proxy.start()
    try:
        await _passthrough_echo(proxy)
    finally:
        await proxy.stop()


async def _passthrough_echo(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/v1/echo/files?purpose=x", headers={"Authorization": "Bearer bot"}) as r:
            assert r.status == 200
            body = await r.json()
    assert body["path"] == "/echo/files" and body["query"] == "purpose=x"
    assert (await settled(proxy))["total_requests"] == 0
