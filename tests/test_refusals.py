"""Refused calls don't flood the books: counted by reason, never a ledger row each, never an error
of the calls that reached (or should have reached) a model."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Proxy
from .fake_upstream import Behavior, FakeUpstream

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hola"}]}


async def test_a_flood_of_unauthenticated_and_refused_calls_leaves_no_rows(
        raw_config: dict[str, Any], fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TG_TEST_BOT_KEY", "bot-key-123")
    raw_config["keys"] = {"bot": {"key_env": "TG_TEST_BOT_KEY", "user": "raymundo"}}
    raw_config["upstreams"]["gpt4o_cloud"]["limits"] = {"rpm": 2}
    proxy = Proxy(raw_config)
    await proxy.start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as s:
            for _ in range(500):
                async with s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 401
            fake.by_model["openai/gpt-4o"] = Behavior(status=500)
            statuses = []
            for _ in range(5):
                async with s.post(proxy.url + "/v1/chat/completions", json=CHAT,
                                  headers={"Authorization": "Bearer bot-key-123"}) as r:
                    statuses.append(r.status)
            assert statuses == [500, 500, 429, 429, 429]
            async with s.get(proxy.url + "/stats", headers={"Authorization": "Bearer bot-key-123"}) as r:
                stats = await r.json()
            async with s.get(proxy.url + "/metrics") as r:
                refused = {x.labels["reason"]: x.value for f in text_string_to_metric_families(await r.text())
                           if f.name == "tollgate_refused_requests" for x in f.samples if x.name.endswith("_total")}
        await proxy.ledger.flush()
        rows = proxy.ledger.count()
    finally:
        await proxy.stop()
    assert rows == 2 and fake.requests == 2
    # The two calls the upstream failed are the errors; refusals are their own figures.
    assert (stats["total_requests"], stats["errores"], stats["tasa_exito"]) == (2, 2, "0.0%")
    assert stats["detail"]["refused"] == {"unauthorized": 500, "rate_limited": 3}
    assert refused == {"unauthorized": 500.0, "rate_limited": 3.0}
