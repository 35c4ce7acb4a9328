"""The Ollama dialect through the proxy, driven by the real `ollama` package."""

from __future__ import annotations


from collections.abc import AsyncIterator

import aiohttp
import pytest
import ollama

from proxy import tokens

from .conftest import Proxy, settled
from .fake_upstream import Behavior, FakeUpstream


@pytest.fixture
async def oc(proxy: Proxy) -> AsyncIterator[ollama.AsyncClient]:
    c = ollama.AsyncClient(host=proxy.url)
    yield c
    await c.close()  # type: ignore[no-untyped-call]  # ollama's close() has no annotations


async def test_chat_streaming_by_default_and_single_object(proxy: Proxy, fake: FakeUpstream, oc: ollama.AsyncClient) -> None:
    fake.behavior = Behavior(prompt_tokens=12, chunks=3, completion_per_chunk=2)
    c = oc
    parts = [p async for p in await c.chat(model="llama3.2", stream=True,
                                             messages=[{"role": "user", "content": "hola"}])]
    assert "".join(p.message.content or "" for p in parts) == "w0 w1 w2 "
    assert parts[-1].done and parts[-1].eval_count == 6
    whole = await c.chat(model="llama3.2", messages=[{"role": "user", "content": "hola"}])
    assert whole.message.content == "w0 w1 w2 " and whole.prompt_eval_count == 12
    # The raw default (no "stream" key) streams NDJSON, as Ollama does.
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/api/chat", json={"model": "llama3.2", "messages": []}) as r:
            assert r.content_type == "application/x-ndjson"
            assert len((await r.read()).splitlines()) == 4
    stats = await settled(proxy)
    assert stats["tokens"]["ollama_local"] == 3 * 18
    assert stats["detail"]["by_upstream"]["ollama_local"]["cost_usd"] == 0
    assert stats["detail"]["tokens"]["estimated"] == 0


async def test_generate_and_embed(proxy: Proxy, fake: FakeUpstream, oc: ollama.AsyncClient) -> None:
    fake.behavior = Behavior(prompt_tokens=5, chunks=2, completion_per_chunk=1)
    c = oc
    assert (await c.generate(model="qwen2.5:7b", prompt="hola")).response == "w0 w1 "
    parts = [p async for p in await c.generate(model="qwen2.5:7b", prompt="hola", stream=True)]
    assert parts[-1].done
    emb = await c.embed(model="qwen2.5:7b", input=["uno", "dos"])
    assert len(emb.embeddings) == 2
    stats = await settled(proxy)
    assert stats["tokens"]["ollama_local"] == 7 + 7 + 5
    assert stats["requests_por_tipo"]["chat"] == 3


async def test_legacy_embeddings_are_estimated(proxy: Proxy, fake: FakeUpstream, oc: ollama.AsyncClient) -> None:
    c = oc
    reply = await c.embeddings(model="llama3.2", prompt="texto para incrustar")
    assert list(reply.embedding) == [0.1, 0.2, 0.3]
    stats = await settled(proxy)
    enc = tokens.encoding("cl100k_base")  # tiktoken knows no Llama: cl100k
    assert stats["tokens"]["ollama_local"] == len(enc.encode("texto para incrustar"))
    assert stats["detail"]["tokens"]["estimated_calls"] == 1


async def test_missing_prompt_eval_count_is_estimated(proxy: Proxy, fake: FakeUpstream, oc: ollama.AsyncClient) -> None:
    fake.behavior = Behavior(chunks=2, completion_per_chunk=3, omit_prompt_eval_count=True)
    await oc.generate(model="llama3.2", prompt="hola mundo")
    stats = await settled(proxy)
    enc = tokens.encoding("cl100k_base")  # tiktoken knows no Llama: cl100k
    assert stats["detail"]["tokens"]["completion"] == 6
    assert stats["detail"]["tokens"]["prompt"] == len(enc.encode("hola mundo"))
    assert stats["detail"]["tokens"]["estimated_calls"] == 1


async def test_error_line_inside_stream_is_relayed_and_counted(proxy: Proxy, fake: FakeUpstream, oc: ollama.AsyncClient) -> None:
    fake.behavior = Behavior(chunks=4, error_after_chunks=2)
    c = oc
    received = []
    try:
        async for part in await c.chat(model="llama3.2", stream=True,
                                       messages=[{"role": "user", "content": "hola"}]):
            received.append(part.message.content)
        raise AssertionError("the error line should reach the client")
    except ollama.ResponseError as exc:
        assert "fake failure mid-stream" in str(exc)
    assert received == ["w0 ", "w1 "]
    stats = await settled(proxy)
    assert stats["errores"] == 1
    assert stats["detail"]["errors_by_kind"]["stream_error"] == 1


async def test_non_llm_paths_pass_through_uncounted(proxy: Proxy, oc: ollama.AsyncClient) -> None:
    c = oc
    names = {m.model for m in (await c.list()).models}
    assert names == {"llama3.2:latest", "qwen2.5:7b"}
    assert (await c.ps()).models == []
    assert (await c.show("llama3.2")).details is not None
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/api/version") as r:
            assert (await r.json()) == {"version": "0.5.7"}
    assert (await settled(proxy))["total_requests"] == 0


async def test_ollama_upstream_serves_openai_dialect(proxy: Proxy, fake: FakeUpstream) -> None:
    """An ollama upstream receives /v1 calls on its own OpenAI-compatible /v1 endpoint."""
    import openai

    fake.behavior = Behavior(prompt_tokens=3, chunks=1, completion_per_chunk=2)
    oc = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    await oc.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "hola"}])
    assert fake.seen[-1].path == "/v1/chat/completions"
    assert "Authorization" not in fake.seen[-1].headers
    assert (await settled(proxy))["tokens"]["ollama_local"] == 5
    await oc.close()
