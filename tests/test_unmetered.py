"""No road to an upstream around the books: every request that would carry the operator's key is
metered, explicitly passed through, or refused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Proxy
from .fake_upstream import FakeUpstream

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hola"}]}
OLLAMA = {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "hola"}]}


@pytest.fixture
async def limited(raw_config: dict[str, Any]) -> AsyncIterator[Proxy]:
    raw_config["upstreams"]["gpt4o_cloud"]["limits"] = {"rpm": 3}
    proxy = Proxy(raw_config)
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.mark.parametrize("path", ["/v1/chat/completions/", "/v1/Chat/Completions", "/v1/CHAT/completions//",
                                  "/t/documento/v1/chat/completions/"])
async def test_spellings_of_the_chat_path_are_metered_and_limited(limited: Proxy, fake: FakeUpstream,
                                                                  path: str) -> None:
    recorded = limited.records()
    async with aiohttp.ClientSession() as s:
        statuses = []
        for _ in range(4):
            async with s.post(limited.url + path, json=CHAT) as r:
                statuses.append(r.status)
    assert statuses == [200, 200, 200, 429]
    rows = await recorded.wait_for(3)
    assert [r.endpoint for r in rows] == ["chat"] * 3 and sum(r.total_tokens for r in rows) == fake.reported.total
    assert limited.accounting.refused == {"rate_limited": 1}
    # The upstream saw the canonical path, three times.
    assert [seen.path for seen in fake.seen] == ["/chat/completions"] * 3


async def test_ollama_chat_with_a_trailing_slash_is_metered(proxy: Proxy, fake: FakeUpstream) -> None:
    recorded = proxy.records()
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/api/chat/", json=OLLAMA) as r:
            assert r.status == 200
    (row,) = await recorded.wait_for(1)
    assert row.endpoint == "chat" and row.upstream == "ollama_local" and row.total_tokens == fake.reported.total


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "GET"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
async def test_other_methods_on_a_metered_path_are_refused(proxy: Proxy, fake: FakeUpstream, method: str,
                                                          path: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, proxy.url + path, json=CHAT) as r:
            assert r.status == 405 and r.headers["Allow"] == "POST"
            body = await r.json()
    message = body["error"]["message"] if path.startswith("/v1") else body["error"]
    assert "POST" in message
    assert fake.seen == [] and fake.requests == 0


@pytest.mark.parametrize("method,path", [
    ("POST", "/v1/images/generations"), ("POST", "/v1/audio/speech"), ("POST", "/v1/audio/transcriptions"),
    ("POST", "/v1/batches"), ("POST", "/v1/files"), ("GET", "/v1/files"), ("POST", "/v1/moderations"),
    ("GET", "/v1/echo/anything"), ("POST", "/api/anything"),
])
async def test_unmetered_endpoints_are_refused_by_default(proxy: Proxy, fake: FakeUpstream, method: str,
                                                         path: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, proxy.url + path, json={"model": "gpt-4o", "prompt": "x"}) as r:
            assert r.status == 403
            body = await r.json()
        async with s.get(proxy.url + "/metrics") as r:
            families = {f.name: f for f in text_string_to_metric_families(await r.text())}
    message = body["error"]["message"] if path.startswith("/v1") else body["error"]
    assert "passthrough" in message and path in message
    assert fake.seen == [] and fake.requests == 0
    [sample] = [s for s in families["tollgate_refused_requests"].samples if s.name.endswith("_total")]
    assert sample.labels == {"reason": "endpoint_not_forwarded"} and sample.value == 1


async def test_ollamas_read_only_endpoints_pass_by_default(proxy: Proxy, fake: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as s:
        for path in ("/api/tags", "/api/version", "/api/ps"):
            async with s.get(proxy.url + path) as r:
                assert r.status == 200
        async with s.post(proxy.url + "/api/show", json={"model": "llama3.2"}) as r:
            assert r.status == 200


@pytest.mark.parametrize("path", ["/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete",
                                  "/api/blobs/sha256:abc"])
async def test_ollama_management_needs_the_admin_token_or_the_flag(raw_config: dict[str, Any], fake: FakeUpstream,
                                                                  monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    monkeypatch.setenv("TOLLGATE_TEST_ADMIN", "s3cret-admin")
    raw_config["server"]["admin_token_env"] = "TOLLGATE_TEST_ADMIN"
    body = {"model": "llama3.2"}
    for flag, token, expected in ((False, None, 403), (False, "wrong", 403), (False, "s3cret-admin", 200),
                                  (True, None, 200)):
        raw_config["upstreams"]["ollama_local"]["allow_management"] = flag
        proxy = Proxy(raw_config)
        await proxy.start()
        try:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with aiohttp.ClientSession() as s:
                async with s.post(proxy.url + path, json=body, headers=headers) as r:
                    assert r.status == expected, (flag, token)
                    if expected == 403:
                        assert "admin token" in (await r.json())["error"]
        finally:
            await proxy.stop()
    # Only the two allowed attempts reached Ollama, and never with a credential of ours.
    assert [seen.path for seen in fake.seen] == [path, path]
    assert all("Authorization" not in seen.headers for seen in fake.seen)


async def test_passthrough_is_a_choice_per_upstream(raw_config: dict[str, Any], fake: FakeUpstream) -> None:
    raw_config["upstreams"]["gpt4o_cloud"]["passthrough"] = ["/v1/files*"]
    proxy = Proxy(raw_config)
    await proxy.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/v1/files?purpose=batch") as r:
                assert r.status == 200
            async with s.get(proxy.url + "/v1/Files/") as r:
                assert r.status == 200
            async with s.post(proxy.url + "/v1/images/generations", json={}) as r:
                assert r.status == 403
    finally:
        await proxy.stop()
    assert [seen.path for seen in fake.seen] == ["/files", "/Files"]
    assert fake.seen[0].headers["Authorization"].startswith("Bearer ghp_")
