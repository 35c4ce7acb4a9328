"""Only what the upstream needs goes up: request headers are an allow-list, not a deny-list."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from .conftest import CLOUD_KEY, Proxy
from .fake_upstream import FakeUpstream

HOSTILE = {"X-Goog-Api-Key": "goog-secret", "X-Auth-Token": "auth-secret", "X-Amz-Security-Token": "amz-secret",
           "Referer": "https://evil.example/page", "X-Real-IP": "10.9.9.9",
           "X-Forwarded-Host": "evil.example", "X-Forwarded-For": "10.9.9.9", "Forwarded": "for=10.9.9.9",
           "Cookie": "session=abc", "X-Api-Key": "client-secret", "Api-Key": "client-secret",
           "X-Custom": "named-in-connection", "Connection": "keep-alive, X-Custom, OpenAI-Beta",
           "X-Tollgate-User": "ana", "OpenAI-Beta": "assistants=v2", "X-Trace-Id": "t-1"}


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hola"}]}),
    ("/api/chat", {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "hola"}]}),
    ("/api/echo/tags", None),  # passed through, unmetered: the same allow-list
])
async def test_only_allowed_headers_reach_the_upstream(raw_config: dict[str, Any], fake: FakeUpstream,
                                                       path: str, body: Any) -> None:
    raw_config["upstreams"]["ollama_local"].update(forward_headers=["X-Trace-Id"], passthrough=["/api/echo/*"])
    proxy = Proxy(raw_config)
    await proxy.start()
    try:
        async with aiohttp.ClientSession() as s:
            headers = {**HOSTILE, "Authorization": "Bearer client-key", "User-Agent": "bot/1.0",
                       "X-Stainless-Lang": "python"}
            method = s.post(proxy.url + path, json=body, headers=headers) if body else \
                s.get(proxy.url + path, headers=headers)
            async with method as r:
                assert r.status == 200
    finally:
        await proxy.stop()
    assert fake.seen and fake.seen[-1].path.endswith(path.rsplit("/", 1)[-1])
    sent = {k.lower(): v for k, v in fake.seen[-1].headers.items()}
    assert sent["user-agent"] == "bot/1.0" and sent["x-stainless-lang"] == "python"
    for name in HOSTILE:
        if name.lower() == "x-trace-id" and path.startswith("/api/"):
            assert sent["x-trace-id"] == "t-1"  # this upstream's forward_headers
            continue
        assert name.lower() not in sent, name
    # OpenAI-Beta is allowed, but this client named it hop-by-hop in Connection.
    expected_auth = f"Bearer {CLOUD_KEY}" if path.startswith("/v1/") else None
    assert sent.get("authorization") == expected_auth


async def test_the_openai_sdks_own_headers_still_go_up(proxy: Proxy, fake: FakeUpstream) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="bot", max_retries=0,
                                default_headers={"OpenAI-Beta": "assistants=v2"})
    await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hola"}])
    await client.close()
    sent = {k.lower(): v for k, v in fake.seen[-1].headers.items()}
    assert sent["openai-beta"] == "assistants=v2" and sent["user-agent"].startswith("AsyncOpenAI/Python")
    assert sent["x-stainless-lang"] == "python" and sent["content-type"] == "application/json"


def test_credentials_cannot_be_listed_to_forward(raw_config: dict[str, Any]) -> None:
    from proxy import config as config_mod

    raw_config["upstreams"]["gpt4o_cloud"]["forward_headers"] = ["Authorization"]
    with pytest.raises(config_mod.ConfigError, match="forward_headers"):
        config_mod.parse(raw_config)
