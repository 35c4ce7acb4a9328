"""Failures become the dialect's error shape, are counted, and land in the ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest


from .conftest import Proxy, settled
from .fake_upstream import Behavior, FakeUpstream


async def post(url: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        kwargs: dict[str, Any] = {"data": raw, "headers": {"Content-Type": "application/json"}} \
            if raw is not None else {"json": body}
        async with s.post(url, **kwargs) as r:
            return r.status, await r.json(content_type=None)


@pytest.fixture
async def dead_proxy(raw_config: dict[str, Any], refused_port: int) -> AsyncIterator[Proxy]:
    for upstream in raw_config["upstreams"].values():
        upstream["base_url"] = f"http://127.0.0.1:{refused_port}"
    p = Proxy(raw_config)
    await p.start()
    yield p
    await p.stop()


async def test_unreachable_is_502_in_both_dialects(dead_proxy: Proxy) -> None:
    status, body = await post(dead_proxy.url + "/v1/chat/completions",
                              {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    assert status == 502
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "gpt4o_cloud" in body["error"]["message"] and "unreachable" in body["error"]["message"]
    status, body = await post(dead_proxy.url + "/api/chat", {"model": "llama3", "messages": []})
    assert status == 502 and isinstance(body["error"], str)
    stats = await settled(dead_proxy)
    assert stats["errores"] == 2 and stats["detail"]["errors_by_kind"]["unreachable"] == 2
    assert stats["tasa_exito"] == "0.0%"
    await dead_proxy.ledger.flush()
    rows = list(dead_proxy.ledger.rows())
    assert [(r.outcome, r.status, r.total_tokens) for r in rows] == [("unreachable", 502, 0)] * 2


async def test_timeout_before_headers_is_504(proxy: Proxy, fake: FakeUpstream, raw_config: dict[str, Any]) -> None:
    raw_config["upstreams"]["gpt4o_cloud"]["read_timeout_s"] = 0.3
    await proxy.restart()
    fake.behavior = Behavior(stall_before_headers=True)
    status, body = await post(proxy.url + "/v1/chat/completions", {"model": "gpt-4o", "messages": []})
    assert status == 504 and body["error"]["type"] == "timeout"
    stats = await settled(proxy)
    assert stats["detail"]["errors_by_kind"]["timeout"] == 1


async def test_stalled_stream_ends_with_error_event(proxy: Proxy, fake: FakeUpstream, raw_config: dict[str, Any]) -> None:
    raw_config["upstreams"]["gpt4o_cloud"]["read_timeout_s"] = 0.3
    await proxy.restart()
    fake.behavior = Behavior(chunks=4, stall_after_chunks=2, honor_include_usage=False)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    got: list[str] = []
    with pytest.raises(openai.APIError, match="stalled"):
        async for chunk in await client.chat.completions.create(
                model="gpt-4o", stream=True, messages=[{"role": "user", "content": "hola"}]):
            got.append(chunk.choices[0].delta.content or "")
    await client.close()
    assert got == ["w0 ", "w1 "]
    stats = await settled(proxy)
    assert stats["detail"]["errors_by_kind"]["timeout"] == 1
    # What had been generated is estimated, not lost.
    assert stats["detail"]["tokens"]["completion"] > 0
    assert stats["detail"]["tokens"]["estimated_calls"] == 1


async def test_stream_cut_midway_is_broken_stream(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.behavior = Behavior(chunks=4, drop_after_chunks=2)
    seen = proxy.records()
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/api/chat", json={"model": "llama3", "messages": []}) as r:
            lines = (await r.read()).splitlines()
    assert b'"error"' in lines[-1] and len(lines) == 3
    rec = (await seen.wait_for(1))[0]
    assert rec.outcome == "broken_stream" and rec.estimated and rec.completion_tokens > 0


async def test_upstream_error_status_passes_through(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.behavior = Behavior(status=503, retry_after="7")
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": []}) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "7"
            assert (await r.json())["error"]["message"] == "fake upstream error 503"
        async with s.post(proxy.url + "/api/generate", json={"model": "llama3", "prompt": "x"}) as r:
            assert r.status == 503 and (await r.json()) == {"error": "fake upstream error 503"}
    stats = await settled(proxy)
    assert stats["detail"]["errors_by_kind"]["upstream_status"] == 2
    assert stats["tokens"]["total"] == 0


@pytest.mark.parametrize("raw, message", [
    (b"{not json", "not valid JSON"),
    (b"", "empty"),
    (b"[1, 2]", "JSON object"),
    (b'{"model": 5}', "'model' must be a string"),
    (b'{"messages": []}', "needs a 'model'"),
])
async def test_bad_bodies_are_400(proxy: Proxy, raw: bytes, message: str) -> None:
    status, body = await post(proxy.url + "/v1/chat/completions", raw=raw)
    assert status == 400 and message in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    stats = await settled(proxy)
    assert stats["detail"]["errors_by_kind"]["bad_request"] == 1 and stats["total_requests"] == 1


async def test_bad_body_in_ollama_dialect(proxy: Proxy) -> None:
    status, body = await post(proxy.url + "/api/chat", raw=b"{oops")
    assert status == 400 and isinstance(body["error"], str) and "JSON" in body["error"]


async def test_oversized_body_is_413(proxy: Proxy, fake: FakeUpstream) -> None:
    huge = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 70_000}]}
    status, body = await post(proxy.url + "/v1/chat/completions", huge)
    assert status == 413 and "65,536" in body["error"]["message"]
    assert fake.seen == []
    stats = await settled(proxy)
    assert stats["detail"]["errors_by_kind"]["too_large"] == 1


async def test_unknown_model_is_404(proxy: Proxy, fake: FakeUpstream) -> None:
    status, body = await post(proxy.url + "/v1/chat/completions", {"model": "claude-3", "messages": []})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert "claude-3" in body["error"]["message"] and fake.seen == []


async def test_encoded_dot_segments_are_refused(proxy: Proxy, fake: FakeUpstream) -> None:
    from yarl import URL

    async with aiohttp.ClientSession() as s:
        for path in ("/v1/x/%2e%2e/%2e%2e/secret", "/api/%2E%2E/etc", "/v1/a//b"):
            async with s.get(URL(proxy.url + path, encoded=True)) as r:
                assert r.status == 400, path
                assert "not allowed" in (await r.text())
    assert fake.seen == []


async def test_client_disconnect_mid_stream_is_cancelled_and_estimated(proxy: Proxy, fake: FakeUpstream) -> None:
    fake.behavior = Behavior(chunks=6, stall_after_chunks=3)
    seen = proxy.records()
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions",
                          json={"model": "gpt-4o", "stream": True,
                                "messages": [{"role": "user", "content": "hola"}]}) as r:
            first = await r.content.readline()
            assert first.startswith(b"data: ")
        # leaving the block closes the connection while the upstream is stalled
    rec = (await seen.wait_for(1))[0]
    assert rec.outcome == "cancelled" and rec.estimated and rec.completion_tokens > 0
    stats = await settled(proxy)
    assert stats["detail"]["errors_by_kind"]["cancelled"] == 1
